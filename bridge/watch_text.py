"""`dispatch-bridge watch --once`: the snapshot as plain text, and the pieces it is made of.

`render` turns a `WatchState` into lines for a given instant and terminal
width (pure: the same state, instant and width give the same lines). The
timeline bars, the axis under them and the short forms of times, spans and
targets are shared with the interactive view (`bridge.watch_view`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import textwrap
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from actor_sdk import wire
from bridge.upcoming import dispatch_runs
from bridge.watch_state import WatchState, printable

__all__ = [
    "DEFAULT_HOURS",
    "MAX_DISPATCHES_PER_TYPE",
    "axis",
    "bar",
    "clock_text",
    "dispatch_label",
    "format_span",
    "relative",
    "render",
    "runs_within",
    "target_text",
    "time_left",
    "union",
]

DEFAULT_HOURS = 3.0
"""How far ahead the timeline looks by default."""

MAX_DISPATCHES_PER_TYPE = 12
"""Timeline bars shown per type; the rest are counted in one line."""

_MAX_STEPS = 4096
"""Schedule steps per dispatch and timeline, bounding the cost of dense rules."""

_UNPLACEABLE = (ValueError, OverflowError, ArithmeticError)
"""What the schedule raises for a value it cannot place (far beyond year 9999)."""

Run = tuple[datetime, datetime]
"""A run within a window: `(from, to)`."""


# --- Schedule over a window ----------------------------------------------------


def runs_within(
    dispatch: wire.Dispatch, start: datetime, end: datetime, limit: int = _MAX_STEPS
) -> list[Run]:
    """Return the runs of a dispatch that overlap `[start, end)`, clipped to it.

    The runs come from `bridge.upcoming.dispatch_runs`, which steps through the
    schedule core's changes, so every recurrence rule is handled the way the
    bridge handles it. Bounded: after `limit` runs the rest of the window is
    left out.

    Args:
        dispatch: The dispatch.
        start: The window's start.
        end: The window's end.
        limit: The most runs returned (1: the first run only, a step or two).

    Returns:
        The runs, in order, as `(from, to)` pairs within the window.
    """
    runs, _ = dispatch_runs(dispatch, start, end, limit)
    return [
        (max(run_start, start), end if run_end is None else min(run_end, end))
        for run_start, run_end in runs
    ]


# --- Rendering -----------------------------------------------------------------


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


def clock_text(moment: datetime, now: datetime) -> str:
    """Show an instant as a UTC clock time, with the date when it is far from now.

    Args:
        moment: The instant.
        now: The instant it is shown at.

    Returns:
        `07:13:20Z`, or `2026-11-29 07:13Z` more than 20 h away.
    """
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


def relative(moment: datetime, now: datetime) -> str:
    """Say how far an instant is from now: `in 4m05s` or `12s ago`.

    Args:
        moment: The instant.
        now: The instant it is shown at.

    Returns:
        The text.
    """
    if moment >= now:
        return f"in {format_span(moment - now)}"
    return f"{format_span(now - moment)} ago"


def _status_lines(state: WatchState, now: datetime, width: int) -> list[str]:
    status = state.status
    if status is None:
        return ["bridge: no status published (bridge never connected, or wrong topic root?)"]
    name = printable(status.bridge, 30)
    synced = (
        "never synced"
        if status.synced_at is None
        else f"synced {clock_text(status.synced_at, now)} ({relative(status.synced_at, now)})"
    )
    return _wrap(
        [
            f"bridge {status.state.upper()}",
            f"upstream {status.upstream}",
            synced,
            f"session {status.session}",
            f"{status.dispatches} dispatches",
            f"{name} {printable(status.version, 20)}",
        ],
        width,
    )


def bar(runs: Sequence[tuple[datetime, datetime]], start: datetime, cell: timedelta, n: int) -> str:
    """Draw runs as one character per cell: `#` runs all of it, `+` part of it, `.` none.

    Args:
        runs: `(from, to)` pairs.
        start: Where the first cell starts.
        cell: How long one cell is.
        n: How many cells.

    Returns:
        The bar, `n` characters.
    """
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


def union(runs: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Merge runs into the times when at least one of them runs.

    Args:
        runs: `(from, to)` pairs, in any order.

    Returns:
        Disjoint `(from, to)` pairs, in order.
    """
    merged: list[tuple[datetime, datetime]] = []
    for run_from, run_to in sorted(runs):
        if merged and run_from <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], run_to))
        else:
            merged.append((run_from, run_to))
    return merged


