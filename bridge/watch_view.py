"""What the interactive `dispatch-bridge watch` shows: rows and lines, no terminal.

Pure functions of a `WatchState`, an instant and the type filter the user typed;
the Textual shell (`bridge.watch_app`) only puts their answers on the screen.
Everything here is unit-tested without a terminal.

The filter: empty shows everything; otherwise a dispatch is shown when its type
contains the text (ignoring case), or when the text is its id (`42` or `#42`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from actor_sdk import wire
from bridge.watch_state import Liveness, WatchState, liveness, printable
from bridge.watch_text import (
    MAX_DISPATCHES_PER_TYPE,
    axis,
    bar,
    clock_text,
    dispatch_label,
    format_span,
    relative,
    target_text,
    time_left,
    union,
)

__all__ = [
    "MAX_ROWS",
    "NO_ACTOR_GRACE",
    "ActorRow",
    "DispatchRow",
    "RunningRow",
    "actor_rows",
    "bridge_line",
    "detail_lines",
    "dispatch_rows",
    "event_lines",
    "matches",
    "recurrence_text",
    "running_rows",
    "timeline_lines",
    "type_cycle",
]

MAX_ROWS = 2000
"""Dispatch rows listed at most; the filter narrows a larger microgrid."""

NO_ACTOR_GRACE = timedelta(seconds=5)
"""How long a dispatch may run before "no actor reports it" is flagged."""

_UPCOMING_SHOWN = 5
"""Coming runs listed in a dispatch's details."""


def matches(filter_text: str, dispatch_type: str, dispatch_id: int | None = None) -> bool:
    """Tell whether a dispatch (or a whole type, without an id) passes the filter.

    >>> matches("peak", "PEAK_SHAVING"), matches("#4", "LIMIT_PV", 4), matches("x", "PV")
    (True, True, False)

    Args:
        filter_text: What the user typed.
        dispatch_type: The dispatch's type.
        dispatch_id: The dispatch's id, if a dispatch is meant.

    Returns:
        True to show it.
    """
    text = filter_text.strip()
    if not text:
        return True
    if text.casefold() in dispatch_type.casefold():
        return True
    return dispatch_id is not None and text.removeprefix("#") == str(dispatch_id)


def bridge_line(state: WatchState, now: datetime) -> tuple[Liveness, str, str]:
    """Say what the bridge is by the liveness rule, and what its status adds.

    Args:
        state: What the topics said.
        now: The instant to judge at.

    Returns:
        The verdict, its line, and the status's details ("" when there are none
        worth showing: no status, or the will's, whose counts say nothing).
    """
    verdict, line = liveness(state, now)
    status = state.status
    if status is None or verdict is Liveness.UNKNOWN:
        return verdict, line, ""
    if verdict is Liveness.OFFLINE:
        return verdict, line, f"session {status.session}"
    synced = "never synced" if status.synced_at is None else f"synced {status.synced_at:%H:%M:%SZ}"
    details = (
        f"upstream {status.upstream}, {synced}, session {status.session}, "
        f"{status.dispatches} dispatches"
    )
    return verdict, line, details


@dataclass(frozen=True)
class RunningRow:
    """One dispatch that runs now, as the running snapshot of its type says.

    Attributes:
        dispatch_type: Its type (printable).
        dispatch_id: Its id.
        left: Until when it runs and the time left (`OVERDUE by ...` past it).
        target: Its target in one line.
        actors: The actors that report running it, comma-separated.
        flag: A problem to point out, or None.
    """

    dispatch_type: str
    dispatch_id: int
    left: str
    target: str
    actors: str
    flag: str | None


def running_rows(state: WatchState, now: datetime, filter_text: str = "") -> list[RunningRow]:
    """List what runs now, per type and id, with time left and who runs it.

    Args:
        state: What the topics said.
        now: The instant to show.
        filter_text: The type filter.

    Returns:
        The rows, by type then id.
    """
    rows: list[RunningRow] = []
    for dispatch_type in sorted(state.snapshots):
        snapshot = state.snapshots[dispatch_type]
        for dispatch in snapshot.running:
            if not matches(filter_text, dispatch_type, dispatch.id):
                continue
            actors = state.actors_running(dispatch_type, dispatch.id)
            since = state.running_since.get((dispatch_type, dispatch.id), now)
            flag = None
            if dispatch.until is not None and dispatch.until < now:
                flag = "no new snapshot past its end (bridge down?)"
            elif not actors and now - since >= NO_ACTOR_GRACE:
                flag = "no actor reports it"
            rows.append(
                RunningRow(
                    dispatch_type=printable(dispatch_type, 40),
                    dispatch_id=dispatch.id,
                    left=time_left(dispatch, now),
                    target=target_text(dispatch.target),
                    actors=", ".join(printable(a, 30) for a in actors) or "-",
                    flag=flag,
                )
            )
    return rows


