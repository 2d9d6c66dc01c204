"""From a dispatch's recurrence to what answers it: closed form, month arithmetic or a `_Rule`.

`_plain_unit` and `_fixed_bounds` cover rules without lists of MINUTELY to
WEEKLY (nothing compiled); `_rule_of` compiles every other rule once per (rule,
start), held in bounded LRU caches; `_problem` says why a rule is invalid.
"""

# Calendar arithmetic reads best as one flat function per question, with early
# returns for each case: the branch and return counts follow the calendar.
# ruff: noqa: PLR0911, PLR0912, PLR0915

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from math import gcd

from actor_sdk import wire
from bridge.schedule.instants import (
    _DAY,
    _EPOCH,
    _FREQUENCIES,
    _HOURLY,
    _MINUTELY,
    _MONTHLY,
    _WEEKDAYS,
    _WEEKLY,
    _YEARLY,
    _frozen,
    _instant,
    _seconds,
)
from bridge.schedule.list_rules import _Rule
from bridge.schedule.month_rules import _Monthly, _monthly


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
