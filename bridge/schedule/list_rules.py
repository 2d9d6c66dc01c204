"""Rules with `by...` lists: `_Rule` walks calendar months near the instant asked about.

Never the occurrences since the start: a day holding occurrences is found by
month (skipping months the rule cannot use), and the occurrences of a day by
bisecting its selected units (hours or minutes) and offsets.
"""

# Calendar arithmetic reads best as one flat function per question, with early
# returns for each case: the branch and return counts follow the calendar.
# ruff: noqa: PLR0911, PLR0912

from __future__ import annotations

from bisect import bisect_left, bisect_right
from datetime import date
from itertools import pairwise
from math import gcd

from bridge.schedule.instants import (
    _DAILY,
    _DAY,
    _EPOCH_ORDINAL,
    _HOURLY,
    _MAX_YEAR,
    _MONTHLY,
    _UNKNOWN,
    _WEEKLY,
    _YEARLY,
    CHAIN_LIMIT,
    _max_gap,
    _month_info,
    _passing_days,
    _phase_slots,
)
from bridge.schedule.month_rules import _Remembering


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

    def walk_chain(self, latest: int, duration: int) -> int | None:
        """Return when the run from occurrence `latest` ends, merged runs included."""
        widest = self.widest_gap()
        if widest is not None and widest <= duration:
            # Every gap is covered: the runs merge up to the last one, if any.
            if self.last is None:
                return None
            return self.prev(self.last) + duration  # type: ignore[operator]
        end = latest + duration
        for _ in range(CHAIN_LIMIT):
            # Follow the runs chained back to back within the day, then cross to
            # the next day holding occurrences; one step per day.
            latest = self.chain_in_day(latest, duration)
            end = latest + duration
            found = self.next(latest + 1)
            if found is None or found > end:
                return end
            latest = found
        return end

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
        """Return the `count`-th occurrence (1-based)."""
        period = self._day_period()
        if period is not None:
            return self._nth_by_period(count, period)
        return self._nth_by_months(count)

    def _nth_by_months(self, count: int) -> int | None:
        """`nth` counting whole days of whole months."""
        remaining = count
        first_day, first, unit, offsets = self.first_day, self.first, self.unit, self.offsets
        per_slot = len(offsets)
        start = date.fromordinal(first_day + _EPOCH_ORDINAL)
        year, month = start.year, start.month
        frequency, interval = self.frequency, self.interval
        uniform_days = frequency >= _MONTHLY or (frequency >= _DAILY and interval == 1)
        uniform_units = frequency <= _HOURLY and self.per_day % interval == 0
        per_month = self._occurrences_per_used_month()
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
                    # When every used month holds as many, all of them are passed at once.
                    passed, step = (
                        ((remaining - 1) // total, interval) if total == per_month else (1, 1)
                    )
                    remaining -= passed * total
                    year, month = _months_later(year, month, passed * step)
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

    def _occurrences_per_used_month(self) -> int | None:
        """For a MONTHLY rule whose every used month holds as many occurrences, that many.

        Only without a month filter and without `until`; `None` when the count
        depends on the month (a 31st, or weekdays).
        """
        if self.frequency != _MONTHLY or self.months is not None or self.last is not None:
            return None
        if not self.daylist:
            return None
        counts = {
            len(self._month_days(length, weekday))
            for length in range(28, 32)
            for weekday in range(7)
        }
        count = counts.pop() * len(self.offsets)
        return count if count and not counts else None

    def _day_period(self) -> int | None:
        """Days after which a DAILY or WEEKLY rule's days repeat; `None` for other rules.

        Only without month-level filters (months, month days) and without `until`.
        """
        if self.months is not None or self.positive or self.negative or self.last is not None:
            return None
        if self.frequency == _WEEKLY:
            return 7 * self.interval
        if self.frequency == _DAILY and self.interval > 1:
            return self.interval * 7 // gcd(self.interval, 7)
        return None

    def _day_instants(self, day: int) -> list[int]:
        """The occurrences of one day, before the `first` and `last` bounds."""
        slots = self.slots(day)
        if not slots:
            return []
        if self.daylist:
            when = date.fromordinal(day + _EPOCH_ORDINAL)
            month_start, length = _month_info(when.year, when.month)
            if when.day not in self._month_days(length, (month_start + 3) % 7):
                return []
        base = day * _DAY
        return [base + slot * self.unit + offset for slot in slots for offset in self.offsets]

    def _nth_by_period(self, count: int, period: int) -> int | None:
        """`nth` for days that repeat every `period` days: whole periods are counted at once.

        A WEEKLY rule with an interval was walked day by day: 2 ms for a count in
        the thousands, the largest part of the first schedule at 100k dispatches.
        """
        first_day = self.first_day
        per_period = sum(
            len(self._day_instants(d)) for d in range(first_day + 1, first_day + 1 + period)
        )
        last_day = date(_MAX_YEAR, 12, 31).toordinal() - _EPOCH_ORDINAL
        remaining = count
        day = first_day
        while day <= last_day:
            instants = self._day_instants(day)
            if day == first_day:
                instants = [instant for instant in instants if instant >= self.first]
            if remaining <= len(instants):
                return instants[remaining - 1]
            remaining -= len(instants)
            if day == first_day:
                if per_period == 0:
                    return None
                skipped = (remaining - 1) // per_period
                day += skipped * period
                remaining -= skipped * per_period
            day += 1
        return None


def _months_later(year: int, month: int, months: int) -> tuple[int, int]:
    """The (year, month) `months` after (year, month)."""
    year, index = divmod(year * 12 + month - 1 + months, 12)
    return year, index + 1
