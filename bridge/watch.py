"""`dispatch-bridge watch`: a live terminal view of one microgrid's dispatch topics.

Built from the retained topics alone, so it runs on any host that can reach the
broker with a read-only user, and needs no access to the Dispatch API. It shows
the bridge's status, and per dispatch type what runs now, how long it still
runs, when the set of running dispatches next changes, and a timeline of the
next hours with one bar per dispatch.

The module has three layers: `WatchState` folds topics and payloads into what
is known (no I/O, garbage becomes a warning line, never an exception);
`render` turns a state into lines for a given instant and terminal width (pure,
unit-tested); the async shell subscribes with aiomqtt and redraws.

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
import contextlib
import logging
import math
import shutil
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import aiomqtt

from actor_sdk import wire
from actor_sdk.mqtt import BrokerSettings, new_client, parse_broker_url
from bridge.config import ConfigError, SettingsSource
from bridge.upcoming import dispatch_runs

__all__ = [
    "WatchSettings",
    "WatchState",
    "add_arguments",
    "add_target_arguments",
    "broker_client",
    "collect_snapshot",
    "load_settings",
    "load_target",
    "render",
    "run",
    "runs_within",
]

_logger = logging.getLogger("bridge.watch")

DEFAULT_HOURS = 3.0
"""How far ahead the timeline looks by default."""

MAX_DISPATCHES_PER_TYPE = 12
"""Timeline bars shown per type; the rest are counted in one line."""

MAX_WARNINGS = 5
"""Warning lines kept (the newest)."""

MAX_EVENTS = 5
"""Lifecycle events kept (the newest)."""

_MAX_STEPS = 4096
"""Schedule steps per dispatch and timeline, bounding the cost of dense rules."""

_AUTH_CODES = frozenset({4, 5, 134, 135})
"""CONNACK codes that mean bad credentials or no permission: retrying cannot help."""


# --- State -------------------------------------------------------------------


@dataclass
class WatchState:
    """What the retained topics of one microgrid say, folded message by message.

    Attributes:
        layout: The topics of the microgrid.
        status: The bridge status, None until one arrives (or after it is cleared).
        snapshots: The running snapshot of each type.
        dispatches: Every dispatch, by type and id.
        warnings: The newest warnings (garbage payloads, unknown topics).
        events: The newest lifecycle events, as `(received, event)`.
        messages: How many messages were applied.
    """

    layout: wire.TopicLayout
    status: wire.BridgeStatus | None = None
    snapshots: dict[str, wire.RunningSnapshot] = field(default_factory=dict)
    dispatches: dict[str, dict[int, wire.Dispatch]] = field(default_factory=dict)
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_WARNINGS))
    events: deque[tuple[datetime, wire.DispatchEvent]] = field(
        default_factory=lambda: deque(maxlen=MAX_EVENTS)
    )
    messages: int = 0

    def apply(self, topic: str, payload: bytes, received: datetime) -> None:
        """Fold one message into the state; a bad topic or payload becomes a warning.

        Args:
            topic: The topic it arrived on.
            payload: Its payload; empty clears a retained topic.
            received: When it arrived (for events).
        """
        self.messages += 1
        try:
            ref = self.layout.parse(topic)
            self._apply(ref, payload, received)
        except wire.WireError as error:
            self.warnings.append(f"{_printable(topic, 60)}: {_printable(str(error), 120)}")

    def _apply(self, ref: wire.TopicRef, payload: bytes, received: datetime) -> None:
        match ref.kind:
            case wire.TopicKind.STATUS:
                self.status = wire.decode_status(payload) if payload else None
            case wire.TopicKind.RUNNING:
                assert ref.dispatch_type is not None
                if not payload:
                    self.snapshots.pop(ref.dispatch_type, None)
                    return
                snapshot = wire.decode_running(payload)
                if snapshot.type != ref.dispatch_type:
                    raise wire.WireError(f"snapshot of type {snapshot.type!r} on this topic")
                self.snapshots[ref.dispatch_type] = snapshot
            case wire.TopicKind.DISPATCH:
                assert ref.dispatch_type is not None and ref.dispatch_id is not None
                of_type = self.dispatches.setdefault(ref.dispatch_type, {})
                if not payload:
                    of_type.pop(ref.dispatch_id, None)
                    if not of_type:
                        del self.dispatches[ref.dispatch_type]
                    return
                dispatch = wire.decode_dispatch(payload)
                if dispatch.id != ref.dispatch_id or dispatch.type != ref.dispatch_type:
                    raise wire.WireError(f"dispatch #{dispatch.id} of another topic")
                of_type[ref.dispatch_id] = dispatch
            case wire.TopicKind.EVENTS:
                self.events.append((received, wire.decode_event(payload)))


# --- Schedule over a window ----------------------------------------------------


def runs_within(
    dispatch: wire.Dispatch, start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """Return the runs of a dispatch that overlap `[start, end)`, clipped to it.

    The runs come from `bridge.upcoming.dispatch_runs`, which steps through the
    schedule core's changes, so every recurrence rule is handled the way the
    bridge handles it. Bounded: after `_MAX_STEPS` runs the rest of the window
    is left out.

    Args:
        dispatch: The dispatch.
        start: The window's start.
        end: The window's end.

    Returns:
        The runs, in order, as `(from, to)` pairs within the window.
    """
    runs, _ = dispatch_runs(dispatch, start, end, _MAX_STEPS)
    return [
        (max(run_start, start), end if run_end is None else min(run_end, end))
        for run_start, run_end in runs
    ]


# --- Rendering -----------------------------------------------------------------


def _printable(text: str, limit: int) -> str:
    """Make wire text safe for a terminal: no control characters, bounded length."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[: max(limit - 3, 0)] + "..."


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(width - 1, 0)] + "~"


