"""Own-clock starts (#13 item 3): the SDK starts a run at the `next_run` it was told.

The broker hop leaves the critical path of a scheduled start: a live view that holds
the dispatch active and unchanged starts it on the SDK's clock (the bridge's, as
estimated); the bridge's snapshot of that instant confirms or corrects it. Three
levels: the reconciler with a fake clock (no broker), the SDK against a scripted
bridge on a real Mosquitto, and the real bridge whose path to the broker is cut
just before the start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import aiomqtt
import msgspec
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import Dispatcher, wire
from actor_sdk._bridge_clock import BridgeClock
from actor_sdk._view import BridgeView
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, TapFactory
from testkit.broker import Broker
from testkit.proxy import TcpProxy
from tests.fixtures.reconcile_shell import MG, NOW, START, Shell, T, told
from tests.fixtures.sdk import (
    ActorLog,
    ScriptedBridge,
    managing,
    poll,
    utcnow,
    wire_dispatch,
)

LATENESS_TOLERANCE_S = 0.25
"""How late an own-clock start may be in these tests (loaded machine; idle: ~1 ms)."""


# --- the reconciler, with a fake clock ---------------------------------------------------


@pytest.fixture
def shell() -> Shell:
    """A live view holding dispatch 1, told to start at START, and the snapshot before."""
    shell = Shell()
    shell.status()
    shell.snapshot()
    shell.dispatch(told(1, START))
    return shell


async def test_a_live_view_starts_at_next_run_and_the_timer_wakes_for_it(shell: Shell) -> None:
    assert await shell.at(NOW) == []
    assert shell.reconciler.deadline == START  # the timer wakes at the told start
    shell.status()
    assert await shell.at(START - timedelta(milliseconds=1)) == []
    assert await shell.at(START) == [1]
    [run] = shell.reconciler.effective[T].values()
    assert run.until == START + timedelta(seconds=60)


async def test_no_own_clock_start_before_the_bridges_clock_is_known() -> None:
    # The local clock would stand in for the bridge's: a skew moves the start (a chaos
    # run's host, 0.2 s ahead, began a run early for a dispatch deleted before its
    # instant). The bridge's snapshot of that instant still starts it.
    shell = Shell(BridgeClock())
    shell.status()
    shell.snapshot()
    shell.dispatch(told(1, START))
    assert await shell.at(NOW) == []
    assert shell.reconciler.deadline != START  # no wake-up for an own-clock start
    assert await shell.at(START) == []
    running = msgspec.structs.replace(
        told(1, START), running=True, until=START + timedelta(seconds=60)
    )
    shell.snapshot(running, next_change=running.until)
    assert await shell.at(START) == [1]


@pytest.mark.parametrize(
    "view", ["not live any more", "retained online only", "syncing", "offline", "older session"]
)
async def test_no_own_clock_start_without_a_live_confirmed_view(shell: Shell, view: str) -> None:
    match view:
        case "not live any more":  # the last live status is 2 intervals old at START
            shell.now = START - timedelta(seconds=10)
            shell.status()
        case "retained online only":
            shell.view.begin_sync()
            shell.status(retained=True)
        case "syncing" | "offline":
            shell.status(view)
        case _:  # the bridge restarted: its snapshot of session 1 is unconfirmed
            shell.status(session=2)
    assert await shell.at(START) == []
    assert await shell.at(START + timedelta(seconds=1)) == []


@pytest.mark.parametrize("change", ["deactivated", "moved", "deleted"])
async def test_no_own_clock_start_when_the_dispatch_changed_since(
    shell: Shell, change: str
) -> None:
    match change:
        case "deactivated":  # the newer message
            shell.dispatch(told(1, START, active=False))
        case "moved":  # the bridge's newer snapshot (one comes with each change) no
            # longer expects a change at START, even before the dispatch's own message
            shell.snapshot(next_change=START + timedelta(hours=1))
        case _:
            shell.view.apply_dispatch(T, 1, b"", events=False)
    assert await shell.at(START) == []


async def test_no_own_clock_start_while_a_change_the_snapshot_counts_is_on_its_way(
    shell: Shell,
) -> None:
    held = told(1, START)
    shell.snapshot(counts=(held,))
    assert shell.view.agrees(T)
    # Moved: the bridge's snapshot (first) counts the new version, whose topic is late.
    moved = msgspec.structs.replace(
        held, update_time=held.update_time + timedelta(seconds=1), next_run=None
    )
    shell.snapshot(counts=(moved,))  # its `next_change` still START (another dispatch)
    assert not shell.view.agrees(T)
    assert await shell.at(START) == []
    shell.dispatch(moved)
    assert shell.view.agrees(T)
    assert await shell.at(START + timedelta(seconds=1)) == []


async def test_no_own_clock_start_while_the_site_holds_the_type(shell: Shell) -> None:
    # A hold (`ROOT/request/hold`) publishes the type's snapshot: nothing runs, no change.
    shell.snapshot(next_change=None, held=True)
    assert await shell.at(START) == []
    # Released before the start, held again after it: that snapshot is newer, it decides.
    shell.now = START - timedelta(seconds=1)
    shell.snapshot()
    assert await shell.at(START, heartbeat=True) == [1]
    shell.now = START + timedelta(seconds=1)
    shell.snapshot(next_change=None, held=True)
    assert await shell.at(shell.now) == []


async def test_an_own_clock_run_stops_at_its_end_and_when_the_dispatch_changes(
    shell: Shell,
) -> None:
    assert await shell.at(START) == [1]
    end = START + timedelta(seconds=60)
    assert await shell.at(end + timedelta(milliseconds=49), heartbeat=True) == [1]  # grace
    assert await shell.at(end + timedelta(milliseconds=50), heartbeat=True) == []
    # Another one, changed while it runs: it stops at once.
    shell.dispatch(told(2, end + timedelta(seconds=1)))
    shell.snapshot(next_change=end + timedelta(seconds=1))
    assert await shell.at(end + timedelta(seconds=1), heartbeat=True) == [2]
    shell.dispatch(told(2, end + timedelta(seconds=1), active=False))
    assert shell.reconciler.needs_run(T, 2)
    assert await shell.at(end + timedelta(seconds=2)) == []


async def test_the_bridges_snapshot_of_that_instant_confirms_or_corrects(shell: Shell) -> None:
    assert await shell.at(START) == [1]
    # The bridge's snapshot for START says it runs: it goes on, as reported.
    shell.now = START + timedelta(milliseconds=5)
    running = msgspec.structs.replace(
        told(1, START), running=True, until=START + timedelta(seconds=60)
    )
    shell.snapshot(running, next_change=running.until)
    assert await shell.at(shell.now) == [1]
    # The next snapshot says it does not run (deactivated on the API): stopped.
    shell.now = START + timedelta(seconds=1)
    shell.snapshot(next_change=None)
    assert await shell.at(shell.now) == []


async def test_a_snapshot_of_that_instant_without_the_dispatch_stops_it(shell: Shell) -> None:
    assert await shell.at(START) == [1]
    shell.now = START + timedelta(milliseconds=5)
    shell.snapshot(next_change=None)
    assert await shell.at(shell.now) == []
    assert await shell.at(START + timedelta(seconds=1)) == []  # and it stays stopped


async def test_a_recurring_run_takes_the_following_start_only_from_a_newer_message(
    shell: Shell,
) -> None:
    assert await shell.at(START) == [1]
    end = START + timedelta(seconds=60, milliseconds=50)
    assert await shell.at(end, heartbeat=True) == []
    # START is not used again.
    assert await shell.at(end + timedelta(seconds=30), heartbeat=True) == []
    following = end + timedelta(seconds=35)
    shell.snapshot(next_change=following)
    shell.dispatch(told(1, following))
    assert not shell.reconciler.needs_run(T, 1)  # only the deadline moves
    assert shell.reconciler.deadline == following
    assert await shell.at(following, heartbeat=True) == [1]


def test_a_view_following_some_types_is_in_sync_once_every_types_snapshot_came() -> None:
    """Dispatch topics of the followed types only; the status counts them all."""
    view = BridgeView(MG)
    view.followed = {"A"}.__contains__
    view.begin_sync()
    one, two, three = (wire_dispatch(i, "A", running=False) for i in (1, 2, 3))
    other = wire_dispatch(4, "B", running=False)
    tally = wire.TypeTally()
    for dispatch in (one, two, three):
        tally.put(dispatch.id, dispatch.update_time)

    def snapshot(dispatch_type: str, count: int, digest: str) -> bytes:
        return wire.encode(
            wire.RunningSnapshot(
                microgrid_id=MG,
                type=dispatch_type,
                running=(),
                next_change=None,
                as_of=NOW,
                session=1,
                seq=1,
                dispatches=count,
                digest=digest,
            )
        )

    status = wire.BridgeStatus(
        state="online",
        upstream="connected",
        synced_at=NOW,
        session=1,
        bridge="b",
        version="1",
        dispatches=4,
        tree_counts=True,
    )
    view.apply_status(wire.encode(status), retained=True, arrived=NOW)  # NATS: it may come first
    for dispatch in (one, two, three):
        view.apply_dispatch("A", dispatch.id, wire.encode(dispatch), events=False)
    view.apply_running("A", snapshot("A", 3, tally.digest))
    assert view.missing() == [
        "3 of the 4 dispatch topics counted by the running snapshots the status counts"
    ]
    b_tally = wire.TypeTally()
    b_tally.put(other.id, other.update_time)
    view.apply_running("B", snapshot("B", 1, b_tally.digest))  # B's topic never comes
    assert view.missing() == []
    # A followed type's topics are still checked against its snapshot.
    view.apply_dispatch("A", 3, b"", events=False)
    assert view.missing() != []


# --- a scripted bridge on a real Mosquitto ------------------------------------------------


async def told_over_mqtt(
    bridge: ScriptedBridge, dispatch_id: int, start: datetime, **fields: Any
) -> wire.Dispatch:
    """Publish what the bridge does when a dispatch for later is created."""
    dispatch = told(dispatch_id, start, **fields)
    await snapshot_over_mqtt(bridge, next_change=start)
    await bridge.dispatch(dispatch)
    return dispatch


async def snapshot_over_mqtt(
    bridge: ScriptedBridge, *, next_change: datetime | None, as_of: datetime | None = None
) -> None:
    """Publish an empty running snapshot of type T with a `next_change`."""
    bridge.seq += 1
    snapshot = wire.RunningSnapshot(
        microgrid_id=bridge.microgrid_id,
        type=T,
        running=(),
        next_change=next_change,
        as_of=as_of or utcnow(),
        session=bridge.session,
        seq=bridge.seq,
    )
    await bridge.raw(bridge.layout.running(T), wire.encode(snapshot))


async def test_starts_at_next_run_before_the_bridges_snapshot_and_it_corrects(
    scripted_bridge: ScriptedBridge,
) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    async with managing(scripted_bridge, log) as dispatcher:
        await poll(lambda: dispatcher.is_live)
        await poll(lambda: dispatcher.knows_bridge_clock, within=10)  # statuses 1 s apart
        start = utcnow().replace(microsecond=0) + timedelta(seconds=2)
        await told_over_mqtt(scripted_bridge, 1, start)
        started = await log.wait_count("start", 1, within=5)
        lateness = (started.wall - start).total_seconds()
        assert 0 <= lateness <= LATENESS_TOLERANCE_S, lateness
        # The bridge's snapshot of that instant does not hold it: stopped at once.
        await snapshot_over_mqtt(scripted_bridge, as_of=start, next_change=None)
        stopped = await log.wait_count("stop", 1, within=5)
        assert stopped.msg == "Dispatch stopped"
        assert [r.kind for r in log.records] == ["start", "stop"]


async def test_no_own_clock_start_without_a_live_view(scripted_bridge: ScriptedBridge) -> None:
    log = ActorLog()
    await scripted_bridge.status("online")
    async with managing(scripted_bridge, log) as dispatcher:
        await poll(lambda: dispatcher.is_live)
        await poll(lambda: dispatcher.knows_bridge_clock, within=10)  # else none either way
        start = utcnow() + timedelta(seconds=1)
        await told_over_mqtt(scripted_bridge, 1, start)
        await scripted_bridge.status("syncing")
        await poll(lambda: not dispatcher.is_live)
        await asyncio.sleep(max(0.0, (start - utcnow()).total_seconds()) + 0.3)  # past it
        assert log.records == []
        # Live again: still told, still due, the snapshot of that instant not there.
        await scripted_bridge.status("online")
        await log.wait_count("start", 1, within=5)


# --- the real bridge, its path to the broker partitioned before the start ---------------------


@pytest.fixture
async def bridge_proxy(mqtt_broker: Broker) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(mqtt_broker.host, mqtt_broker.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.mark.slow
async def test_the_real_bridge_partitioned_before_a_start_the_sdk_starts_on_its_clock(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
    bridge_proxy: TcpProxy,
) -> None:
    microgrid = 1
    layout = wire.TopicLayout.for_microgrid(microgrid)
    tap = mqtt_tap_factory(mqtt_broker, layout.running("E2E_OWN_CLOCK"))
    bridge = bridge_factory(
        api_server,
        mqtt_broker,
        (microgrid,),
        extra_env={"MQTT_URL": f"mqtt://127.0.0.1:{bridge_proxy.port}"},
        # Statuses every 3 s: the SDK knows the bridge's clock after 4 of them, and its
        # view stays live 6 s after the last one (1 s: the view went stale before the
        # start, the partition being up to 2 s before it and the last status 1 s before).
        extra_args=["--status-interval", "3"],
        start=False,
    )
    # In threads: the proxy forwards on this event loop.
    await asyncio.to_thread(bridge.start)
    await asyncio.to_thread(bridge.wait_synced)
    log = ActorLog()
    async with (
        asyncio.timeout(60),
        api_server.client() as client,
        Dispatcher(microgrid_id=microgrid, broker=mqtt_broker.url("actor"), keepalive=5) as sdk,
    ):
        await sdk.start_managing("E2E_OWN_CLOCK", actor_factory=log.factory)
        await poll(lambda: sdk.is_live, within=15)
        await poll(lambda: sdk.knows_bridge_clock, within=30)
        created = await client.create(
            microgrid_id=MicrogridId(microgrid),
            type="E2E_OWN_CLOCK",
            start_time=utcnow() + timedelta(seconds=2),
            duration=timedelta(seconds=3),
            target=TargetIds(1),
            payload={},
        )
        start = created.start_time
        # The SDK holds the told start; then the bridge's path to the broker goes silent.
        await poll(lambda: sdk._view.told_start_of("E2E_OWN_CLOCK", int(created.id)) == start)
        assert (start - utcnow()).total_seconds() > 0.3, "created too late to test"
        bridge_proxy.partition()
        started = await log.wait_count("start", 1, within=5)
        lateness = (started.wall - start).total_seconds()
        assert 0 <= lateness <= LATENESS_TOLERANCE_S, lateness
        # No snapshot of that instant reached the broker before the actor started.
        made_after = [
            m.at
            for m in tap.messages()
            if m.payload and wire.decode_running(m.payload).as_of >= start
        ]
        assert all(at > started.wall.timestamp() for at in made_after), made_after
        # The run ends at its end, the bridge's path healed or not.
        stopped = await log.wait_count("stop", 1, within=8)
        assert created.duration is not None
        end_lateness = (stopped.wall - (start + created.duration)).total_seconds()
        assert 0 <= end_lateness <= LATENESS_TOLERANCE_S, end_lateness
        bridge_proxy.heal()
        assert [r.kind for r in log.records] == ["start", "stop"]


# --- fewer messages (#13 item 4) ----------------------------------------------------------


class CountingDispatcher(Dispatcher):
    """A dispatcher that records the topic of every message it receives."""

    topics: list[str]

    async def message(self, message: aiomqtt.Message, arrived: datetime) -> None:
        self.topics.append(message.topic.value)
        await super().message(message, arrived)


def per_kind(topics: list[str], root: str) -> dict[str, int]:
    """Count topics by `<type level>/<kind>` (a dispatch topic as `dispatches/+`)."""
    counts: dict[str, int] = {}
    for topic in topics:
        parts = topic.removeprefix(root + "/").split("/")
        key = "/".join(parts[:2]) + ("/+" if len(parts) == 3 else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.slow
async def test_a_managing_sdk_receives_only_its_types_dispatch_topics(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    microgrid = 1
    layout = wire.TopicLayout.for_microgrid(microgrid)
    bridge = bridge_factory(api_server, mqtt_broker, (microgrid,), start=False)
    await asyncio.to_thread(bridge.start)
    await asyncio.to_thread(bridge.wait_synced)
    log = ActorLog()
    before: list[str] = []  # what the SDK subscribed to before: every type's topics
    old_filters = [f"{layout.root}/+/running", f"{layout.root}/+/dispatches/+"]
    sdk = CountingDispatcher(microgrid_id=microgrid, broker=mqtt_broker.url("actor"))
    sdk.topics = []
    async with (
        asyncio.timeout(60),
        api_server.client() as client,
        aiomqtt.Client(**mqtt_broker.client_kwargs("actor")) as old,
        sdk,
    ):
        await old.subscribe([(f, 1) for f in old_filters])

        async def listen() -> None:
            async for message in old.messages:
                before.append(message.topic.value)

        listener = asyncio.create_task(listen())
        await sdk.start_managing("MANAGED", actor_factory=log.factory)
        start = utcnow().replace(microsecond=0) + timedelta(seconds=3)
        for dispatch_type in ("MANAGED", "OTHER"):
            await client.create(
                microgrid_id=MicrogridId(microgrid),
                type=dispatch_type,
                start_time=start,
                duration=timedelta(seconds=1),
                target=TargetIds(1),
                payload={},
            )
        # Count from just before the start to after the stop: two transitions each.
        await asyncio.sleep(max(0.0, (start - utcnow()).total_seconds()) - 0.3)
        sdk.topics.clear()
        before.clear()
        await log.wait_count("stop", 1, within=5)

        def counts() -> tuple[dict[str, int], dict[str, int]]:
            # Not counted: the bridge's status heartbeat, the SDK's own actor status.
            ours = [t for t in sdk.topics if t.startswith(f"{layout.root}/")]
            ours = [t for t in ours if t != layout.status]
            return per_kind(before, layout.root), per_kind(ours, layout.root)

        # Each type's stop is published at the same instant; wait for all of it.
        each = {"MANAGED/running": 2, "MANAGED/dispatches/+": 2, "OTHER/running": 2}
        expected = ({**each, "OTHER/dispatches/+": 2}, each)
        with contextlib.suppress(AssertionError):
            await poll(lambda: counts() == expected, within=3)
        listener.cancel()
    print(f"per 2 transitions of each type, before and after: {counts()}")
    assert counts() == expected
