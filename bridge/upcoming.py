"""Advance notice: per type, the runs of the coming hours, as a retained topic.

`microgrid/<id>/dispatch/<type>/upcoming` carries a `wire.UpcomingRuns`: the
runs of the type's dispatches that overlap `[as_of, as_of + window)` (24 h
by default, `dispatch-bridge run --upcoming-hours`), each with its id, start
and end (`None` for a run without end). The web page's timeline and the
SDK's advance notice read it, so the schedule is computed in one place only:
`bridge.schedule`, stepped from change to change.

Two layers, as elsewhere in the bridge:

* `dispatch_runs`, `RunMerge` and `upcoming_runs`, pure: a dispatch or a
  type, a window, the runs. `RunMerge` steps each dispatch only as far as
  the runs listed need, so a type costs one schedule step per dispatch plus
  one per run listed, however dense its rules.
* `UpcomingTopics`, the async shell: told which types changed, it
  recomputes them half a second later (a burst of changes costs one
  computation per type), and recomputes every type every `refresh` (15
  minutes for a 24 h window: a list is always complete at least 23 h 45 min
  ahead unless cut short; a reader ignores the runs that ended since
  `as_of`). A type is republished only when its runs changed or its
  published `until` comes within half a window, so an unchanging site sends
  little. A pass yields to the event loop every `_SLICE` dispatches or runs
  (about a millisecond), so that scheduled publishes are not held up by it.

Decisions worth knowing:

* Back-to-back or overlapping runs merge, as in `bridge.schedule`: one run
  per stretch of running.
* A run already going at `as_of` is listed with its real start: the
  schedule is walked back occurrence by occurrence, at most `_BACK_STEPS`
  of them (a longer back-to-back chain gives the start of the earliest
  occurrence reached).
* A list holds the earliest `MAX_RUNS` runs (1,000: under 100 KB, far below
  a NATS server's default 1 MB payload limit); beyond that it is complete up
  to the start of its last run and says `truncated`. Such a list is
  recomputed when half the time it covers has passed (at least 10 s apart),
  so its readers always hold the runs of the next stretch.
* A type left with no dispatch keeps its topic with an empty list (as its
  `running` topic keeps an empty snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
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
    "RunMerge",
    "UpcomingTopics",
    "dispatch_runs",
    "refresh_interval",
    "upcoming_runs",
]

_logger = logging.getLogger("bridge.upcoming")

DEFAULT_WINDOW = timedelta(hours=24)
"""How far ahead the runs are listed unless configured."""

MAX_RUNS = 1_000
"""The most runs one type's list holds (about 70-100 bytes each on the wire)."""

_BACK_STEPS = 48
"""How many occurrences back the start of a run in progress is looked for."""

_DEBOUNCE_S = 0.5
"""How long after a change its type is recomputed (changes in between join it)."""

_SLICE = 100
"""Dispatches added, or runs taken, between two yields to the event loop (about 1 ms)."""

_MIN_RECHECK = timedelta(seconds=10)
"""The least time between two recomputations of a list cut short."""

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


def _runs(dispatch: wire.Dispatch, start: datetime, end: datetime) -> Iterator[Run]:
    """Yield the runs of one dispatch that overlap `[start, end)`, in order, one step at a time.

    A run is yielded once its end is known: back-to-back occurrences merge
    first, so the schedule is stepped only as far as the runs taken need.
    """
    if not dispatch.active:
        return
    moment = start
    state = schedule.run_state(dispatch, moment)
    open_run: Run | None = None
    if state.running:
        open_run = (_run_start(dispatch, moment), state.changes_at)
    while True:
        change = state.changes_at
        if change is None or change >= end or change <= moment:
            if open_run is not None:
                yield open_run
            return
        moment = change
        state = schedule.run_state(dispatch, moment)
        if not state.running:
            if open_run is not None:
                yield open_run
                open_run = None
        elif open_run is not None and open_run[1] == moment:
            # `changes_at` was a recheck instant inside a chain of runs.
            open_run = (open_run[0], state.changes_at)
        else:
            if open_run is not None:
                yield open_run
            open_run = (moment, state.changes_at)


def dispatch_runs(
    dispatch: wire.Dispatch, start: datetime, end: datetime, limit: int
) -> tuple[list[Run], bool]:
    """Return the first `limit` runs of one dispatch that overlap `[start, end)`, not clipped.

    Args:
        dispatch: The dispatch.
        start: The window's start.
        end: The window's end.
        limit: The most runs returned.

    Returns:
        The runs in order, and whether the limit cut them short.
    """
    runs = list(itertools.islice(_runs(dispatch, start, end), limit + 1))
    return runs[:limit], len(runs) > limit