def _wrap(segments: Sequence[str], width: int, indent: str = "    ") -> list[str]:
    """Join segments with `, `, starting a new indented line where one would not fit."""
    lines: list[str] = []
    current = ""
    for segment in segments:
        if not current:
            current = segment
        elif len(current) + 2 + len(segment) <= width:
            current += ", " + segment
        else:
            lines.append(current + ",")
            current = indent + segment
    if current:
        lines.append(current)
    return lines


def _clock(moment: datetime, now: datetime) -> str:
    moment = moment.astimezone(UTC)
    if abs(moment - now) < timedelta(hours=20):
        return moment.strftime("%H:%M:%SZ")
    return moment.strftime("%Y-%m-%d %H:%MZ")


def format_span(span: timedelta) -> str:
    """Format a duration compactly: `45s`, `4m05s`, `2h07m`, `3d04h`.

    >>> format_span(timedelta(minutes=4, seconds=5))
    '4m05s'

    Args:
        span: The duration; negative ones are shown as their absolute value.

    Returns:
        The text.
    """
    seconds = math.ceil(abs(span.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _relative(moment: datetime, now: datetime) -> str:
    if moment >= now:
        return f"in {format_span(moment - now)}"
    return f"{format_span(now - moment)} ago"


def _status_lines(state: WatchState, now: datetime, width: int) -> list[str]:
    status = state.status
    if status is None:
        return ["bridge: no status published (bridge never connected, or wrong topic root?)"]
    name = _printable(status.bridge, 30)
    synced = (
        "never synced"
        if status.synced_at is None
        else f"synced {_clock(status.synced_at, now)} ({_relative(status.synced_at, now)})"
    )
    return _wrap(
        [
            f"bridge {status.state.upper()}",
            f"upstream {status.upstream}",
            synced,
            f"session {status.session}",
            f"{status.dispatches} dispatches",
            f"{name} {_printable(status.version, 20)}",
        ],
        width,
    )


def _bar(
    runs: Sequence[tuple[datetime, datetime]], start: datetime, cell: timedelta, n: int
) -> str:
    """One character per cell: `#` runs all of it, `+` part of it, `.` not at all."""
    covered = [0.0] * n
    cell_s = cell.total_seconds()
    for run_from, run_to in runs:
        first = int((run_from - start).total_seconds() // cell_s)
        last = min(math.ceil((run_to - start).total_seconds() / cell_s), n)
        for index in range(max(first, 0), last):
            cell_from = start + cell * index
            overlap = min(run_to, cell_from + cell) - max(run_from, cell_from)
            covered[index] += overlap.total_seconds()
    return "".join(
        "#" if value >= cell_s * 0.999 else "+" if value > 0 else "." for value in covered
    )


def _union(runs: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for run_from, run_to in sorted(runs):
        if merged and run_from <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], run_to))
        else:
            merged.append((run_from, run_to))
    return merged


def _axis(start: datetime, cell: timedelta, n: int) -> str:
    """Clock labels at round times under the bars, as many as fit."""
    horizon = cell * n
    step = next(
        (
            candidate
            for candidate in (
                timedelta(minutes=1),
                timedelta(minutes=5),
                timedelta(minutes=15),
                timedelta(minutes=30),
                timedelta(hours=1),
                timedelta(hours=3),
                timedelta(hours=6),
                timedelta(hours=12),
                timedelta(days=1),
            )
            if horizon / candidate <= max(n // 8, 1)
        ),
        timedelta(days=1),
    )
    chars = [" "] * n
    chars[:4] = "^now"
    step_s = step.total_seconds()
    tick = datetime.fromtimestamp(math.ceil(start.timestamp() / step_s) * step_s, UTC)
    while tick < start + horizon:
        position = int((tick - start) / cell)
        label = "|" + tick.strftime("%H:%M")
        if position + len(label) <= n and all(
            c == " " for c in chars[max(position - 1, 0) :][: len(label) + 1]
        ):
            chars[position : position + len(label)] = label
        tick += step
    return "".join(chars).rstrip()


def _dispatch_label(dispatch_id: int) -> str:
    return f"#{dispatch_id}"


def _target_text(target: wire.Target) -> str:
    if target.categories is not None:
        names = (
            c.category if c.type is None else f"{c.category}:{c.type}" for c in target.categories
        )
        return "categories " + ",".join(_printable(name, 30) for name in names)
    return "ids " + ",".join(str(i) for i in target.ids or ()) if target.ids else "no target"


def _time_left(dispatch: wire.Dispatch, now: datetime) -> str:
    if dispatch.until is None:
        return "runs until changed"
    until = _clock(dispatch.until, now)
    if dispatch.until >= now:
        return f"until {until}, {format_span(dispatch.until - now)} left"
    return f"until {until}, OVERDUE by {format_span(now - dispatch.until)}"


def _running_lines(
    dispatch_type: str, snapshot: wire.RunningSnapshot | None, now: datetime, width: int
) -> list[str]:
    title = _printable(dispatch_type, max(width - 40, 16))
    if snapshot is None:
        return [f"{title}: no running snapshot"]
    change = (
        "no scheduled change"
        if snapshot.next_change is None
        else f"next change {_clock(snapshot.next_change, now)} "
        f"({_relative(snapshot.next_change, now)})"
    )
    lines = _wrap([f"{title}: {len(snapshot.running)} running", change], width)
    for dispatch in snapshot.running:
        flags = " dry-run" if dispatch.dry_run else ""
        lines.extend(
            _wrap(
                [
                    f"  RUN {_dispatch_label(dispatch.id)}{flags} {_time_left(dispatch, now)}",
                    _target_text(dispatch.target),
                ],
                width,
                indent="      ",
            )
        )
    if snapshot.next_change is not None and snapshot.next_change < now - timedelta(seconds=2):
        lines.append("  ! snapshot is stale: its next change has passed (bridge down?)")
    return lines


def _timeline_lines(
    dispatches: dict[int, wire.Dispatch], now: datetime, width: int, horizon: timedelta
) -> list[str]:
    """One bar per dispatch that runs within the horizon, soonest first."""
    label_width = max([len("any"), *(len(_dispatch_label(i)) for i in dispatches)]) + 1
    bar_width = max(width - label_width - 1, 8)
    cell = horizon / bar_width
    timed: list[tuple[datetime, int, list[tuple[datetime, datetime]]]] = []
    unknown: list[int] = []
    for dispatch_id, dispatch in dispatches.items():
        try:
            runs = runs_within(dispatch, now, now + horizon)
        except (ValueError, OverflowError, ArithmeticError):
            # A value the schedule cannot place (far beyond year 9999): no bar, no crash.
            unknown.append(dispatch_id)
            continue
        if runs:
            timed.append((runs[0][0], dispatch_id, runs))
    timed.sort(key=lambda item: (item[0], item[1]))
    lines: list[str] = [
        f"  ! {_dispatch_label(i)}: its schedule cannot be computed" for i in sorted(unknown)
    ]
    if timed:
        lines.append(f"  next {format_span(horizon)}: # runs, + runs part of the time")
        for _, dispatch_id, runs in timed[:MAX_DISPATCHES_PER_TYPE]:
            label = _dispatch_label(dispatch_id).rjust(label_width - 1)
            lines.append(f"{label} |{_bar(runs, now, cell, bar_width)}")
        if len(timed) > 1:
            # What one merged actor per type sees: the union of the runs.
            union = _union(run for _, _, runs in timed for run in runs)
            lines.append(f"{'any'.rjust(label_width - 1)} |{_bar(union, now, cell, bar_width)}")
        lines.append(" " * (label_width + 1) + _axis(now, cell, bar_width))
        if len(timed) > MAX_DISPATCHES_PER_TYPE:
            lines.append(f"  ... {len(timed) - MAX_DISPATCHES_PER_TYPE} more in this window")
    idle = len(dispatches) - len(timed) - len(unknown)
    if idle:
        lines.append(f"  {idle} other dispatch(es) not running in the next {format_span(horizon)}")
    return lines


def render(
    state: WatchState,
    *,
    now: datetime,
    width: int = 80,
    horizon: timedelta = timedelta(hours=DEFAULT_HOURS),
    connection: str | None = None,
) -> list[str]:
    """Render what is known as terminal lines, none wider than `width`.

    Pure: the same state, instant and width give the same lines.

    Args:
        state: What the topics said.
        now: The instant to show the state for (time left, timeline start).
        width: The terminal width in columns (at least 20 is used).
        horizon: How far ahead the timeline looks.
        connection: A line about the broker connection, if any (live mode).

    Returns:
        The lines, without line endings.
    """
    width = max(width, 20)
    now = now.astimezone(UTC)
    lines = _wrap([state.layout.root, now.strftime("%Y-%m-%d %H:%M:%SZ")], width)
    if connection:
        lines.append(connection)
    lines.extend(_status_lines(state, now, width))
    lines.extend(f"! {warning}" for warning in state.warnings)
    types = sorted(set(state.snapshots) | set(state.dispatches))
    if not types:
        lines.append("")
        lines.append("no dispatches published")
    for dispatch_type in types:
        lines.append("")
        lines.extend(_running_lines(dispatch_type, state.snapshots.get(dispatch_type), now, width))
        lines.extend(_timeline_lines(state.dispatches.get(dispatch_type, {}), now, width, horizon))
    if state.events:
        lines.append("")
        lines.append("recent events:")
        for received, event in state.events:
            lines.append(
                f"  {_clock(received, now)} {event.event} {_dispatch_label(event.dispatch.id)}"
                f" {_printable(event.dispatch.type, 40)}"
            )
    return [_fit(line, width) for line in lines]


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


def _connect_failure(error: aiomqtt.MqttError, target: BrokerSettings) -> str:
    return f"cannot connect to the broker {target.describe()}: {error}"


def _is_auth_failure(error: aiomqtt.MqttError) -> bool:
    code = getattr(error, "rc", None)
    value = getattr(code, "value", code)
    return isinstance(value, int) and value in _AUTH_CODES


async def collect_snapshot(
    target: BrokerSettings,
    layout: wire.TopicLayout,
    *,
    quiet: float = 0.5,
    max_wait: float = 10.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> WatchState:
    """Subscribe, gather the retained burst, and return what it says.

    The burst is over when no message arrived for `quiet` seconds (counted
    from the subscription's acknowledgement, then from each message), or at
    `max_wait` seconds in all.

    Args:
        target: The broker.
        layout: The microgrid's topics.
        quiet: Seconds of silence that end the burst.
        max_wait: The most seconds to wait in all.
        clock: The wall clock (for event times).

    Returns:
        The state.

    Raises:
        aiomqtt.MqttError: The broker cannot be reached or refused us.
    """
    state = WatchState(layout)
    loop = asyncio.get_running_loop()
    async with broker_client(target, f"dispatch-bridge-watch-{uuid.uuid4().hex[:12]}") as client:
        await client.subscribe(layout.everything, qos=1)
        deadline = loop.time() + max_wait
        messages = aiter(client.messages)
        while True:
            wait = min(quiet, deadline - loop.time())
            if wait <= 0:
                break
            try:
                message = await asyncio.wait_for(anext(messages), wait)
            except TimeoutError:
                break
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            state.apply(message.topic.value, bytes(payload), clock())
    return state


def _terminal_width(override: int | None) -> int:
    if override is not None:
        return override
    return shutil.get_terminal_size((80, 24)).columns


class _Screen:
    """Redraws the whole view in place with ANSI escapes (no curses)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def draw(self, lines: Iterable[str]) -> None:
        text = "\n".join(lines)
        self._out.write("\x1b[H\x1b[2J" + text + "\n")
        self._out.flush()


async def _live(
    target: BrokerSettings,
    layout: wire.TopicLayout,
    horizon: timedelta,
    width: int | None,
    out: TextIO,
) -> int:
    state = WatchState(layout)
    screen = _Screen(out)
    changed = asyncio.Event()
    connection = f"connecting to {target.describe()}"

    def draw() -> None:
        screen.draw(
            render(
                state,
                now=datetime.now(UTC),
                width=_terminal_width(width),
                horizon=horizon,
                connection=connection,
            )
        )

    async def redraw_loop() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                # Redraw on news, at most every 0.1 s, and once a second for the clocks.
                await asyncio.wait_for(changed.wait(), 1.0)
                await asyncio.sleep(0.1)
            changed.clear()
            draw()

    redraw = asyncio.create_task(redraw_loop())
    backoff = 1.0
    try:
        while True:
            try:
                async with broker_client(
                    target, f"dispatch-bridge-watch-{uuid.uuid4().hex[:12]}"
                ) as client:
                    # The broker resends every retained topic: start from scratch.
                    state = WatchState(layout, warnings=state.warnings, events=state.events)
                    await client.subscribe(layout.everything, qos=1)
                    connection = f"connected to {target.describe()}"
                    backoff = 1.0
                    changed.set()
                    async for message in client.messages:
                        payload = message.payload
                        raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                        state.apply(message.topic.value, raw, datetime.now(UTC))
                        changed.set()
            except aiomqtt.MqttError as error:
                if _is_auth_failure(error):
                    print(
                        f"dispatch-bridge watch: {_connect_failure(error, target)}", file=sys.stderr
                    )
                    return 1
                connection = (
                    f"DISCONNECTED from {target.describe()}: {error}; retrying in {backoff:.0f} s"
                    " (showing the last known state)"
                )
                changed.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
    finally:
        redraw.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await redraw


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
        "--width", type=int, default=None, help="columns to fit (default: the terminal's)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="--once: most seconds to wait for the retained topics (default 10)",
    )
    parser.epilog = (
        "Credentials may also come from MQTT_USERNAME and MQTT_PASSWORD (or MQTT_PASSWORD_FILE), "
        "which keeps the password off the command line."
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


def load_target(args: argparse.Namespace) -> tuple[BrokerSettings, wire.TopicLayout]:
    """Resolve the broker and the microgrid's topics from flags and environment.

    Shared by the read-only subcommands (`watch`, `health`). Credentials in
    the URL win; a URL without them takes `MQTT_USERNAME` and `MQTT_PASSWORD`
    (or `MQTT_PASSWORD_FILE`).

    Args:
        args: The parsed flags (`broker`, `broker_ca_file`, `microgrid_id`, `topic_root`,
            and `config`, a TOML file whose [bridge] table is read too, if the
            subcommand has that flag).

    Returns:
        The broker and the topic layout.

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
    ca_file = source.get("broker_ca_file", env="MQTT_CA_FILE", parse=str, default=None)
    try:
        target = target.with_tls_files(ca_file)
    except ValueError as error:
        raise ConfigError(f"invalid --broker-ca-file: {error}") from None
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
    return target, layout


def load_settings(args: argparse.Namespace) -> WatchSettings:
    """Resolve the settings from flags and environment (see `load_target`).

    Args:
        args: The parsed flags.

    Returns:
        The settings.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    target, layout = load_target(args)
    hours = DEFAULT_HOURS if args.hours is None else args.hours
    if not 0 < hours <= 24 * 14:
        raise ConfigError("invalid --hours: must be more than 0 and at most 336 (two weeks)")
    if args.width is not None and args.width < 20:
        raise ConfigError("invalid --width: at least 20 columns")
    if args.timeout <= 0:
        raise ConfigError("invalid --timeout: must be positive")
    return WatchSettings(target, layout, timedelta(hours=hours))


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge watch`.

    Args:
        args: The parsed flags.

    Returns:
        0 after a snapshot or Ctrl-C, 1 when the broker cannot be reached.
    """
    settings = load_settings(args)
    if not args.once:
        try:
            return asyncio.run(
                _live(settings.target, settings.layout, settings.horizon, args.width, sys.stdout)
            )
        except KeyboardInterrupt:
            return 0
    try:
        state = asyncio.run(
            collect_snapshot(settings.target, settings.layout, max_wait=args.timeout)
        )
    except aiomqtt.MqttError as error:
        print(f"dispatch-bridge watch: {_connect_failure(error, settings.target)}", file=sys.stderr)
        return 1
    for line in render(
        state,
        now=datetime.now(UTC),
        width=_terminal_width(args.width),
        horizon=settings.horizon,
    ):
        print(line)
    return 0