def axis(start: datetime, cell: timedelta, n: int) -> str:
    """Label round clock times under the bars, as many as fit.

    Args:
        start: Where the first cell starts (labelled `^now`).
        cell: How long one cell is.
        n: How many cells.

    Returns:
        The axis line, at most `n` characters.
    """
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


def dispatch_label(dispatch_id: int) -> str:
    """Name a dispatch as the view does: `#42`.

    Args:
        dispatch_id: The id.

    Returns:
        The label.
    """
    return f"#{dispatch_id}"


def target_text(target: wire.Target) -> str:
    """Describe a target in one line: `ids 7,8` or `categories BATTERY:LI_ION`.

    Args:
        target: The target.

    Returns:
        The text, safe for a terminal.
    """
    if target.categories is not None:
        names = (
            c.category if c.type is None else f"{c.category}:{c.type}" for c in target.categories
        )
        return "categories " + ",".join(printable(name, 30) for name in names)
    return "ids " + ",".join(str(i) for i in target.ids or ()) if target.ids else "no target"


def time_left(dispatch: wire.Dispatch, now: datetime) -> str:
    """Say until when a running dispatch runs and how long that is from now.

    Args:
        dispatch: A running dispatch (its `until`).
        now: The instant it is shown at.

    Returns:
        `until 07:13:20Z, 10m00s left`, `... OVERDUE by 5m00s`, or `runs until changed`.
    """
    if dispatch.until is None:
        return "runs until changed"
    until = clock_text(dispatch.until, now)
    if dispatch.until >= now:
        return f"until {until}, {format_span(dispatch.until - now)} left"
    return f"until {until}, OVERDUE by {format_span(now - dispatch.until)}"


def _running_lines(
    dispatch_type: str, snapshot: wire.RunningSnapshot | None, now: datetime, width: int
) -> list[str]:
    title = printable(dispatch_type, max(width - 40, 16))
    if snapshot is None:
        return [f"{title}: no running snapshot"]
    change = (
        "no scheduled change"
        if snapshot.next_change is None
        else f"next change {clock_text(snapshot.next_change, now)} "
        f"({relative(snapshot.next_change, now)})"
    )
    lines = _wrap([f"{title}: {len(snapshot.running)} running", change], width)
    if snapshot.held:
        reason = printable(snapshot.hold_reason or "no reason given", max(width - 40, 16))
        lines.append(f"  HELD by the site ({reason}): nothing runs until released")
    for dispatch in snapshot.running:
        flags = " dry-run" if dispatch.dry_run else ""
        lines.extend(
            _wrap(
                [
                    f"  RUN {dispatch_label(dispatch.id)}{flags} {time_left(dispatch, now)}",
                    target_text(dispatch.target),
                ],
                width,
                indent="      ",
            )
        )
    if snapshot.next_change is not None and snapshot.next_change < now - timedelta(seconds=2):
        lines.append("  ! snapshot is stale: its next change has passed (bridge down?)")
    return lines


def _placed_runs(
    dispatch: wire.Dispatch, start: datetime, end: datetime, limit: int
) -> list[Run] | None:
    """`runs_within`, or None for a dispatch whose schedule cannot be placed."""
    try:
        return runs_within(dispatch, start, end, limit)
    except _UNPLACEABLE:
        return None


class _Cover:
    """The union of runs added so far, as sorted disjoint `(from, to)` pairs (as `union`)."""

    def __init__(self) -> None:
        self._froms: list[datetime] = []
        self._tos: list[datetime] = []

    def add(self, run_from: datetime, run_to: datetime) -> None:
        """Merge one run in, with every run it overlaps or touches."""
        first = bisect.bisect_left(self._tos, run_from)
        after = bisect.bisect_right(self._froms, run_to)
        if first < after:
            run_from = min(run_from, self._froms[first])
            run_to = max(run_to, self._tos[after - 1])
        self._froms[first:after] = [run_from]
        self._tos[first:after] = [run_to]

    def covers(self, start: datetime, end: datetime) -> bool:
        """Tell whether the union holds all of `[start, end)`."""
        return len(self._froms) == 1 and self._froms[0] <= start and self._tos[0] >= end

    def runs(self) -> list[Run]:
        """Return the union."""
        return list(zip(self._froms, self._tos, strict=True))


