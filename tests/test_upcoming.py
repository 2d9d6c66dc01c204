"""bridge.upcoming: the runs of the coming hours, per type (pure core and async shell)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from actor_sdk import wire
from bridge import schedule
from bridge.core import ScheduleCore
from bridge.service import RetainedValue
from bridge.upcoming import (
    MAX_RUNS,
    UpcomingTopics,
    dispatch_runs,
    refresh_interval,
    upcoming_runs,
)
from tests.test_watch import LAYOUT, MINUTELY, NOW, make_dispatch

DAY = timedelta(hours=24)
HOURLY = wire.Recurrence(frequency="HOURLY", interval=1)


def run(dispatch_id: int, start: datetime, end: datetime | None) -> wire.UpcomingRun:
    return wire.UpcomingRun(id=dispatch_id, start=start, end=end)


def test_a_one_off_and_an_endless_dispatch_are_listed_with_their_real_bounds() -> None:
    one_off = make_dispatch(1, NOW + timedelta(hours=2), 600)
    endless = make_dispatch(2, NOW - timedelta(hours=5), None)
    past = make_dispatch(3, NOW - timedelta(hours=2), 600)
    beyond = make_dispatch(4, NOW + timedelta(hours=25), 600)
    inactive = make_dispatch(5, NOW + timedelta(hours=1), 600, active=False)

    message = upcoming_runs(7, "T", [one_off, endless, past, beyond, inactive], NOW, DAY)

    assert message.runs == (
        run(2, NOW - timedelta(hours=5), None),
        run(1, NOW + timedelta(hours=2), NOW + timedelta(hours=2, minutes=10)),
    )
    assert (message.microgrid_id, message.type, message.as_of) == (7, "T", NOW)
    assert message.until == NOW + DAY
    assert not message.truncated


def test_a_recurrence_is_laid_out_and_the_run_in_progress_keeps_its_start() -> None:
    # Every hour at :00 for 30 min, since 5 h ago; NOW is 07:03:20, inside the 07:00 run.
    start = NOW.replace(minute=0, second=0) - timedelta(hours=5)
    dispatch = make_dispatch(9, start, 1800, recurrence=HOURLY)

    runs, cut = dispatch_runs(dispatch, NOW, NOW + timedelta(hours=3), 10)

    top = NOW.replace(minute=0, second=0)
    half = timedelta(minutes=30)
    assert not cut
    assert runs == [(top + timedelta(hours=h), top + timedelta(hours=h) + half) for h in range(4)]


def test_back_to_back_runs_merge_and_a_chain_in_progress_is_walked_back() -> None:
    # Hourly for 2 h each, 10 occurrences from 3 h ago: one stretch of 11 h.
    start = NOW - timedelta(hours=3)
    rule = wire.Recurrence(frequency="HOURLY", interval=1, end=wire.EndCriteria(count=10))
    dispatch = make_dispatch(4, start, 7200, recurrence=rule)

    runs, _ = dispatch_runs(dispatch, NOW, NOW + DAY, 5000)

    assert runs == [(start, start + timedelta(hours=11))]


def test_every_listed_run_agrees_with_the_schedule() -> None:
    rules = [
        MINUTELY,
        HOURLY,
        wire.Recurrence(frequency="DAILY", interval=1, byhours=(6, 18), byminutes=(15,)),
        wire.Recurrence(frequency="WEEKLY", interval=1, byweekdays=("MONDAY", "SATURDAY")),
    ]
    periods = [60, 3600, 12 * 3600, 2 * 86400]
    for index, rule in enumerate(rules):
        for duration in (20, 900, 5400):
            dispatch = make_dispatch(index, NOW - timedelta(days=3), duration, recurrence=rule)
            runs, _ = dispatch_runs(dispatch, NOW, NOW + DAY, 5000)
            for run_start, run_end in runs:
                assert schedule.run_state(dispatch, run_start).running
                # Without end only when the runs chain for ever (a duration of a period).
                assert run_end is not None or duration >= periods[index]
                assert run_end is None or not schedule.run_state(dispatch, run_end).running
                if run_start > NOW:
                    before = run_start - timedelta(microseconds=1)
                    assert not schedule.run_state(dispatch, before).running


def every_run(dispatches: list[wire.Dispatch], end: datetime) -> list[wire.UpcomingRun]:
    """The oracle: each dispatch's runs on their own, all of them, sorted by start then id."""
    found = [
        run(dispatch.id, run_start, run_end)
        for dispatch in dispatches
        for run_start, run_end in dispatch_runs(dispatch, NOW, end, 100_000)[0]
    ]
    return sorted(found, key=lambda r: (r.start, r.id))


