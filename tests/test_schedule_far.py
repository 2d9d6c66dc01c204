"""Property test: rules started years ago, against the reference restarted near `now`.

The reference cannot walk years of past occurrences, but a rule restarted a
whole number of `interval` periods later has the same occurrences from then
on. So ours, started years (MINUTELY: decades) ago, must give the same
`next_run` as the reference started just before `now`, and the same run state
whenever the restarted reference saw the latest occurrence.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from actor_sdk import wire
from bridge import schedule
from tests.schedule_cases import OracleTooSlow, client, expected_state, oracle, time_limit
from tests.test_schedule_properties import _SETTINGS, PERIOD, dispatches

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # The reference's cutoff (`time_limit`) sets SIGALRM's handler and timer; pytest-timeout's
    # signal method uses the same signal. A fresh-clone CI once failed here with a traceback
    # raised from a signal handler: these tests time out by a thread instead.
    pytest.mark.timeout(120, method="thread"),
]
CUTOFF_S = 0.05


UNITS = {"MINUTELY": "minutes", "HOURLY": "hours", "DAILY": "days", "WEEKLY": "weeks"}


def _shifted_start(recurrence: wire.Recurrence, start: datetime, periods: int) -> datetime | None:
    """The start moved by whole `interval` periods: same occurrences from then on."""
    steps = periods * recurrence.interval
    unit = UNITS.get(recurrence.frequency)
    if unit is not None:
        return start + timedelta(**{unit: steps})
    # Months and years: only rules whose days do not default to the start's day.
    if not (recurrence.bymonthdays or recurrence.byweekdays):
        return None
    months = steps * (12 if recurrence.frequency == "YEARLY" else 1)
    year, month = divmod(start.year * 12 + start.month - 1 + months, 12)
    if year > 2200:
        return None
    return start.replace(year=year, month=month + 1, day=1)


FAR_PERIODS = {
    "MINUTELY": (100_000, 30_000_000),
    "HOURLY": (10_000, 500_000),
    "DAILY": (1_000, 20_000),
    "WEEKLY": (100, 3_000),
    "MONTHLY": (20, 600),
    "YEARLY": (5, 60),
}


@settings(_SETTINGS, max_examples=300)
@given(dispatches(), st.data())
def test_years_after_the_start_equals_reference_started_nearby(
    d: wire.Dispatch, data: st.DataObject
) -> None:
    recurrence = d.recurrence
    if recurrence is None or recurrence.frequency == "UNSPECIFIED" or d.duration is None:
        reject()
    if recurrence.end is not None and recurrence.end.count is not None:
        reject()  # a count ends differently once restarted
    periods = data.draw(st.integers(*FAR_PERIODS[recurrence.frequency]))
    shifted = _shifted_start(recurrence, d.start_time.replace(microsecond=0), periods)
    if shifted is None:
        reject()
    assert shifted is not None
    nearby = wire.Dispatch(
        **{**{f: getattr(d, f) for f in d.__struct_fields__}, "start_time": shifted}
    )
    step = PERIOD[recurrence.frequency] * recurrence.interval
    now = shifted + timedelta(seconds=data.draw(st.integers(0, 60 * step)))
    try:
        with time_limit(CUTOFF_S):
            running, until, next_run = expected_state(nearby, now)
            latest = oracle(
                lambda: client(nearby).recurrence._as_rrule(shifted).before(now, inc=True)
            )
    except OracleTooSlow:
        reject()
    state = schedule.run_state(d, now)
    assert state.next_run == next_run, (d, now, shifted)
    if latest is not None:
        # The restarted rule saw the latest occurrence: the run state must agree.
        assert (state.running, state.until) == (running, until), (d, now, shifted)


def test_the_reference_time_limit_fires_inside_the_reference_only() -> None:
    # Raised anywhere else (hypothesis, pytest, a `with` statement's cleanup), the
    # alarm's error left a frame without a line number and crashed pytest's report.
    from dateutil.rrule import MINUTELY, rrule  # noqa: PLC0415

    with time_limit(0.01):
        spin_until = time.monotonic() + 0.05
        while time.monotonic() < spin_until:  # our own code: the alarm waits
            pass
        with pytest.raises(OracleTooSlow):
            oracle(lambda: sum(1 for _ in rrule(MINUTELY, dtstart=datetime(2000, 1, 1))))
