"""Actor SDK against a real Mosquitto, with a scripted publisher in place of the bridge.

Each test publishes status, running snapshots and dispatch topics as the `bridge`
user (wire structs) and watches what the SDK's actors do. Windows are seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import msgspec
import pytest
from frequenz.client.common.microgrid import MicrogridId

from actor_sdk import (
    ActorDispatcher,
    Created,
    Deleted,
    Dispatcher,
    DispatchEvent,
    DispatchInfo,
    MergeByType,
    MergeByTypeTarget,
    Updated,
    manage,
    wire,
)
from testkit.broker import Broker
from testkit.proxy import TcpProxy
from tests.fixtures.sdk import (
    ActorLog,
    Record,
    ScriptedBridge,
    dispatcher_for,
    managing,
    new_microgrid_id,
    poll,
    utcnow,
    wire_dispatch,
)

T = "SDK_TEST"


async def test_starts_an_actor_with_the_payload_target_and_dry_run_then_stops_it(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    d1 = wire_dispatch(
        1, T, payload={"power_w": 5000}, target=wire.Target(ids=(7, 8)), dry_run=True
    )
    async with managing(scripted_bridge, log):
        await scripted_bridge.running(T, [d1])
        start = await log.wait_count("start", 1)
        assert start.info is not None
        assert start.info.options == {"power_w": 5000}
        assert set(start.info.target) == {7, 8}
        assert start.info.dry_run is True
        assert start.info._src.started
        assert start.info._src.until == d1.until

        await scripted_bridge.running(T, [])
        stop = await log.wait_count("stop", 1)
        assert stop.msg == "Dispatch stopped"
    assert len(log.of("start")) == 1


async def test_a_running_dispatch_changed_is_an_update_not_a_restart(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T, payload={"v": 1})])
    async with managing(scripted_bridge, log):
        await log.wait_count("start", 1)
        changed = wire_dispatch(1, T, payload={"v": 2}, target=wire.Target(ids=(9,)))
        await scripted_bridge.running(T, [changed])
        update = await log.wait_count("update", 1)
        assert update.info is not None
        assert update.info.options == {"v": 2}
        assert set(update.info.target) == {9}
        # The same snapshot again (a republish) changes nothing.
        await scripted_bridge.running(T, [changed])
        await scripted_bridge.running(T, [])
        await log.wait_count("stop", 1)
    assert [r.kind for r in log.records] == ["start", "update", "stop"]


async def test_old_and_duplicate_snapshots_are_ignored_and_a_new_session_wins(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online", session=5)
    d1 = wire_dispatch(1, T)
    await scripted_bridge.running(T, [d1], session=5, seq=10)
    async with managing(scripted_bridge, log):
        await log.wait_count("start", 1)
        await scripted_bridge.running(T, [], session=5, seq=9)  # older
        await scripted_bridge.running(T, [], session=5, seq=10)  # duplicate
        await scripted_bridge.running(T, [], session=4, seq=99)  # older session
        d2 = wire_dispatch(2, T)
        await scripted_bridge.running(T, [d1, d2], session=5, seq=11)  # marker: newer
        # One connection delivers these in order and the SDK reconciles each before
        # the next: once the marker's d2 has started, every older snapshot has been
        # handled, and a stop of d1 by any of them (then a restart) would be in the log.
        await log.wait_for(lambda lg: 2 in lg.running_dispatch_ids(), what="d2 started")
        assert [(r.kind, r.dispatch_id) for r in log.records] == [("start", 1), ("start", 2)]
        await scripted_bridge.status("online", session=6)
        await scripted_bridge.running(T, [d2], session=6, seq=1)  # new session, low seq
        await log.wait_count("stop", 1)
        assert log.running_dispatch_ids() == [2]


async def test_garbage_is_logged_with_its_topic_and_ignored(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    layout = scripted_bridge.layout
    async with managing(scripted_bridge, log):
        with caplog.at_level(logging.WARNING, logger="actor_sdk"):
            await scripted_bridge.raw(layout.running(T), b"{not json", retain=False)
            await scripted_bridge.raw(layout.dispatch(T, 3), b"[1,2]", retain=False)
            await scripted_bridge.raw(f"{layout.root}/bad%2/running", b"{}", retain=False)
            await scripted_bridge.running(T, [wire_dispatch(1, T)])
            await log.wait_count("start", 1)
            # Not in publish order across topics on every broker (NATS): wait for all three.
            topics = [layout.running(T), layout.dispatch(T, 3), "bad%2"]
            await poll(
                lambda: all(any(t in r.getMessage() for r in caplog.records) for t in topics)
            )


async def test_nothing_starts_while_the_bridge_is_offline(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("offline")
    await scripted_bridge.running(T, [wire_dispatch(1, T)])
    async with managing(scripted_bridge, log):
        await scripted_bridge.running(T, [wire_dispatch(1, T), wire_dispatch(2, T)])
        # The status is the bridge's word: once online, the snapshot is confirmed.
        await asyncio.sleep(0.3)  # nothing to await: asserting that nothing happens
        assert log.records == []
        await scripted_bridge.status("online")
        await log.wait_count("start", 2)


async def test_a_snapshot_whose_run_already_ended_is_not_started(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    past = utcnow() - timedelta(seconds=30)
    ended = wire_dispatch(1, T, start=past, duration=10)
    await scripted_bridge.running(T, [ended])
    async with managing(scripted_bridge, log):
        await scripted_bridge.running(T, [ended, wire_dispatch(2, T)])
        await log.wait_count("start", 1)
        assert log.running_dispatch_ids() == [2]


async def test_bridge_offline_stops_the_actor_at_its_until(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    until = utcnow() + timedelta(seconds=1.5)
    d1 = wire_dispatch(1, T, start=until - timedelta(seconds=10), duration=10)
    async with managing(scripted_bridge, log):
        await scripted_bridge.running(T, [d1])
        await log.wait_count("start", 1)
        await scripted_bridge.status("offline")
        stop = await log.wait_count("stop", 1, within=5)
        stopped_at = utcnow()
        assert stop.msg is not None and "no live view" in stop.msg
        assert d1.until is not None
        assert abs((stopped_at - d1.until).total_seconds()) < 0.5


async def test_lost_broker_connection_stops_the_actor_at_its_until_and_reconnect_reconciles(
    scripted_bridge: ScriptedBridge, mqtt_broker_session: Broker, broker_proxy: TcpProxy
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    start = utcnow() - timedelta(seconds=8)
    d1 = wire_dispatch(1, T, start=start, duration=10)  # ends in about 2 s
    d2 = wire_dispatch(2, T, duration=60)
    async with managing(scripted_bridge, log, broker_proxy.url(mqtt_broker_session)):
        await scripted_bridge.running(T, [d1, d2])
        await log.wait_count("start", 2)
        await broker_proxy.cut()
        # Disconnected: d1 stops at its own until, d2 (60 s) keeps running.
        stop = await log.wait_count("stop", 1, within=5)
        assert stop.dispatch_id == 1
        assert d1.until is not None
        assert abs((utcnow() - d1.until).total_seconds()) < 0.5
        # Meanwhile the bridge stops d2 and starts d3.
        d3 = wire_dispatch(3, T, duration=60)
        await scripted_bridge.running(T, [d3])
        await broker_proxy.resume()
        await log.wait_for(lambda lg: lg.running_dispatch_ids() == [3], what="only d3")
        assert [r.dispatch_id for r in log.of("start")] == [1, 2, 3]
        assert sorted(r.dispatch_id for r in log.of("stop")) == [1, 2]


async def test_a_running_snapshot_lost_by_the_broker_keeps_the_last_one(
    scripted_bridge: ScriptedBridge, mqtt_broker_session: Broker, broker_proxy: TcpProxy
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T, duration=None)])
    async with managing(scripted_bridge, log, broker_proxy.url(mqtt_broker_session)) as dispatcher:
        await log.wait_count("start", 1)
        await broker_proxy.cut()
        await poll(lambda: not dispatcher.is_live)
        await scripted_bridge.raw(scripted_bridge.layout.running(T), b"")
        await broker_proxy.resume()
        await poll(lambda: dispatcher.is_live)
        assert log.of("stop") == []
        await scripted_bridge.running(T, [])  # the bridge's word
        await log.wait_count("stop", 1)


async def test_lifecycle_events_from_the_retained_dispatch_topics(
    scripted_bridge: ScriptedBridge, mqtt_broker_session: Broker, broker_proxy: TcpProxy
) -> None:
    await scripted_bridge.status("online")
    one = wire_dispatch(1, T, running=False)
    await scripted_bridge.dispatch(one)
    await scripted_bridge.dispatch(wire_dispatch(2, T, running=False))
    await scripted_bridge.dispatch(wire_dispatch(3, "OTHER", running=False))
    async with dispatcher_for(scripted_bridge, broker_proxy.url(mqtt_broker_session)) as dispatcher:
        events = dispatcher.new_lifecycle_events_receiver(T)

        async def next_event() -> DispatchEvent:
            return await asyncio.wait_for(events.receive(), 5)

        first = [await next_event(), await next_event()]
        # On a broker that does not keep the order across topics (NATS), a dispatch
        # topic may come after the status, and then live: any order.
        by_id = sorted(first, key=lambda e: int(e.dispatch.id))
        assert [(type(e), int(e.dispatch.id)) for e in by_id] == [(Created, 1), (Created, 2)]
        # Only the computed state changes: no event. The payload changes: Updated.
        # (The same definition: `wire_dispatch` would stamp the update time anew.)
        await scripted_bridge.dispatch(msgspec.structs.replace(one, running=True))
        await scripted_bridge.dispatch(msgspec.structs.replace(one, payload={"new": True}))
        updated = await next_event()
        assert isinstance(updated, Updated) and updated.dispatch.payload == {"new": True}
        await scripted_bridge.delete(T, 1)
        deleted = await next_event()
        assert isinstance(deleted, Deleted) and deleted.dispatch.deleted
        # Deleted while disconnected: learnt at the resync.
        await broker_proxy.cut()
        await scripted_bridge.delete(T, 2)
        await broker_proxy.resume()
        gone = await next_event()
        assert isinstance(gone, Deleted) and int(gone.dispatch.id) == 2


async def test_running_state_receiver_with_merge_holds_back_a_stop_while_another_runs(
    scripted_bridge: ScriptedBridge,
) -> None:
    await scripted_bridge.status("online")
    d1, d2 = wire_dispatch(1, T), wire_dispatch(2, T)
    await scripted_bridge.running(T, [d1])
    async with dispatcher_for(scripted_bridge) as dispatcher:
        merged = await dispatcher.new_running_state_event_receiver(T, merge_strategy=MergeByType())
        plain = await dispatcher.new_running_state_event_receiver(T)

        async def take(receiver: object, count: int) -> list[tuple[int, bool]]:
            got = []
            for _ in range(count):
                message = await asyncio.wait_for(receiver.receive(), 5)  # type: ignore[attr-defined]
                got.append((int(message.id), message.started))
            return got

        assert await take(merged, 1) == [(1, True)]
        await scripted_bridge.running(T, [d1, d2])
        await scripted_bridge.running(T, [d2])
        await scripted_bridge.running(T, [])
        assert await take(plain, 4) == [(1, True), (2, True), (1, False), (2, False)]
        assert await take(merged, 2) == [(2, True), (2, False)]


async def test_a_failing_factory_is_retried_every_retry_interval(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog(fail_next=2)
    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T)])
    async with managing(scripted_bridge, log, retry_interval=timedelta(seconds=0.5)):
        await log.wait_count("start", 1, within=5)
    calls = log.factory_calls
    assert len(calls) == 3
    assert 0.45 <= calls[1] - calls[0] <= 0.8
    assert 0.45 <= calls[2] - calls[1] <= 0.8


async def test_merge_by_type_keeps_one_actor_that_always_reflects_a_running_dispatch(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    d1 = wire_dispatch(1, T, payload={"p": 1})
    d2 = wire_dispatch(2, T, payload={"p": 2}, start=utcnow() + timedelta(seconds=1))
    async with managing(scripted_bridge, log, merge_strategy=MergeByType()):
        await scripted_bridge.running(T, [d1])
        await log.wait_count("start", 1)
        await scripted_bridge.running(T, [d1, d2])
        update = await log.wait_count("update", 1)
        assert update.info is not None and update.info.options == {"p": 2}
        await scripted_bridge.running(T, [d1])  # the newer one ends first
        back = await log.wait_count("update", 2)
        assert back.info is not None and back.info.options == {"p": 1}
        await scripted_bridge.running(T, [])
        await log.wait_count("stop", 1)
    assert [r.kind for r in log.records] == ["start", "update", "update", "stop"]


async def test_merge_by_type_target_and_dry_run_make_separate_actors(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    a1 = wire_dispatch(1, T, target=wire.Target(ids=(1,)))
    a2 = wire_dispatch(2, T, target=wire.Target(ids=(1,)))
    b3 = wire_dispatch(3, T, target=wire.Target(ids=(2,)))
    dry4 = wire_dispatch(4, T, target=wire.Target(ids=(1,)), dry_run=True)
    async with managing(scripted_bridge, log, merge_strategy=MergeByTypeTarget()):
        await scripted_bridge.running(T, [a1, a2, b3, dry4])
        await log.wait_count("start", 3)
        assert len(log.running) == 3
        await scripted_bridge.running(T, [a1, a2, dry4])
        await log.wait_count("stop", 1)
        assert log.of("stop")[0].dispatch_id == 3
        assert len(log.running) == 2


async def test_broker_restart_is_survived(mqtt_broker: Broker) -> None:
    log = ActorLog()
    async with (
        ScriptedBridge(mqtt_broker, new_microgrid_id()) as bridge,
        managing(bridge, log),
    ):
        await bridge.status("online")
        await bridge.running(T, [wire_dispatch(1, T, duration=60)])
        await log.wait_count("start", 1)
        mqtt_broker.restart()
        async with ScriptedBridge(mqtt_broker, bridge.microgrid_id) as again:
            again.session = 2
            await again.status("online")
            await again.running(T, [wire_dispatch(2, T, duration=60)])
            await log.wait_for(lambda lg: lg.running_dispatch_ids() == [2], what="d2 only")
    assert [r.dispatch_id for r in log.of("start")] == [1, 2]


async def test_retries_wait_for_a_live_view(scripted_bridge: ScriptedBridge) -> None:
    log = ActorLog(fail_next=1)
    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T)])
    async with managing(scripted_bridge, log, retry_interval=timedelta(seconds=0.3)):
        await log.wait_for(lambda lg: len(lg.factory_calls) == 1, what="the failed call")
        await scripted_bridge.status("offline")
        await asyncio.sleep(0.8)  # past the retry: nothing to await, nothing may happen
        assert len(log.factory_calls) == 1
        await scripted_bridge.status("online")
        await log.wait_count("start", 1)


async def test_actor_dispatcher_on_a_running_state_receiver(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog(fail_next=1)
    await scripted_bridge.status("online")
    d1, d2 = wire_dispatch(1, T, payload={"p": 1}), wire_dispatch(2, T, payload={"p": 2})
    async with dispatcher_for(scripted_bridge) as dispatcher:
        strategy = MergeByType()
        receiver = await dispatcher.new_running_state_event_receiver(T, merge_strategy=strategy)
        async with ActorDispatcher(
            log.factory, receiver, strategy.identity, timedelta(seconds=0.3)
        ):
            await scripted_bridge.running(T, [d1])
            await log.wait_count("start", 1)  # after one retry
            assert len(log.factory_calls) == 2
            await scripted_bridge.running(T, [d1, d2])
            update = await log.wait_count("update", 1)
            assert update.info is not None and update.info.options == {"p": 2}
            await scripted_bridge.running(T, [d2])
            await scripted_bridge.running(T, [])
            await log.wait_count("stop", 1)
        assert [r.kind for r in log.records] == ["start", "update", "stop"]


async def test_without_any_retained_status_initialization_ends_and_nothing_starts(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.running(T, [wire_dispatch(1, T)])  # no status was ever published
    started = time.monotonic()
    async with dispatcher_for(scripted_bridge, sync_timeout=timedelta(seconds=0.5)) as dispatcher:
        assert time.monotonic() - started >= 0.5
        await dispatcher.start_managing(T, actor_factory=log.factory)
        assert not dispatcher.is_live and log.records == []
        await scripted_bridge.status("online")
        await log.wait_count("start", 1)


async def test_stop_managing_stops_the_actors_of_that_type_only(
    scripted_bridge: ScriptedBridge,
) -> None:
    log_a, log_b = ActorLog(), ActorLog()
    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T)])
    await scripted_bridge.running("OTHER", [wire_dispatch(2, "OTHER")])
    async with dispatcher_for(scripted_bridge) as dispatcher:
        await dispatcher.start_managing(T, actor_factory=log_a.factory)
        await dispatcher.start_managing("OTHER", actor_factory=log_b.factory)
        await dispatcher.start_managing(T, actor_factory=log_b.factory)  # ignored: managed
        await log_a.wait_count("start", 1)
        await log_b.wait_count("start", 1)
        assert dispatcher.is_managed(T)
        await dispatcher.stop_managing(T)
        assert not dispatcher.is_managed(T)
        stop = await log_a.wait_count("stop", 1)
        assert stop.msg == "Stopped managing this dispatch type"
        assert log_b.of("stop") == []
    assert log_b.of("stop")[0].msg == "Dispatcher stopped"


async def test_a_microgrid_id_as_frequenz_dispatch_takes_it(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T)])
    dispatcher = Dispatcher(
        microgrid_id=MicrogridId(scripted_bridge.microgrid_id),
        broker=scripted_bridge.broker.url("actor"),
    )
    async with dispatcher:
        assert dispatcher.microgrid_id == scripted_bridge.microgrid_id
        await dispatcher.start_managing(T, actor_factory=log.factory)
        await log.wait_count("start", 1)


async def test_manage_runs_until_cancelled_and_then_stops_its_actors(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T, payload={"k": "v"})])
    task = asyncio.create_task(
        manage(
            broker=scripted_bridge.broker.url("actor"),
            microgrid_id=scripted_bridge.microgrid_id,
            dispatch_type=T,
            actor_factory=log.factory,
            merge_strategy=MergeByType(),
            retry_interval=timedelta(seconds=10),
        )
    )
    try:
        start = await log.wait_count("start", 1)
        assert start.info is not None and start.info.options == {"k": "v"}
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert log.of("stop")[0].msg == "Dispatcher stopped"


async def test_an_actor_that_never_stops_does_not_hold_up_the_others(
    scripted_bridge: ScriptedBridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("actor_sdk._actor_set.STOP_TIMEOUT_S", 0.3)
    stuck, healthy = ActorLog(), ActorLog()

    class Stuck:
        def start(self) -> None:
            stuck.add(Record("start", 0, time.monotonic()))

        async def stop(self, msg: str) -> None:
            await asyncio.Event().wait()

    async def stuck_factory(info: DispatchInfo, updates: object) -> Stuck:
        return Stuck()

    await scripted_bridge.status("online")
    async with dispatcher_for(scripted_bridge) as dispatcher:
        await dispatcher.start_managing("STUCK", actor_factory=stuck_factory)
        await dispatcher.start_managing(T, actor_factory=healthy.factory)
        await scripted_bridge.running("STUCK", [wire_dispatch(1, "STUCK")])
        await scripted_bridge.running(T, [wire_dispatch(2, T)])
        await stuck.wait_count("start", 1)
        await healthy.wait_count("start", 1)
        await scripted_bridge.running("STUCK", [])
        await scripted_bridge.running(T, [])
        await healthy.wait_count("stop", 1, within=3)


async def test_the_status_barrier_comes_after_thousands_of_retained_dispatches(
    scripted_bridge: ScriptedBridge,
) -> None:
    count = 2000
    await scripted_bridge.many_dispatches(T, count)
    await scripted_bridge.status("online")
    # A long sync timeout: initialization must end at the status, with all of them.
    async with dispatcher_for(scripted_bridge, sync_timeout=timedelta(seconds=60)) as dispatcher:
        assert dispatcher.in_sync
        events = dispatcher.new_lifecycle_events_receiver(T)
        created = [await asyncio.wait_for(events.receive(), 5) for _ in range(count)]
        assert {int(e.dispatch.id) for e in created} == set(range(1, count + 1))
        assert all(isinstance(e, Created) for e in created)


async def test_a_frequenz_sdk_actor_fits(scripted_bridge: ScriptedBridge) -> None:
    sdk_actor = pytest.importorskip("frequenz.sdk.actor")
    seen: list[dict[str, object]] = []

    class PowerActor(sdk_actor.Actor):  # type: ignore[misc, name-defined]
        def __init__(self, info: DispatchInfo, updates: object) -> None:
            super().__init__(name="power")
            self.updates = updates
            seen.append(info.options)

        async def _run(self) -> None:
            async for info in self.updates:  # type: ignore[attr-defined]
                seen.append(info.options)

    created: list[PowerActor] = []

    async def create(info: DispatchInfo, updates: object) -> PowerActor:
        created.append(PowerActor(info, updates))
        return created[-1]

    await scripted_bridge.status("online")
    await scripted_bridge.running(T, [wire_dispatch(1, T, payload={"v": 1})])
    async with dispatcher_for(scripted_bridge) as dispatcher:
        await dispatcher.start_managing(T, actor_factory=create)
        await poll(lambda: seen == [{"v": 1}])
        await scripted_bridge.running(T, [wire_dispatch(1, T, payload={"v": 2})])
        await poll(lambda: seen == [{"v": 1}, {"v": 2}])
        [running] = created  # one actor, sent the update rather than replaced
        assert running.is_running
        await scripted_bridge.running(T, [])
        await poll(lambda: not running.is_running)


async def test_a_garbage_retained_status_still_ends_the_sync(
    scripted_bridge: ScriptedBridge,
) -> None:
    await scripted_bridge.raw(scripted_bridge.layout.status, b"\x00 not a status")
    started = time.monotonic()
    async with dispatcher_for(scripted_bridge, sync_timeout=timedelta(seconds=30)) as dispatcher:
        assert time.monotonic() - started < 10
        assert not dispatcher.is_live  # no valid status: no live view


async def test_no_retained_dispatch_is_lost_when_a_short_sync_timeout_ends_the_resync(
    scripted_bridge: ScriptedBridge,
) -> None:
    count = 2000
    await scripted_bridge.many_dispatches(T, count)
    # No status: a sync timeout far shorter than the burst may end the resync in its
    # middle; whatever arrives as it fires, and after, must still reach the view.
    async with dispatcher_for(scripted_bridge, sync_timeout=timedelta(seconds=0.02)) as dispatcher:
        events = dispatcher.new_lifecycle_events_receiver(T)
        seen: set[int] = set()
        while len(seen) < count:
            event = await asyncio.wait_for(events.receive(), 10)
            assert isinstance(event, Created)
            seen.add(int(event.dispatch.id))
        assert seen == set(range(1, count + 1))