def _covering_union(runs_of: Iterable[list[Run]], start: datetime, end: datetime) -> list[Run]:
    """Merge the runs of many dispatches, taking no more once they cover the window.

    Once the union holds all of `[start, end)`, the runs of the other dispatches
    cannot change it: `runs_of` is read lazily, so theirs are never computed.

    Args:
        runs_of: Each dispatch's runs within the window.
        start: The window's start.
        end: The window's end.

    Returns:
        Disjoint `(from, to)` pairs, in order: `union` of all the runs.
    """
    cover = _Cover()
    for runs in runs_of:
        for run_from, run_to in runs:
            cover.add(run_from, run_to)
        if cover.covers(start, end):
            break
    return cover.runs()


def _timeline_lines(
    dispatches: dict[int, wire.Dispatch], now: datetime, width: int, horizon: timedelta
) -> list[str]:
    """One bar per dispatch that runs within the horizon, soonest first.

    Only the first run of each dispatch is needed to order them; all its runs only
    for the bars shown and for the union, until the union covers the window.
    """
    label_width = max([len("any"), *(len(dispatch_label(i)) for i in dispatches)]) + 1
    bar_width = max(width - label_width - 1, 8)
    cell = horizon / bar_width
    end = now + horizon
    timed: list[tuple[datetime, int, list[Run]]] = []
    unknown: list[int] = []
    for dispatch_id, dispatch in dispatches.items():
        first = _placed_runs(dispatch, now, end, 1)
        if first is None:
            # A value the schedule cannot place (far beyond year 9999): no bar, no crash.
            unknown.append(dispatch_id)
        elif first:
            timed.append((first[0][0], dispatch_id, first))
    timed.sort(key=lambda item: (item[0], item[1]))

    def all_runs(dispatch_id: int, first: list[Run]) -> list[Run]:
        return _placed_runs(dispatches[dispatch_id], now, end, _MAX_STEPS) or first

    shown = [
        all_runs(dispatch_id, first) for _, dispatch_id, first in timed[:MAX_DISPATCHES_PER_TYPE]
    ]
    lines: list[str] = [
        f"  ! {dispatch_label(i)}: its schedule cannot be computed" for i in sorted(unknown)
    ]
    if timed:
        lines.append(f"  next {format_span(horizon)}: # runs, + runs part of the time")
        for (_, dispatch_id, _), runs in zip(timed, shown, strict=False):
            label = dispatch_label(dispatch_id).rjust(label_width - 1)
            lines.append(f"{label} |{bar(runs, now, cell, bar_width)}")
        if len(timed) > 1:
            # What one merged actor per type sees: the union of the runs.
            rest = (all_runs(i, first) for _, i, first in timed[MAX_DISPATCHES_PER_TYPE:])
            merged = _covering_union(itertools.chain(shown, rest), now, end)
            lines.append(f"{'any'.rjust(label_width - 1)} |{bar(merged, now, cell, bar_width)}")
        lines.append(" " * (label_width + 1) + axis(now, cell, bar_width))
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
    tree: Sequence[str] = (),
) -> list[str]:
    """Render what is known as terminal lines, none wider than `width`.

    Pure: the same state, instant and width give the same lines.

    Args:
        state: What the topics said.
        now: The instant to show the state for (time left, timeline start).
        width: The terminal width in columns (at least 20 is used).
        horizon: How far ahead the timeline looks.
        connection: A line about the broker connection, if any (live mode).
        tree: What is known of the retained tree's completeness (`--once`), shown
            under the status, each wrapped to the width.

    Returns:
        The lines, without line endings.
    """
    width = max(width, 20)
    now = now.astimezone(UTC)
    lines = _wrap([state.layout.root, now.strftime("%Y-%m-%d %H:%M:%SZ")], width)
    if connection:
        lines.append(connection)
    lines.extend(_status_lines(state, now, width))
    for text in tree:
        lines.extend(textwrap.wrap(text, width, subsequent_indent="    "))
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
                f"  {clock_text(received, now)} {event.event} {dispatch_label(event.dispatch.id)}"
                f" {printable(event.dispatch.type, 40)}"
            )
    return [_fit(line, width) for line in lines]
