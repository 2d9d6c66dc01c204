"""`dispatch-bridge watch`: a terminal view of one microgrid's dispatch topics.

Built from the retained topics alone, so it runs on any host that can reach the
broker with a read-only user, and needs no access to the Dispatch API. This
module is the command line (flags, settings, the `--once` snapshot); the parts:

- `bridge.watch_state`: `WatchState` folds topics and payloads into what is
  known, and the contract's liveness rule (pure);
- `bridge.watch_text`: the `--once` text, for scripts (pure);
- `bridge.watch_view`: what the interactive view shows, as rows and lines (pure);
- `bridge.watch_app`: the interactive view, a Textual app around those
  (imported only when it runs, so `--once` and `health` start fast).

Settings (flag / environment):

| setting | flag | environment |
|---|---|---|
| broker | `--broker mqtt://user:pass@host:port` (or `mqtts://`) | `MQTT_URL` |
| credentials | in the URL | `MQTT_USERNAME`, `MQTT_PASSWORD` (or `MQTT_PASSWORD_FILE`) |
| microgrid | `--microgrid-id M` | `MICROGRID_ID` |
| topic root | `--topic-root TEMPLATE` | `DISPATCH_BRIDGE_TOPIC_ROOT` |
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt

from actor_sdk import wire
from actor_sdk.mqtt import (
    BrokerSettings,
    Message,
    MqttError,
    connection_lost,
    handing_queue,
    new_client,
    parse_broker_url,
)
from actor_sdk.wall_clock import utc_now
from bridge.config import ConfigError, SettingsSource
from bridge.watch_state import WatchState, printable
from bridge.watch_text import DEFAULT_HOURS, render

__all__ = [
    "EXIT_INCOMPLETE",
    "ConnectionLostWhileReading",
    "Snapshot",
    "WatchSettings",
    "add_arguments",
    "add_target_arguments",
    "broker_client",
    "collect_snapshot",
    "connect_failure",
    "is_auth_failure",
    "load_settings",
    "load_target",
    "run",
]

_logger = logging.getLogger("bridge.watch")

_AUTH_CODES = frozenset({4, 5, 134, 135})
"""CONNACK codes that mean bad credentials or no permission: retrying cannot help."""


# --- Broker connection -----------------------------------------------------------


def broker_client(settings: BrokerSettings, identifier: str) -> aiomqtt.Client:
    """Build a fresh aiomqtt client for one read-only connection.

    Args:
        settings: The broker (`actor_sdk.mqtt.parse_broker_url`).
        identifier: The MQTT client id.

    Returns:
        The client (not yet connected).
    """
    return new_client(settings, identifier=identifier)


def connect_failure(error: aiomqtt.MqttError, target: BrokerSettings) -> str:
    """Say in one line that the broker could not be reached or refused us.

    Args:
        error: The client library's error.
        target: The broker (shown without its password).

    Returns:
        The line.
    """
    return f"cannot connect to the broker {target.describe()}: {error}"


def is_auth_failure(error: aiomqtt.MqttError) -> bool:
    """Tell whether the broker refused the credentials or the permission (retrying cannot help).

    Args:
        error: The client library's error.

    Returns:
        True for CONNACK codes 4, 5 (MQTT 3.1.1), 134, 135 (MQTT 5).
    """
    code = getattr(error, "rc", None)
    value = getattr(code, "value", code)
    return isinstance(value, int) and value in _AUTH_CODES


QUIET_S = 0.5
"""Seconds without a message that end the wait when the tree's size is not known."""

SETTLE_S = 3.0
"""Seconds without a message that end the wait for a tree still short of its counts
(a broker that lost topics: nothing more will come); the SDK's sync timeout."""

DEFAULT_TIMEOUT_S = 60.0
"""`--timeout`: a complete tree ends the wait long before (100k topics: seconds)."""

EXIT_INCOMPLETE = 3
"""`--once` exit code: the wait ended before the tree was complete; the snapshot is partial."""