class RunMerge:
    """The runs of many dispatches in one order (start, then dispatch id), taken on demand.

    Each dispatch is stepped only as far as the runs taken need: listing the
    earliest `MAX_RUNS` of a type costs one schedule step per dispatch plus
    about one per run taken, however dense the rules are.
    """

    def __init__(self, start: datetime, end: datetime) -> None:
        """Create an empty merge over the window `[start, end)`.

        Args:
            start: The window's start.
            end: The window's end.
        """
        self._start = start
        self._end = end
        self._heads: list[tuple[datetime, int, datetime | None, Iterator[Run]]] = []

    def add(self, dispatches: Iterable[wire.Dispatch]) -> None:
        """Add dispatches: each one's first run is found now.

        Args:
            dispatches: Dispatches with ids not added before.
        """
        for dispatch in dispatches:
            runs = _runs(dispatch, self._start, self._end)
            first = next(runs, None)
            if first is not None:
                heapq.heappush(self._heads, (first[0], dispatch.id, first[1], runs))

    def take(self, count: int) -> list[wire.UpcomingRun]:
        """Take up to `count` runs, the earliest first.

        Args:
            count: The most runs taken.

        Returns:
            The runs, in order; fewer than `count` when none is left.
        """
        taken: list[wire.UpcomingRun] = []
        while self._heads and len(taken) < count:
            run_start, dispatch_id, run_end, runs = self._heads[0]
            taken.append(wire.UpcomingRun(id=dispatch_id, start=run_start, end=run_end))
            following = next(runs, None)
            if following is None:
                heapq.heappop(self._heads)
            else:
                heapq.heapreplace(self._heads, (following[0], dispatch_id, following[1], runs))
        return taken

    @property
    def exhausted(self) -> bool:
        """Whether every run in the window was taken."""
        return not self._heads


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
        The message: the earliest `MAX_RUNS` runs, sorted by start, then id.
    """
    merge = RunMerge(now, now + window)
    merge.add(dispatches)
    runs = merge.take(MAX_RUNS)
    return _message(microgrid_id, dispatch_type, runs, merge, now=now, until=now + window)


def _message(
    microgrid_id: int,
    dispatch_type: str,
    runs: list[wire.UpcomingRun],
    merge: RunMerge,
    *,
    now: datetime,
    until: datetime,
) -> wire.UpcomingRuns:
    """The message of one type: its runs taken, cut short if the merge holds more."""
    return wire.UpcomingRuns(
        microgrid_id=microgrid_id,
        type=dispatch_type,
        runs=tuple(runs),
        as_of=now,
        until=until,
        truncated=not merge.exhausted,
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
        flushed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Create the publisher of upcoming runs.

        Args:
            core: The schedule core whose dispatches are listed.
            sink: Where the topics go (the publisher).
            window: How far ahead runs are listed.
            clock: Returns the current instant.
            flushed: Waits until the sink has sent what it holds; each computation
                waits for it, so that advance notice never delays the dispatch and
                running topics (at start-up: 100,050 of them at 100k).
        """
        self._core = core
        self._sink = sink
        self.window = window
        self.refresh = refresh_interval(window)
        self._clock = clock
        self._flushed = flushed
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self._published: dict[str, tuple[int, datetime]] = {}
        self._recheck: dict[str, datetime] = {}
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
            self._dirty.update(t for t, at in self._recheck.items() if at <= now)
            if self._dirty:
                await asyncio.sleep(_DEBOUNCE_S)
                wanted, self._dirty = self._dirty, set()
                await self._compute(wanted)
                continue
            wake_at = min([next_full, *self._recheck.values()])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), (wake_at - self._clock()).total_seconds()
                )

    async def _compute(self, wanted: set[str] | None) -> None:
        """Recompute the wanted types (`None`: every type held), yielding now and then."""
        if self._flushed is not None:
            await self._flushed()
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
        for dispatch_type, dispatches in sorted(by_type.items()):
            now = self._clock()
            until = now + self.window
            merge = RunMerge(now, until)
            for first in range(0, len(dispatches), _SLICE):
                merge.add(dispatches[first : first + _SLICE])
                await asyncio.sleep(0)
            runs: list[wire.UpcomingRun] = []
            while len(runs) < MAX_RUNS and not merge.exhausted:
                runs += merge.take(min(_SLICE, MAX_RUNS - len(runs)))
                await asyncio.sleep(0)
            message = _message(
                self._core.microgrid_id, dispatch_type, runs, merge, now=now, until=until
            )
            self._plan_recheck(message)
            self._publish(message, now)
            await asyncio.sleep(0)
        self.passes += 1

    def _plan_recheck(self, message: wire.UpcomingRuns) -> None:
        """A list cut short is recomputed when half of what it covers has passed.

        So a reader always holds the runs of the next stretch, even when a
        type's runs are too many for `refresh` (at least `_MIN_RECHECK` apart).
        """
        if not message.truncated:
            self._recheck.pop(message.type, None)
            return
        covered = message.runs[-1].start - message.as_of
        self._recheck[message.type] = message.as_of + max(covered / 2, _MIN_RECHECK)

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
