"""The pure schedule: given dispatches and an instant, what runs and when that changes.

Everything that decides whether a dispatch runs lives in this file. It never
reads the clock and never does I/O: the caller passes `now` in and acts on the
answer (the way h11 keeps HTTP free of sockets).

The results equal `frequenz-client-dispatch`'s `Dispatch.started_at(now)`,
`Dispatch._until(now)` and `Dispatch.next_run_after(now)` for every valid
dispatch, quirks included:

* `next_run` ignores `active`: an inactive dispatch still has a `next_run`.
* `duration: None` runs from `start_time` on for ever and ignores the
  recurrence; its `next_run` is `start_time` until that instant, then `None`.
* `duration: 0` (or less) never runs.
* Frequency `UNSPECIFIED` makes a dispatch a one-off, whatever else its
  recurrence says.
* Occurrences follow `dateutil.rrule` with the rule's `dtstart` = `start_time`
  truncated to the second: `by...` lists expand or limit, MONTHLY and YEARLY
  rules without `by...` lists skip months lacking the start's day (a monthly
  rule started on January 31 has no February occurrence), `count` counts
  occurrences, `until` is inclusive, weeks start on Monday, times are UTC and
  the seconds of every occurrence are the start's seconds. A dispatch never
  runs before its own `start_time`, even when the first occurrence is the same
  second truncated.
* A run is the latest occurrence `o <= now` with `now < o + duration`;
  back-to-back or overlapping runs therefore merge.

Invalid recurrence rules, where the reference raises or walks to the year
9999: interval below 1, a weekday `UNSPECIFIED` (or any unknown name), a
`by...` value out of range (minutes 0-59, hours 0-23, month days 1-31 or
-31..-1, months 1-12), an HOURLY rule whose `byhours` the interval can never
reach, or a MINUTELY rule whose `byhours`/`byminutes` it can never reach. Such
a dispatch never runs: `run_state` gives `running=False`, `next_run=None`,
`changes_at=None` (with `duration: None` the recurrence is ignored, as by the
reference). `run_state` and `running_at` never raise for them, so one bad
dispatch cannot stop a whole set; `validate` raises `InvalidRecurrence` with
the reason, for callers that want to refuse or log such rules.

Cost: one-offs and rules without `by...` lists of MINUTELY to WEEKLY use
closed-form arithmetic on whole seconds, with nothing cached; MONTHLY and
YEARLY rules without lists use month arithmetic; rules with lists walk
calendar months near `now` (never the occurrences since the start). Both
kinds are compiled once per (rule, start) into small objects held in bounded
LRU caches, which remember the last answer's window (consecutive calls
usually cost nothing); month shapes, slot lists and filter sets are shared by
rules of the same shape. A `count` end is turned once into the instant of the
last occurrence, counting whole months where all days are alike. A day that
never exists (February 30) is recognised at once and never occurs (`validate`
does not flag it: the rule is well-formed, just empty).

`changes_at` is exact, except for rules with month or month-day filters (or
MONTHLY and YEARLY rules whose gaps vary) whose runs chain back to back over
more than `CHAIN_LIMIT` days (e.g. an endless DAILY rule limited to some
months, with a duration of a day or more): there it is the end of the last
run examined, an instant at least `CHAIN_LIMIT - 1` days ahead at which the
state does not change yet and from which the caller recomputes. Not
thread-safe beyond what the GIL gives: the remembered windows are replaced
whole, so a race only costs a recomputation.
"""

# Calendar arithmetic reads best as one flat function per question, with early
# returns for each case: the branch and return counts follow the calendar.
# ruff: noqa: PLR0911, PLR0912, PLR0915

from __future__ import annotations

import calendar
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from math import gcd

from actor_sdk import wire

__all__ = [
    "CHAIN_LIMIT",
    "InvalidRecurrence",
    "RunState",
    "end_time",
    "run_state",
    "running_at",
    "validate",
]

CHAIN_LIMIT = 1000
"""The most days of back-to-back runs `changes_at` follows before it gives a recheck instant."""


class InvalidRecurrence(ValueError):
    """A recurrence rule that can never produce an occurrence as written.

    Raised only by `validate`; the other functions treat such a dispatch as
    never running.
    """


@dataclass(frozen=True, slots=True)
class RunState:
    """The schedule state of one dispatch at one instant.

    Attributes:
        running: Whether it runs at that instant (`Dispatch.started_at(now)`).
        until: The end of the current run when running; `None` when not
            running or when the run is endless.
        next_run: The first start at or after that instant
            (`Dispatch.next_run_after(now)`), whether active or not.
        changes_at: The next instant after `now` at which `running` flips;
            `None` if it never does again.
    """

    running: bool
    until: datetime | None
    next_run: datetime | None
    changes_at: datetime | None


def _slot_setter(name: str) -> Callable[[RunState, object], None]:
    setter: Callable[[RunState, object], None] = RunState.__dict__[name].__set__
    return setter


_set_running = _slot_setter("running")
_set_until = _slot_setter("until")
_set_next_run = _slot_setter("next_run")
_set_changes_at = _slot_setter("changes_at")
_new_state = object.__new__


def _state(
    running: bool, until: datetime | None, next_run: datetime | None, changes_at: datetime | None
) -> RunState:
    """Build a `RunState` without the frozen dataclass's slow `__init__` (same value)."""
    state: RunState = _new_state(RunState)
    _set_running(state, running)
    _set_until(state, until)
    _set_next_run(state, next_run)
    _set_changes_at(state, changes_at)
    return state


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_DAY = 86400
_MAX_YEAR = 9999

_MINUTELY, _HOURLY, _DAILY, _WEEKLY, _MONTHLY, _YEARLY = range(6)
_FREQUENCIES = {
    "MINUTELY": _MINUTELY,
    "HOURLY": _HOURLY,
    "DAILY": _DAILY,
    "WEEKLY": _WEEKLY,
    "MONTHLY": _MONTHLY,
    "YEARLY": _YEARLY,
}
_WEEKDAYS = {
    name: index
    for index, name in enumerate(
        ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")
    )
}


