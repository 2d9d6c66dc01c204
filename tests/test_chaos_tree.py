"""The chaos run's audit of the retained tree (`testkit.chaos_tree.check_retained`)."""

from __future__ import annotations

from datetime import timedelta

from frequenz.client.dispatch.types import Dispatch

from actor_sdk import wire
from testkit.chaos_tree import check_retained
from tests.fixtures.wire_examples import T0, contract_example

LAYOUT = wire.TopicLayout.for_microgrid(1)
TYPE = "CHAOS_A"
TOL = 0.5


def at(seconds: float) -> float:
    return (T0 + timedelta(seconds=seconds)).timestamp()


def defined(dispatch_id: int, start_s: int) -> wire.Dispatch:
    """A dispatch of TYPE that runs for 5 s from T0 + `start_s`, without computed state."""
    return contract_example(
        id=dispatch_id,
        type=TYPE,
        start_time=T0 + timedelta(seconds=start_s),
        duration=5,
        recurrence=None,
        running=False,
        until=None,
        next_run=None,
    )


FIRST, SECOND = defined(1, 10), defined(2, 20)
"""They run from +10 s to +15 s and from +20 s to +25 s."""
HELD: dict[int, Dispatch] = {d.id: wire.to_client(d) for d in (FIRST, SECOND)}


def tree(running: tuple[wire.Dispatch, ...], made_s: float) -> dict[str, bytes]:
    """What the bridge keeps retained: its status, both dispatches, one snapshot."""
    made = T0 + timedelta(seconds=made_s)
    status = wire.BridgeStatus(
        state="online",
        upstream="connected",
        synced_at=made,
        session=1,
        bridge="b",
        version="1",
        dispatches=2,
        as_of=made,
        status_interval=5,
        contract=2,
    )
    snapshot = wire.RunningSnapshot(
        microgrid_id=1,
        type=TYPE,
        running=running,
        next_change=None,
        as_of=made,
        session=1,
        seq=1,
        held=False,
    )
    return {
        LAYOUT.status: wire.encode(status),
        LAYOUT.dispatch(TYPE, 1): wire.encode(FIRST),
        LAYOUT.dispatch(TYPE, 2): wire.encode(SECOND),
        LAYOUT.running(TYPE): wire.encode(snapshot),
    }


def audit(
    running: tuple[wire.Dispatch, ...], made_s: float, read: tuple[float, float]
) -> list[str]:
    retained = tree(running, made_s)
    return check_retained(
        retained, HELD, (at(read[0]), at(read[1])), TOL, layout=LAYOUT, types=[TYPE]
    )


def test_a_tree_equal_to_the_truth_passes() -> None:
    assert audit((FIRST,), 10, (11, 13)) == []


def test_a_snapshot_made_during_the_read_passes_though_another_change_came_before_its_end() -> None:
    # Seen in a 60-minute run: the read began 10 ms before a start, the broker handed
    # over the snapshot of that start, and the next start came before the read ended.
    assert audit((FIRST,), 10, (9.99, 21)) == []


def test_a_snapshot_older_than_the_read_that_missed_a_change_fails() -> None:
    [problem] = audit((FIRST,), 10, (16, 18))
    assert "running lists [1], the oracle says [] at the read" in problem


def test_a_snapshot_wrong_when_made_fails_even_during_the_read() -> None:
    problems = audit((), 12, (11, 13))
    assert any("differs from the oracle at its as_of" in p for p in problems)
    assert any("the oracle says [1] at the read" in p for p in problems)


def test_a_stale_dispatch_topic_is_named() -> None:
    retained = tree((FIRST,), 10)
    retained[LAYOUT.dispatch(TYPE, 3)] = wire.encode(defined(3, 40))
    problems = check_retained(retained, HELD, (at(11), at(13)), TOL, layout=LAYOUT, types=[TYPE])
    assert "dispatch topics: stale [3], missing []" in problems
