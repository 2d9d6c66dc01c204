"""The SDK's fail-safe against a real Mosquitto, with a scripted bridge (issue #11).

What the fail-safe promises (docs/reliability.md): the view is live only after a
status with state `online` arrived live; no actor runs past the last `until` it was
told; endless runs stop after `max_blind_time` without a live view; one actor's hung
factory or stop holds up nobody else; a silent partition is noticed within 1.5
keepalives; deadlines follow the bridge's clock.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import pytest
from frequenz.channels import Receiver
from frequenz.client.dispatch.types import DispatchId

from actor_sdk import DispatchActorId, Dispatcher, DispatchInfo, MergeStrategy, wire
from actor_sdk._dispatch_model import Dispatch
from testkit.broker import Broker
from testkit.proxy import TcpProxy
from tests.fixtures.sdk import (
    SDK_TEST_TYPE,
    ActorLog,
    RecordingActor,
    ScriptedBridge,
    dispatcher_for,
    managing,
    poll,
    utcnow,
    wire_dispatch,
)

T = SDK_TEST_TYPE

LATENESS_TOLERANCE_S = 0.25
"""A stop's allowed lateness past `until` in these tests: the promise is 100 ms on an
idle machine (50 ms grace while live + timer); the tests run on a loaded one."""


def ending_in(dispatch_id: int, seconds: float, **fields: object) -> wire.Dispatch:
    """A running dispatch whose current run ends `seconds` from now."""
    now = utcnow()
    return wire_dispatch(
        dispatch_id,
        T,
        start=now - timedelta(seconds=10),
        duration=3600,
        until=now + timedelta(seconds=seconds),
        **fields,  # type: ignore[arg-type]
    )


def lateness(log: ActorLog, dispatch: wire.Dispatch) -> float:
    """How long after its `until` the (only) actor of `dispatch` stopped, in seconds."""
    [stop] = [r for r in log.of("stop") if r.dispatch_id == dispatch.id]
    assert dispatch.until is not None
    return (stop.wall - dispatch.until).total_seconds()


# --- 1. liveness ---------------------------------------------------------------------


async def test_a_retained_online_status_of_a_silent_bridge_starts_nothing(
    scripted_bridge: ScriptedBridge,
) -> None:
    # A broker restored from its autosave: `online` and a run retained, no bridge alive.
    log = ActorLog()
    await scripted_bridge.status("online", heartbeat=False)
    await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600)])
    async with managing(scripted_bridge, log) as dispatcher:
        await asyncio.sleep(1.5)  # nothing to await: nothing may start
        assert log.records == []
        assert not dispatcher.is_live
        await scripted_bridge.status("online")  # the bridge is back: live
        await log.wait_count("start", 1)
        assert dispatcher.is_live


async def test_syncing_or_an_unreadable_status_is_not_live_and_is_logged(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture
) -> None:
    log = ActorLog()
    await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600)])
    with caplog.at_level(logging.INFO, logger="actor_sdk"):
        async with managing(scripted_bridge, log) as dispatcher:
            await scripted_bridge.status("syncing", error="no cache and no API")
            await poll(lambda: "is syncing" in caplog.text)
            await scripted_bridge.status("vouching")  # a newer contract's state
            await poll(lambda: "cannot be read" in caplog.text)
            await asyncio.sleep(1.2)  # a heartbeat or more: still nothing
            assert log.records == []
            assert not dispatcher.is_live
            await scripted_bridge.status("online")
            await log.wait_count("start", 1)
    assert "no cache and no API" in caplog.text


async def test_a_snapshot_of_an_older_session_waits_until_the_bridge_republishes_it(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600)], session=1)
    scripted_bridge.session = 2
    await scripted_bridge.status("online")
    async with managing(scripted_bridge, log) as dispatcher:
        await poll(lambda: dispatcher.is_live)
        await asyncio.sleep(0.5)
        assert log.records == []  # session 1's snapshot: unconfirmed
        await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600)], seq=1)
        await log.wait_count("start", 1)


async def test_a_bridge_that_goes_silent_is_not_live_after_two_status_intervals(
    scripted_bridge: ScriptedBridge,
) -> None:
    await scripted_bridge.status("online")
    async with dispatcher_for(scripted_bridge) as dispatcher:
        await poll(lambda: dispatcher.is_live)
        await scripted_bridge.stop_heartbeat()  # hung, or its host lost power: no will
        silent = time.monotonic()
        await poll(lambda: not dispatcher.is_live, within=5)
        waited = time.monotonic() - silent
        assert waited <= 2 * scripted_bridge.status_interval + 0.5, waited


# --- 2. no run past its until ----------------------------------------------------------


async def test_a_run_stops_at_its_until_while_the_view_stays_live(
    scripted_bridge: ScriptedBridge,
) -> None:
    # A blind bridge never publishes the stop: the SDK's own timer does it.
    log = ActorLog()
    await scripted_bridge.status("online")
    async with managing(scripted_bridge, log) as dispatcher:
        await poll(lambda: dispatcher.is_live)
        run = ending_in(1, 1.5)
        await scripted_bridge.running(T, [run])
        await log.wait_count("start", 1)
        await log.wait_count("stop", 1, within=5)
        assert dispatcher.is_live
        assert -0.01 <= lateness(log, run) <= LATENESS_TOLERANCE_S, log.describe()
        # Only a newer message extends a run.
        longer = ending_in(1, 600)
        await scripted_bridge.running(T, [longer])
        await log.wait_count("start", 2)


async def test_an_endless_run_stops_after_max_blind_time_without_a_live_view(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    blind_time = timedelta(seconds=1)
    async with managing(scripted_bridge, log, max_blind_time=blind_time) as dispatcher:
        await scripted_bridge.running(T, [wire_dispatch(1, T, duration=None)])
        await log.wait_count("start", 1)
        await scripted_bridge.stop_heartbeat()
        await poll(lambda: not dispatcher.is_live, within=5)
        blind = time.monotonic()
        stop = await log.wait_count("stop", 1, within=5)
        assert 0.8 <= stop.at - blind <= 1.0 + LATENESS_TOLERANCE_S + 0.1, stop.at - blind
        assert stop.msg is not None and "max_blind_time" in stop.msg


# --- 3. isolation -------------------------------------------------------------------


class _HangingFactory:
    """Creates recording actors, but hangs for the dispatches named in `hang`."""

    def __init__(self, log: ActorLog, hang: set[int], hang_stop: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.log = log
        self.hang = hang
        self.hang_stop = hang_stop
        self.cancelled = 0

    async def __call__(self, info: DispatchInfo, updates: Receiver[DispatchInfo]) -> RecordingActor:
        if int(info._src.id) in self.hang:
            self.log.note_factory_call()
            try:
                await asyncio.Event().wait()  # a Modbus connect that never returns
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        actor = await self.log.factory(info, updates)
        if int(info._src.id) in self.hang_stop:
            actor.stop = self._never_stops  # type: ignore[method-assign]
        return actor

    async def _never_stops(self, msg: str | None = None) -> None:
        await asyncio.Event().wait()


async def test_a_hung_factory_delays_no_other_start_and_times_out_and_is_retried(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture
) -> None:
    log = ActorLog()
    factory = _HangingFactory(log, hang={1})
    await scripted_bridge.status("online")
    async with dispatcher_for(scripted_bridge) as dispatcher:
        await dispatcher.start_managing(
            T,
            actor_factory=factory,
            retry_interval=timedelta(seconds=0.5),
            factory_timeout=timedelta(seconds=0.5),
        )
        await poll(lambda: dispatcher.is_live)
        await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600)])
        await log.wait_for(lambda lg: len(lg.factory_calls) == 1, what="the hung call")
        await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600), ending_in(2, 600)])
        started = await log.wait_count("start", 1, within=0.4)  # not after the timeout
        assert started.dispatch_id == 2
        # Timed out (cancelled) and called again after the retry interval.
        await log.wait_for(lambda lg: len(lg.factory_calls) >= 3, what="a retry", within=5)
        assert factory.cancelled >= 1
        assert "did not return an actor within 0.5 s" in caplog.text


async def test_a_hung_stop_delays_no_other_stop(scripted_bridge: ScriptedBridge) -> None:
    log = ActorLog()
    factory = _HangingFactory(log, hang=set(), hang_stop={1})
    await scripted_bridge.status("online")
    async with dispatcher_for(scripted_bridge) as dispatcher:
        await dispatcher.start_managing(T, actor_factory=factory)
        await poll(lambda: dispatcher.is_live)
        runs = [ending_in(1, 1.0), ending_in(2, 1.0), ending_in(3, 600)]
        await scripted_bridge.running(T, runs)
        await log.wait_count("start", 3)
        stop = await log.wait_count("stop", 1, within=3)
        assert stop.dispatch_id == 2
        assert lateness(log, runs[1]) <= LATENESS_TOLERANCE_S
        # And a later start is not held up by the stop that still hangs.
        await scripted_bridge.running(T, [runs[2], ending_in(4, 600)])
        started = await log.wait_count("start", 4, within=2)
        assert started.dispatch_id == 4


async def test_a_blocked_event_loop_is_logged(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture
) -> None:
    def blocking_factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> RecordingActor:
        time.sleep(0.6)  # a synchronous Modbus read: nothing can interrupt it
        return RecordingActor(log, 0, info, updates)

    log = ActorLog()
    await scripted_bridge.status("online")
    with caplog.at_level(logging.WARNING, logger="actor_sdk"):
        async with dispatcher_for(scripted_bridge) as dispatcher:
            await dispatcher.start_managing(T, actor_factory=blocking_factory)
            await poll(lambda: dispatcher.is_live)
            await scripted_bridge.running(T, [wire_dispatch(1, T, duration=600)])
            await log.wait_count("start", 1)
            await poll(lambda: "event loop was blocked" in caplog.text, within=2)


class _ExplodingMerge(MergeStrategy):
    """A user's merge strategy with a bug: it raises for one payload."""

    def identity(self, dispatch: Dispatch) -> DispatchActorId:
        if dispatch.payload.get("explode"):
            raise KeyError("a bug in the user's merge strategy")
        return DispatchActorId(int(dispatch.id))

    def filter(self, dispatches: Mapping[DispatchId, Dispatch], dispatch: Dispatch) -> bool:
        return True