def _seconds(instant: datetime) -> tuple[int, int]:
    """Split an aware instant into whole seconds since the epoch and microseconds."""
    delta = instant - _EPOCH
    return delta.days * _DAY + delta.seconds, delta.microseconds


_LAST_SECOND = _seconds(datetime.max.replace(tzinfo=UTC))[0]


def _instant(seconds: int) -> datetime:
    # Rules and durations can reach past year 9999, where datetime ends: such an
    # instant is "not before the end of time", and the last representable second
    # says exactly that without an OverflowError in the middle of a schedule step.
    return datetime.fromtimestamp(min(seconds, _LAST_SECOND), UTC)


@lru_cache(maxsize=4096)
def _month_info(year: int, month: int) -> tuple[int, int]:
    """Return the day index (since the epoch) of a month's first day, and its length."""
    return date(year, month, 1).toordinal() - _EPOCH_ORDINAL, calendar.monthrange(year, month)[1]


# --- Compiled rules ---------------------------------------------------------


@lru_cache(maxsize=8192)
def _passing_days(
    weekdays: frozenset[int], positive: frozenset[int], negative: frozenset[int], shape: int
) -> tuple[int, ...]:
    """Days of a month (1-based) that pass the weekday and month-day filters.

    `shape` is `length * 7 + weekday of the 1st`; the month filter is applied
    by the caller.
    """
    length, first_weekday = divmod(shape, 7)
    days = []
    for day in range(1, length + 1):
        if weekdays and (first_weekday + day - 1) % 7 not in weekdays:
            continue
        if (positive or negative) and day not in positive and day - length - 1 not in negative:
            continue
        days.append(day)
    return tuple(days)


@lru_cache(maxsize=256)
def _phase_slots(
    per_day: int,
    interval: int,
    hours: frozenset[int] | None,
    minutes: frozenset[int] | None,
    phase: int,
) -> tuple[int, ...]:
    """Units of a day (hours or minutes) selected by the interval and the filters.

    A unit `u` of the day is selected when `u ≡ phase (mod interval)`, its hour
    is in `hours` and (minutely rules) its minute in `minutes`.
    """
    if per_day == 24:
        return tuple(unit for unit in range(phase, 24, interval) if hours is None or unit in hours)
    slots = []
    for hour in range(24) if hours is None else sorted(hours):
        first = (phase - 60 * hour) % interval
        for minute in range(first, 60, interval):
            if minutes is None or minute in minutes:
                slots.append(_UNITS_OF_DAY[60 * hour + minute])
    return tuple(slots)


_UNITS_OF_DAY = tuple(range(1440))
"""Shared int objects, so that cached slot tuples hold only pointers."""


@lru_cache(maxsize=1024)
def _frozen(values: tuple[int, ...]) -> frozenset[int]:
    """Return one shared frozenset per distinct filter (a compiled rule holds several)."""
    return frozenset(values)


def _max_gap(slots: tuple[int, ...], offsets: tuple[int, ...], unit: int) -> int:
    """Return the largest gap in seconds between consecutive occurrences within one day."""
    return _max_gap_cached(slots, offsets, unit) if len(slots) > 1 or len(offsets) > 1 else 0


@lru_cache(maxsize=512)
def _max_gap_cached(slots: tuple[int, ...], offsets: tuple[int, ...], unit: int) -> int:
    gap = max((b - a for a, b in pairwise(offsets)), default=0)
    step = max((b - a for a, b in pairwise(slots)), default=0)
    if step:
        gap = max(gap, step * unit + offsets[0] - offsets[-1])
    return gap


_MINUS_INFINITY = -(1 << 62)
_PLUS_INFINITY = 1 << 62
_UNKNOWN = -1
_NO_WINDOW: tuple[int, int, int | None, int | None] = (0, 0, None, None)


class _Remembering:
    """What `_Rule` and `_Monthly` share: answers remembered between calls.

    Every instant between two consecutive occurrences has the same answer,
    so the bridge's next step usually costs nothing. Each memo is one tuple,
    replaced whole.
    """

    __slots__ = ("_chain_memo", "_window")

    def __init__(self) -> None:
        self._window = _NO_WINDOW
        self._chain_memo = (0, 0, 0)

    def prev(self, at: int) -> int | None:
        """Return the last occurrence at or before `at`."""
        raise NotImplementedError

    def next(self, at: int) -> int | None:
        """Return the first occurrence at or after `at`."""
        raise NotImplementedError

    def around(self, at: int) -> tuple[int | None, int | None]:
        """Return the last occurrence at or before `at` and the first one after it.

        Remembers the answer: every instant between those two occurrences has
        the same answer, so the next call (the bridge's next step) usually
        costs nothing.
        """
        low, high, before, after = self._window
        if low <= at < high:
            return before, after
        before = self.prev(at)
        after = self.next(at + 1)
        self._window = (
            _MINUS_INFINITY if before is None else before,
            _PLUS_INFINITY if after is None else after,
            before,
            after,
        )
        return before, after

    def chain_end(self, latest: int, duration: int) -> int | None:
        """Return `_chain_end` for this rule, remembering the last answer."""
        memo_latest, memo_duration, memo_end = self._chain_memo
        if memo_latest == latest and memo_duration == duration and latest:
            return memo_end if memo_end >= 0 else None
        assert isinstance(self, _Monthly | _Rule)
        end = _chain_end(self, latest, duration)
        self._chain_memo = (latest, duration, -1 if end is None else end)
        return end


