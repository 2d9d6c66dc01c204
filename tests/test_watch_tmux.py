"""`dispatch-bridge watch` used as a person would: in a terminal (tmux), keys typed, screen read.

Each test runs the real command in its own tmux server against a real
Mosquitto (and a real bridge and API server where the test needs them), sends
keys with `tmux send-keys` and awaits what the screen shows with
`tmux capture-pane` and a deadline.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import msgspec
import pytest
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import Dispatcher, wire
from bridge.api import create_dispatch
from testkit.api_server import ApiServerHandle, dispatch_bridge_command, run_dispatch_cli
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from testkit.processes import wait_until
from tests.fixtures.sdk import ActorLog

LAYOUT = wire.TopicLayout.for_microgrid(1)


class Terminal:
    """One command in a detached tmux session of its own tmux server."""

    def __init__(self, command: list[str], directory: Path, width: int = 150, height: int = 48):
        # The server's socket in the test's directory: nothing is left in /tmp/tmux-*.
        self.socket = str(directory / f"tmux-{uuid.uuid4().hex[:8]}.sock")
        config = directory / "tmux.conf"
        # Keep the pane once the command exits, to read its last screen.
        config.write_text("set -g remain-on-exit on\n")
        # COLUMNS and LINES (set in the test process) would override the pane's size;
        # the shell prints the exit code (tmux's #{pane_dead_status} is not reliable).
        unset = ["env", "-u", "COLUMNS", "-u", "LINES"]
        # The command waits for a first Enter, sent once the session exists: what a
        # command printed while tmux was still setting up the pane was lost now and
        # then (a refusal printed within 0.1 s of the start, then a blank screen).
        script = f'read -r _; {shlex.join([*unset, *command])}; echo "[exited $?]"'
        self._tmux(
            "-f", str(config), "new-session", "-d", "-s", "watch",
            "-x", str(width), "-y", str(height), shlex.join(["sh", "-c", script]),
        )  # fmt: skip
        self._tmux("send-keys", "-t", "watch", "Enter")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.socket, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout

    def screen(self) -> str:
        """What the terminal shows now."""
        return self._tmux("capture-pane", "-p", "-t", "watch")

    def keys(self, *keys: str) -> None:
        """Type keys (tmux key names: `Enter`, `Down`, `Escape`, or text)."""
        self._tmux("send-keys", "-t", "watch", *keys)

    def type(self, text: str) -> None:
        """Type text literally."""
        self._tmux("send-keys", "-t", "watch", "-l", text)

    def exit_status(self) -> int | None:
        """The command's exit code once it has ended (the shell prints it), else None."""
        match = re.search(r"^\[exited (\d+)\]$", self.screen(), re.MULTILINE)
        return None if match is None else int(match[1])

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        """Poll the screen until `check` accepts it; return that screen."""
        screens: list[str] = []

        def probe() -> str | None:
            screens.append(self.screen())
            return screens[-1] if check(screens[-1]) else None

        try:
            return wait_until(probe, timeout, what, interval=0.1)
        except TimeoutError as error:
            raise AssertionError(
                f"{error}; the screen:\n{screens[-1] if screens else ''}"
            ) from None

    def wait_text(self, text: str, timeout: float = 30.0) -> str:
        """Wait until the screen shows `text`."""
        return self.wait_for(lambda screen: text in screen, repr(text), timeout)

    def close(self) -> None:
        """End the tmux server of this terminal (and the command in it)."""
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[[list[str]], Terminal]]:
    """Start commands in terminals; close them all at the end."""
    started: list[Terminal] = []

    def start(command: list[str]) -> Terminal:
        started.append(Terminal(command, tmp_path))
        return started[-1]

    yield start
    for each in started:
        each.close()


def watch_command(broker: Broker) -> list[str]:
    return [
        *dispatch_bridge_command(),
        "watch",
        "--broker",
        broker.url("actor"),
        "--microgrid-id",
        "1",
    ]


def running_line(screen: str, dispatch_id: int) -> str:
    """The line of a dispatch in the "Running now" table ("" when it is not there)."""
    running = screen.split("Running now", 1)[-1].split("Dispatches:", 1)[0]
    return next((ln for ln in running.splitlines() if f" #{dispatch_id} " in ln), "")