async def test_an_exception_in_user_code_is_logged_and_the_dispatcher_goes_on(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    async with managing(scripted_bridge, log, merge_strategy=_ExplodingMerge()) as dispatcher:
        await poll(lambda: dispatcher.is_live)
        await scripted_bridge.running(T, [wire_dispatch(1, T, payload={"explode": True})])
        await poll(lambda: "a bug in the user's merge strategy" in caplog.text)
        assert f"actors of type {T!r}" in caplog.text
        assert dispatcher.is_running
        await scripted_bridge.running(T, [wire_dispatch(2, T, duration=600)])
        started = await log.wait_count("start", 1)
        assert started.dispatch_id == 2


# --- 7. a silent partition -----------------------------------------------------------


async def test_a_silent_partition_stops_runs_at_their_until_is_noticed_and_heals(
    scripted_bridge: ScriptedBridge,
    mqtt_broker_session: Broker,
    broker_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = ActorLog()
    keepalive = 2
    await scripted_bridge.status("online")
    with caplog.at_level(logging.WARNING, logger="actor_sdk"):
        async with managing(
            scripted_bridge, log, broker_proxy.url(mqtt_broker_session), keepalive=keepalive
        ) as dispatcher:
            await poll(lambda: dispatcher.is_live)
            run = ending_in(1, 1.0)
            await scripted_bridge.running(T, [run, ending_in(2, 600)])
            await log.wait_count("start", 2)
            broker_proxy.partition()
            cut = time.monotonic()
            await log.wait_count("stop", 1, within=3)
            assert lateness(log, run) <= LATENESS_TOLERANCE_S
            await poll(lambda: "lost the broker connection" in caplog.text, within=2 * keepalive)
            noticed = time.monotonic() - cut
            assert noticed <= 1.5 * keepalive + 0.5, noticed
            # Healed: the SDK reconnects, and follows the bridge again.
            broker_proxy.heal()
            await poll(lambda: dispatcher.is_live, within=15)
            await scripted_bridge.running(T, [ending_in(2, 600), ending_in(3, 600)])
            await log.wait_for(lambda lg: lg.running_dispatch_ids() == [2, 3], what="2 and 3")


# --- 8. the bridge's clock ---------------------------------------------------------------


def skewed_clock(skew: timedelta) -> Callable[[], datetime]:
    return lambda: utcnow() + skew


@pytest.mark.parametrize("skew_s", [5, -5])
async def test_runs_start_and_stop_on_the_bridges_clock_with_a_skewed_sdk_host(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture, skew_s: int
) -> None:
    log = ActorLog()
    skew = timedelta(seconds=skew_s)
    await scripted_bridge.status("online")
    with caplog.at_level(logging.WARNING, logger="actor_sdk"):
        async with managing(scripted_bridge, log, clock=skewed_clock(skew)) as dispatcher:
            await poll(lambda: dispatcher._bridge_clock.converged, within=10)  # 4 statuses
            assert abs((dispatcher.clock_offset - skew).total_seconds()) < 0.1
            run = ending_in(1, 1.5)
            await scripted_bridge.running(T, [run])
            await log.wait_count("start", 1)  # 5 s ahead it would look ended already
            await log.wait_count("stop", 1, within=5)
            assert -0.01 <= lateness(log, run) <= LATENESS_TOLERANCE_S  # not 5 s late
    direction = "ahead of" if skew_s > 0 else "behind"
    lines = [r.getMessage() for r in caplog.records if "local clock is" in r.getMessage()]
    assert len(lines) == 1 and f"5.0 s {direction}" in lines[0], lines


async def test_the_clock_offset_does_not_jump_during_a_burst_of_retained_messages(
    scripted_bridge: ScriptedBridge, mqtt_broker_session: Broker, broker_proxy: TcpProxy
) -> None:
    count = 3000
    await scripted_bridge.many_dispatches(T, count, concurrency=50)
    await scripted_bridge.status("online")
    url = broker_proxy.url(mqtt_broker_session)
    async with dispatcher_for(scripted_bridge, url) as dispatcher:
        await poll(lambda: dispatcher._bridge_clock.converged, within=10)
        settled = dispatcher.clock_offset
        offsets = []
        # Reconnect: the whole retained tree comes again, while live snapshots flow.
        await broker_proxy.cut()
        await broker_proxy.resume()
        for seq in range(40):
            await scripted_bridge.running(T, [], seq=1000 + seq)
            offsets.append(dispatcher.clock_offset)
            await asyncio.sleep(0.05)
        await poll(lambda: dispatcher.is_live, within=15)
        offsets.append(dispatcher.clock_offset)
    drift = max(abs((offset - settled).total_seconds()) for offset in offsets)
    assert drift < 0.05, drift


# --- #18: what initialization waits for ------------------------------------------------


async def test_waiting_for_an_unreachable_broker_is_logged_and_times_out_clearly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = Dispatcher(
        microgrid_id=1,
        broker="mqtt://actor:pw@127.0.0.1:1",  # nothing listens on port 1
        reconnect_delay=timedelta(seconds=0.1),
        max_reconnect_delay=timedelta(seconds=0.2),
    )
    with caplog.at_level(logging.WARNING, logger="actor_sdk"):
        dispatcher.start()
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError) as raised:
                await dispatcher.wait_for_initialization(timeout=timedelta(seconds=1))
            assert 0.9 <= time.monotonic() - started < 3
        finally:
            await dispatcher.stop()
    assert "cannot reach the broker at mqtt://actor@127.0.0.1:1" in str(raised.value)
    # Each retry is logged with the broker it waits for: the user name shown, never
    # the password (the wording of the line is the link's own).
    waits = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(waits) >= 2, waits
    assert all("broker at mqtt://actor@127.0.0.1:1" in wait for wait in waits), waits
    assert "pw" not in caplog.text


# --- 9. a tree that never adds up, on a busy link ------------------------------------


async def test_live_messages_hold_the_wait_for_an_incomplete_tree_open_only_for_a_while(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A busy bridge never falls silent: its changes and status keep coming live.

    The retained tree here never adds up (its snapshot counts a topic the broker lost,
    as after a restore from an autosave taken between the two publishes). Each live
    message restarted the sync timeout, so the SDK never ended its sync and never
    counted its view live again (found by the chaos run). The wait now ends 4 sync
    timeouts after the last retained message, whatever comes live.
    """
    layout = scripted_bridge.layout
    kept, lost = (wire_dispatch(n, T, running=False) for n in (1, 2))
    tally = wire.TypeTally()
    for item in (kept, lost):
        tally.put(item.id, item.update_time)
    snapshot = wire.RunningSnapshot(
        microgrid_id=scripted_bridge.microgrid_id,
        type=T,
        running=(),
        next_change=None,
        as_of=utcnow(),
        session=1,
        seq=1,
        dispatches=2,
        digest=tally.digest,
    )
    await scripted_bridge.raw(layout.running(T), wire.encode(snapshot))
    await scripted_bridge.dispatch(kept)
    await scripted_bridge.status("online", dispatches=2, tree_counts=True, heartbeat=False)

    async def busy_bridge() -> None:  # live status 5 times a second, as changes bring
        while True:
            await scripted_bridge.status("online", dispatches=2, tree_counts=True, heartbeat=False)
            await asyncio.sleep(0.2)

    dispatcher = Dispatcher(
        microgrid_id=scripted_bridge.microgrid_id,
        broker=scripted_bridge.broker.url("actor"),
        sync_timeout=timedelta(seconds=0.5),
    )
    events = dispatcher.new_lifecycle_events_receiver(T)  # T's dispatch topics: counted
    chatter = asyncio.create_task(busy_bridge())
    with caplog.at_level(logging.WARNING, logger="actor_sdk"):
        dispatcher.start()
        try:
            started = time.monotonic()
            await dispatcher.wait_for_initialization(8)
            waited = time.monotonic() - started
            assert dispatcher.in_sync
            await poll(lambda: dispatcher.is_live)
            created = await asyncio.wait_for(events.receive(), 5)  # what arrived is used
            assert int(created.dispatch.id) == kept.id
        finally:
            chatter.cancel()
            await dispatcher.stop()
    assert 1.5 <= waited <= 6, waited  # 4 x 0.5 s after the retained catch-up
    assert "after the last retained message, while live messages kept coming" in caplog.text
    assert f"type {T!r}: 1 dispatch topics arrived, its running snapshot counts 2" in caplog.text


# --- 10. receivers dropped by their caller -------------------------------------------


async def test_dropped_receivers_of_a_managed_type_never_hold_up_its_actors(
    scripted_bridge: ScriptedBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver its caller dropped has a closed channel: sending to it raises.

    That raised inside the reconcile of the type, before its actors were brought up
    to date: a dropped running-state receiver kept a managed type's actors from
    starting and, worse, from stopping at their `until`.
    """
    log = ActorLog()
    await scripted_bridge.status("online")
    with caplog.at_level(logging.INFO, logger="actor_sdk"):
        async with managing(scripted_bridge, log) as dispatcher:
            await poll(lambda: dispatcher.is_live)
            dispatcher.new_lifecycle_events_receiver(T)  # dropped at once
            await dispatcher.new_running_state_event_receiver(T)  # dropped at once
            gc.collect()
            run = ending_in(1, 1.0)
            await scripted_bridge.dispatch(run)
            await scripted_bridge.running(T, [run])
            await log.wait_count("start", 1)
            await log.wait_count("stop", 1, within=3)
            assert lateness(log, run) <= LATENESS_TOLERANCE_S
    assert "bringing the actors of type" not in caplog.text
    assert f"a running state receiver of type {T!r} is gone" in caplog.text
    assert f"a lifecycle receiver of type {T!r} is gone" in caplog.text