def dense_type(count: int) -> list[wire.Dispatch]:
    """`count` minutely dispatches of 20 s, staggered: 1,440 runs each in 24 h."""
    return [
        make_dispatch(n, NOW - timedelta(hours=1, seconds=n), 20, recurrence=MINUTELY)
        for n in range(1, count + 1)
    ]


def test_a_list_holds_the_earliest_runs_of_all_dispatches_and_says_where_it_was_cut() -> None:
    # 2 dense dispatches give 2,880 runs in 24 h: more than a list holds.
    dispatches = [
        *dense_type(2),
        make_dispatch(20, NOW + timedelta(hours=20), 60),
        make_dispatch(21, NOW + timedelta(minutes=10), 60),
        make_dispatch(22, NOW - timedelta(hours=2), 7200, recurrence=HOURLY),
    ]

    message = upcoming_runs(1, "T", dispatches, NOW, DAY)

    assert message.truncated
    assert list(message.runs) == every_run(dispatches, NOW + DAY)[:MAX_RUNS]
    assert 21 in {r.id for r in message.runs}
    assert 20 not in {r.id for r in message.runs}


def test_a_list_that_fits_is_every_run_and_not_cut() -> None:
    rules = [None, MINUTELY, HOURLY, wire.Recurrence(frequency="DAILY", interval=1)]
    dispatches = [
        make_dispatch(
            n,
            NOW + timedelta(minutes=37 * n - 600),
            [20, 900, 5400, None][n % 4],
            recurrence=rules[n % 4] if n % 4 != 1 or n < 4 else None,
            active=n % 7 != 0,
        )
        for n in range(1, 30)
    ]

    message = upcoming_runs(1, "T", dispatches, NOW, DAY)

    assert not message.truncated
    assert list(message.runs) == every_run(dispatches, NOW + DAY)


def test_a_list_costs_a_step_per_dispatch_and_per_run_listed_not_per_run_in_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 200 dense dispatches hold 288,000 runs in 24 h; the list shows 1,000 of them.
    steps = 0
    real_run_state = schedule.run_state

    def counted(dispatch: wire.Dispatch, at: datetime) -> schedule.RunState:
        nonlocal steps
        steps += 1
        return real_run_state(dispatch, at)

    monkeypatch.setattr(schedule, "run_state", counted)

    message = upcoming_runs(1, "T", dense_type(200), NOW, DAY)

    assert len(message.runs) == MAX_RUNS and message.truncated
    # A step to the start and one to the end of each run, and the walk back of runs in progress.
    assert steps <= 3 * 200 + 2 * MAX_RUNS + 200


def test_the_payload_round_trips_and_endless_ends_are_null() -> None:
    message = upcoming_runs(1, "T", [make_dispatch(2, NOW, None)], NOW, DAY)

    data = wire.encode(message)

    assert b'"end":null' in data
    assert wire.decode_upcoming(data) == message
    with pytest.raises(wire.WireError):
        wire.decode_upcoming(b'{"runs": 3}')
    assert LAYOUT.parse(LAYOUT.upcoming("a/b")) == wire.TopicRef(wire.TopicKind.UPCOMING, "a/b")


def test_refresh_interval_is_a_96th_of_the_window_within_bounds() -> None:
    assert refresh_interval(DAY) == timedelta(minutes=15)
    assert refresh_interval(timedelta(hours=2)) == timedelta(seconds=75)
    assert refresh_interval(timedelta(minutes=1)) == timedelta(seconds=10)
    assert refresh_interval(timedelta(days=30)) == timedelta(minutes=15)


class FakeSink:
    """Records what the shell sets."""

    def __init__(self) -> None:
        self.sets: list[tuple[str, wire.UpcomingRuns]] = []
        self.published = asyncio.Event()

    def set(self, topic: str, payload: RetainedValue) -> None:
        assert isinstance(payload, bytes)
        self.sets.append((topic, wire.decode_upcoming(payload)))
        self.published.set()

    def clear(self, topic: str) -> None:
        raise AssertionError(f"cleared {topic}")

    def event(self, topic: str, payload: bytes) -> None:
        raise AssertionError(f"event on {topic}")

    def mark_authoritative(self) -> None:
        raise AssertionError("mark_authoritative")

    def set_status(self, **_: object) -> None:
        raise AssertionError("set_status")


