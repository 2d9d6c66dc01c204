"""Unit tests of `bridge.api_clock`: the bridge's clock judged from streamed changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bridge.api_clock import SECONDS_NEEDED, ApiClockCheck, ClockVerdict

T0 = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def arrive(check: ApiClockCheck, at: datetime, late: float, dispatch_id: int = 1) -> ClockVerdict:
    """A change made `late` seconds (API clock) before it arrived at `at` (bridge clock)."""
    return check.observe(dispatch_id, at - timedelta(seconds=late), at)


def test_a_change_from_the_future_proves_the_bridge_behind_at_once() -> None:
    verdict = ApiClockCheck().observe(7, T0 + timedelta(seconds=20), T0)

    assert verdict.problem is not None
    assert "the bridge's clock is 20.0 s behind the Dispatch API's" in verdict.problem
    assert "dispatch 7" in verdict.problem
    assert not verdict.agree


def test_a_burst_of_held_changes_is_no_proof_of_a_clock_ahead() -> None:
    # A healed partition delivers what it held at once: every change 8 s old.
    check = ApiClockCheck()
    at = T0 + timedelta(milliseconds=100)
    verdicts = [arrive(check, at + timedelta(milliseconds=n), 8.0 + n / 10) for n in range(10)]

    assert all(v.problem is None and not v.agree for v in verdicts)


def test_changes_late_in_several_seconds_show_a_clock_ahead() -> None:
    check = ApiClockCheck()
    verdicts = [arrive(check, T0 + timedelta(seconds=n), 20.0 + n) for n in range(SECONDS_NEEDED)]

    assert [v.problem is None for v in verdicts[:-1]] == [True] * (SECONDS_NEEDED - 1)
    problem = verdicts[-1].problem
    assert problem is not None
    assert "the bridge's clock is 20.0 s ahead of the Dispatch API's" in problem


def test_one_change_on_time_among_late_ones_keeps_the_clock_trusted() -> None:
    # The smallest sample bounds the offset: one on time means no clock ahead.
    check = ApiClockCheck()
    lates = [8.0, 0.1, 9.0, 7.5]
    verdicts = [arrive(check, T0 + timedelta(seconds=n), late) for n, late in enumerate(lates)]

    assert [v.problem for v in verdicts] == [None] * len(lates)
    assert [v.agree for v in verdicts] == [False, True, False, False]


def test_a_change_on_time_says_the_clocks_agree() -> None:
    verdict = arrive(ApiClockCheck(), T0, 1.9)

    assert verdict.agree
    assert verdict.problem is None
