"""Table tests of the schedule core: named edge cases, hand-computed and against the reference."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actor_sdk import wire
from bridge import schedule
from bridge.schedule import InvalidRecurrence, RunState, end_time, list_rules, run_state, running_at
from tests.schedule_cases import client, dispatch, expected_state, oracle, rule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)  # type: ignore[misc]


def assert_matches_reference(d: wire.Dispatch, now: datetime) -> RunState:
    state = run_state(d, now)
    assert (state.running, state.until, state.next_run) == expected_state(d, now)
    return state


# --- Calendar edge cases ----------------------------------------------------


def test_yearly_rule_started_on_a_leap_day_recurs_only_in_leap_years() -> None:
    d = dispatch(start=utc(2024, 2, 29, 10), duration=3600, recurrence=rule("YEARLY"))
    state = assert_matches_reference(d, utc(2025, 3, 1))
    assert state == RunState(False, None, utc(2028, 2, 29, 10), utc(2028, 2, 29, 10))
    state = assert_matches_reference(d, utc(2028, 2, 29, 10, 30))
    assert state == RunState(True, utc(2028, 2, 29, 11), utc(2032, 2, 29, 10), utc(2028, 2, 29, 11))


def test_monthly_rule_started_on_january_31_skips_shorter_months() -> None:
    d = dispatch(start=utc(2025, 1, 31, 8), duration=60, recurrence=rule("MONTHLY"))
    state = assert_matches_reference(d, utc(2025, 2, 1))
    assert state.next_run == utc(2025, 3, 31, 8)
    assert assert_matches_reference(d, utc(2025, 4, 1)).next_run == utc(2025, 5, 31, 8)


def test_negative_month_day_is_the_last_day_of_each_month() -> None:
    d = dispatch(
        start=utc(2025, 1, 15, 6), duration=600, recurrence=rule("MONTHLY", bymonthdays=(-1,))
    )
    assert assert_matches_reference(d, utc(2025, 2, 10)).next_run == utc(2025, 2, 28, 6)
    assert assert_matches_reference(d, utc(2024, 2, 10)).next_run == utc(2025, 1, 31, 6)
    state = assert_matches_reference(d, utc(2025, 4, 30, 6, 5))
    assert state.running
    assert state.until == utc(2025, 4, 30, 6, 10)


def test_count_end_stops_after_the_last_occurrence() -> None:
    d = dispatch(start=utc(2026, 1, 1, 9), duration=600, recurrence=rule("DAILY", count=3))
    state = assert_matches_reference(d, utc(2026, 1, 3, 9, 5))
    assert state == RunState(True, utc(2026, 1, 3, 9, 10), None, utc(2026, 1, 3, 9, 10))
    state = assert_matches_reference(d, utc(2026, 1, 4, 9, 5))
    assert state == RunState(False, None, None, None)
    assert end_time(d) == utc(2026, 1, 3, 9, 10)


def test_until_end_is_inclusive() -> None:
    start = utc(2026, 1, 1, 0, 0, 30)
    d = dispatch(
        start=start, duration=60, recurrence=rule("HOURLY", until=start + timedelta(hours=2))
    )
    assert assert_matches_reference(d, utc(2026, 1, 1, 1, 59)).next_run == utc(2026, 1, 1, 2, 0, 30)
    assert assert_matches_reference(d, utc(2026, 1, 1, 2, 1)).running
    assert assert_matches_reference(d, utc(2026, 1, 1, 2, 2)).next_run is None
    assert end_time(d) == utc(2026, 1, 1, 2, 1, 30)


def test_count_and_by_lists_count_occurrences_not_periods() -> None:
    # Mondays and Fridays at 07:00 and 19:00, six times: Mon 5, Fri 9, Mon 12 (Jan 2026).
    d = dispatch(
        start=utc(2026, 1, 5, 7),
        duration=60,
        recurrence=rule("WEEKLY", byweekdays=("MONDAY", "FRIDAY"), byhours=(7, 19), count=6),
    )
    assert end_time(d) == utc(2026, 1, 12, 19, 1)
    assert assert_matches_reference(d, utc(2026, 1, 12, 19)).running
    assert assert_matches_reference(d, utc(2026, 1, 16, 7)) == RunState(False, None, None, None)


def test_hourly_rule_at_half_past_in_working_hours_on_weekdays() -> None:
    d = dispatch(
        start=utc(2026, 11, 2, 0),
        duration=900,
        recurrence=rule(
            "HOURLY",
            byhours=(8, 9, 10),
            byminutes=(30,),
            byweekdays=("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY"),
        ),
    )
    # Friday 10:40 → next is Monday 08:30.
    state = assert_matches_reference(d, utc(2026, 11, 27, 10, 40))
    assert state == RunState(
        True, utc(2026, 11, 27, 10, 45), utc(2026, 11, 30, 8, 30), utc(2026, 11, 27, 10, 45)
    )


# --- Dispatch-level cases ----------------------------------------------------


def test_inactive_dispatch_never_runs_but_keeps_its_next_run() -> None:
    d = dispatch(start=utc(2026, 1, 1), duration=3600, active=False, recurrence=rule("DAILY"))
    state = assert_matches_reference(d, utc(2026, 1, 5, 0, 30))
    assert state == RunState(False, None, utc(2026, 1, 6), None)


def test_duration_zero_never_runs() -> None:
    d = dispatch(start=utc(2026, 1, 1), duration=0, recurrence=rule("HOURLY"))
    state = assert_matches_reference(d, utc(2026, 1, 1, 5))
    assert state == RunState(False, None, utc(2026, 1, 1, 5), None)
    one_off = dispatch(start=utc(2026, 1, 1), duration=0)
    assert assert_matches_reference(one_off, utc(2026, 1, 1)) == RunState(
        False, None, utc(2026, 1, 1), None
    )


def test_duration_none_runs_from_the_start_on_and_ignores_the_recurrence() -> None:
    d = dispatch(start=utc(2026, 1, 1), duration=None, recurrence=rule("DAILY", count=1))
    before = assert_matches_reference(d, utc(2025, 12, 31))
    assert before == RunState(False, None, utc(2026, 1, 1), utc(2026, 1, 1))
    after = assert_matches_reference(d, utc(2027, 1, 1))
    assert after == RunState(True, None, None, None)
    assert end_time(d) is None


def test_unspecified_frequency_is_a_one_off() -> None:
    d = dispatch(
        start=utc(2026, 1, 1), duration=60, recurrence=rule("UNSPECIFIED", 3, byhours=(5,))
    )
    assert assert_matches_reference(d, utc(2026, 1, 1, 0, 0, 30)) == RunState(
        True, utc(2026, 1, 1, 0, 1), None, utc(2026, 1, 1, 0, 1)
    )
    assert end_time(d) == utc(2026, 1, 1, 0, 1)


def test_start_with_microseconds_runs_from_the_start_not_the_truncated_second() -> None:
    start = utc(2026, 1, 1, 10, 0, 0) + timedelta(microseconds=500_000)
    d = dispatch(start=start, duration=30, recurrence=rule("MINUTELY"))
    state = assert_matches_reference(d, start - timedelta(microseconds=300_000))
    assert state == RunState(False, None, utc(2026, 1, 1, 10, 1), start)
    assert assert_matches_reference(d, start).until == utc(2026, 1, 1, 10, 0, 30)


def test_back_to_back_runs_merge_into_one_change() -> None:
    d = dispatch(start=utc(2026, 1, 1), duration=25 * 3600, recurrence=rule("DAILY", count=3))
    state = assert_matches_reference(d, utc(2026, 1, 1, 12))
    assert state.running
    assert state.changes_at == utc(2026, 1, 4, 1)
    endless = dispatch(start=utc(2026, 1, 1), duration=3600, recurrence=rule("HOURLY"))
    assert run_state(endless, utc(2026, 6, 1)).changes_at is None


# --- Invalid rules -----------------------------------------------------------


def test_interval_zero_never_runs_and_validate_says_why() -> None:
    d = dispatch(start=utc(2026, 1, 1), duration=60, recurrence=rule("DAILY", 0))
    assert run_state(d, utc(2026, 1, 1, 0, 0, 30)) == RunState(False, None, None, None)
    with pytest.raises(ValueError, match="Interval"):
        oracle(lambda: client(d).next_run_after(utc(2026, 1, 1)))
    with pytest.raises(InvalidRecurrence, match="interval 0"):
        schedule.validate(d)
    assert end_time(d) is None


def test_unspecified_weekday_never_runs_like_the_reference_next_run() -> None:
    d = dispatch(
        start=utc(2026, 1, 1),
        duration=60,
        recurrence=rule("WEEKLY", byweekdays=("MONDAY", "UNSPECIFIED")),
    )
    now = utc(2026, 1, 5, 0, 0, 30)
    assert run_state(d, now) == RunState(False, None, None, None)
    assert client(d).next_run_after(now) is None
    with pytest.raises(InvalidRecurrence, match="UNSPECIFIED"):
        schedule.validate(d)


def test_unreachable_hourly_byhours_is_invalid() -> None:
    d = dispatch(start=utc(2026, 1, 1, 0), duration=60, recurrence=rule("HOURLY", 2, byhours=(1,)))
    assert run_state(d, utc(2026, 1, 1, 1)) == RunState(False, None, None, None)
    with pytest.raises(ValueError):
        oracle(lambda: client(d).next_run_after(utc(2026, 1, 1)))
    with pytest.raises(InvalidRecurrence):
        schedule.validate(d)


def test_invalid_rule_with_endless_duration_still_runs_as_the_reference_does() -> None:
    d = dispatch(start=utc(2026, 1, 1), duration=None, recurrence=rule("DAILY", 0))
    assert assert_matches_reference(d, utc(2026, 1, 2)) == RunState(True, None, None, None)
    schedule.validate(d)


def test_impossible_day_never_occurs_without_walking_to_year_9999() -> None:
    d = dispatch(
        start=utc(2026, 1, 1),
        duration=60,
        recurrence=rule("MONTHLY", bymonths=(2,), bymonthdays=(30,)),
    )
    assert run_state(d, utc(2026, 3, 1)) == RunState(False, None, None, None)


# --- Elapsed time does not matter --------------------------------------------


def test_minutely_rule_started_five_years_ago() -> None:
    d = dispatch(start=utc(2021, 11, 28, 6), duration=30, recurrence=rule("MINUTELY"))
    now = utc(2026, 11, 28, 6, 34, 25) + timedelta(microseconds=500_000)
    assert run_state(d, now) == RunState(
        True, utc(2026, 11, 28, 6, 34, 30), utc(2026, 11, 28, 6, 35), utc(2026, 11, 28, 6, 34, 30)
    )


def test_minutely_rule_with_by_lists_started_five_years_ago() -> None:
    # Mondays, 08:00-08:59, every 7 minutes counted from the start.
    start = utc(2021, 11, 29, 8)  # a Monday
    d = dispatch(
        start=start,
        duration=60,
        recurrence=rule("MINUTELY", 7, byhours=(8,), byweekdays=("MONDAY",)),
    )
    now = utc(2026, 11, 30, 8, 30)  # a Monday, 1827 days later
    minutes = (now - start) // timedelta(minutes=1)
    first = now + timedelta(minutes=(-minutes) % 7)
    assert first.hour == 8
    state = run_state(d, now)
    assert state.next_run == first
    assert state.running == (minutes % 7 == 0)


def test_count_end_far_in_the_future_is_found_by_days_not_occurrences() -> None:
    d = dispatch(
        start=utc(2020, 1, 1),
        duration=60,
        recurrence=rule("MINUTELY", byhours=(12,), count=60 * 365 * 3),
    )
    # 60 occurrences a day at 12:xx: the last one is on the 1095th day.
    assert end_time(d) == utc(2020, 1, 1, 12, 59, 0) + timedelta(days=1094, minutes=1)


def count_calls(monkeypatch: pytest.MonkeyPatch, method: str) -> list[int]:
    """Count the calls of a compiled rule's method (the count is the list's one item)."""
    calls = [0]
    real = getattr(list_rules._Rule, method)

    def counted(self: list_rules._Rule, *args: int) -> object:
        calls[0] += 1
        return real(self, *args)

    monkeypatch.setattr(list_rules._Rule, method, counted)
    return calls


@pytest.mark.parametrize(
    ("frequency", "interval", "weekdays", "count"),
    [
        ("WEEKLY", 3, ("MONDAY", "THURSDAY"), 4999),
        ("WEEKLY", 2, ("SUNDAY",), 1),
        ("WEEKLY", 2, ("SUNDAY",), 2),
        ("WEEKLY", 1, ("TUESDAY", "WEDNESDAY", "SATURDAY"), 3001),
        ("WEEKLY", 5, (), 700),
        ("DAILY", 3, (), 4000),
        ("DAILY", 4, ("FRIDAY", "SATURDAY"), 2500),
        ("DAILY", 10, ("MONDAY",), 3),
    ],
)
def test_a_count_end_of_repeating_days_equals_the_reference_and_skips_whole_periods(
    frequency: str,
    interval: int,
    weekdays: tuple[str, ...],
    count: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Started on a Wednesday at 09:30 with two times a day: the first day's earlier
    # time is before the start, so the first day holds one occurrence.
    d = dispatch(
        start=utc(2026, 3, 4, 9, 30),
        duration=600,
        recurrence=rule(
            frequency, interval, byweekdays=weekdays, byhours=(8, 17), byminutes=(30,), count=count
        ),
    )
    occurrences = oracle(lambda: list(client(d).recurrence._as_rrule(d.start_time)))
    days_walked = count_calls(monkeypatch, "slots")

    assert end_time(d) == occurrences[-1] + timedelta(seconds=600)
    # About two periods (the first one counted, the last one walked), never every day.
    assert days_walked[0] <= 2 * 7 * interval + 4


@pytest.mark.parametrize(
    ("interval", "days", "count", "constant"),
    [
        (1, {"bymonthdays": (1, 15, -1)}, 4999, True),
        (3, {"bymonthdays": (5,)}, 3000, True),
        (2, {"bymonthdays": (-3, 10)}, 2000, True),
        (1, {"bymonthdays": (31,)}, 500, False),
        (1, {"bymonthdays": (28, -1)}, 900, False),
        (2, {"byweekdays": ("MONDAY",)}, 700, False),
    ],
)
def test_a_count_end_of_a_monthly_rule_equals_the_reference_and_passes_alike_months_at_once(
    interval: int,
    days: dict[str, tuple[int | str, ...]],
    count: int,
    constant: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = dispatch(
        start=utc(2026, 3, 20, 9, 30),
        duration=600,
        recurrence=rule("MONTHLY", interval, byhours=(8, 17), byminutes=(30,), count=count, **days),
    )
    occurrences = oracle(lambda: list(client(d).recurrence._as_rrule(d.start_time)))
    months_walked = count_calls(monkeypatch, "_skip_month")

    assert end_time(d) == occurrences[-1] + timedelta(seconds=600)
    if constant:
        # Months that all hold as many occurrences are passed at once, not one by one.
        assert months_walked[0] <= 4 * interval + 4


# --- running_at ---------------------------------------------------------------


def test_running_at_sorts_by_id_and_gives_the_earliest_change() -> None:
    now = utc(2026, 1, 1, 12)
    ds = [
        dispatch(dispatch_id=7, start=utc(2026, 1, 1, 11), duration=7200),
        dispatch(dispatch_id=3, start=utc(2026, 1, 1), duration=60, recurrence=rule("HOURLY")),
        dispatch(dispatch_id=5, start=utc(2026, 1, 1, 13), duration=60),
        dispatch(dispatch_id=1, start=utc(2026, 1, 1), duration=None),
        dispatch(dispatch_id=2, start=utc(2026, 1, 1), duration=None, active=False),
    ]
    running, change = running_at(ds, now)
    assert [d.id for d in running] == [1, 3, 7]
    assert change == utc(2026, 1, 1, 12, 1)
    assert running_at([], now) == ([], None)


def test_runs_chained_past_year_9999_answer_without_overflow() -> None:
    # Found by the property test: 24-yearly runs of 60 years each never stop, and
    # the chain's end lies beyond the last instant a datetime can hold.
    start = datetime(2024, 2, 29, 10, 30, 15, tzinfo=UTC)
    d = dispatch(start=start, duration=1_904_646_249, recurrence=rule("YEARLY", 24))

    state = run_state(d, start)

    assert state.running
    assert state.until == start + timedelta(seconds=1_904_646_249)
    assert state.next_run == start
    assert state.changes_at == datetime.max.replace(tzinfo=UTC).replace(microsecond=0)
