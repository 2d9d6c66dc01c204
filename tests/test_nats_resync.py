"""On a real NATS server: the SDK's view is complete, and stale topics are cleared.

NATS sends a new subscriber's retained topics out of publish order. Here the status
even arrives before part of the tree (the rest is published after the SDK
subscribed, as a bridge still busy republishing would): the SDK must not count
itself in sync, nor live, before every dispatch topic the tree counts has come.
The bridge's stale-topic scan meets an earlier session's tree full of dispatches it
no longer holds, on NATS's MQTT 3.1.1, and must clear all of them.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiomqtt
import msgspec
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import Created, Dispatcher, wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, retained_snapshot
from testkit.nats import NatsNode
from testkit.processes import wait_until
from tests.fixtures.sdk import ScriptedBridge, new_microgrid_id, wire_dispatch

pytestmark = pytest.mark.slow

TYPES = ("NATS_A", "NATS.B")
PER_TYPE = 150


def consistent_tree(microgrid_id: int) -> tuple[dict[str, list[wire.Dispatch]], dict[str, bytes]]:
    """Dispatches per type, and each type's running snapshot counting them."""
    held: dict[str, list[wire.Dispatch]] = {}
    snapshots: dict[str, bytes] = {}
    for index, dispatch_type in enumerate(TYPES):
        items = [
            wire_dispatch(index * 1000 + n, dispatch_type, running=False) for n in range(PER_TYPE)
        ]
        tally = wire.TypeTally()
        for item in items:
            tally.put(item.id, item.update_time)
        held[dispatch_type] = items
        snapshots[dispatch_type] = wire.encode(
            wire.RunningSnapshot(
                microgrid_id=microgrid_id,
                type=dispatch_type,
                running=(),
                next_change=None,
                as_of=items[0].update_time,
                session=1,
                seq=index + 1,
                dispatches=len(tally),
                digest=tally.digest,
            )
        )
    return held, snapshots


async def test_the_sdk_is_in_sync_only_once_the_tree_it_counts_has_come(
    nats_server: NatsNode,
) -> None:
    async with ScriptedBridge(nats_server, new_microgrid_id()) as bridge:
        held, snapshots = consistent_tree(bridge.microgrid_id)
        everything = [d for items in held.values() for d in items]
        early, late = everything[::2], everything[1::2]
        for dispatch_type, payload in snapshots.items():
            await bridge.raw(bridge.layout.running(dispatch_type), payload)
        for item in early:
            await bridge.dispatch(item)
        await bridge.status(dispatches=len(everything), tree_counts=True)

        dispatcher = Dispatcher(
            microgrid_id=bridge.microgrid_id,
            broker=nats_server.url("actor"),
            sync_timeout=timedelta(seconds=30),
        )
        # Receivers before the start: the SDK follows (and counts) these types' topics.
        receivers = {t: dispatcher.new_lifecycle_events_receiver(t) for t in held}
        dispatcher.start()
        try:
            # Connected, the status and half the tree in: not in sync, not live.
            with pytest.raises(TimeoutError, match="not received yet"):
                await dispatcher.wait_for_initialization(1.5)
            assert not dispatcher.in_sync and not dispatcher.is_live
            for item in late:
                await bridge.dispatch(item)
            await dispatcher.wait_for_initialization(20)
            assert dispatcher.in_sync and dispatcher.is_live
            for dispatch_type, items in held.items():
                receiver = receivers[dispatch_type]
                created = [await receiver.receive() for _ in items]
                assert all(isinstance(event, Created) for event in created)
                assert sorted(int(e.dispatch.id) for e in created) == sorted(d.id for d in items)
        finally:
            await dispatcher.stop()


async def test_an_incomplete_tree_ends_the_sync_at_the_timeout_saying_what_is_missing(
    nats_server: NatsNode, caplog: pytest.LogCaptureFixture
) -> None:
    async with ScriptedBridge(nats_server, new_microgrid_id()) as bridge:
        held, snapshots = consistent_tree(bridge.microgrid_id)
        for dispatch_type, payload in snapshots.items():
            await bridge.raw(bridge.layout.running(dispatch_type), payload)
        for item in held[TYPES[0]]:
            await bridge.dispatch(item)
        await bridge.dispatch(held[TYPES[1]][0])
        await bridge.status(dispatches=2 * PER_TYPE, tree_counts=True)
        dispatcher = Dispatcher(
            microgrid_id=bridge.microgrid_id,
            broker=nats_server.url("actor"),
            sync_timeout=timedelta(seconds=1),
        )
        for dispatch_type in TYPES:  # followed from the start
            dispatcher.new_lifecycle_events_receiver(dispatch_type)
        async with dispatcher:
            assert dispatcher.in_sync
    missing = f"type {TYPES[1]!r}: 1 dispatch topics arrived, its running snapshot counts"
    assert f"{missing} {PER_TYPE}" in caplog.text