@pytest.mark.slow
async def test_a_dispatch_made_with_dispatch_cli_shows_filters_selects_and_a_killed_bridge_shows(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    terminal: Callable[[list[str]], Terminal],
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    async with api_server.client() as client:
        other = await create_dispatch(
            client,
            microgrid_id=1,
            type="OTHER_TYPE",
            start_time=now - timedelta(minutes=1),
            duration=timedelta(minutes=30),
            target=TargetIds(3),
        )
        first = await create_dispatch(
            client,
            microgrid_id=1,
            type="WATCH_TEST",
            start_time=now + timedelta(hours=1),
            duration=timedelta(minutes=5),
            target=TargetIds(4),
            payload={"first": True},
        )
    bridge = bridge_factory(api_server, mqtt_broker)
    bridge.wait_synced()
    term = terminal(watch_command(mqtt_broker))
    screen = term.wait_text("bridge LIVE")

    # The running dispatch is listed with its time left; no actor runs it: flagged.
    screen = term.wait_for(
        lambda s: "no actor reports it" in running_line(s, int(other.id)),
        "the running dispatch flagged",
    )
    assert re.search(r"until \d\d:\d\d:\d\dZ, 2\dm\d\ds left", running_line(screen, int(other.id)))

    # A real SDK actor runs it: its id shows beside the dispatch; stopped, the flag is back.
    async with Dispatcher(
        microgrid_id=1, broker=mqtt_broker.url("actor"), actor_id="watch-actor"
    ) as dispatcher:
        await dispatcher.start_managing("OTHER_TYPE", actor_factory=ActorLog().factory)
        await asyncio.to_thread(
            term.wait_for,
            lambda s: "watch-actor" in running_line(s, int(other.id)),
            "the actor beside the dispatch",
        )
    await asyncio.to_thread(
        term.wait_for,
        lambda s: "no actor reports it" in running_line(s, int(other.id)),
        "the flag once the actor stopped",
    )

    code, output = await run_dispatch_cli(
        api_server,
        "create", "1", "WATCH_TEST", "7,8", "in 2 hours", "10 minutes",
        "--payload", '{"power_w": 1234}',
    )  # fmt: skip
    assert code == 0, output
    match = re.search(r"ID:\s+DID(\d+)", output)
    assert match is not None, output
    created = int(match[1])
    term.wait_for(lambda s: f"#{created}" in s and "Dispatches: 3" in s, "the new dispatch")

    # Filter on its type: the other type's dispatch is gone from every list.
    term.keys("/")
    # In the filter, letters are text: the footer no longer offers `q quit`.
    term.wait_for(lambda s: "q quit" not in s, "the filter to take the keys")
    term.type("watch_t")
    term.wait_text("watch_t")
    term.keys("Enter")
    # Back in the list: the footer offers `q quit` again.
    # The whole filtered screen: the count can be redrawn before the timeline pane
    # (a fresh-clone CI caught the old timeline beside the new count).
    screen = term.wait_for(
        lambda s: "Dispatches: 2" in s and "q quit" in s and "OTHER_TYPE" not in s,
        "the filtered list",
    )
    assert f"#{int(other.id)}" not in screen and "OTHER_TYPE" not in screen

    # Select the second row: its details show its payload, target and recurrence.
    term.keys("Down")
    screen = term.wait_text(f"#{created} WATCH_TEST (active)")
    assert '"power_w": 1234' in screen
    assert "target:     ids 7,8" in screen
    assert "recurrence: once (no recurrence)" in screen
    assert '"first"' not in screen
    assert f"#{int(first.id)} " in screen

    # The bridge killed: the broker publishes its will at once.
    bridge.kill9()
    term.wait_text("bridge OFFLINE: the bridge stopped or its will fired")

    term.keys("q")
    wait_until(lambda: term.exit_status() is not None, 10, "watch to exit")
    assert term.exit_status() == 0, term.screen()


async def publish(broker: Broker, topic: str, payload: bytes) -> None:
    """Publish a retained message as the broker's admin (bridge and actor topics alike)."""
    async with aiomqtt.Client(**broker.client_kwargs()) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def test_a_retained_online_waits_for_a_live_status_and_actors_show_what_they_run(
    mqtt_broker: Broker, terminal: Callable[[list[str]], Terminal]
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    dispatch = wire.Dispatch(
        id=11,
        type="PV_LIMIT",
        start_time=now - timedelta(minutes=1),
        duration=600,
        target=wire.Target(ids=(7,)),
        active=True,
        dry_run=False,
        payload={},
        create_time=now,
        update_time=now,
        end_time=None,
        running=True,
        until=now + timedelta(minutes=9),
        next_run=None,
    )
    snapshot = wire.RunningSnapshot(
        microgrid_id=1,
        type="PV_LIMIT",
        running=(dispatch,),
        next_change=dispatch.until,
        as_of=now,
        session=1,
        seq=1,
    )

    def status(state: str) -> bytes:
        return wire.encode(
            wire.BridgeStatus(
                state=state,  # type: ignore[arg-type]
                upstream="connected",
                synced_at=now,
                session=1,
                bridge="edge",
                version="0.1.0",
                dispatches=1,
                status_interval=30,
            )
        )

    actor = wire.ActorStatus(
        state="running",
        types={"PV_LIMIT": wire.ActorTypeStatus(state="running", dispatches=(11,))},
        since=now,
        as_of=now,
        host="inverter-host",
        error=None,
        version="0.1.0",
    )
    await publish(mqtt_broker, LAYOUT.status, status("online"))
    await publish(mqtt_broker, LAYOUT.running("PV_LIMIT"), wire.encode(snapshot))
    await publish(mqtt_broker, LAYOUT.dispatch("PV_LIMIT", 11), wire.encode(dispatch))
    await publish(mqtt_broker, wire.actor_status_topic(1, "pv-actor"), wire.encode(actor))
    other = msgspec.structs.replace(dispatch, id=12, type="ZZ_OTHER", running=False, until=None)
    await publish(mqtt_broker, LAYOUT.dispatch("ZZ_OTHER", 12), wire.encode(other))

    term = terminal(watch_command(mqtt_broker))

    screen = term.wait_text("online? (retained only: waiting for a live status)")
    screen = term.wait_for(lambda s: "pv-actor" in running_line(s, 11), "the actor running #11")
    assert "inverter-host" in screen and "PV_LIMIT: #11" in screen

    # `t` filters on the first type, Esc shows every type again.
    term.wait_text("Dispatches: 2")
    term.keys("t")
    screen = term.wait_text("Dispatches: 1")
    assert "ZZ_OTHER" not in screen and "#11 PV_LIMIT (active)" in screen
    term.keys("Escape")
    term.wait_for(lambda s: "Dispatches: 2" in s and "ZZ_OTHER" in s, "every type again")

    await publish(mqtt_broker, LAYOUT.status, status("online"))
    term.wait_text("bridge LIVE")
    await publish(mqtt_broker, LAYOUT.status, status("offline"))
    term.wait_text("OFFLINE: the bridge stopped or its will fired")

    # The broker gone: the last known state stays on screen while it retries.
    mqtt_broker.stop()
    screen = term.wait_text("DISCONNECTED, retrying in ")
    assert "last known state shown" in screen
    assert "pv-actor" in running_line(screen, 11)


def test_without_a_terminal_the_live_view_says_to_use_once(mqtt_broker: Broker) -> None:
    result = subprocess.run(
        watch_command(mqtt_broker),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )

    assert result.returncode == 2
    assert "needs a terminal; use --once" in result.stderr


def test_refused_credentials_end_the_view_with_exit_code_1_and_say_why(
    mqtt_broker: Broker, terminal: Callable[[list[str]], Terminal]
) -> None:
    mqtt_broker.require_acl()
    url = f"mqtt://actor:wrong-password@{mqtt_broker.host}:{mqtt_broker.port}"
    command = [*dispatch_bridge_command(), "watch", "--broker", url, "--microgrid-id", "1"]

    term = terminal(command)

    screen = term.wait_text("[exited 1]")
    assert "cannot connect to the broker mqtt://actor@" in screen
    assert "wrong-password" not in screen
