"""The bridge as a subprocess, and reading what it publishes with `mosquitto_sub`.

`BridgeHandle` runs `dispatch-bridge run` against an API server and a broker; `MqttTap`
records every message a `mosquitto_sub` sees (with its retain flag); `retained_snapshot`
reads what the broker holds under a filter.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from actor_sdk import wire
from testkit.api_server import ApiServerHandle, dispatch_bridge_command
from testkit.broker import Broker
from testkit.processes import ManagedProcess, ProcessFactory, wait_until

T = TypeVar("T")

MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"


@dataclass(frozen=True)
class Received:
    """One message a tap received."""

    at: float
    """Receive time, unix seconds (mosquitto_sub's clock, `%U`)."""
    retain: bool
    topic: str
    payload: bytes


class MqttTap:
    """A live `mosquitto_sub -F '%U %r %t %p'` on one filter, recording every message."""

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process

    def messages(self) -> list[Received]:
        """Every message received so far, in order."""
        found: list[Received] = []
        for line in self.process.output().splitlines():
            if line.startswith("=====") or not line.strip():
                continue
            parts = line.split(" ", 3)
            if len(parts) < 3:
                continue
            try:
                at = float(parts[0])
            except ValueError:
                continue
            payload = parts[3] if len(parts) == 4 else ""
            found.append(Received(at, parts[1] == "1", parts[2], payload.encode()))
        return found

    def on(self, topic: str) -> list[Received]:
        """The messages received on one topic."""
        return [m for m in self.messages() if m.topic == topic]

    def latest(self, topic: str) -> bytes | None:
        """The last payload seen on a topic (b"": cleared), None: never seen."""
        seen = self.on(topic)
        return seen[-1].payload if seen else None

    def wait_for(
        self,
        predicate: Callable[[list[Received]], T | None],
        timeout: float = 10.0,
        what: str = "a message",
    ) -> T:
        """Wait until `predicate(messages)` is truthy; return its value."""

        def probe() -> T | None:
            self.process.check_alive()
            return predicate(self.messages())

        return wait_until(probe, timeout, what, interval=0.02)

    def wait_latest(
        self, topic: str, check: Callable[[bytes], bool], timeout: float = 10.0
    ) -> bytes:
        """Wait until the latest payload of `topic` passes `check`; return it."""

        def probe(messages: list[Received]) -> bytes | None:
            seen = [m for m in messages if m.topic == topic]
            if seen and check(seen[-1].payload):
                return seen[-1].payload or b" "
            return None

        return self.wait_for(probe, timeout, f"the expected payload on {topic}")


def retained_snapshot(broker: Broker, topic_filter: str, wait: float = 1.0) -> dict[str, bytes]:
    """Every retained message under `topic_filter` now, as a fresh `mosquitto_sub` sees it.

    Args:
        broker: The broker (read as `admin`).
        topic_filter: The subscription filter.
        wait: How long to collect, in seconds (retained messages arrive at once).
    """
    result = subprocess.run(
        [
            MOSQUITTO_SUB,
            *broker.cli_args("admin"),
            "-t",
            topic_filter,
            "-F",
            "%r %t %p",
            "-W",
            str(max(1, round(wait))),
            # Not --retained-only: it exits at the first live message. Live messages
            # carry retain 0 and are skipped below.
        ],
        capture_output=True,
        timeout=wait + 15,
        check=False,
    )
    found: dict[str, bytes] = {}
    for line in result.stdout.decode().splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] == "1":
            found[parts[1]] = (parts[2] if len(parts) == 3 else "").encode()
    return found


class BridgeHandle:
    """One `dispatch-bridge run` subprocess."""

    def __init__(
        self,
        factory: ProcessFactory,
        *,
        api: ApiServerHandle,
        broker: Broker,
        state_dir: Path,
        microgrid_ids: Sequence[int],
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
        name: str = "test-bridge",
    ) -> None:
        self.api = api
        self.broker = broker
        self.state_dir = state_dir
        self.microgrid_ids = tuple(microgrid_ids)
        self.name = name
        env = {
            "MICROGRID_ID": ",".join(map(str, self.microgrid_ids)),
            "DISPATCH_API_URL": api.url,
            "DISPATCH_API_AUTH_KEY": api.key or "no-key",
            "DISPATCH_API_SIGN_SECRET": api.secret or "",
            "MQTT_URL": f"mqtt://{broker.host}:{broker.port}",
            "MQTT_USERNAME": broker.username("bridge") or "",
            "MQTT_PASSWORD": broker.bridge_password or "",
            "DISPATCH_BRIDGE_STATE_DIR": str(state_dir),
            "DISPATCH_BRIDGE_NAME": name,
            # Tests restart servers: reconnect within seconds, not the default 30 s.
            "DISPATCH_BRIDGE_RETRY_MAX": "1",
        }
        env.update(extra_env or {})
        self.process = factory(
            [*dispatch_bridge_command(), "--log-level", "DEBUG", "run", *extra_args],
            name="bridge",
            extra_env=env,
            start=False,
        )

    def layout(self, microgrid_id: int | None = None) -> wire.TopicLayout:
        """The topic layout of a microgrid (default: the first one served)."""
        return wire.TopicLayout.for_microgrid(microgrid_id or self.microgrid_ids[0])

    def start(self, *, wait_online: bool = True, timeout: float = 20.0) -> None:
        """Start the bridge; by default wait until it says it is connected to the broker."""
        before = self.process.output().count("connected to MQTT broker")
        self.process.start()
        if wait_online:
            wait_until(
                self.process.alive_and(
                    lambda: (
                        self.process.output().count("connected to MQTT broker")
                        >= before + len(self.microgrid_ids)
                    )
                ),
                timeout,
                "the bridge to connect to the broker",
            )

    def wait_synced(self, count: int = 1, timeout: float = 20.0) -> None:
        """Wait until the bridge logged `count` syncs with the Dispatch API in total."""
        wait_until(
            self.process.alive_and(
                lambda: self.process.output().count(" dispatches from the Dispatch API (") >= count
            ),
            timeout,
            f"{count} syncs with the Dispatch API",
        )

    def wait_vouching(self, timeout: float = 20.0) -> None:
        """Wait until this run of the bridge says `online` in every microgrid's status.

        The bridge says so only after its first sync and the read-back of the broker's
        tree; until then its status says `syncing`. A retained `online` made before this
        run started (a previous run's, which the broker still holds while the new one
        cannot reach it) does not count.
        """
        started_at = self.process.started_at or 0.0

        def vouching(microgrid_id: int) -> bool:
            topic = self.layout(microgrid_id).status
            payload = retained_snapshot(self.broker, topic).get(topic)
            if not payload:
                return False
            try:
                status = wire.decode_status(payload)
            except wire.WireError:
                return False
            made = status.as_of.timestamp() if status.as_of is not None else 0.0
            return status.state == "online" and made >= started_at

        wait_until(
            self.process.alive_and(lambda: all(map(vouching, self.microgrid_ids))),
            timeout,
            "this run of the bridge to say online in its retained status",
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM; return the exit code."""
        return self.process.stop(timeout)

    def kill9(self) -> None:
        """SIGKILL, as a crash."""
        self.process.kill9()

    def output(self) -> str:
        """The bridge's log so far."""
        return self.process.output()


BridgeFactory = Callable[..., BridgeHandle]

TapFactory = Callable[[Broker, str], MqttTap]