class _Monthly(_Remembering):
    """A MONTHLY or YEARLY rule without `by...` lists: the start's day every `step` months.

    A month lacking that day (a 31st, February 29) has no occurrence. Same
    interface as `_Rule`, by direct month arithmetic.
    """

    __slots__ = ("day", "empty", "first", "last", "month0", "step", "time_of_day")

    def __init__(self, first: int, step: int) -> None:
        super().__init__()
        start = date.fromordinal(first // _DAY + _EPOCH_ORDINAL)
        self.first = first
        self.step = step
        self.day = start.day
        self.month0 = start.year * 12 + start.month - 1
        self.time_of_day = first % _DAY
        self.last: int | None = None
        self.empty = False

    def _occurrence(self, index: int) -> int | None:
        """Return the occurrence in the `index`-th selected month, if that month has the day."""
        year, month = divmod(self.month0 + index * self.step, 12)
        if year > _MAX_YEAR:
            return None
        month_start, length = _month_info(year, month + 1)
        if self.day > length:
            return None
        return (month_start + self.day - 1) * _DAY + self.time_of_day

    def _index(self, at: int) -> int:
        """Return the index of the selected month at or before the month of `at`."""
        day = date.fromordinal(at // _DAY + _EPOCH_ORDINAL)
        return (day.year * 12 + day.month - 1 - self.month0) // self.step

    def prev(self, at: int) -> int | None:
        """Return the last occurrence at or before `at`."""
        if self.empty:
            return None
        if self.last is not None and at > self.last:
            at = self.last
        if at < self.first:
            return None
        index = self._index(at)
        for _ in range(_MONTH_CYCLE):
            if index < 0:
                return None
            found = self._occurrence(index)
            if found is not None and found <= at:
                return found
            index -= 1
        return None

    def next(self, at: int) -> int | None:
        """Return the first occurrence at or after `at`."""
        if self.empty:
            return None
        index = self._index(max(at, self.first))
        found: int | None = None
        for _ in range(_MONTH_CYCLE):
            found = self._occurrence(index)
            if found is not None and found >= at:
                break
            if self.month0 + index * self.step > _MAX_YEAR * 12:
                return None
            index += 1
        else:
            return None
        if found is None or (self.last is not None and found > self.last):
            return None
        return found

    def nth(self, count: int) -> int | None:
        """Return the `count`-th occurrence (1-based)."""
        if self.day <= 28:
            return self._occurrence(count - 1)
        index = 0
        while self.month0 + index * self.step <= _MAX_YEAR * 12 + 11:
            found = self._occurrence(index)
            if found is not None:
                count -= 1
                if count == 0:
                    return found
            index += 1
        return None

    def walk_chain(self, latest: int, duration: int) -> int | None:
        """Return when the run from occurrence `latest` ends, merged runs included."""
        if self.day <= 28 and duration >= 31 * _DAY * self.step:
            # No gap is longer than `step` months of 31 days: the runs never stop.
            if self.last is None:
                return None
            return self.prev(self.last) + duration  # type: ignore[operator]
        end = latest + duration
        for _ in range(CHAIN_LIMIT):
            found = self.next(latest + 1)
            if found is None or found > end:
                return end
            latest, end = found, found + duration
        return end


_MONTH_CYCLE = 4800 + 12
"""Months in the Gregorian 400-year cycle: every month pattern repeats within it."""


def _monthly(rule: wire.Recurrence, start: datetime) -> _Monthly:
    """Compile a MONTHLY or YEARLY rule without `by...` lists (interval at least 1)."""
    first, _ = _seconds(start)
    step = rule.interval * (12 if rule.frequency == "YEARLY" else 1)
    compiled = _Monthly(first, step)
    end = rule.end
    if end is not None:
        last: int | None = None
        if end.until is not None:
            last, _ = _seconds(end.until)
        if end.count is not None:
            by_count = compiled.nth(end.count) if end.count > 0 else first - 1
            if by_count is not None:
                last = by_count if last is None else min(last, by_count)
        compiled.last = last
        compiled.empty = last is not None and compiled.prev(last) is None
    return compiled


class _Rule(_Remembering):
    """A valid recurrence compiled for one start instant.

    Instants are whole seconds since the epoch. `first` is the rule's dtstart
    (the start truncated to the second), `last` the last occurrence allowed by
    `until`/`count` (`None`: endless); `empty` marks a rule without any.
    """

    __slots__ = (
        "_widest",
        "anchor",
        "daylist",
        "empty",
        "first",
        "first_day",
        "frequency",
        "hours",
        "interval",
        "last",
        "minutes",
        "months",
        "negative",
        "offsets",
        "per_day",
        "period",
        "positive",
        "unit",
        "weekdays",
    )

    def __init__(self, frequency: int, interval: int, first: int) -> None:
        super().__init__()
        self.frequency = frequency
        self.interval = interval
        self.first = first
        self.first_day = first // _DAY
        self.last: int | None = None
        self.empty = False
        self.period = 0
        self.months: frozenset[int] | None = None
        self.weekdays: frozenset[int] = frozenset()
        self.positive: frozenset[int] = frozenset()
        self.negative: frozenset[int] = frozenset()
        self.daylist = False
        self.hours: frozenset[int] | None = None
        self.minutes: frozenset[int] | None = None
        self.per_day = 1
        self.unit = _DAY
        self.offsets: tuple[int, ...] = ()
        self.anchor = 0
        self._widest: int | None = _UNKNOWN

    # -- days --

    def slots(self, day: int) -> tuple[int, ...]:
        """Return the selected units of a day that passed the day filters."""
        frequency = self.frequency
        if frequency == _DAILY:
            return (0,) if (day - self.first_day) % self.interval == 0 else ()
        if frequency == _WEEKLY:
            return (0,) if ((day + 3) // 7 - self.anchor) % self.interval == 0 else ()
        if frequency >= _MONTHLY:
            return (0,)
        per_day = self.per_day
        phase = (self.anchor - day * per_day) % self.interval
        if self.interval >= per_day:
            if phase >= per_day:
                return ()
            if per_day == 24:
                ok = self.hours is None or phase in self.hours
            else:
                ok = (self.hours is None or phase // 60 in self.hours) and (
                    self.minutes is None or phase % 60 in self.minutes
                )
            return (phase,) if ok else ()
        return _phase_slots(per_day, self.interval, self.hours, self.minutes, phase)

    def _month_days(self, length: int, first_weekday: int) -> tuple[int, ...]:
        return _passing_days(
            self.weekdays, self.positive, self.negative, length * 7 + first_weekday
        )

    def _skip_month(self, year: int, month: int) -> tuple[int, int] | None:
        """Return the first month at or after (year, month) the rule may use, if it differs."""
        if self.frequency == _YEARLY:
            skip = (self.anchor - year) % self.interval
            if skip:
                return year + skip, 1
        elif self.frequency == _MONTHLY:
            index = year * 12 + month - 1
            skip = (self.anchor - index) % self.interval
            if skip:
                year, month = divmod(index + skip, 12)
                return year, month + 1
        months = self.months
        if months is not None and month not in months:
            later = [allowed for allowed in months if allowed > month]
            return (year, min(later)) if later else (year + 1, min(months))
        return None

    def _skip_month_back(self, year: int, month: int) -> tuple[int, int] | None:
        """Mirror of `_skip_month`: the last usable month at or before (year, month)."""
        if self.frequency == _YEARLY:
            skip = (year - self.anchor) % self.interval
            if skip:
                return year - skip, 12
        elif self.frequency == _MONTHLY:
            index = year * 12 + month - 1
            skip = (index - self.anchor) % self.interval
            if skip:
                year, month = divmod(index - skip, 12)
                return year, month + 1
        months = self.months
        if months is not None and month not in months:
            earlier = [allowed for allowed in months if allowed < month]
            return (year, max(earlier)) if earlier else (year - 1, max(months))
        return None

    def next_day(self, day: int) -> int | None:
        """Return the first day at or after `day` holding occurrences of the rule."""
        day = max(day, self.first_day)
        start = date.fromordinal(day + _EPOCH_ORDINAL)
        year, month, from_day = start.year, start.month, start.day
        while year <= _MAX_YEAR:
            skipped = self._skip_month(year, month)
            if skipped is not None:
                (year, month), from_day = skipped, 1
                continue
            month_start, length = _month_info(year, month)
            if self.daylist:
                days = self._month_days(length, (month_start + 3) % 7)
                for month_day in days[bisect_left(days, from_day) :]:
                    if self.slots(month_start + month_day - 1):
                        return month_start + month_day - 1
            elif self.frequency == _DAILY:
                candidate = month_start + from_day - 1
                candidate += (self.first_day - candidate) % self.interval
                if candidate < month_start + length:
                    return candidate
            else:
                for candidate in range(month_start + from_day - 1, month_start + length):
                    if self.slots(candidate):
                        return candidate
            year, month, from_day = (year + 1, 1, 1) if month == 12 else (year, month + 1, 1)
        return None

    def prev_day(self, day: int) -> int | None:
        """Return the last day at or before `day`, not before the start, with occurrences."""
        first_day = self.first_day
        if day < first_day:
            return None
        start = date.fromordinal(day + _EPOCH_ORDINAL)
        year, month, to_day = start.year, start.month, start.day
        first = date.fromordinal(first_day + _EPOCH_ORDINAL)
        first_month = (first.year, first.month)
        while (year, month) >= first_month:
            skipped = self._skip_month_back(year, month)
            if skipped is not None:
                (year, month), to_day = skipped, 31
                continue
            month_start, length = _month_info(year, month)
            to_day = min(to_day, length)
            if self.daylist:
                days = self._month_days(length, (month_start + 3) % 7)
                for month_day in reversed(days[: bisect_right(days, to_day)]):
                    candidate = month_start + month_day - 1
                    if candidate < first_day:
                        return None
                    if self.slots(candidate):
                        return candidate
            elif self.frequency == _DAILY:
                candidate = month_start + to_day - 1
                candidate -= (candidate - first_day) % self.interval
                if candidate >= month_start:
                    return candidate if candidate >= first_day else None
            else:
                for candidate in range(month_start + to_day - 1, month_start - 1, -1):
                    if candidate < first_day:
                        return None
                    if self.slots(candidate):
                        return candidate
            year, month, to_day = (year - 1, 12, 31) if month == 1 else (year, month - 1, 31)
        return None

    # -- instants --

    def _last_in_day(self, day: int, at: int) -> int | None:
        """Return the last occurrence of `day` at or before `at` (no bounds applied)."""
        slots = self.slots(day)
        if not slots:
            return None
        base = day * _DAY
        unit, offsets = self.unit, self.offsets
        relative = at - base
        if relative >= _DAY:
            return base + slots[-1] * unit + offsets[-1]
        if relative < 0:
            return None
        which, rest = divmod(relative, unit)
        index = bisect_right(slots, which) - 1
        if index < 0:
            return None
        if slots[index] == which:
            offset = bisect_right(offsets, rest) - 1
            if offset >= 0:
                return base + which * unit + offsets[offset]
            index -= 1
            if index < 0:
                return None
        return base + slots[index] * unit + offsets[-1]

    def _first_in_day(self, day: int, at: int) -> int | None:
        """Return the first occurrence of `day` at or after `at` (no bounds applied)."""
        slots = self.slots(day)
        if not slots:
            return None
        base = day * _DAY
        unit, offsets = self.unit, self.offsets
        relative = at - base
        if relative < 0:
            return base + slots[0] * unit + offsets[0]
        if relative >= _DAY:
            return None
        which, rest = divmod(relative, unit)
        index = bisect_left(slots, which)
        if index == len(slots):
            return None
        if slots[index] == which:
            offset = bisect_left(offsets, rest)
            if offset < len(offsets):
                return base + which * unit + offsets[offset]
            index += 1
            if index == len(slots):
                return None
        return base + slots[index] * unit + offsets[0]

    def _unbounded_prev(self, at: int) -> int | None:
        day = at // _DAY
        found = self.prev_day(day)
        while found is not None:
            result = self._last_in_day(found, at)
            if result is not None:
                return result if result >= self.first else None
            found = self.prev_day(found - 1)
        return None

    def _unbounded_next(self, at: int) -> int | None:
        at = max(at, self.first)
        found = self.next_day(at // _DAY)
        while found is not None:
            result = self._first_in_day(found, at)
            if result is not None:
                return result
            found = self.next_day(found + 1)
        return None

    def widest_gap(self) -> int | None:
        """Return the widest gap between consecutive occurrences, if the pattern is short.

        Rules without month or month-day filters repeat every few days (a
        week, the interval, or both); the gap is measured over one cycle,
        once. `None` when the pattern is longer (month lengths, month
        filters), and the caller must walk.
        """
        if self._widest != _UNKNOWN:
            return self._widest
        self._widest = widest = self._measure_widest_gap()
        return widest

    def _measure_widest_gap(self) -> int | None:
        if self.months is not None or self.positive or self.negative:
            return None
        frequency, interval = self.frequency, self.interval
        if frequency == _DAILY:
            cycle = interval * 7 // gcd(interval, 7) if self.weekdays else interval
        elif frequency == _WEEKLY:
            cycle = 7 * interval
        elif frequency <= _HOURLY and self.per_day % interval == 0:
            cycle = 7 if self.weekdays else 1
        else:
            return None
        if cycle > 400:
            return None
        instants: list[int] = []
        weekdays, unit, offsets = self.weekdays, self.unit, self.offsets
        for day in range(self.first_day, self.first_day + cycle):
            if weekdays and (day + 3) % 7 not in weekdays:
                continue
            base = day * _DAY
            instants.extend(
                base + slot * unit + offset for slot in self.slots(day) for offset in offsets
            )
        if not instants:
            return None
        wrap = instants[0] + cycle * _DAY - instants[-1]
        return max(wrap, max((b - a for a, b in pairwise(instants)), default=0))

    def chain_in_day(self, latest: int, duration: int) -> int:
        """Return the last occurrence of the day of `latest` reached by back-to-back runs.

        Runs chain while the next occurrence starts no later than the end of
        the current one (`gap <= duration`).
        """
        day = latest // _DAY
        slots = self.slots(day)
        unit, offsets = self.unit, self.offsets
        base = day * _DAY
        bound = base + _DAY - 1 if self.last is None else min(self.last, base + _DAY - 1)
        if _max_gap(slots, offsets, unit) <= duration:
            found = self._last_in_day(day, bound)
            return latest if found is None or found < latest else found
        which = (latest - base) // unit
        current = latest
        for slot in slots[bisect_left(slots, which) :]:
            for offset in offsets:
                instant = base + slot * unit + offset
                if instant <= current:
                    continue
                if instant > bound or instant - current > duration:
                    return current
                current = instant
        return current

    def prev(self, at: int) -> int | None:
        """Return the last occurrence at or before `at`."""
        if self.empty:
            return None
        if self.last is not None and at > self.last:
            at = self.last
        return self._unbounded_prev(at)

    def next(self, at: int) -> int | None:
        """Return the first occurrence at or after `at`."""
        if self.empty:
            return None
        found = self._unbounded_next(at)
        if found is None or (self.last is not None and found > self.last):
            return None
        return found

    def nth(self, count: int) -> int | None:
        """Return the `count`-th occurrence (1-based), counting whole days of whole months."""
        remaining = count
        first_day, first, unit, offsets = self.first_day, self.first, self.unit, self.offsets
        per_slot = len(offsets)
        start = date.fromordinal(first_day + _EPOCH_ORDINAL)
        year, month = start.year, start.month
        frequency, interval = self.frequency, self.interval
        uniform_days = frequency >= _MONTHLY or (frequency >= _DAILY and interval == 1)
        uniform_units = frequency <= _HOURLY and self.per_day % interval == 0
        while year <= _MAX_YEAR:
            skipped = self._skip_month(year, month)
            if skipped is not None:
                year, month = skipped
                continue
            month_start, length = _month_info(year, month)
            if self.last is not None and month_start * _DAY > self.last:
                return None
            if month_start > first_day and (uniform_days or uniform_units):
                # Every day of this month alike: count the month at once.
                if self.daylist:
                    days_in = len(self._month_days(length, (month_start + 3) % 7))
                else:
                    days_in = length
                total = days_in * per_slot * (len(self.slots(month_start)) if uniform_units else 1)
                if remaining > total:
                    remaining -= total
                    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
                    continue
            if self.daylist:
                days = [
                    month_start + month_day - 1
                    for month_day in self._month_days(length, (month_start + 3) % 7)
                ]
            else:
                days = list(range(month_start, month_start + length))
            for day in days:
                if day < first_day:
                    continue
                slots = self.slots(day)
                if not slots:
                    continue
                base = day * _DAY
                if day == first_day:
                    instants = [
                        base + slot * unit + offset
                        for slot in slots
                        for offset in offsets
                        if base + slot * unit + offset >= first
                    ]
                    if remaining <= len(instants):
                        return instants[remaining - 1]
                    remaining -= len(instants)
                    continue
                total = len(slots) * per_slot
                if remaining <= total:
                    slot, offset = divmod(remaining - 1, per_slot)
                    return base + slots[slot] * unit + offsets[offset]
                remaining -= total
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return None


def _problem(rule: wire.Recurrence, start: datetime) -> str | None:
    """Say why a recurrence with a real frequency is invalid, or return None."""
    start = start.astimezone(UTC)
    if rule.interval < 1:
        return f"interval {rule.interval} is not at least 1"
    for name in rule.byweekdays:
        if name not in _WEEKDAYS:
            return f"weekday {name} is not a day of the week"
    if any(not 0 <= value <= 59 for value in rule.byminutes):
        return f"byminutes {list(rule.byminutes)} has a value outside 0..59"
    if any(not 0 <= value <= 23 for value in rule.byhours):
        return f"byhours {list(rule.byhours)} has a value outside 0..23"
    if any(value == 0 or not -31 <= value <= 31 for value in rule.bymonthdays):
        return f"bymonthdays {list(rule.bymonthdays)} has a value outside 1..31 / -31..-1"
    if any(not 1 <= value <= 12 for value in rule.bymonths):
        return f"bymonths {list(rule.bymonths)} has a value outside 1..12"
    frequency = _FREQUENCIES[rule.frequency]
    if frequency == _HOURLY and rule.byhours:
        step = gcd(rule.interval, 24)
        if all((hour - start.hour) % step for hour in rule.byhours):
            return f"an HOURLY interval of {rule.interval} never reaches byhours"
    if frequency == _MINUTELY and (rule.byhours or rule.byminutes):
        step = gcd(rule.interval, 1440)
        if step == 1:
            return None
        origin = start.hour * 60 + start.minute
        hours = rule.byhours or range(24)
        minutes = rule.byminutes or range(60)
        if all((60 * hour + minute - origin) % step for hour in hours for minute in minutes):
            return f"a MINUTELY interval of {rule.interval} never reaches byhours/byminutes"
    return None


def _compile(rule: wire.Recurrence, start: datetime) -> _Rule | None:
    """Compile a recurrence with a real frequency; `None` if it is invalid."""
    if _problem(rule, start) is not None:
        return None
    return _compile_valid(rule, start)


@lru_cache(maxsize=16384)
def _compile_cached(rule: wire.Recurrence, start: datetime) -> _Rule | None:
    return _compile(rule, start)


def _compile_valid(rule: wire.Recurrence, start: datetime) -> _Rule:
    frequency = _FREQUENCIES[rule.frequency]
    first, _ = _seconds(start)
    compiled = _Rule(frequency, rule.interval, first)
    first_time = _instant(first)
    months = set(rule.bymonths)
    monthdays = set(rule.bymonthdays)
    weekdays = {_WEEKDAYS[name] for name in rule.byweekdays}
    if not monthdays and not weekdays:
        # dateutil's defaults when no day-level list is given.
        if frequency == _YEARLY:
            months = months or {first_time.month}
            monthdays = {first_time.day}
        elif frequency == _MONTHLY:
            monthdays = {first_time.day}
        elif frequency == _WEEKLY:
            weekdays = {first_time.weekday()}
    compiled.months = _frozen(tuple(sorted(months))) if months else None
    compiled.weekdays = _frozen(tuple(sorted(weekdays)))
    compiled.positive = _frozen(tuple(sorted(day for day in monthdays if day > 0)))
    compiled.negative = _frozen(tuple(sorted(day for day in monthdays if day < 0)))
    compiled.daylist = bool(weekdays or monthdays)
    second = first_time.second
    if frequency == _MINUTELY:
        compiled.per_day, compiled.unit = 1440, 60
        compiled.hours = _frozen(tuple(sorted(set(rule.byhours)))) if rule.byhours else None
        compiled.minutes = _frozen(tuple(sorted(set(rule.byminutes)))) if rule.byminutes else None
        compiled.offsets = (second,)
        compiled.anchor = first // 60
    elif frequency == _HOURLY:
        compiled.per_day, compiled.unit = 24, 3600
        compiled.hours = _frozen(tuple(sorted(set(rule.byhours)))) if rule.byhours else None
        minutes = sorted(set(rule.byminutes)) if rule.byminutes else [first_time.minute]
        compiled.offsets = tuple(60 * minute + second for minute in minutes)
        compiled.anchor = first // 3600
    else:
        hours = sorted(set(rule.byhours)) if rule.byhours else [first_time.hour]
        minutes = sorted(set(rule.byminutes)) if rule.byminutes else [first_time.minute]
        compiled.offsets = tuple(
            3600 * hour + 60 * minute + second for hour in hours for minute in minutes
        )
        if frequency == _WEEKLY:
            compiled.anchor = (compiled.first_day + 3) // 7
        elif frequency == _MONTHLY:
            compiled.anchor = first_time.year * 12 + first_time.month - 1
        elif frequency == _YEARLY:
            compiled.anchor = first_time.year
    if compiled.daylist and not _ever_passes(compiled):
        # E.g. February 30: the reference walks to the year 9999 to say so.
        compiled.empty = True
        return compiled
    end = rule.end
    if end is not None:
        last: int | None = None
        if end.until is not None:
            last, _ = _seconds(end.until)
            if last < first:
                compiled.empty = True
                return compiled
            compiled.last = last
        if end.count is not None:
            if end.count <= 0:
                compiled.empty = True
                return compiled
            nth = compiled.nth(end.count)
            if nth is not None and (last is None or nth < last):
                compiled.last = nth
    return compiled


_MONTH_LENGTHS = {2: (28, 29), 4: (30,), 6: (30,), 9: (30,), 11: (30,)}


def _ever_passes(rule: _Rule) -> bool:
    """Tell whether any day of any year passes the rule's day filters."""
    for month in range(1, 13) if rule.months is None else sorted(rule.months):
        for length in _MONTH_LENGTHS.get(month, (31,)):
            for first_weekday in range(7):
                if rule._month_days(length, first_weekday):
                    return True
    return False


_FIXED_BY_NAME = {"MINUTELY": 60, "HOURLY": 3600, "DAILY": _DAY, "WEEKLY": 7 * _DAY}


def _has_lists(rule: wire.Recurrence) -> bool:
    return bool(
        rule.byminutes or rule.byhours or rule.byweekdays or rule.bymonthdays or rule.bymonths
    )


def _plain_unit(rule: wire.Recurrence) -> int | None:
    """The unit of a rule without `by...` lists of MINUTELY to WEEKLY, else `None`.

    Such rules are answered in closed form (`_fixed_bounds`), with nothing compiled.
    """
    if rule.byminutes or rule.byhours or rule.byweekdays or rule.bymonthdays or rule.bymonths:
        return None
    return _FIXED_BY_NAME.get(rule.frequency)


def _rule_of(dispatch: wire.Dispatch) -> _Monthly | _Rule | None:
    """Compile the recurrence of a recurring dispatch that `_plain_unit` does not cover.

    Returns:
        The compiled rule; `None` if invalid.
    """
    rule = dispatch.recurrence
    assert rule is not None
    if rule.frequency in _MONTHS and rule.interval >= 1 and not _has_lists(rule):
        return _monthly_cached(rule, dispatch.start_time)
    return _compile_cached(rule, dispatch.start_time)


_MONTHS = frozenset({"MONTHLY", "YEARLY"})
_monthly_cached = lru_cache(maxsize=16384)(_monthly)


def _is_one_off(dispatch: wire.Dispatch) -> bool:
    rule = dispatch.recurrence
    return rule is None or rule.frequency == "UNSPECIFIED"


# --- Public functions -------------------------------------------------------


def validate(dispatch: wire.Dispatch) -> None:
    """Check that a dispatch's recurrence rule can produce occurrences as written.

    One-offs, frequency `UNSPECIFIED` and `duration: None` (which ignores the
    recurrence) always pass.

    Args:
        dispatch: The dispatch.

    Raises:
        InvalidRecurrence: The rule is invalid; the message says why.
    """
    if _is_one_off(dispatch) or dispatch.duration is None:
        return
    assert dispatch.recurrence is not None
    problem = _problem(dispatch.recurrence, dispatch.start_time)
    if problem is not None:
        raise InvalidRecurrence(f"dispatch {dispatch.id}: {problem}")


def _chain_end(rule: _Monthly | _Rule, latest: int, duration: int) -> int | None:
    """Return when the run starting at occurrence `latest` ends, merged runs included."""
    if isinstance(rule, _Monthly):
        return rule.walk_chain(latest, duration)
    widest = rule.widest_gap()
    if widest is not None and widest <= duration:
        # Every gap is covered: the runs merge up to the last one, if any.
        if rule.last is None:
            return None
        return rule.prev(rule.last) + duration  # type: ignore[operator]
    end = latest + duration
    for _ in range(CHAIN_LIMIT):
        # Follow the runs chained back to back within the day, then cross to
        # the next day holding occurrences; one step per day.
        latest = rule.chain_in_day(latest, duration)
        end = latest + duration
        found = rule.next(latest + 1)
        if found is None or found > end:
            return end
        latest = found
    return end


_AT_START = -(1 << 61)
"""`_recurring_core`'s change marker for "at `start_time` itself" (not a whole second)."""


def _recurring_core(
    rule: _Monthly | _Rule,
    start: datetime,
    duration: int,
    now: datetime,
    now_s: int,
) -> tuple[int | None, int | None]:
    """Compute an active recurring dispatch with a positive duration at `now`.

    Returns:
        The latest occurrence when running (else `None`), and the next change
        in whole seconds (`None`: never; `_AT_START`: at `start`).
    """
    if now >= start:
        latest, after = rule.around(now_s)
        if latest is not None and now_s < latest + duration:
            return latest, rule.chain_end(latest, duration)
        return None, after
    # Not started yet: the first flip is at the start itself if the first
    # occurrence (the start truncated to the second) still runs then.
    start_s, _ = _seconds(start)
    latest = rule.prev(start_s)
    if latest is not None and start_s < latest + duration:
        return None, _AT_START
    return None, rule.next(start_s + 1)


def _recurring_state(
    dispatch: wire.Dispatch,
    rule: _Monthly | _Rule | None,
    now: datetime,
    now_s: int,
    now_us: int,
) -> RunState:
    duration = dispatch.duration
    assert duration is not None
    if rule is None:
        return _state(False, None, None, None)
    latest, after = rule.around(now_s)
    next_found = latest if latest == now_s and not now_us else after
    next_run = None if next_found is None else _instant(next_found)
    if not dispatch.active or duration <= 0:
        return _state(False, None, next_run, None)
    start = dispatch.start_time
    core = _recurring_core(rule, start, duration, now, now_s)
    return _state_of(start, duration, next_run, next_found, core)


def _state_of(
    start: datetime,
    duration: int,
    next_run: datetime | None,
    next_found: int | None,
    core: tuple[int | None, int | None],
) -> RunState:
    """Build the `RunState` of an active dispatch from a core's answer.

    Args:
        start: The dispatch's start.
        duration: Its duration, positive.
        next_run: Its next start, and `next_found`, the same in whole seconds.
        next_found: See `next_run`.
        core: What `_recurring_core` or `_fixed_core` answered: the occurrence
            whose run goes on (`None`: not running) and the next change in whole
            seconds (`None`: never; `_AT_START`: at `start`).
    """
    latest, change = core
    if change is None:
        changes_at = None
    elif change == _AT_START:
        changes_at = start
    else:
        changes_at = next_run if change == next_found else _instant(change)
    if latest is None:
        return _state(False, None, next_run, changes_at)
    until_s = latest + duration
    until = changes_at if change == until_s else _instant(until_s)
    return _state(True, until, next_run, changes_at)


def _one_off_state(dispatch: wire.Dispatch, now: datetime) -> RunState:
    start = dispatch.start_time
    next_run = start if now <= start else None
    duration = dispatch.duration
    if duration is None:
        if not dispatch.active:
            return _state(False, None, next_run, None)
        if now < start:
            return _state(False, None, next_run, start)
        return _state(True, None, next_run, None)
    if not dispatch.active or duration <= 0:
        return _state(False, None, next_run, None)
    if now < start:
        return _state(False, None, next_run, start)
    end = start + timedelta(seconds=duration)
    if now < end:
        return _state(True, end, next_run, end)
    return _state(False, None, next_run, None)


def run_state(dispatch: wire.Dispatch, now: datetime) -> RunState:
    """Compute the schedule state of one dispatch at one instant.

    Args:
        dispatch: The dispatch.
        now: The instant, timezone-aware.

    Returns:
        Whether it runs, until when, its next start and its next change.
    """
    if dispatch.duration is None or _is_one_off(dispatch):
        return _one_off_state(dispatch, now)
    now_s, now_us = _seconds(now)
    rule = dispatch.recurrence
    assert rule is not None
    unit = _plain_unit(rule)
    if unit is not None:
        return _fixed_state(dispatch, rule, unit, now=now, now_s=now_s, now_us=now_us)
    return _recurring_state(dispatch, _rule_of(dispatch), now, now_s, now_us)


def _fixed_state(
    dispatch: wire.Dispatch,
    rule: wire.Recurrence,
    unit: int,
    *,
    now: datetime,
    now_s: int,
    now_us: int,
) -> RunState:
    """`run_state` for rules without lists, MINUTELY..WEEKLY, in whole seconds."""
    start = dispatch.start_time
    bounds = _fixed_bounds(rule, unit, start)
    if bounds is None:
        return _state(False, None, None, None)
    first, period, last = bounds
    at = max(now_s + 1 if now_us else now_s, first)
    next_found: int | None = at + (first - at) % period
    if last is not None and next_found > last:  # type: ignore[operator]
        next_found = None
    next_run = None if next_found is None else _instant(next_found)
    duration = dispatch.duration
    assert duration is not None
    if not dispatch.active or duration <= 0:
        return _state(False, None, next_run, None)
    core = _fixed_core(bounds, duration, now < start, now_s)
    return _state_of(start, duration, next_run, next_found, core)


def _fixed_bounds(
    rule: wire.Recurrence, unit: int, start: datetime
) -> tuple[int, int, int | None] | None:
    """The first occurrence, period and last-occurrence bound of a rule without lists.

    In whole seconds since the epoch; the bound is `None` for an endless rule.

    Returns:
        The three, or `None` when the rule never occurs (interval below 1, or an
        end before the start).
    """
    interval = rule.interval
    if interval < 1:
        return None
    delta = start - _EPOCH
    first = delta.days * _DAY + delta.seconds
    period = unit * interval
    last = None
    end = rule.end
    if end is not None:
        if end.until is not None:
            delta = end.until - _EPOCH
            last = delta.days * _DAY + delta.seconds
        if end.count is not None:
            by_count = first + (end.count - 1) * period
            last = by_count if last is None else min(last, by_count)
        if last is not None and last < first:
            return None
    return first, period, last


def _fixed_core(
    bounds: tuple[int, int, int | None], duration: int, before_start: bool, now_s: int
) -> tuple[int | None, int | None]:
    """`_recurring_core` for a rule without lists, MINUTELY..WEEKLY, in closed form.

    Args:
        bounds: The rule's `_fixed_bounds`.
        duration: The dispatch's duration, positive.
        before_start: Whether `now` is before the dispatch's start.
        now_s: `now` in whole seconds.

    Returns:
        The latest occurrence when running (else `None`), and the next change
        in whole seconds (`None`: never; `_AT_START`: at the start).
    """
    if before_start:
        # The first occurrence is the start truncated to the second: it runs then.
        return None, _AT_START
    first, period, last = bounds
    at = now_s if last is None or now_s <= last else last
    latest = at - (at - first) % period
    if now_s < latest + duration:
        if duration < period:
            return latest, latest + duration
        if last is None:
            return latest, None
        return latest, last - (last - first) % period + duration
    found = now_s + 1 + (first - now_s - 1) % period
    if last is not None and found > last:
        return None, None
    return None, found


def running_at(
    dispatches: Iterable[wire.Dispatch], now: datetime
) -> tuple[list[wire.Dispatch], datetime | None]:
    """Tell which dispatches of a set run at an instant, and when that set next changes.

    Args:
        dispatches: The dispatches, e.g. all of one type.
        now: The instant, timezone-aware.

    Returns:
        The running dispatches sorted by id, and the earliest instant after
        `now` at which any of them starts or stops running (`None`: never).
    """
    running: list[wire.Dispatch] = []
    change: datetime | None = None  # earliest change at a datetime
    change_s: int | None = None  # earliest change in whole seconds
    now_s, _ = _seconds(now)
    one_second = timedelta(seconds=1)
    for dispatch in dispatches:
        if not dispatch.active:
            continue
        duration = dispatch.duration
        rule = dispatch.recurrence
        start = dispatch.start_time
        if rule is None or rule.frequency == "UNSPECIFIED" or duration is None:
            # The cheap path: one-offs (and endless runs) need no rule at all.
            if now < start:
                if (duration is None or duration > 0) and (change is None or start < change):
                    change = start
                continue
            if duration is None:
                running.append(dispatch)
                continue
            if duration <= 0:
                continue
            end = start + one_second * duration
            if now < end:
                running.append(dispatch)
                if change is None or end < change:
                    change = end
            continue
        if duration <= 0:
            continue
        unit = _plain_unit(rule)
        if unit is not None:
            bounds = _fixed_bounds(rule, unit, start)
            if bounds is None:
                continue
            latest, found = _fixed_core(bounds, duration, now < start, now_s)
        else:
            compiled = _rule_of(dispatch)
            if compiled is None:
                continue
            latest, found = _recurring_core(compiled, start, duration, now, now_s)
        if latest is not None:
            running.append(dispatch)
        if found is None:
            continue
        if found == _AT_START:
            if change is None or start < change:
                change = start
        elif change_s is None or found < change_s:
            change_s = found
    if change_s is not None:
        at = _instant(change_s)
        if change is None or at < change:
            change = at
    running.sort(key=_by_id)
    return running, change


def _by_id(dispatch: wire.Dispatch) -> int:
    return dispatch.id


def end_time(dispatch: wire.Dispatch) -> datetime | None:
    """Return the end of a dispatch's last run ever, whether active or not.

    Args:
        dispatch: The dispatch.

    Returns:
        For a one-off, `start_time + duration`; for a rule ended by `count` or
        `until`, the end of its last occurrence; `None` for endless dispatches
        (`duration: None` or a rule without end) and for rules that never
        occur (invalid, or ended before their first occurrence).
    """
    duration = dispatch.duration
    if duration is None:
        return None
    if _is_one_off(dispatch):
        return dispatch.start_time + timedelta(seconds=duration)
    recurrence = dispatch.recurrence
    assert recurrence is not None
    unit = _plain_unit(recurrence)
    if unit is not None:
        bounds = _fixed_bounds(recurrence, unit, dispatch.start_time)
        if bounds is None:
            return None
        first, period, bound = bounds
        return None if bound is None else _instant(bound - (bound - first) % period + duration)
    rule = _rule_of(dispatch)
    if rule is None or rule.empty or rule.last is None:
        return None
    last = rule.prev(rule.last)
    return None if last is None else _instant(last + duration)
