"""The public queries: the run state of one dispatch, and what runs of a set.

Each query reads no clock: the caller passes `now`. Plain rules are answered
by `_fixed_core` in closed form, every other recurring rule by its compiled
form through `_recurring_core`; both answers become a `RunState` in one place.
"""

# Calendar arithmetic reads best as one flat function per question, with early
# returns for each case: the branch and return counts follow the calendar.
# ruff: noqa: PLR0911, PLR0912, PLR0915

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from actor_sdk import wire
from bridge.schedule.compiler import _fixed_bounds, _is_one_off, _plain_unit, _problem, _rule_of
from bridge.schedule.instants import _instant, _seconds
from bridge.schedule.list_rules import _Rule
from bridge.schedule.month_rules import _Monthly


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