async def next_set(sink: FakeSink) -> tuple[str, wire.UpcomingRuns]:
    await asyncio.wait_for(sink.published.wait(), 5)
    sink.published.clear()
    return sink.sets[-1]


async def sets_made(sink: FakeSink, count: int) -> None:
    while len(sink.sets) < count:
        await next_set(sink)


async def test_the_shell_publishes_every_type_then_only_what_changed() -> None:
    core = ScheduleCore(1, LAYOUT)
    a = make_dispatch(1, NOW + timedelta(hours=1), 60, dispatch_type="A")
    b = make_dispatch(2, NOW + timedelta(hours=2), 60, dispatch_type="B")
    core.load([a, b], NOW)
    sink = FakeSink()
    topics = UpcomingTopics(core, sink, clock=lambda: NOW)
    task = asyncio.create_task(topics.run())
    try:
        await sets_made(sink, 2)  # the first full pass sets both
        assert [(topic, [r.id for r in m.runs]) for topic, m in sink.sets] == [
            (LAYOUT.upcoming("A"), [1]),
            (LAYOUT.upcoming("B"), [2]),
        ]
        # A change of A's dispatches republishes A only.
        out = core.apply(
            "updated", make_dispatch(1, NOW + timedelta(hours=3), 60, dispatch_type="A"), NOW
        )
        assert out.changed
        topics.mark(["A"])
        topic, message = await next_set(sink)
        assert topic == LAYOUT.upcoming("A")
        assert message.runs == (
            run(1, NOW + timedelta(hours=3), NOW + timedelta(hours=3, minutes=1)),
        )
        # Marked but unchanged: nothing is sent; a type left empty gets an empty list.
        topics.mark(["B"])
        core.apply("deleted", a, NOW)
        topics.mark(["A"])
        topic, message = await next_set(sink)
        assert (topic, message.runs) == (LAYOUT.upcoming("A"), ())
        assert len(sink.sets) == 4
    finally:
        task.cancel()


async def test_a_list_cut_short_is_recomputed_when_half_its_stretch_has_passed() -> None:
    # 50 dense dispatches: 1,000 runs cover 20 minutes, so the list is redone after 10,
    # before the full pass of every 15 minutes.
    core = ScheduleCore(1, LAYOUT)
    core.load(dense_type(50), NOW)
    sink = FakeSink()
    now = [NOW]
    topics = UpcomingTopics(core, sink, clock=lambda: now[0])
    task = asyncio.create_task(topics.run())
    try:
        _, first = await next_set(sink)
        assert first.truncated and first.as_of == NOW
        covered = first.runs[-1].start - NOW
        assert timedelta(minutes=19) < covered < timedelta(minutes=21)
        # Before half the stretch has passed, a wake-up recomputes nothing.
        now[0] = NOW + covered / 2 - timedelta(seconds=1)
        topics.mark([])
        await asyncio.sleep(0.6)
        assert len(sink.sets) == 1
        # After it, the list moves on.
        now[0] = NOW + covered / 2 + timedelta(seconds=1)
        topics.mark([])
        _, second = await next_set(sink)
        assert second.as_of == now[0] and second.truncated
        assert second.runs[-1].start > first.runs[-1].start + covered / 3
    finally:
        task.cancel()


async def test_a_computation_waits_until_the_sink_has_sent_what_it_holds() -> None:
    # At start-up the dispatch and running topics go first; advance notice after them.
    core = ScheduleCore(1, LAYOUT)
    core.load([make_dispatch(1, NOW + timedelta(hours=1), 60, dispatch_type="A")], NOW)
    sink = FakeSink()
    asked, sent = asyncio.Event(), asyncio.Event()

    async def flushed() -> None:
        asked.set()
        await sent.wait()

    topics = UpcomingTopics(core, sink, clock=lambda: NOW, flushed=flushed)
    task = asyncio.create_task(topics.run())
    try:
        await asyncio.wait_for(asked.wait(), 5)
        assert sink.sets == [] and topics.passes == 0
        sent.set()
        topic, message = await next_set(sink)
        assert (topic, [r.id for r in message.runs]) == (LAYOUT.upcoming("A"), [1])
    finally:
        task.cancel()
