"""`dispatch-bridge health`: is the bridge of one microgrid online and vouching for its tree?

Exit 0 only when a status with state `online` arrives *live* (retain flag 0:
published while this check was subscribed) since this check connected; a
retained replay proves nothing on its own (a broker restored from its
persistence file replays the last `online` of a bridge that may be long gone).
The bridge republishes its status every `status_interval` seconds, so the check
waits up to twice that (10 s while the interval is unknown) for a live status.
Anything else exits 1. Either way one line on stdout says why, e.g.:

    bridge online: session 7, 12 dispatches, knowledge from 2026-12-02T21:40:03Z
    bridge syncing: Dispatch API unreachable (connection refused), no cache
    bridge offline since 2026-12-02T21:40:03Z (session 7)
    no live status within 10 s (retained says online, session 7)
    broker unreachable: mqtt://127.0.0.1:1883: [Errno 111] Connection refused

Usable as a Docker `HEALTHCHECK` and in compose (see deploy/). Settings as for
`watch` (`--broker`, `MQTT_USERNAME`, `MQTT_PASSWORD(_FILE)`, `--microgrid-id`,
`--topic-root`), optionally from the `[bridge]` table of `--config`.

`HealthCheck` is the pure core (messages and times in, a verdict out); the
async shell subscribes to the status topic and feeds it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from actor_sdk import mqtt, wire
from actor_sdk.mqtt import BrokerSettings
from bridge.config import ConfigError
from bridge.watch import add_target_arguments, broker_client, load_target

__all__ = ["DEFAULT_STATUS_INTERVAL", "HealthCheck", "Verdict", "add_arguments", "check", "run"]

_logger = logging.getLogger("bridge.health")

DEFAULT_STATUS_INTERVAL = 5.0
"""The bridge's status interval assumed while the status does not say (contract 1)."""


@dataclass(frozen=True)
class Verdict:
    """The answer of a health check.

    Attributes:
        healthy: The bridge is online and vouches for its tree.
        reason: One line saying why.
    """

    healthy: bool
    reason: str


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "an unknown time"
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe_live(status: wire.BridgeStatus) -> Verdict:
    match status.state:
        case "online":
            return Verdict(
                True,
                f"bridge online: session {status.session}, {status.dispatches} dispatches, "
                f"knowledge from {_time(status.knowledge_at or status.synced_at)}"
                # Still healthy (it vouches for its tree), but not unnoticed: a full
                # state dir, a clock off the API's, another bridge.
                + (f"; but: {status.error}" if status.error else ""),
            )
        case "offline":
            return Verdict(
                False, f"bridge offline since {_time(status.as_of)} (session {status.session})"
            )
        case _:
            return Verdict(False, f"bridge {status.state}: {status.error or 'no reason given'}")


