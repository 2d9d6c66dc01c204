"""Instants as whole seconds since the epoch, and the calendar facts the rules share.

The compiled rules count in whole seconds and whole days (`_DAY`); this module
converts from and to aware `datetime`s, numbers frequencies and weekdays, and
caches what many rules ask again: month lengths, the days of a month that pass
a rule's day filters, the hours or minutes of a day it selects.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime
from functools import lru_cache
from itertools import pairwise

CHAIN_LIMIT = 1000
"""The most days of back-to-back runs `changes_at` follows before it gives a recheck instant."""


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