@dataclass(frozen=True)
class Snapshot:
    """What `--once` gathered, and how the wait for it ended.

    Attributes:
        state: What the topics said.
        timed_out: Whether `max_wait` ended the wait (the topics were still coming).
    """

    state: WatchState
    timed_out: bool

    def complete(self) -> bool | None:
        """Tell whether the tree is complete by the counts the bridge publishes.

        Returns:
            True when the status counts the tree and it adds up; False when it
            does not (the wait ended first), when a type's topics are not those
            its snapshot counts, or when the topics were still coming as
            `max_wait` ended the wait; None when it cannot be known.
        """
        gaps = self.state.tree_gaps()
        if self.state.counts_tree():
            return not gaps
        if self.timed_out:
            return False
        # Without counts, only the snapshots can tell of a gap, once a status came.
        return False if gaps and self.state.tree.status_seen else None

    def report(self, timeout: float) -> str:
        """Say in one line how complete the snapshot is, and what is missing.

        Args:
            timeout: The `--timeout` the wait had.

        Returns:
            The line; it starts with `! ` when the snapshot is partial.
        """
        state = self.state
        complete = self.complete()
        if complete:
            return (
                f"retained tree: complete, the {state.dispatch_topics():,} dispatch topics "
                "the bridge counts"
            )
        if complete is None:
            return (
                f"retained tree: completeness unknown ({_uncounted(state)}); shown is what "
                f"arrived until {QUIET_S:g} s passed without a message"
            )
        ended = (
            f"--timeout ended the wait after {timeout:g} s"
            if self.timed_out
            else f"then nothing came for {SETTLE_S if state.counts_tree() else QUIET_S:g} s"
        )
        return f"! retained tree INCOMPLETE: {self._shortfall()}; {ended}; what follows is partial"

    def _shortfall(self) -> str:
        state = self.state
        held = state.dispatch_topics()
        status = state.status
        if state.counts_tree() and status is not None and held != status.dispatches:
            return (
                f"received {held:,} of the {status.dispatches:,} dispatch topics the bridge counts"
            )
        gaps = [printable(gap, 160) for gap in state.tree_gaps()]
        if not gaps:
            return f"received {held:,} dispatch topics, still coming ({_uncounted(state)})"
        more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
        return "missing " + "; ".join(gaps[:3]) + more


def _uncounted(state: WatchState) -> str:
    """Why the tree's size is not known."""
    status = state.status
    if status is None:
        return "no readable bridge status"
    if not status.tree_counts:
        return "the bridge's status does not count its tree: an older bridge"
    return f"the bridge is {status.state}: it counts its tree only while online"