class HealthCheck:
    """The pure core: folds the status messages of one connection into a verdict.

    Feed every message of the status topic to `observe` with its retain flag
    and the (monotonic) time it arrived; it returns the verdict as soon as one
    is certain. When no message decides by `deadline`, `expired` gives it.
    """

    def __init__(self, topic: str, started: float, timeout: float | None = None) -> None:
        """Start a check.

        Args:
            topic: The status topic (for messages).
            started: When the subscription was acknowledged (monotonic seconds).
            timeout: Seconds to wait for a live status; None: twice the
                bridge's status interval (as the retained status says, else
                `DEFAULT_STATUS_INTERVAL`).
        """
        self._topic = topic
        self._started = started
        self._timeout = timeout
        self._retained: wire.BridgeStatus | None = None
        self._unreadable: str | None = None

    @property
    def wait(self) -> float:
        """Seconds this check waits for a live status in all."""
        if self._timeout is not None:
            return self._timeout
        interval = self._retained.status_interval if self._retained is not None else 0
        return 2 * (interval or DEFAULT_STATUS_INTERVAL)

    @property
    def deadline(self) -> float:
        """When `expired` gives the verdict (monotonic seconds)."""
        return self._started + self.wait

    def observe(self, payload: bytes, *, retained: bool) -> Verdict | None:
        """Fold one message of the status topic.

        Args:
            payload: Its payload (empty: the retained status was cleared).
            retained: Its retain flag (a replay, not published since we connected).

        Returns:
            The verdict when this message decides it, else None.
        """
        if not payload:
            self._retained = None
            return None
        try:
            status = wire.decode_status(payload)
        except wire.WireError as error:
            # Undecodable counts as not live (a newer bridge, or garbage): keep waiting.
            self._unreadable = str(error)
            return None
        if not retained:
            return _describe_live(status)
        self._retained = status
        if status.state == "offline":
            # The bridge said goodbye (or its will did): no live status will follow.
            return _describe_live(status)
        return None

    def expired(self) -> Verdict:
        """The verdict when no message decided it in time.

        Returns:
            Always unhealthy, with what was seen instead.
        """
        waited = f"{self.wait:g} s"
        retained = self._retained
        if retained is not None:
            said = f"retained says {retained.state}, session {retained.session}"
            if retained.error:
                said += f": {retained.error}"
            return Verdict(False, f"no live status within {waited} ({said})")
        if self._unreadable is not None:
            return Verdict(False, f"status on {self._topic} cannot be read: {self._unreadable}")
        return Verdict(
            False,
            f"no status on {self._topic} within {waited} "
            "(bridge never connected, or another topic root?)",
        )


async def check(
    target: BrokerSettings, layout: wire.TopicLayout, max_wait: float | None = None
) -> Verdict:
    """Connect, subscribe to the status topic and wait for the verdict.

    Args:
        target: The broker.
        layout: The microgrid's topics.
        max_wait: Seconds to wait for a live status (None: twice the status interval).

    Returns:
        The verdict; an unreachable broker is an unhealthy one.
    """
    connected = False
    try:
        async with broker_client(
            target, f"dispatch-bridge-health-{uuid.uuid4().hex[:12]}"
        ) as client:
            connected = True
            return await _listen(client, layout, max_wait)
    except mqtt.MqttError as error:
        what = "broker connection lost" if connected else "broker unreachable"
        return Verdict(False, f"{what}: {target.describe()}: {error}")


async def _listen(client: mqtt.Client, layout: wire.TopicLayout, max_wait: float | None) -> Verdict:
    loop = asyncio.get_running_loop()
    await client.subscribe(layout.status, qos=1)
    health = HealthCheck(layout.status, loop.time(), max_wait)
    _logger.debug("subscribed to %s, waiting for a live status", layout.status)
    messages = aiter(client.messages)
    while (left := health.deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(anext(messages), left)
        except TimeoutError:
            break
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        verdict = health.observe(bytes(payload), retained=bool(message.retain))
        if verdict is not None:
            return verdict
    return health.expired()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatch-bridge health`.

    Args:
        parser: The subcommand's parser.
    """
    add_target_arguments(parser)
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=None,
        help="seconds to wait for a live status (default: twice the bridge's status "
        f"interval, {2 * DEFAULT_STATUS_INTERVAL:g} s while it is unknown)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file; broker, microgrid_id, topic_root and credentials from its [bridge] "
        "table, as `run` reads them",
    )
    parser.epilog = (
        "Exit 0 when the bridge is online and vouches for its tree (a live status since "
        "connecting), 1 otherwise; one line on stdout says why. Credentials may also come "
        "from MQTT_USERNAME and MQTT_PASSWORD (or MQTT_PASSWORD_FILE)."
    )


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge health`.

    Args:
        args: The parsed flags.

    Returns:
        0 when healthy, 1 otherwise.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    if args.timeout is not None and not 0 < args.timeout <= 3600:
        raise ConfigError("invalid --timeout: must be more than 0 and at most 3600 seconds")
    target, layout = load_target(args)
    verdict = asyncio.run(check(target, layout, args.timeout))
    print(verdict.reason, file=sys.stdout, flush=True)
    return 0 if verdict.healthy else 1
