"""`dispatch-bridge watch --once`: when the wait for the retained tree ends, and what it says.

A bridge's `online` status counts the dispatch topics it holds, and each running
snapshot those of its type with a digest (`tree_counts`, contract "Broker
independence"). `--once` stops as soon as what arrived adds up, says whether the
snapshot is complete, and exits 3 when its wait ended before (the snapshot is partial).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from actor_sdk import wire
from actor_sdk.mqtt import parse_broker_url
from bridge import watch
from bridge.watch import EXIT_INCOMPLETE, Snapshot, collect_snapshot
from bridge.watch_state import WatchState
from testkit.broker import Broker
from tests.test_watch import LAYOUT, make_dispatch, publish_retained, watch_once

NOW = datetime.now(UTC).replace(microsecond=0)


def bridge_tree(
    ids_of: dict[str, list[int]],
    *,
    held: dict[str, list[int]] | None = None,
    state: str = "online",
    counted: bool = True,
) -> dict[str, bytes]:
    """The retained tree of a bridge holding `held` (default `ids_of`), of which `ids_of` came.

    Each type's running snapshot counts the type's held topics; the status counts them all.
    """
    held = ids_of if held is None else held
    tree: dict[str, bytes] = {}
    for dispatch_type, ids in held.items():
        tally = wire.TypeTally()
        for dispatch_id in ids:
            dispatch = make_dispatch(
                dispatch_id, NOW + timedelta(hours=1), 60, dispatch_type=dispatch_type
            )
            tally.put(dispatch_id, dispatch.update_time)
            if dispatch_id in ids_of.get(dispatch_type, []):
                tree[LAYOUT.dispatch(dispatch_type, dispatch_id)] = wire.encode(dispatch)
        snapshot = wire.RunningSnapshot(
            microgrid_id=1,
            type=dispatch_type,
            running=(),
            next_change=None,
            as_of=NOW,
            session=3,
            seq=1,
            dispatches=len(tally) if counted else None,
            digest=tally.digest if counted else None,
        )
        tree[LAYOUT.running(dispatch_type)] = wire.encode(snapshot)
    status = wire.BridgeStatus(
        state=state,  # type: ignore[arg-type]
        upstream="connected",
        synced_at=NOW,
        session=3,
        bridge="edge-test",
        version="0.1.0",
        dispatches=sum(len(ids) for ids in held.values()),
        contract=2,
        tree_counts=counted,
    )
    tree[LAYOUT.status] = wire.encode(status)
    return tree


def folded(tree: dict[str, bytes]) -> WatchState:
    state = WatchState(LAYOUT)
    for topic, payload in tree.items():
        state.apply(topic, payload, NOW)
    return state


# --- What is known of the tree (pure) ----------------------------------------------


def test_the_counts_add_up_only_once_every_counted_topic_arrived() -> None:
    tree = bridge_tree({"A": [1, 2, 3], "B": [4]})

    for left_out in tree:
        state = folded({topic: p for topic, p in tree.items() if topic != left_out})
        assert state.tree_gaps() != [] or not state.counts_tree(), left_out
    state = folded(tree)
    assert state.counts_tree() and state.tree_gaps() == []
    assert state.dispatch_topics() == 4


@pytest.mark.parametrize(
    ("tree", "timed_out", "complete", "said"),
    [
        (
            bridge_tree({"A": [1, 2, 3], "B": [4]}),
            False,
            True,
            "retained tree: complete, the 4 dispatch topics the bridge counts",
        ),
        (
            bridge_tree({"A": [1], "B": [4]}, held={"A": [1, 2, 3], "B": [4]}),
            True,
            False,
            "! retained tree INCOMPLETE: received 2 of the 4 dispatch topics the bridge counts; "
            "--timeout ended the wait after 7 s; what follows is partial",
        ),
        (
            # As many topics as counted, but not the ones counted (an old version of #3).
            {
                **bridge_tree({"A": [1, 2, 3]}),
                LAYOUT.dispatch("A", 3): wire.encode(
                    make_dispatch(3, NOW - timedelta(days=1), 60, dispatch_type="A")
                ),
            },
            False,
            False,
            "! retained tree INCOMPLETE: missing type 'A': 3 dispatch topics arrived, its "
            "running snapshot counts 3 (same count, other versions); then nothing came for 3 s",
        ),
        (
            bridge_tree({"A": [1]}, counted=False),
            False,
            None,
            "retained tree: completeness unknown (the bridge's status does not count its tree: "
            "an older bridge); shown is what arrived until 0.5 s passed without a message",
        ),
        (
            bridge_tree({"A": [1]}, counted=False),
            True,
            False,
            "! retained tree INCOMPLETE: received 1 dispatch topics, still coming (the bridge's "
            "status does not count its tree: an older bridge); --timeout ended the wait after 7 s",
        ),
        (
            # A bridge that is not online does not vouch for its status's count, but its
            # snapshots still count their types.
            bridge_tree({"A": [1]}, held={"A": [1, 2]}, state="offline"),
            False,
            False,
            "! retained tree INCOMPLETE: missing type 'A': 1 dispatch topics arrived, its "
            "running snapshot counts 2; then nothing came for 0.5 s",
        ),
        (
            {LAYOUT.dispatch("A", 1): wire.encode(make_dispatch(1, NOW, 60, dispatch_type="A"))},
            False,
            None,
            "retained tree: completeness unknown (no readable bridge status)",
        ),
    ],
)
def test_the_snapshot_says_how_complete_it_is(
    tree: dict[str, bytes], timed_out: bool, complete: bool | None, said: str
) -> None:
    snapshot = Snapshot(folded(tree), timed_out)

    assert snapshot.complete() is complete
    assert snapshot.report(7).startswith(said)


def test_the_snapshot_of_a_large_tree_has_a_short_repr() -> None:
    """`asyncio.run` formats the repr of its result (Python 3.11: its SIGINT handler's
    repr names the task): spelled out, 100,000 dispatches took 3 s of `--once`."""
    snapshot = Snapshot(folded(bridge_tree({"A": list(range(1, 2001))})), False)

    assert len(repr(snapshot)) < 200
    assert "2000 dispatch topics" in repr(snapshot)


# --- Against a real broker ----------------------------------------------------------


async def test_the_wait_ends_once_the_counted_tree_is_complete(
    mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No quiet window could end this wait: only the counts adding up can, before max_wait.
    monkeypatch.setattr(watch, "QUIET_S", 3600.0)
    monkeypatch.setattr(watch, "SETTLE_S", 3600.0)
    await publish_retained(mqtt_broker, bridge_tree({"A": list(range(1, 301)), "B": [400]}))

    snapshot = await collect_snapshot(
        parse_broker_url(mqtt_broker.url("actor")), LAYOUT, max_wait=60
    )

    assert not snapshot.timed_out
    assert snapshot.complete() is True
    assert snapshot.state.dispatch_topics() == 301


async def test_a_counted_tree_short_of_its_counts_ends_the_wait_when_nothing_more_comes(
    mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "QUIET_S", 3600.0)
    monkeypatch.setattr(watch, "SETTLE_S", 0.3)
    await publish_retained(mqtt_broker, bridge_tree({"A": [1, 2]}, held={"A": [1, 2, 3]}))

    snapshot = await collect_snapshot(
        parse_broker_url(mqtt_broker.url("actor")), LAYOUT, max_wait=60
    )

    assert not snapshot.timed_out
    assert snapshot.complete() is False
    assert "received 2 of the 3 dispatch topics the bridge counts" in snapshot.report(60)


async def test_once_prints_a_complete_tree_and_exits_0(mqtt_broker: Broker) -> None:
    await publish_retained(mqtt_broker, bridge_tree({"A": [1, 2], "B": [3]}))

    result = await asyncio.to_thread(watch_once, mqtt_broker)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "retained tree: complete, the 3 dispatch topics the bridge counts" in lines[:5]


async def test_once_says_what_is_missing_and_exits_3_when_the_timeout_ends_the_wait(
    mqtt_broker: Broker,
) -> None:
    await publish_retained(mqtt_broker, bridge_tree({"A": [1]}, held={"A": [1, 2, 3], "B": [4]}))

    result = await asyncio.to_thread(watch_once, mqtt_broker, "--timeout", "1")

    assert result.returncode == EXIT_INCOMPLETE == 3
    top = " ".join(" ".join(result.stdout.splitlines()[:6]).split())  # wrapped at 80
    assert (
        "! retained tree INCOMPLETE: received 1 of the 4 dispatch topics the bridge counts; "
        "--timeout ended the wait after 1 s; what follows is partial"
    ) in top
    assert "retained tree INCOMPLETE: received 1 of the 4" in result.stderr


async def test_a_connection_lost_during_the_wait_is_an_error(
    mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    mqtt_broker.require_control()
    monkeypatch.setattr(watch, "QUIET_S", 3600.0)
    await publish_retained(mqtt_broker, bridge_tree({"A": [1]}, counted=False))
    arrived = asyncio.Event()

    def clock() -> datetime:
        arrived.set()
        return datetime.now(UTC)

    waiting = asyncio.create_task(
        collect_snapshot(
            parse_broker_url(mqtt_broker.url("actor")), LAYOUT, max_wait=60, clock=clock
        )
    )
    await arrived.wait()
    await asyncio.to_thread(mqtt_broker.kill9)

    # Said as a loss, not as "cannot connect" (the broker had accepted us).
    with pytest.raises(watch.ConnectionLostWhileReading, match="lost the connection"):
        await waiting