@dataclass(frozen=True)
class DispatchRow:
    """One known dispatch, for the list a dispatch is selected from.

    Attributes:
        dispatch_type: Its type as published (the key to select it by).
        type_label: Its type, safe to show.
        dispatch_id: Its id.
        when: Running with time left, its next start, or why it does not run.
        rule: Its recurrence in short, or `once`.
    """

    dispatch_type: str
    type_label: str
    dispatch_id: int
    when: str
    rule: str


def _next_starts(state: WatchState, now: datetime) -> dict[tuple[str, int], datetime]:
    """The next start after now of each dispatch, from the upcoming topics."""
    starts: dict[tuple[str, int], datetime] = {}
    for dispatch_type, upcoming in state.upcoming.items():
        for run in upcoming.runs:
            if run.start > now:
                starts.setdefault((dispatch_type, run.id), run.start)
    return starts


def _when(state: WatchState, dispatch: wire.Dispatch, now: datetime, start: datetime | None) -> str:
    snapshot = state.snapshots.get(dispatch.type)
    if snapshot is not None and any(d.id == dispatch.id for d in snapshot.running):
        return "RUNNING"
    if not dispatch.active:
        return "inactive"
    if start is None and dispatch.next_run is not None and dispatch.next_run > now:
        start = dispatch.next_run
    if start is None:
        return "no run ahead"
    return f"next {clock_text(start, now)}"


def dispatch_rows(
    state: WatchState, now: datetime, filter_text: str = ""
) -> tuple[list[DispatchRow], int]:
    """List the known dispatches that pass the filter, by type then id.

    Args:
        state: What the topics said.
        now: The instant to show.
        filter_text: The type filter.

    Returns:
        At most `MAX_ROWS` rows, and how many dispatches passed the filter in all.
    """
    starts = _next_starts(state, now)
    wanted_id = filter_text.strip().removeprefix("#")
    rows: list[DispatchRow] = []
    total = 0
    for dispatch_type in sorted(state.dispatches):
        of_type = state.dispatches[dispatch_type]
        if matches(filter_text, dispatch_type):
            ids = sorted(of_type)
        elif wanted_id.isdigit() and int(wanted_id) in of_type:
            ids = [int(wanted_id)]
        else:
            continue
        total += len(ids)
        for dispatch_id in ids[: max(MAX_ROWS - len(rows), 0)]:
            dispatch = of_type[dispatch_id]
            rows.append(
                DispatchRow(
                    dispatch_type=dispatch_type,
                    type_label=printable(dispatch_type, 40),
                    dispatch_id=dispatch_id,
                    when=_when(state, dispatch, now, starts.get((dispatch_type, dispatch_id))),
                    rule=_short_rule(dispatch.recurrence),
                )
            )
    return rows, total


_UNITS = {
    "MINUTELY": "minute",
    "HOURLY": "hour",
    "DAILY": "day",
    "WEEKLY": "week",
    "MONTHLY": "month",
    "YEARLY": "year",
}


def _short_rule(rule: wire.Recurrence | None) -> str:
    if rule is None:
        return "once"
    unit = _UNITS.get(rule.frequency, rule.frequency.lower())
    return f"every {unit}" if rule.interval == 1 else f"every {rule.interval} {unit}s"


def recurrence_text(rule: wire.Recurrence | None) -> str:
    """Describe a recurrence rule in one line.

    >>> recurrence_text(wire.Recurrence(frequency="DAILY", interval=2, byhours=(6, 18)))
    'every 2 days, hours 6,18'

    Args:
        rule: The rule, None for a one-off.

    Returns:
        The text.
    """
    if rule is None:
        return "once (no recurrence)"
    parts = [_short_rule(rule)]
    for name, values in (
        ("months", rule.bymonths),
        ("month days", rule.bymonthdays),
        ("weekdays", rule.byweekdays),
        ("hours", rule.byhours),
        ("minutes", rule.byminutes),
    ):
        if values:
            parts.append(f"{name} {','.join(str(v) for v in values)}")
    if rule.end is not None and rule.end.count is not None:
        parts.append(f"ends after {rule.end.count} runs")
    if rule.end is not None and rule.end.until is not None:
        parts.append(f"ends {rule.end.until:%Y-%m-%d %H:%M:%SZ}")
    return ", ".join(parts)


