"""Advance notice: per type, the runs of the coming hours, as a retained topic.

`microgrid/<id>/dispatch/<type>/upcoming` carries a `wire.UpcomingRuns`: the
runs of the type's dispatches that overlap `[as_of, as_of + window)` (24 h
by default, `dispatch-bridge run --upcoming-hours`), each with its id, start
and end (`None` for a run without end). The web page's timeline and the
SDK's advance notice read it, so the schedule is computed in one place only:
`bridge.schedule`, stepped from change to change.

Two layers, as elsewhere in the bridge:

* `dispatch_runs` and `upcoming_runs`, pure: a dispatch or a type, a window,
  the runs.
* `UpcomingTopics`, the async shell: told which types changed, it
  recomputes them half a second later (a burst of changes costs one
  computation per type), and recomputes every type every `refresh` (15
  minutes for a 24 h window: a list is always complete at least 23 h 45 min
  ahead; a reader ignores the runs that ended since `as_of`). A type is
  republished only when its runs changed or its published `until` comes
  within half a window, so an unchanging site sends little. A full pass
  yields to the event loop every `_CHUNK` dispatches, so that scheduled
  publishes are never held up by it.

Decisions worth knowing:

* Back-to-back or overlapping runs merge, as in `bridge.schedule`: one run
  per stretch of running.
* A run already going at `as_of` is listed with its real start: the
  schedule is walked back occurrence by occurrence, at most `_BACK_STEPS`
  of them (a longer back-to-back chain gives the start of the earliest
  occurrence reached).
* A list holds at most `MAX_RUNS` runs, and one dispatch contributes at most
  `MAX_RUNS_PER_DISPATCH`; beyond that the list keeps its earliest runs,
  is complete up to the start of its last run, and says `truncated`.
* A type left with no dispatch keeps its topic with an empty list (as its
  `running` topic keeps an empty snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from actor_sdk import wire
from actor_sdk.wall_clock import utc_now
from bridge import schedule

if TYPE_CHECKING:
    from bridge.core import ScheduleCore
    from bridge.service import Sink

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_RUNS",
    "MAX_RUNS_PER_DISPATCH",
    "UpcomingTopics",
    "dispatch_runs",
    "refresh_interval",
    "upcoming_runs",
]

_logger = logging.getLogger("bridge.upcoming")

DEFAULT_WINDOW = timedelta(hours=24)
"""How far ahead the runs are listed unless configured."""

MAX_RUNS = 10_000
"""The most runs one type's list holds."""

MAX_RUNS_PER_DISPATCH = 1_500
"""The most runs one dispatch contributes (a MINUTELY rule fills 24 h with 1,440)."""

_BACK_STEPS = 48
"""How many occurrences back the start of a run in progress is looked for."""

_DEBOUNCE_S = 0.5
"""How long after a change its type is recomputed (changes in between join it)."""

_CHUNK = 2_000
"""Dispatches computed between two yields to the event loop."""

_MICROSECOND = timedelta(microseconds=1)

Run = tuple[datetime, datetime | None]
"""A run: its start, and its end (`None`: without end)."""


def refresh_interval(window: timedelta) -> timedelta:
    """How often every type is recomputed as the window moves.

    Args:
        window: How far ahead runs are listed.

    Returns:
        A 96th of the window (15 minutes for 24 h), at least 10 seconds and
        at most 15 minutes.
    """
    return min(max(window / 96, timedelta(seconds=10)), timedelta(minutes=15))


def _run_start(dispatch: wire.Dispatch, at: datetime) -> datetime:
    """The start of the run going at `at` (merged runs walked back, bounded)."""
    duration = dispatch.duration
    if duration is None or dispatch.recurrence is None or duration <= 0:
        return dispatch.start_time
    length = timedelta(seconds=duration)
    moment = at
    start = at
    for _ in range(_BACK_STEPS):
        # The earliest occurrence still running at `moment` began after `moment - length`.
        found = schedule.run_state(dispatch, moment - length + _MICROSECOND).next_run
        if found is None or found > moment:
            return start
        start = max(found, dispatch.start_time)
        if (
            start <= dispatch.start_time
            or not schedule.run_state(dispatch, start - _MICROSECOND).running
        ):
            return start
        moment = start - _MICROSECOND
    return start


def dispatch_runs(
    dispatch: wire.Dispatch,
    start: datetime,
    end: datetime,
    limit: int = MAX_RUNS_PER_DISPATCH,
) -> tuple[list[Run], bool]:
    """Return the runs of one dispatch that overlap `[start, end)`, not clipped.

    Args:
        dispatch: The dispatch.
        start: The window's start.
        end: The window's end.
        limit: The most runs returned.

    Returns:
        The runs in order, and whether the limit cut them short.
    """
    runs: list[Run] = []
    if not dispatch.active:
        return runs, False
    moment = start
    state = schedule.run_state(dispatch, moment)
    first = state.running
    while True:
        change = state.changes_at
        if state.running:
            if runs and runs[-1][1] == moment:
                # `changes_at` was a recheck instant inside a chain of runs.
                runs[-1] = (runs[-1][0], change)
            elif len(runs) == limit:
                return runs, True
            else:
                runs.append((_run_start(dispatch, moment) if first else moment, change))
        first = False
        if change is None or change >= end or change <= moment:
            return runs, False
        moment = change
        state = schedule.run_state(dispatch, moment)


_Found = list[tuple[datetime, int, datetime | None]]
"""Runs found so far: start, dispatch id, end."""


