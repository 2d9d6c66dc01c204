"""Property tests: the schedule core against frequenz-client-dispatch as the oracle.

Every example keeps the reference cheap: `now` lies within a few hundred
periods of the start, and a reference call that walks further (it can walk to
year 9999 for rules that never occur) is cut off and the example rejected.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta

import pytest
from dateutil import rrule as dateutil_rrule
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from actor_sdk import wire
from bridge import schedule
from bridge.schedule.compiler import _problem
from tests.schedule_cases import (
    OracleTooSlow,
    client,
    dispatch,
    expected_state,
    oracle,
    time_limit,
)

FREQUENCIES = ["MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"]
PERIOD = {
    "MINUTELY": 60,
    "HOURLY": 3600,
    "DAILY": 86400,
    "WEEKLY": 7 * 86400,
    "MONTHLY": 31 * 86400,
    "YEARLY": 366 * 86400,
}
WEEKDAYS = ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"]
MONTH_DAYS = [*range(-31, 0), *range(1, 32)]
SPECIAL_STARTS = [
    datetime(2024, 2, 29, 10, 30, 15, tzinfo=UTC),
    datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC),
    datetime(2025, 12, 31, 0, 0, tzinfo=UTC),
    datetime(2025, 2, 28, 12, 0, tzinfo=UTC),
    datetime(2025, 3, 30, 6, 0, 30, 500_000, tzinfo=UTC),
    datetime(2026, 11, 28, 6, 0, tzinfo=UTC),
]
EXAMPLES = 1400
CUTOFF_S = 0.2


def _subset(values: list[int] | list[str], most: int) -> st.SearchStrategy[tuple]:  # type: ignore[type-arg]
    return st.lists(st.sampled_from(values), max_size=most, unique=True).map(tuple)


# Built once: building strategies inside composites costs more than the tests.
LISTS = {
    "byminutes": _subset(list(range(60)), 3),
    "byhours": _subset(list(range(24)), 3),
    "byweekdays": _subset(WEEKDAYS, 3),
    "bymonthdays": _subset(MONTH_DAYS, 3),
    "bymonths": _subset(list(range(1, 13)), 4),
}
ANY_START = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
)
SPECIAL_START = st.sampled_from(SPECIAL_STARTS)
FREQUENCY = st.sampled_from(FREQUENCIES)
SMALL_INTERVAL = st.integers(1, 4)
ANY_INTERVAL = st.integers(1, 30)


@st.composite
def starts(draw: st.DrawFn) -> datetime:
    if draw(st.integers(0, 3)) == 0:
        return draw(SPECIAL_START)
    start = draw(ANY_START)
    if draw(st.integers(0, 3)):
        start = start.replace(microsecond=0)
    return start


@st.composite
def recurrences(draw: st.DrawFn, start: datetime) -> wire.Recurrence | None:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return None
    if kind == 1:
        return wire.Recurrence(frequency="UNSPECIFIED", interval=draw(st.integers(0, 3)))
    frequency = draw(FREQUENCY)
    with_lists = draw(st.booleans())
    interval = draw(SMALL_INTERVAL if with_lists else ANY_INTERVAL)
    fields: dict[str, tuple] = {}  # type: ignore[type-arg]
    if with_lists:
        for name, values in LISTS.items():
            fields[name] = draw(values)
    end = None
    match draw(st.integers(0, 3)):
        case 1:
            end = wire.EndCriteria(count=draw(st.integers(0, 30)))
        case 2:
            offset = draw(st.integers(-PERIOD[frequency], 60 * PERIOD[frequency] * interval))
            end = wire.EndCriteria(until=start + timedelta(seconds=offset))
    recurrence = wire.Recurrence(frequency=frequency, interval=interval, end=end, **fields)
    if _problem(recurrence, start) is not None:
        reject()  # invalid rules have their own table tests
    return recurrence


@st.composite
def dispatches(draw: st.DrawFn, dispatch_id: int = 1) -> wire.Dispatch:
    start = draw(starts())
    recurrence = draw(recurrences(start))
    frequency = "MINUTELY" if recurrence is None else recurrence.frequency
    period = PERIOD.get(frequency, 3600) * (recurrence.interval if recurrence else 1)
    duration: int | None = None
    match draw(st.integers(0, 3)):
        case 1:
            duration = 0
        case 2:
            duration = draw(st.integers(1, 3 * max(1, period)))
        case 3:
            duration = draw(st.integers(1, 120))
    return dispatch(
        start=start,
        duration=duration,
        active=draw(st.integers(0, 5)) > 0,
        recurrence=recurrence,
        dispatch_id=dispatch_id,
    )


def _first_occurrences(d: wire.Dispatch, many: int) -> list[datetime]:
    """A few true occurrences near the start, to aim instants at boundaries."""
    ref = client(d)
    if d.recurrence is None or d.recurrence.frequency == "UNSPECIFIED":
        return [d.start_time]
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for occurrence in ref.recurrence._as_rrule(d.start_time):
            found.append(occurrence)
            if len(found) >= many:
                break
    return found


@st.composite
def instants(draw: st.DrawFn, d: wire.Dispatch) -> datetime:
    recurrence = d.recurrence
    frequency = "HOURLY" if recurrence is None else recurrence.frequency
    period = PERIOD.get(frequency, 3600) * (recurrence.interval if recurrence else 1)
    how = draw(st.integers(0, 3))
    if how >= 2:
        try:
            with time_limit(CUTOFF_S):
                occurrences = _first_occurrences(d, 40)
        except OracleTooSlow:
            reject()
        if occurrences:
            base = draw(st.sampled_from(occurrences))
            if how == 3 and d.duration is not None:
                base += timedelta(seconds=d.duration)
            return base + timedelta(microseconds=draw(st.sampled_from([-1, 0, 0, 1])))
    offset = draw(st.integers(-2 * period, 150 * period))
    now = d.start_time + timedelta(seconds=offset)
    if draw(st.booleans()):
        now += timedelta(microseconds=draw(st.integers(0, 999_999)))
    return now


def _compare(d: wire.Dispatch, now: datetime) -> schedule.RunState:
    try:
        with time_limit(CUTOFF_S):
            running, until, next_run = expected_state(d, now)
    except OracleTooSlow:
        reject()
    state = schedule.run_state(d, now)
    assert (state.running, state.until, state.next_run) == (running, until, next_run), (d, now)
    return state


def _running(d: wire.Dispatch, now: datetime) -> bool:
    with time_limit(CUTOFF_S):
        return oracle(lambda: client(d).started_at(now))


@st.composite
def cases(draw: st.DrawFn) -> tuple[wire.Dispatch, datetime]:
    d = draw(dispatches())
    return d, draw(instants(d))


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@_SETTINGS
@given(cases())
def test_run_state_equals_reference(case: tuple[wire.Dispatch, datetime]) -> None:
    d, now = case
    _compare(d, now)


@settings(_SETTINGS, max_examples=EXAMPLES // 2)
@given(cases())
def test_changes_at_is_the_next_flip(case: tuple[wire.Dispatch, datetime]) -> None:
    d, now = case
    state = _compare(d, now)
    try:
        if state.changes_at is None:
            # Never flips again: sample a few later instants.
            for later in (1, 3_600, 86_400 * 40):
                assert _running(d, now + timedelta(seconds=later)) == state.running
            return
        assert state.changes_at > now
        before = state.changes_at - timedelta(microseconds=1)
        assert _running(d, before) == state.running, (d, now, state)
        recheck = timedelta(days=schedule.CHAIN_LIMIT - 1)
        if state.running and state.changes_at - now >= recheck:
            # A flip, or the documented recheck instant of a very long chain
            # of runs (the state up to it was checked above).
            return
        assert _running(d, state.changes_at) != state.running, (d, now, state)
    except OracleTooSlow:
        reject()


def _reference_end(d: wire.Dispatch) -> datetime | None:
    if d.duration is None:
        return None
    ref = client(d)
    if d.recurrence is None or d.recurrence.frequency == "UNSPECIFIED":
        return ref.start_time + timedelta(seconds=d.duration)
    end = d.recurrence.end
    if end is None or (end.count is None and end.until is None):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        occurrences = list(ref.recurrence._as_rrule(d.start_time))
    return occurrences[-1] + timedelta(seconds=d.duration) if occurrences else None


@settings(_SETTINGS, max_examples=EXAMPLES // 2)
@given(dispatches())
def test_end_time_equals_last_occurrence(d: wire.Dispatch) -> None:
    try:
        with time_limit(CUTOFF_S):
            expected = _reference_end(d)
    except OracleTooSlow:
        reject()
    assert schedule.end_time(d) == expected


@settings(_SETTINGS, max_examples=150)
@given(st.lists(dispatches(), max_size=12), st.integers(-86_400, 86_400 * 30))
def test_running_at_agrees_with_run_state(ds: list[wire.Dispatch], offset: int) -> None:
    ds = [
        wire.Dispatch(**{**{f: getattr(d, f) for f in d.__struct_fields__}, "id": i})
        for i, d in enumerate(ds)
    ]
    now = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=offset)
    states = {d.id: schedule.run_state(d, now) for d in ds}
    running, change = schedule.running_at(reversed(ds), now)
    assert [d.id for d in running] == sorted(i for i, s in states.items() if s.running)
    changes = [s.changes_at for s in states.values() if s.changes_at is not None]
    assert change == (min(changes) if changes else None)


def test_rrule_weeks_start_on_monday() -> None:
    # The schedule assumes dateutil's default week start; fail loudly if it moved.
    assert dateutil_rrule.rrule(dateutil_rrule.WEEKLY)._wkst == 0  # type: ignore[attr-defined]


pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # The reference's cutoff (`time_limit`) sets SIGALRM's handler and timer; pytest-timeout's
    # signal method uses the same signal. A fresh-clone CI once failed here with a traceback
    # raised from a signal handler: these tests time out by a thread instead.
    pytest.mark.timeout(120, method="thread"),
]