def _payload_lines(payload: dict[str, object]) -> list[str]:
    if not payload:
        return ["payload: {} (empty)"]
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return ["payload:", *(printable(line, 200) for line in text.splitlines()[:40])]


def detail_lines(
    state: WatchState, dispatch_type: str, dispatch_id: int, now: datetime
) -> list[str]:
    """Describe one dispatch in full: when, what, on which components, who runs it.

    Args:
        state: What the topics said.
        dispatch_type: Its type.
        dispatch_id: Its id.
        now: The instant to show.

    Returns:
        The lines; one line saying so when the dispatch is gone.
    """
    dispatch = state.dispatches.get(dispatch_type, {}).get(dispatch_id)
    label = f"{dispatch_label(dispatch_id)} {printable(dispatch_type, 60)}"
    if dispatch is None:
        return [f"{label}: no longer published (deleted, or its type changed)"]
    flags = ["active" if dispatch.active else "INACTIVE"]
    if dispatch.dry_run:
        flags.append("dry run")
    duration = (
        "until changed"
        if dispatch.duration is None
        else format_span(timedelta(seconds=dispatch.duration))
    )
    snapshot = state.snapshots.get(dispatch_type)
    running = next((d for d in snapshot.running if d.id == dispatch_id), None) if snapshot else None
    lines = [
        f"{label} ({', '.join(flags)})",
        f"start:      {dispatch.start_time:%Y-%m-%d %H:%M:%SZ}",
        f"duration:   {duration}",
        f"recurrence: {recurrence_text(dispatch.recurrence)}",
        f"target:     {target_text(dispatch.target)}",
        f"now:        {'RUNNING ' + time_left(running, now) if running else 'not running'}",
    ]
    actors = state.actors_running(dispatch_type, dispatch_id)
    lines.append(f"actors:     {', '.join(printable(a, 30) for a in actors) or 'none reports it'}")
    upcoming = state.upcoming.get(dispatch_type)
    if upcoming is not None:
        runs = [
            f"{clock_text(r.start, now)}-{'...' if r.end is None else clock_text(r.end, now)}"
            for r in upcoming.runs
            if r.id == dispatch_id and (r.end is None or r.end > now)
        ]
        shown = runs[:_UPCOMING_SHOWN] or [f"none until {clock_text(upcoming.until, now)}"]
        if len(runs) > _UPCOMING_SHOWN:
            shown.append(f"(+{len(runs) - _UPCOMING_SHOWN} more)")
        for index, run in enumerate(shown):
            lines.append(("coming:" if index == 0 else "").ljust(12) + run)
    lines.extend(_payload_lines(wire.payload_of(dispatch)))
    lines.append(f"created {dispatch.create_time:%Y-%m-%d %H:%M:%SZ}")
    lines.append(f"updated {dispatch.update_time:%Y-%m-%d %H:%M:%SZ}")
    return lines


def _upcoming_runs(
    upcoming: wire.UpcomingRuns, now: datetime, end: datetime
) -> dict[int, list[tuple[datetime, datetime]]]:
    """The runs of each dispatch within `[now, end)`, clipped to it."""
    by_id: dict[int, list[tuple[datetime, datetime]]] = {}
    for run in upcoming.runs:
        run_end = end if run.end is None else min(run.end, end)
        if run.start < end and run_end > now:
            by_id.setdefault(run.id, []).append((max(run.start, now), run_end))
    return by_id