async def test_the_bridge_clears_an_earlier_sessions_stale_tree_on_nats(
    api_server: ApiServerHandle, nats_server: NatsNode, bridge_factory: BridgeFactory
) -> None:
    microgrid_id = new_microgrid_id()
    layout = wire.TopicLayout.for_microgrid(microgrid_id)
    held, snapshots = consistent_tree(microgrid_id)
    async with aiomqtt.Client(**nats_server.client_kwargs("admin")) as client:
        for dispatch_type, items in held.items():
            for item in items:
                payload = wire.encode(item)
                await client.publish(layout.dispatch(dispatch_type, item.id), payload, retain=True)
            # An earlier session's snapshot: session 0, before this bridge's first (1).
            old = wire.decode_running(snapshots[dispatch_type])
            await client.publish(
                layout.running(dispatch_type),
                wire.encode(msgspec.structs.replace(old, session=0)),
                retain=True,
            )
    # QoS 0 publishes: NATS stores them a moment after the client sent them (a read
    # right away once found 264 of 300): wait until they are all there.
    await asyncio.to_thread(
        wait_until,
        lambda: (
            len(retained_snapshot(nats_server, f"{layout.root}/+/dispatches/+")) == 2 * PER_TYPE
        ),
        10,
        "the earlier session's dispatch topics stored",
    )

    bridge = bridge_factory(api_server, nats_server, (microgrid_id,))
    bridge.wait_synced()

    def cleared() -> dict[str, bytes] | None:
        retained = retained_snapshot(nats_server, layout.everything)
        left = [topic for topic in retained if "/dispatches/" in topic]
        return retained if not left else None

    retained = await asyncio.to_thread(wait_until, cleared, 30, "the stale topics cleared")
    for dispatch_type in TYPES:
        emptied = wire.decode_running(retained[layout.running(dispatch_type)])
        assert emptied.running == ()
    assert "stale-topic scan got no retained message" not in bridge.output()


async def test_an_sdk_is_in_sync_with_a_real_bridge_by_its_counts_on_nats(
    api_server: ApiServerHandle, nats_server: NatsNode, bridge_factory: BridgeFactory
) -> None:
    microgrid_id = new_microgrid_id()
    bridge = bridge_factory(api_server, nats_server, (microgrid_id,))
    bridge.wait_synced()
    async with api_server.client() as client:
        for n in range(20):
            await client.create(
                microgrid_id=MicrogridId(microgrid_id),
                type=TYPES[n % 2],
                start_time=datetime.now(UTC) + timedelta(hours=1),
                duration=timedelta(minutes=5),
                target=TargetIds(1),
                payload={"n": n},
            )
    layout = bridge.layout(microgrid_id)

    def whole_tree() -> dict[str, bytes] | None:
        retained = retained_snapshot(nats_server, layout.everything)
        return retained if sum("/dispatches/" in t for t in retained) == 20 else None

    retained = await asyncio.to_thread(wait_until, whole_tree, 30, "20 dispatch topics")
    # The tree counts itself: the status, and each type's snapshot with its digest.
    assert wire.decode_status(retained[layout.status]).tree_counts
    for dispatch_type in TYPES:
        tally = wire.TypeTally()
        for topic, payload in retained.items():
            if topic.startswith(f"{layout.root}/{wire.encode_type(dispatch_type)}/dispatches/"):
                held = wire.decode_dispatch(payload)
                tally.put(held.id, held.update_time)
        snapshot = wire.decode_running(retained[layout.running(dispatch_type)])
        assert (snapshot.dispatches, snapshot.digest) == (10, tally.digest)
    dispatcher = Dispatcher(
        microgrid_id=microgrid_id,
        broker=nats_server.url("actor"),
        sync_timeout=timedelta(seconds=60),
    )
    receivers = {t: dispatcher.new_lifecycle_events_receiver(t) for t in TYPES}
    # Well before the 60 s sync timeout: the sync is ended by the tree's own counts.
    async with asyncio.timeout(20), dispatcher:
        assert dispatcher.in_sync
        for receiver in receivers.values():
            created = [await receiver.receive() for _ in range(10)]
            assert all(isinstance(event, Created) for event in created)
