"""Unit tests of the SDK's pure decisions: fail-safe filter, actor planner, running state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from frequenz.client.dispatch.types import DispatchId

from actor_sdk import Dispatch, MergeByType, MergeByTypeTarget, wire
from actor_sdk._dispatch_model import from_wire
from actor_sdk._planner import (
    LIVE_GRACE,
    ActorPlanner,
    SnapshotTerms,
    StartActor,
    StopActor,
    UpdateActor,
    confirmed_running,
    own_clock_running,
    running_state_changes,
)
from tests.fixtures.sdk import wire_dispatch

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def dispatch(
    dispatch_id: int,
    *,
    started_ago: float = 10,
    duration: int | None = 60,
    running: bool = True,
    payload: dict[str, Any] | None = None,
    ids: tuple[int, ...] = (1,),
    dry_run: bool = False,
    dispatch_type: str = "T",
) -> Dispatch:
    """A dispatch as the SDK holds it, started `started_ago` seconds before `NOW`."""
    wired = wire_dispatch(
        dispatch_id,
        dispatch_type,
        start=NOW - timedelta(seconds=started_ago),
        duration=duration,
        running=running,
        payload=payload,
        target=wire.Target(ids=ids),
        dry_run=dry_run,
    )
    return from_wire(wired, as_of=NOW)


def ids(dispatches: tuple[Dispatch, ...]) -> list[int]:
    return [int(d.id) for d in dispatches]


# --- confirmed_running ------------------------------------------------------------------


def test_live_view_confirms_what_the_bridge_reports() -> None:
    reported = [dispatch(1), dispatch(2, duration=None)]
    assert ids(confirmed_running(reported, set(), now=NOW, live=True)) == [1, 2]


def test_a_new_run_whose_until_passed_is_never_started() -> None:
    ended = dispatch(1, started_ago=70)
    assert confirmed_running([ended], set(), now=NOW, live=True) == ()


def test_a_known_run_stops_at_its_until_even_with_a_live_view() -> None:
    # A blind bridge may never publish the stop: only a newer message extends a run.
    run = dispatch(1, started_ago=60)  # until == NOW
    known = {DispatchId(1)}
    grace = LIVE_GRACE - timedelta(milliseconds=1)
    # Live, the bridge's own change (a merged actor's next run) gets LIVE_GRACE to arrive.
    assert ids(confirmed_running([run], known, now=NOW + grace, live=True)) == [1]
    assert confirmed_running([run], known, now=NOW + LIVE_GRACE, live=True) == ()
    assert confirmed_running([run], known, now=NOW, live=False) == ()
    assert timedelta(milliseconds=100) >= LIVE_GRACE


def test_without_a_live_view_nothing_new_starts() -> None:
    assert confirmed_running([dispatch(1)], set(), now=NOW, live=False) == ()


def test_without_a_live_view_a_known_run_continues_until_its_until() -> None:
    known = {DispatchId(1), DispatchId(2)}
    runs = [dispatch(1), dispatch(2, duration=None)]
    assert ids(confirmed_running(runs, known, now=NOW, live=False)) == [1, 2]
    later = NOW + timedelta(seconds=50)
    assert ids(confirmed_running(runs, known, now=later, live=False)) == [2]


def test_an_endless_run_stops_once_blind_too_long_but_never_while_live() -> None:
    known = {DispatchId(2)}
    endless = [dispatch(2, duration=None)]
    assert confirmed_running(endless, known, now=NOW, live=False, blind_too_long=True) == ()
    assert ids(confirmed_running(endless, known, now=NOW, live=True, blind_too_long=True)) == [2]


def test_a_dispatch_not_started_in_a_snapshot_is_ignored() -> None:
    assert confirmed_running([dispatch(1, running=False)], set(), now=NOW, live=True) == ()


# --- the planner ---------------------------------------------------------------------


def test_one_actor_per_dispatch_without_a_strategy() -> None:
    planner = ActorPlanner(lambda d: d.id)
    actions = planner.reconcile([dispatch(1), dispatch(2)])
    assert [type(a) for a in actions] == [StartActor, StartActor]
    assert planner.reconcile([dispatch(2)]) == [
        StopActor(DispatchId(1), dispatch(1), "Dispatch stopped")
    ]


def test_an_unchanged_snapshot_does_nothing_and_a_change_is_an_update() -> None:
    planner = ActorPlanner(lambda d: d.id)
    planner.reconcile([dispatch(1)])
    assert planner.reconcile([dispatch(1)]) == []
    changed = dispatch(1, payload={"n": 99})
    assert planner.reconcile([changed]) == [UpdateActor(DispatchId(1), changed)]


def test_merge_by_type_shares_one_actor_and_follows_the_newest_running_dispatch() -> None:
    planner = ActorPlanner(MergeByType().identity)
    older, newer = dispatch(1, started_ago=20), dispatch(2, started_ago=5)
    [start] = planner.reconcile([older])
    assert isinstance(start, StartActor)
    assert planner.reconcile([older, newer]) == [UpdateActor(start.key, newer)]
    # The newer one ends first: the actor goes back to the one that still runs.
    assert planner.reconcile([older]) == [UpdateActor(start.key, older)]
    assert planner.reconcile([]) == [StopActor(start.key, older, "Dispatch stopped")]


def test_back_to_back_dispatches_of_one_group_do_not_stop_the_actor() -> None:
    planner = ActorPlanner(MergeByType().identity)
    first, second = dispatch(1, started_ago=60), dispatch(2, started_ago=0)
    [start] = planner.reconcile([first])
    assert planner.reconcile([second]) == [UpdateActor(start.key, second)]


def test_a_change_of_a_member_makes_it_the_one_the_actor_reflects() -> None:
    planner = ActorPlanner(MergeByType().identity)
    older, newer = dispatch(1, started_ago=20), dispatch(2, started_ago=5)
    [start] = planner.reconcile([older, newer])
    assert isinstance(start, StartActor) and start.dispatch == newer
    changed = dispatch(1, started_ago=20, payload={"x": 1})
    assert planner.reconcile([changed, newer]) == [UpdateActor(start.key, changed)]


def test_merge_by_type_target_and_dry_run_split_groups() -> None:
    planner = ActorPlanner(MergeByTypeTarget().identity)
    actions = planner.reconcile(
        [
            dispatch(1, ids=(1,)),
            dispatch(2, ids=(1,)),
            dispatch(3, ids=(2,)),
            dispatch(4, dry_run=True),
        ]
    )
    assert [type(a) for a in actions] == [StartActor] * 3


def test_dry_run_flip_moves_a_dispatch_to_another_actor() -> None:
    planner = ActorPlanner(MergeByType().identity)
    [real] = planner.reconcile([dispatch(1)])
    actions = planner.reconcile([dispatch(1, dry_run=True)])
    assert [type(a) for a in actions] == [StopActor, StartActor]
    assert actions[0].key == real.key and actions[1].key != real.key


def test_a_failed_start_waits_for_retry_and_is_forgotten_when_the_run_ends() -> None:
    planner = ActorPlanner(lambda d: d.id)
    [start] = planner.reconcile([dispatch(1)])
    planner.start_failed(start.key)
    assert planner.waiting_keys == {start.key}
    assert planner.reconcile([dispatch(1)]) == []  # a republish does not retry
    assert planner.retry(start.key) == StartActor(start.key, dispatch(1))
    assert planner.retry(start.key) is None
    planner.start_failed(start.key)
    assert planner.reconcile([]) == []  # no actor to stop
    assert planner.retry(start.key) is None


def test_a_failed_start_is_tried_again_at_once_when_its_dispatch_changes() -> None:
    planner = ActorPlanner(lambda d: d.id)
    [start] = planner.reconcile([dispatch(1)])
    planner.start_failed(start.key)
    changed = dispatch(1, payload={"fixed": True})
    assert planner.reconcile([changed]) == [StartActor(start.key, changed)]


def test_stop_all_stops_only_running_actors() -> None:
    planner = ActorPlanner(lambda d: d.id)
    planner.reconcile([dispatch(1), dispatch(2)])
    planner.start_failed(DispatchId(2))
    assert [a.key for a in planner.stop_all("bye")] == [DispatchId(1)]
    assert planner.running_keys == frozenset()


# --- running state messages ----------------------------------------------------------


def test_running_state_changes_report_starts_updates_then_stops() -> None:
    before = {DispatchId(1): dispatch(1), DispatchId(2): dispatch(2)}
    after = {DispatchId(2): dispatch(2, payload={"v": 2}), DispatchId(3): dispatch(3)}
    messages = running_state_changes(before, after, lambda d: d.with_state(running=False))
    assert [(int(m.id), m.started) for m in messages] == [(2, True), (3, True), (1, False)]
    assert running_state_changes(after, after, lambda d: d) == []


def test_dispatch_state_comes_from_the_bridge_not_the_clock() -> None:
    d = dispatch(1, started_ago=10_000, running=True)  # long past by the local clock
    assert d.started and d.until is not None
    stopped = d.with_state(running=False, deleted=True)
    assert not stopped.started and stopped.until is None and stopped.deleted


def test_merge_by_type_filter_holds_back_a_stop_while_another_runs() -> None:
    strategy = MergeByType()
    running, stopping = dispatch(1), dispatch(2).with_state(running=False)
    context = {DispatchId(1): running, DispatchId(2): stopping}
    assert strategy.filter(context, running)
    assert not strategy.filter(context, stopping)
    assert strategy.filter({DispatchId(2): stopping}, stopping)


def test_identities_are_stable_and_equal_for_equal_groups() -> None:
    assert MergeByType().identity(dispatch(1)) == MergeByType().identity(dispatch(2))
    assert MergeByType().identity(dispatch(1)) != MergeByType().identity(dispatch(2, dry_run=True))
    by_target = MergeByTypeTarget()
    assert by_target.identity(dispatch(1, ids=(1, 2))) == by_target.identity(
        dispatch(2, ids=(2, 1))
    )
    assert by_target.identity(dispatch(1, ids=(1,))) != by_target.identity(dispatch(2, ids=(2,)))


async def test_primed_receiver_hands_out_its_initial_messages_first() -> None:
    from frequenz.channels import BroadcastChannel  # noqa: PLC0415

    from actor_sdk._receivers import PrimedReceiver  # noqa: PLC0415

    sender, inner = BroadcastChannel[int](name="t")
    receiver = PrimedReceiver([1, 2], inner)
    await sender.send(3)
    await sender.aclose()
    assert [message async for message in receiver] == [1, 2, 3]


# --- own_clock_running ------------------------------------------------------------------

START = NOW + timedelta(seconds=5)
"""The `next_run` told in these tests."""


def told(
    dispatch_id: int,
    *,
    next_run: datetime | None = START,
    duration: int | None = 60,
    active: bool = True,
) -> Dispatch:
    """A held dispatch (its `dispatches/ID` message) that is told to start at `next_run`."""
    wired = wire_dispatch(
        dispatch_id, "T", start=START, duration=duration, running=False, active=active
    )
    return from_wire(msgspec.structs.replace(wired, next_run=next_run))


def own_clock(
    reported: list[Dispatch],
    held: list[Dispatch],
    now: datetime,
    *,
    as_of: datetime | None = NOW,
    next_change: datetime | None = START,
    agrees: bool = True,
    previous: tuple[int, ...] = (),
    live: bool = True,
    blind_too_long: bool = False,
) -> tuple[Dispatch, ...]:
    """What runs: `own_clock_running`, then `confirmed_running`, as the shell does."""
    return confirmed_running(
        own_clock_running(reported, held, SnapshotTerms(as_of, next_change, agrees), now=now),
        {DispatchId(i) for i in previous},
        now=now,
        live=live,
        blind_too_long=blind_too_long,
    )


def test_a_told_start_runs_at_its_next_run_on_the_own_clock_until_its_end() -> None:
    held = [told(1)]
    assert own_clock([], held, START - timedelta(milliseconds=1)) == ()
    [run] = own_clock([], held, START)  # nothing the bridge said about START yet
    assert run.started and run.until == START + timedelta(seconds=60)
    end = START + timedelta(seconds=60)
    assert ids(own_clock([], held, end + LIVE_GRACE / 2, previous=(1,))) == [1]
    assert own_clock([], held, end + LIVE_GRACE, previous=(1,)) == ()
    assert own_clock([], held, end, previous=(1,), live=False) == ()


def test_an_endless_told_start_runs_without_until_and_duration_zero_never() -> None:
    [run] = own_clock([], [told(1, duration=None)], START + timedelta(hours=5))
    assert run.started and run.until is None
    assert own_clock([], [told(2, duration=0)], START) == ()


def test_no_own_clock_start_without_a_live_view() -> None:
    # Stale, syncing, an older session's snapshot: the shell passes `live=False`.
    assert own_clock([], [told(1)], START, live=False) == ()


def test_a_started_own_clock_run_goes_on_to_its_end_when_the_view_is_lost() -> None:
    later = START + timedelta(seconds=30)
    assert ids(own_clock([], [told(1)], later, previous=(1,), live=False)) == [1]
    endless = [told(2, duration=None)]
    assert ids(own_clock([], endless, later, previous=(2,), live=False)) == [2]
    blind = own_clock([], endless, later, previous=(2,), live=False, blind_too_long=True)
    assert blind == ()


def test_the_snapshot_of_that_instant_decides_and_corrects_an_own_clock_start() -> None:
    held = [told(1)]
    after = START + timedelta(milliseconds=3)
    # The bridge's snapshot for the start arrived without the dispatch: it stops.
    assert own_clock([], held, after, as_of=START, previous=(1,)) == ()
    # With it: its run, as reported.
    reported = [from_wire(wire_dispatch(1, "T", start=START, duration=60), as_of=START)]
    assert own_clock(reported, held, after, as_of=START, previous=(1,)) == tuple(reported)


def test_no_own_clock_start_when_the_dispatch_changed_since() -> None:
    # The newer message: inactive, deleted, or told another start.
    assert own_clock([], [told(1, active=False)], START) == ()
    assert own_clock([], [told(1).with_state(running=False, deleted=True)], START) == ()
    assert own_clock([], [told(1, next_run=START + timedelta(hours=1))], START) == ()
    # The bridge's newer snapshot expects no change at that start (moved or cancelled).
    assert own_clock([], [told(1)], START, next_change=START + timedelta(seconds=1)) == ()
    assert own_clock([], [told(1)], START, next_change=None) == ()
    # A change the snapshot counts whose topic has not arrived (count or digest differ).
    assert own_clock([], [told(1)], START, agrees=False) == ()
    # No snapshot of the type: nothing confirms the bridge's view at all.
    assert own_clock([], [told(1)], START, as_of=None) == ()


def test_a_recurring_run_takes_its_following_start_only_from_a_newer_message() -> None:
    first_end = START + timedelta(seconds=60)
    held = [told(1)]
    # The first run is over; the message still says START: it does not start again.
    assert own_clock([], held, first_end + LIVE_GRACE, previous=(1,)) == ()
    assert own_clock([], held, first_end + timedelta(minutes=5)) == ()
    # A newer message (the bridge's, at the first run's end) tells the next start.
    following = START + timedelta(minutes=10)
    newer = [told(1, next_run=following)]
    before = following - timedelta(milliseconds=1)
    assert own_clock([], newer, before, as_of=first_end, next_change=following) == ()
    [run] = own_clock([], newer, following, as_of=first_end, next_change=following)
    assert run.until == following + timedelta(seconds=60)


def test_a_reported_run_that_ended_gives_way_to_the_told_next_start() -> None:
    ended = from_wire(
        wire_dispatch(1, "T", start=NOW - timedelta(seconds=55), duration=60), as_of=NOW
    )
    assert ended.until == START
    following = START + timedelta(seconds=10)
    held = [told(1, next_run=following)]
    [run] = own_clock([ended], held, following, next_change=START, previous=(1,))
    assert run.until == following + timedelta(seconds=60)
    # While the reported run goes on, it stays as reported.
    assert own_clock([ended], held, START - timedelta(seconds=1), previous=(1,)) == (ended,)