async def collect_snapshot(
    target: BrokerSettings,
    layout: wire.TopicLayout,
    *,
    max_wait: float = DEFAULT_TIMEOUT_S,
    clock: Callable[[], datetime] = utc_now,
) -> Snapshot:
    """Subscribe, gather the retained burst, and return what it says.

    The wait ends as soon as the tree is complete by the counts the bridge
    publishes (`WatchState.tree_gaps`); without counts (no status yet, a bridge
    not online, or older than the counts) after `QUIET_S` without a message; with
    counts but short of them after `SETTLE_S` without a message; and at
    `max_wait` seconds in all. Silence is counted from the subscription's
    acknowledgement, then from each message. Each message is folded as it is
    read (`handing_queue`): no task and no timer per message.

    Args:
        target: The broker.
        layout: The microgrid's topics.
        max_wait: The most seconds to wait in all.
        clock: The wall clock (for event times).

    Returns:
        The state, and how the wait ended.

    Raises:
        MqttError: The broker cannot be reached, refused us, or the connection was lost.
    """
    state = WatchState(layout)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    last_arrival = loop.time()

    def take(message: Message) -> None:
        nonlocal last_arrival
        last_arrival = loop.time()
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        state.apply(message.topic.value, bytes(payload), clock(), retained=bool(message.retain))
        if state.counts_tree() and not state.tree_gaps():
            done.set()

    client = new_client(
        target,
        identifier=f"dispatch-bridge-watch-{uuid.uuid4().hex[:12]}",
        queue_type=handing_queue(take),
    )
    async with client:
        await client.subscribe(layout.everything, qos=1)
        last_arrival = loop.time()
        deadline = last_arrival + max_wait
        complete = asyncio.ensure_future(done.wait())
        lost = connection_lost(client)  # aiomqtt's own: waited on, never cancelled here
        waited: set[asyncio.Future[Any]] = {complete, lost}
        timed_out = False
        try:
            while not done.is_set():
                now = loop.time()
                quiet_until = last_arrival + (SETTLE_S if state.counts_tree() else QUIET_S)
                if now >= min(quiet_until, deadline):
                    timed_out = deadline < quiet_until
                    break
                await asyncio.wait(
                    waited,
                    timeout=min(quiet_until, deadline) - now,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if lost.done() and not done.is_set():
                    raise _lost_while_reading(target, lost)
        finally:
            complete.cancel()
    return Snapshot(state, timed_out)


class ConnectionLostWhileReading(MqttError):
    """The broker accepted us, then the connection ended before the tree was read."""


def _lost_while_reading(
    target: BrokerSettings, lost: asyncio.Future[None]
) -> ConnectionLostWhileReading:
    error = lost.exception() if not lost.cancelled() else None
    reason = f" ({error})" if error is not None else ""
    return ConnectionLostWhileReading(
        f"lost the connection to the broker {target.describe()} while reading its retained "
        f"tree{reason}; nothing is shown: run it again once the broker is back"
    )


async def refused_credentials(target: BrokerSettings) -> str | None:
    """Connect once; say why when the broker refuses our credentials, else None.

    The interactive view checks this before it takes the terminal, so the reason is
    printed on a plain screen; an unreachable broker is not refused (the view starts
    and retries).

    Args:
        target: The broker.

    Returns:
        The reason, or None.
    """
    try:
        async with broker_client(target, f"dispatch-bridge-watch-{uuid.uuid4().hex[:12]}"):
            return None
    except aiomqtt.MqttError as error:
        return connect_failure(error, target) if is_auth_failure(error) else None


def _terminal_width(override: int | None) -> int:
    if override is not None:
        return override
    return shutil.get_terminal_size((80, 24)).columns


# --- Command line -----------------------------------------------------------------


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the broker and microgrid flags that `load_target` reads.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="mqtt://user:pass@host:port or mqtts://... (env MQTT_URL); a read-only user is enough",
    )
    parser.add_argument(
        "--broker-ca-file",
        metavar="PATH",
        help="CA certificates to verify an mqtts:// broker with (env MQTT_CA_FILE)",
    )
    parser.add_argument(
        "--broker-cert-file",
        metavar="PATH",
        help="client certificate for an mqtts:// broker that requires one (env MQTT_CERT_FILE)",
    )
    parser.add_argument(
        "--broker-key-file",
        metavar="PATH",
        help="the key of --broker-cert-file, if not in that file (env MQTT_KEY_FILE)",
    )
    parser.add_argument("--microgrid-id", metavar="M", help="the microgrid (env MICROGRID_ID)")
    parser.add_argument(
        "--topic-root",
        metavar="TEMPLATE",
        help="topic root, {microgrid_id} is replaced (env DISPATCH_BRIDGE_TOPIC_ROOT; "
        f"default {wire.DEFAULT_TOPIC_ROOT})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatch-bridge watch`.

    Args:
        parser: The subcommand's parser.
    """
    add_target_arguments(parser)
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one snapshot of the retained topics and exit (for scripts)",
    )
    parser.add_argument(
        "--hours",
        type=float,
        default=None,
        help=f"how far ahead the timeline looks (default {DEFAULT_HOURS:g})",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="--once: columns to fit (default: the terminal's)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="--once: most seconds to wait for the retained topics; the wait ends as soon "
        f"as the tree is complete by the bridge's counts (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.epilog = (
        "--once exits 0 after a snapshot of the whole tree (or of what came, when the bridge "
        "does not count its tree), 1 when the broker cannot be reached or refuses the "
        f"credentials, 2 on a usage error, and {EXIT_INCOMPLETE} after a partial snapshot: "
        "the wait ended before every topic the bridge counts arrived (the first lines and "
        "stderr say what is missing). Credentials may also come from MQTT_USERNAME and "
        "MQTT_PASSWORD (or MQTT_PASSWORD_FILE), which keeps the password off the command line."
    )


def _positive_int(value: Any) -> int:
    if isinstance(value, list):
        # `microgrid_id = [1]` in a config file's [bridge] table.
        if len(value) != 1:
            raise ValueError("several microgrids: pick one with --microgrid-id")
        value = value[0]
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


@dataclass(frozen=True)
class WatchSettings:
    """Everything `dispatch-bridge watch` needs, resolved from flags and environment."""

    target: BrokerSettings
    layout: wire.TopicLayout
    horizon: timedelta
    microgrid_id: int


def load_target(args: argparse.Namespace) -> tuple[BrokerSettings, wire.TopicLayout]:
    """Resolve the broker and the microgrid's topics from flags and environment.

    Shared by the read-only subcommands (`watch`, `health`); see `_resolve`.

    Args:
        args: The parsed flags.

    Returns:
        The broker and the topic layout.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    target, layout, _ = _resolve(args)
    return target, layout


def _resolve(args: argparse.Namespace) -> tuple[BrokerSettings, wire.TopicLayout, int]:
    """Resolve the broker, the microgrid's topics and its id from flags and environment.

    Shared by the read-only subcommands (`watch`, `health`). Credentials in
    the URL win; a URL without them takes `MQTT_USERNAME` and `MQTT_PASSWORD`
    (or `MQTT_PASSWORD_FILE`).

    Args:
        args: The parsed flags (`broker`, `broker_ca_file`, `broker_cert_file`,
            `broker_key_file`, `microgrid_id`, `topic_root`,
            and `config`, a TOML file whose [bridge] table is read too, if the
            subcommand has that flag).

    Returns:
        The broker, the topic layout and the microgrid id.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    source = SettingsSource.load(vars(args), getattr(args, "config", None), table="bridge")
    url = source.get("broker", env="MQTT_URL", parse=str, default=None, secret=True)
    if url is None:
        raise ConfigError("no broker: give --broker mqtt://user:pass@host:port (or MQTT_URL)")
    try:
        target = parse_broker_url(url)
    except ValueError as error:
        raise ConfigError(f"invalid broker URL: {error}") from None
    username = source.get("mqtt_username", env="MQTT_USERNAME", parse=str, default=None)
    password = source.get(
        "mqtt_password", env="MQTT_PASSWORD", parse=str, default=None, secret=True
    )
    if target.username is None and username is not None:
        target = replace(target, username=username, password=password)
    elif target.password is None and password is not None:
        target = replace(target, password=password)
    tls_files = [
        source.get(f"broker_{key}_file", env=f"MQTT_{key.upper()}_FILE", parse=str, default=None)
        for key in ("ca", "cert", "key")
    ]
    try:
        target = target.with_tls_files(*tls_files)
    except ValueError as error:
        raise ConfigError(f"invalid broker TLS settings: {error}") from None
    microgrid = source.get("microgrid_id", env="MICROGRID_ID", parse=_positive_int, default=None)
    if microgrid is None:
        raise ConfigError("no microgrid: give --microgrid-id M (or MICROGRID_ID)")
    template = source.get(
        "topic_root",
        env="DISPATCH_BRIDGE_TOPIC_ROOT",
        parse=str,
        default=wire.DEFAULT_TOPIC_ROOT,
    )
    try:
        layout = wire.TopicLayout.for_microgrid(microgrid, template)
    except (wire.WireError, KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"invalid --topic-root {template!r}: {error}") from None
    return target, layout, microgrid


def load_settings(args: argparse.Namespace) -> WatchSettings:
    """Resolve the settings from flags and environment (see `load_target`).

    Args:
        args: The parsed flags.

    Returns:
        The settings.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    target, layout, microgrid = _resolve(args)
    hours = DEFAULT_HOURS if args.hours is None else args.hours
    if not 0 < hours <= 24 * 14:
        raise ConfigError("invalid --hours: must be more than 0 and at most 336 (two weeks)")
    if args.width is not None and args.width < 20:
        raise ConfigError("invalid --width: at least 20 columns")
    if args.timeout <= 0:
        raise ConfigError("invalid --timeout: must be positive")
    return WatchSettings(target, layout, timedelta(hours=hours), microgrid)


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge watch`.

    Args:
        args: The parsed flags.

    Returns:
        0 after a snapshot or on quitting, 1 when the broker cannot be reached or
        refuses us, 2 when the interactive view has no terminal, `EXIT_INCOMPLETE`
        (3) when `--once` printed a snapshot short of the tree the bridge counts.
    """
    settings = load_settings(args)
    if not args.once:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            print(
                "dispatch-bridge watch: the interactive view needs a terminal; "
                "use --once for one snapshot as plain text",
                file=sys.stderr,
            )
            return 2
        # Imported here: Textual takes a while to import, and `--once` and `health` need none of it.
        from bridge.watch_app import WatchApp  # noqa: PLC0415

        refused = asyncio.run(refused_credentials(settings.target))
        if refused is not None:
            print(f"dispatch-bridge watch: {refused}", file=sys.stderr)
            return 1
        app = WatchApp(settings)
        app.run()
        if app.failure is not None:
            print(app.failure, file=sys.stderr)
        return app.return_code or 0
    try:
        snapshot = asyncio.run(
            collect_snapshot(settings.target, settings.layout, max_wait=args.timeout)
        )
    except aiomqtt.MqttError as error:
        lost = isinstance(error, ConnectionLostWhileReading)
        line = str(error) if lost else connect_failure(error, settings.target)
        print(f"dispatch-bridge watch: {line}", file=sys.stderr)
        return 1
    report = snapshot.report(args.timeout)
    for line in render(
        snapshot.state,
        now=datetime.now(UTC),
        width=_terminal_width(args.width),
        horizon=settings.horizon,
        tree=[report],
    ):
        print(line)
    if snapshot.complete() is False:
        print(f"dispatch-bridge watch: {report.removeprefix('! ')}", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0