def timeline_lines(
    state: WatchState,
    now: datetime,
    width: int,
    horizon: timedelta,
    filter_text: str = "",
) -> list[str]:
    """Draw the coming hours per type from the bridge's upcoming topics.

    One clock axis on top, then per type its name and one bar per dispatch (the
    soonest `MAX_DISPATCHES_PER_TYPE`), with `any` for their union when there
    are several: what one merged actor of the type does.

    Args:
        state: What the topics said.
        now: Where the timeline starts.
        width: The columns to fit.
        horizon: How far ahead to draw.
        filter_text: The type filter.

    Returns:
        The lines.
    """
    end = now + horizon
    shown = {
        dispatch_type: _upcoming_runs(upcoming, now, end)
        for dispatch_type, upcoming in sorted(state.upcoming.items())
        if matches(filter_text, dispatch_type)
    }
    if not shown:
        return ["no upcoming runs published (bridge run with --upcoming-hours 0?)"]
    ids = [i for by_id in shown.values() for i in by_id]
    label_width = max([len("any"), *(len(dispatch_label(i)) for i in ids)]) + 1
    cells = max(width - label_width - 1, 8)
    cell = horizon / cells
    lines = [
        f"next {format_span(horizon)}: # runs, + runs part of the time",
        " " * (label_width + 1) + axis(now, cell, cells),
    ]
    for dispatch_type, by_id in shown.items():
        upcoming = state.upcoming[dispatch_type]
        title = printable(dispatch_type, 40)
        if upcoming.until < end:
            title += f" (the bridge's list ends {clock_text(upcoming.until, now)})"
        if upcoming.truncated:
            title += " (list truncated by the bridge)"
        lines.append(title if by_id else f"{title}: no run in this window")
        order = sorted(by_id, key=lambda i: (by_id[i][0][0], i))
        for dispatch_id in order[:MAX_DISPATCHES_PER_TYPE]:
            label = dispatch_label(dispatch_id).rjust(label_width - 1)
            lines.append(f"{label} |{bar(by_id[dispatch_id], now, cell, cells)}")
        if len(order) > 1:
            merged = union(run for runs in by_id.values() for run in runs)
            lines.append(f"{'any'.rjust(label_width - 1)} |{bar(merged, now, cell, cells)}")
        if len(order) > MAX_DISPATCHES_PER_TYPE:
            lines.append(f"  ... {len(order) - MAX_DISPATCHES_PER_TYPE} more in this window")
    return lines


def event_lines(state: WatchState, now: datetime, filter_text: str = "") -> list[str]:
    """List the warnings and the newest lifecycle events, newest last.

    Args:
        state: What the topics said.
        now: The instant to show.
        filter_text: The type filter (events only; warnings always show).

    Returns:
        The lines.
    """
    lines = [f"! {warning}" for warning in state.warnings]
    lines.extend(
        f"{clock_text(received, now)} {event.event} {dispatch_label(event.dispatch.id)} "
        f"{printable(event.dispatch.type, 40)}"
        for received, event in state.events
        if matches(filter_text, event.dispatch.type, event.dispatch.id)
    )
    return lines or ["no events since watch connected"]


@dataclass(frozen=True)
class ActorRow:
    """One actor host, as its execution status says.

    Attributes:
        actor_id: Its id (the MQTT client id).
        state: `running`, `idle`, `failed` or `offline`.
        runs: Per managed type, the dispatches it runs (`T: #1,#4`) or its state.
        host: The host it runs on, and the SDK's version.
        since: Since when its state holds.
        error: Its latest failure, or "".
    """

    actor_id: str
    state: str
    runs: str
    host: str
    since: str
    error: str


def _type_runs(dispatch_type: str, of_type: wire.ActorTypeStatus) -> str:
    name = printable(dispatch_type, 40)
    if of_type.dispatches:
        return f"{name}: " + ",".join(dispatch_label(i) for i in of_type.dispatches)
    return f"{name}: {of_type.state}"


def actor_rows(state: WatchState, now: datetime, filter_text: str = "") -> list[ActorRow]:
    """List the actor hosts that manage a type passing the filter, by id.

    Args:
        state: What the topics said.
        now: The instant to show.
        filter_text: The type filter.

    Returns:
        The rows.
    """
    rows: list[ActorRow] = []
    for actor_id in sorted(state.actors):
        status = state.actors[actor_id]
        types = sorted(t for t in status.types if matches(filter_text, t))
        if filter_text.strip() and not types:
            continue
        rows.append(
            ActorRow(
                actor_id=printable(actor_id, 40),
                state=status.state,
                runs="; ".join(_type_runs(t, status.types[t]) for t in types) or "-",
                host=f"{printable(status.host, 40)} ({printable(status.version, 20)})",
                since=f"{clock_text(status.since, now)} ({relative(status.since, now)})",
                error=printable(status.error or "", 120),
            )
        )
    return rows


def type_cycle(types: Iterable[str], current: str) -> str:
    """Return the filter that follows `current` when cycling through the types.

    >>> type_cycle(["A", "B"], ""), type_cycle(["A", "B"], "A"), type_cycle(["A", "B"], "B")
    ('A', 'B', '')

    Args:
        types: The known types, sorted.
        current: The filter now.

    Returns:
        The next type, or "" (everything) after the last one.
    """
    ordered = list(types)
    if current in ordered:
        index = ordered.index(current) + 1
        return ordered[index] if index < len(ordered) else ""
    return ordered[0] if ordered else ""
