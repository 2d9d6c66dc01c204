"""Advance notice (`actor_sdk._upcoming`): the pure rules, then the receiver end to end.

The e2e test runs the real API server, bridge and Mosquitto: a dispatch created to
start a few seconds later reaches an upcoming receiver before its start.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest

from actor_sdk import Dispatcher, UpcomingRun, wire
from actor_sdk._upcoming import UpcomingFeeds, UpcomingNotices
from testkit.api_server import ApiServerHandle, run_dispatch_cli
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from tests.fixtures.sdk import utcnow

T0 = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def runs(
    *listed: tuple[int, datetime, datetime | None], as_of: datetime = T0, truncated: bool = False
) -> wire.UpcomingRuns:
    return wire.UpcomingRuns(
        microgrid_id=1,
        type="T",
        runs=tuple(wire.UpcomingRun(id=i, start=s, end=e) for i, s, e in listed),
        as_of=as_of,
        until=as_of + timedelta(hours=24),
        truncated=truncated,
    )


def told(notices: list[UpcomingRun]) -> list[tuple[int, datetime, bool]]:
    return [(n.dispatch_id, n.start, n.cancelled) for n in notices]


def test_a_run_is_due_once_when_its_start_comes_within_the_window() -> None:
    notices = UpcomingNotices(timedelta(minutes=5))
    assert notices.update(runs((1, T0 + 10 * MIN, T0 + 20 * MIN)), T0) == []
    assert notices.due(T0) == []
    assert notices.next_due(T0) == T0 + 5 * MIN
    assert notices.due(T0 + 5 * MIN - timedelta(microseconds=1)) == []
    [run] = notices.due(T0 + 5 * MIN)
    assert (run.dispatch_id, run.start, run.end, run.cancelled) == (
        1,
        T0 + 10 * MIN,
        T0 + 20 * MIN,
        False,
    )
    assert notices.due(T0 + 6 * MIN) == []  # once
    assert notices.next_due(T0 + 6 * MIN) is None


def test_runs_already_in_the_window_come_at_once_and_started_runs_never() -> None:
    notices = UpcomingNotices(timedelta(minutes=5))
    notices.update(runs((1, T0 - MIN, T0 + MIN), (2, T0 + 2 * MIN, None)), T0)
    assert told(notices.due(T0)) == [(2, T0 + 2 * MIN, False)]


def test_a_changed_end_is_told_again_and_a_moved_start_cancels_the_old_run() -> None:
    notices = UpcomingNotices(timedelta(minutes=5))
    notices.update(runs((1, T0 + 2 * MIN, T0 + 3 * MIN)), T0)
    notices.due(T0)
    assert notices.update(runs((1, T0 + 2 * MIN, T0 + 4 * MIN)), T0) == []
    [again] = notices.due(T0)
    assert again.end == T0 + 4 * MIN
    cancelled = notices.update(runs((1, T0 + 3 * MIN, T0 + 4 * MIN)), T0)
    assert told(cancelled) == [(1, T0 + 2 * MIN, True)]
    assert told(notices.due(T0)) == [(1, T0 + 3 * MIN, False)]


def test_a_deleted_run_is_cancelled_once_but_a_started_or_unlisted_one_is_not() -> None:
    notices = UpcomingNotices(timedelta(minutes=5))
    notices.update(runs((1, T0 + MIN, None), (2, T0 + 2 * MIN, None)), T0)
    assert len(notices.due(T0)) == 2
    # 1 started (listed no more once over), 2 deleted before its start.
    assert told(notices.update(runs(), T0 + 90 * timedelta(seconds=1))) == [(2, T0 + 2 * MIN, True)]
    assert notices.update(runs(), T0 + 100 * timedelta(seconds=1)) == []
    # A run beyond the end of a truncated list is not cancelled.
    notices.update(runs((3, T0 + 3 * MIN, None), (4, T0 + 4 * MIN, None)), T0)
    notices.due(T0)
    assert notices.update(runs((3, T0 + 3 * MIN, None), truncated=True), T0) == []
    # A cleared topic (the type is gone) cancels what was told.
    assert told(notices.update(None, T0)) == [
        (3, T0 + 3 * MIN, True),
        (4, T0 + 4 * MIN, True),
    ]


def test_the_same_list_again_repeats_nothing() -> None:
    notices = UpcomingNotices(timedelta(minutes=5))
    listed = runs((1, T0 + MIN, T0 + 2 * MIN))
    notices.update(listed, T0)
    assert len(notices.due(T0)) == 1
    assert notices.update(listed, T0 + timedelta(seconds=5)) == []  # a reconnect's replay
    assert notices.due(T0 + timedelta(seconds=5)) == []


async def test_the_feed_delivers_due_runs_with_their_dispatch_and_repeats_nothing_on_replay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [T0]
    feeds = UpcomingFeeds(lambda: now[0], lambda kind, number: None)
    listed = wire.encode(runs((1, T0 + MIN, None), (2, T0 + 20 * MIN, None)))
    await feeds.apply("T", listed)  # before any receiver: kept, not decoded
    receiver = feeds.receiver("T", within=timedelta(minutes=5))
    task = asyncio.create_task(feeds.run())
    try:
        first = await asyncio.wait_for(receiver.receive(), 5)
        assert (first.dispatch_id, first.cancelled) == (1, False)
        await feeds.apply("T", listed)  # a reconnect's replay
        await feeds.apply("T", b"not json")  # unreadable: taken as nothing listed
        cancelled = await asyncio.wait_for(receiver.receive(), 5)
        assert (cancelled.dispatch_id, cancelled.cancelled) == (1, True)
        assert "cannot be read" in caplog.text
        now[0] = T0 + 16 * MIN  # 1 started meanwhile (never told again), 2 is due
        await feeds.apply("T", listed)
        told_next = await asyncio.wait_for(receiver.receive(), 5)
        assert (told_next.dispatch_id, told_next.cancelled) == (2, False)
    finally:
        task.cancel()
        await feeds.close()


@pytest.mark.slow
async def test_an_upcoming_receiver_hears_of_a_run_before_its_start(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker, (1,))
    bridge.wait_synced()
    # A type whose list is retained long before anyone follows it.
    code, output = await run_dispatch_cli(
        api_server, "create", "1", "EARLY", "7", "in 30 minutes", "5 minutes"
    )
    assert code == 0, output
    async with Dispatcher(microgrid_id=1, broker=mqtt_broker.url("actor")) as dispatcher:
        receiver = dispatcher.new_upcoming_receiver("PREPARE", within=timedelta(seconds=8))
        code, output = await run_dispatch_cli(
            api_server, "create", "1", "PREPARE", "7", "in 12 seconds", "3 seconds"
        )
        assert code == 0, output
        match = re.search(r"ID:\s+DID(\d+)", output)
        assert match is not None, output
        dispatch_id = int(match.group(1))
        run = await asyncio.wait_for(receiver.receive(), 20)
        heard = utcnow()
        assert run.dispatch_id == dispatch_id and not run.cancelled
        # The schedule switches on whole seconds: a start with sub-second digits
        # (dispatch-cli's "in 12 seconds") runs from the next second.
        assert run.end is not None
        assert timedelta(seconds=2) <= run.end - run.start <= timedelta(seconds=3)
        # Before its start, and not before the window opened (the clocks are one here).
        assert run.start - timedelta(seconds=8.5) <= heard < run.start - timedelta(seconds=3)
        assert run.dispatch is not None and int(run.dispatch.id) == dispatch_id
        # Deleted seconds before its start: told once more, cancelled, before the start.
        code, output = await run_dispatch_cli(api_server, "delete", "1", str(dispatch_id))
        assert code == 0, output
        cancelled = await asyncio.wait_for(receiver.receive(), 10)
        assert (cancelled.dispatch_id, cancelled.start, cancelled.cancelled) == (
            dispatch_id,
            run.start,
            True,
        )
        assert utcnow() < run.start
        # Subscribed when a receiver asks: the retained list of EARLY comes then.
        early = dispatcher.new_upcoming_receiver("EARLY", within=timedelta(hours=1))
        ahead = await asyncio.wait_for(early.receive(), 10)
        assert ahead.start - utcnow() > timedelta(minutes=29) and not ahead.cancelled
