"""Compiled rules that remember their last answer, and MONTHLY/YEARLY rules without lists.

`_Remembering` is what every compiled rule shares: the window between two
consecutive occurrences (every instant in it has the same answer) and the last
chain of merged runs. `_Monthly` answers a MONTHLY or YEARLY rule without `by...`
lists by month arithmetic: the start's day every `step` months.
"""

from __future__ import annotations

from datetime import date, datetime

from actor_sdk import wire
from bridge.schedule.instants import (
    _DAY,
    _EPOCH_ORDINAL,
    _MAX_YEAR,
    _MINUS_INFINITY,
    _NO_WINDOW,
    _PLUS_INFINITY,
    CHAIN_LIMIT,
    _month_info,
    _seconds,
)


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

    def walk_chain(self, latest: int, duration: int) -> int | None:
        """Return when the run from occurrence `latest` ends, merged runs included."""
        raise NotImplementedError

    def chain_end(self, latest: int, duration: int) -> int | None:
        """Return `walk_chain`'s answer, remembering the last one."""
        memo_latest, memo_duration, memo_end = self._chain_memo
        if memo_latest == latest and memo_duration == duration and latest:
            return memo_end if memo_end >= 0 else None
        end = self.walk_chain(latest, duration)
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