def _collect(
    dispatches: Iterable[wire.Dispatch], now: datetime, until: datetime, found: _Found
) -> datetime:
    """Add the runs of these dispatches in `[now, until)` to `found`.

    Returns:
        The instant up to which the runs found are complete (`until` unless a
        dispatch hit its limit).
    """
    complete_until = until
    for dispatch in dispatches:
        runs, cut = dispatch_runs(dispatch, now, until)
        if cut:
            complete_until = min(complete_until, runs[-1][0])
        found.extend((run_start, dispatch.id, run_end) for run_start, run_end in runs)
    return complete_until


def _message(
    microgrid_id: int,
    dispatch_type: str,
    found: _Found,
    *,
    complete_until: datetime,
    now: datetime,
    until: datetime,
) -> wire.UpcomingRuns:
    """Sort and cut the runs found into the message of one type."""
    found.sort(key=lambda run: (run[0], run[1]))
    truncated = complete_until < until
    if truncated:
        found = [run for run in found if run[0] <= complete_until]
    if len(found) > MAX_RUNS:
        found = found[:MAX_RUNS]
        truncated = True
    return wire.UpcomingRuns(
        microgrid_id=microgrid_id,
        type=dispatch_type,
        runs=tuple(
            wire.UpcomingRun(id=dispatch_id, start=run_start, end=run_end)
            for run_start, dispatch_id, run_end in found
        ),
        as_of=now,
        until=until,
        truncated=truncated,
    )


def upcoming_runs(
    microgrid_id: int,
    dispatch_type: str,
    dispatches: Iterable[wire.Dispatch],
    now: datetime,
    window: timedelta,
) -> wire.UpcomingRuns:
    """Compute the upcoming-runs message of one type.

    Args:
        microgrid_id: The microgrid.
        dispatch_type: The type.
        dispatches: The dispatches of that type.
        now: The window's start (the message's `as_of`).
        window: How far ahead.

    Returns:
        The message: runs sorted by start, then id.
    """
    until = now + window
    found: _Found = []
    complete_until = _collect(dispatches, now, until, found)
    return _message(
        microgrid_id, dispatch_type, found, complete_until=complete_until, now=now, until=until
    )


class UpcomingTopics:
    """Keeps every type's `upcoming` topic current; the async shell of this module."""

    def __init__(
        self,
        core: ScheduleCore,
        sink: Sink,
        *,
        window: timedelta = DEFAULT_WINDOW,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Create the publisher of upcoming runs.

        Args:
            core: The schedule core whose dispatches are listed.
            sink: Where the topics go (the publisher).
            window: How far ahead runs are listed.
            clock: Returns the current instant.
        """
        self._core = core
        self._sink = sink
        self.window = window
        self.refresh = refresh_interval(window)
        self._clock = clock
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self._published: dict[str, tuple[int, datetime]] = {}
        self.passes = 0

    def mark(self, types: Iterable[str]) -> None:
        """Note types whose dispatches changed (never blocks).

        Args:
            types: The types.
        """
        self._dirty.update(types)
        self._wakeup.set()

    async def run(self) -> None:
        """Recompute changed types and, every `refresh`, all types, until cancelled."""
        next_full = self._clock()
        while True:
            now = self._clock()
            if now >= next_full:
                self._dirty.clear()
                await self._compute(None)
                next_full = now + self.refresh
                continue
            self._wakeup.clear()
            if self._dirty:
                await asyncio.sleep(_DEBOUNCE_S)
                wanted, self._dirty = self._dirty, set()
                await self._compute(wanted)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), (next_full - self._clock()).total_seconds()
                )

    async def _compute(self, wanted: set[str] | None) -> None:
        """Recompute the wanted types (`None`: every type held), yielding now and then."""
        by_type: dict[str, list[wire.Dispatch]] = {}
        if wanted is not None:
            by_type = {dispatch_type: [] for dispatch_type in wanted}
        for dispatch in self._core.dispatches():
            if wanted is None or dispatch.type in wanted:
                by_type.setdefault(dispatch.type, []).append(dispatch)
        if wanted is None:
            # Types left with no dispatch keep their (empty) list.
            for dispatch_type in self._published:
                by_type.setdefault(dispatch_type, [])
        done = 0
        for dispatch_type, dispatches in sorted(by_type.items()):
            now = self._clock()
            until = now + self.window
            found: _Found = []
            complete_until = until
            for first in range(0, len(dispatches), _CHUNK):
                chunk = dispatches[first : first + _CHUNK]
                complete_until = min(complete_until, _collect(chunk, now, until, found))
                done += len(chunk)
                if done >= _CHUNK:
                    done = 0
                    await asyncio.sleep(0)
            message = _message(
                self._core.microgrid_id,
                dispatch_type,
                found,
                complete_until=complete_until,
                now=now,
                until=until,
            )
            self._publish(message, now)
        self.passes += 1

    def _publish(self, message: wire.UpcomingRuns, now: datetime) -> None:
        digest = hash((message.runs, message.truncated))
        published = self._published.get(message.type)
        if published is not None:
            last_digest, last_until = published
            if last_digest == digest and last_until - now > self.window / 2:
                return
        try:
            topic = self._core.layout.upcoming(message.type)
        except wire.WireError as error:  # the core refuses such types: never here
            _logger.error("type %r has no upcoming topic (%s): not published", message.type, error)
            return
        self._published[message.type] = (digest, message.until)
        self._sink.set(topic, wire.encode(message))
