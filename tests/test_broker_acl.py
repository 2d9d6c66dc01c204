"""Access control of the shipped broker config, proven with real clients.

* An `actor` user cannot forge the schedule: a fake `running` snapshot it publishes is
  dropped by the broker, and neither a live subscriber nor an SDK-managed actor sees it.
* Per-microgrid users (the block the shipped ACL carries as a comment, uncommented
  here): `bridge-mg1` cannot write microgrid 2's tree, `actor-mg1` cannot read it.
* Anonymous clients are refused on the plain listener (on the TLS listener:
  `tests/test_broker_tls.py`).

The broker with these users comes from `tests/fixtures/custom_broker.py`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import Dispatcher, wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from testkit.processes import wait_until
from tests.fixtures.custom_broker import (
    NEEDS_MOSQUITTO,
    TYPE,
    CustomBroker,
    messages_of,
    publish,
    start_custom_broker,
)
from tests.fixtures.sdk import ActorLog, ScriptedBridge, wire_dispatch

pytestmark = NEEDS_MOSQUITTO


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[CustomBroker]:
    """A broker with per-microgrid users, plain listener only."""
    custom = start_custom_broker(tmp_path / "acl-broker", tls=False)
    try:
        yield custom
    finally:
        custom.broker.close()


# --- helpers ------------------------------------------------------------------------------


async def retained(broker: Broker, topic_filter: str, user: str = "admin") -> dict[str, bytes]:
    """Every retained message under a filter, as a fresh `user` subscriber sees it.

    The broker sends retained messages right after the SUBACK; a marker published
    by this client afterwards arrives behind them, so no waiting on a timer.
    """
    marker = f"acl-test/marker/{os.urandom(4).hex()}"
    found: dict[str, bytes] = {}
    async with (
        aiomqtt.Client(**broker.client_kwargs("admin")) as writer,
        aiomqtt.Client(**broker.client_kwargs(user)) as reader,
    ):
        await reader.subscribe(topic_filter, qos=1)
        if user != "admin":
            # A reader that may not read the marker topic: a barrier inside the tree.
            return await _retained_via_barrier(broker, reader)
        await reader.subscribe(marker, qos=1)
        await writer.publish(marker, b"x", qos=1)
        async with asyncio.timeout(10):
            async for message in reader.messages:
                if str(message.topic) == marker:
                    break
                if message.retain:
                    found[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    return found


async def _retained_via_barrier(broker: Broker, reader: aiomqtt.Client) -> dict[str, bytes]:
    # The reader may only read the dispatch tree: the barrier is a non-retained
    # message on a topic under the filter that the reader may read (microgrid 1).
    barrier = f"microgrid/1/dispatch/BARRIER_{os.urandom(4).hex()}/events"
    async with aiomqtt.Client(**broker.client_kwargs("admin")) as writer:
        await writer.publish(barrier, b"barrier", qos=1, retain=False)
    found: dict[str, bytes] = {}
    async with asyncio.timeout(10):
        async for message in reader.messages:
            if str(message.topic) == barrier:
                break
            if message.retain:
                found[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    return found


def snapshot(microgrid_id: int, dispatches: list[wire.Dispatch], seq: int, session: int) -> bytes:
    """A running snapshot payload of `TYPE`."""
    return wire.encode(
        wire.RunningSnapshot(
            microgrid_id=microgrid_id,
            type=TYPE,
            running=tuple(dispatches),
            next_change=None,
            as_of=datetime.now(UTC),
            session=session,
            seq=seq,
        )
    )


# --- actor users cannot forge the schedule ------------------------------------------------


async def test_actor_forging_a_running_snapshot_changes_nothing_for_subscribers_or_actors(
    mqtt_broker: Broker,
) -> None:
    mqtt_broker.require_acl()
    microgrid_id = 41
    layout = wire.TopicLayout.for_microgrid(microgrid_id)
    log = ActorLog()
    real = wire_dispatch(1, TYPE, duration=600, payload={"power_w": 1})
    async with ScriptedBridge(mqtt_broker, microgrid_id) as bridge:
        await bridge.status("online")
        await bridge.running(TYPE, [real])
        dispatcher = Dispatcher(microgrid_id=microgrid_id, broker=mqtt_broker.url("actor"))
        async with dispatcher, aiomqtt.Client(**mqtt_broker.client_kwargs("admin")) as watcher:
            await dispatcher.start_managing(TYPE, actor_factory=log.factory)
            await log.wait_count("start", 1)
            await watcher.subscribe(layout.everything, qos=1)
            watched = messages_of(watcher)
            # The retained state arrives first; this marker behind it.
            marker = layout.events("MARKER")
            await watcher.publish(marker, b"marker", qos=1)
            async with asyncio.timeout(10):
                while (await anext(watched)).topic.value != marker:
                    pass

            # The forgeries: a newer session running another dispatch, a clearing of
            # the running topic, an offline status, and a deletion of the dispatch.
            forged = wire_dispatch(666, TYPE, duration=600, payload={"power_w": 10**6})
            actor = mqtt_broker.client_kwargs("actor")
            await publish(actor, layout.running(TYPE), snapshot(microgrid_id, [forged], 1, 99))
            await publish(actor, layout.running(TYPE), b"")
            await publish(actor, layout.status, b'{"state":"offline"}')
            await publish(actor, layout.dispatch(TYPE, 1), b"")

            # The real bridge's next snapshot: if any forgery had got through, the
            # watcher would see it first, and the SDK would have rejected this one
            # (older session than 99) or stopped the actor.
            updated = wire_dispatch(1, TYPE, duration=600, payload={"power_w": 2})
            await bridge.running(TYPE, [updated])
            async with asyncio.timeout(10):
                arrived = await anext(watched)
            assert (arrived.topic.value, arrived.retain) == (layout.running(TYPE), False)
            assert wire.decode_running(arrived.payload).running == (updated,)  # type: ignore[arg-type]
            await log.wait_count("update", 1)

            assert [r.dispatch_id for r in log.of("start")] == [1]
            assert log.of("stop") == []
            assert log.running_dispatch_ids() == [1]
            assert log.records[-1].info is not None
            assert log.records[-1].info.options == {"power_w": 2}

    state = await retained(mqtt_broker, layout.everything)
    assert wire.decode_running(state[layout.running(TYPE)]).running == (updated,)
    assert wire.decode_status(state[layout.status]).state == "online"


# --- per-microgrid users ------------------------------------------------------------------


async def test_per_microgrid_bridge_user_cannot_write_another_microgrids_tree(
    acl_broker: CustomBroker,
) -> None:
    broker = acl_broker.broker
    mg1 = wire.TopicLayout.for_microgrid(1)
    mg2 = wire.TopicLayout.for_microgrid(2)
    admin = broker.client_kwargs("admin")
    for layout in (mg1, mg2):
        await publish(admin, layout.running(TYPE), snapshot(1, [], 1, 1))
        await publish(admin, layout.status, b"original")

    mg1_bridge = {**admin, "username": "bridge-mg1", "password": broker.passwords["bridge-mg1"]}
    async with aiomqtt.Client(**admin) as watcher:  # type: ignore[arg-type]
        await watcher.subscribe("microgrid/+/dispatch/+/running", qos=1)
        await watcher.subscribe("acl-test/marker", qos=1)
        watched = messages_of(watcher)
        for _ in range(2):  # the two retained snapshots
            async with asyncio.timeout(5):
                assert (await anext(watched)).retain

        # Its own tree: stored and delivered.
        await publish(mg1_bridge, mg1.running(TYPE), snapshot(1, [], 2, 1))
        async with asyncio.timeout(5):
            own = await anext(watched)
        assert own.topic.value == mg1.running(TYPE)
        # Another microgrid's tree: acknowledged by the broker (MQTT 3.1.1), then dropped.
        await publish(mg1_bridge, mg2.running(TYPE), snapshot(2, [], 666, 666))
        await publish(mg1_bridge, mg2.status, b"forged")
        await publish(mg1_bridge, "microgrid/2/dispatch/NEW%20TYPE/running", b"forged")
        await publish(admin, "acl-test/marker", b"marker")
        async with asyncio.timeout(5):
            after = await anext(watched)
        assert after.topic.value == "acl-test/marker", f"forged message delivered: {after.topic}"

    state = await retained(broker, "microgrid/#")
    assert wire.decode_running(state[mg1.running(TYPE)]).seq == 2
    assert wire.decode_running(state[mg2.running(TYPE)]).seq == 1
    assert state[mg2.status] == b"original"
    assert "microgrid/2/dispatch/NEW%20TYPE/running" not in state


async def test_per_microgrid_actor_user_reads_only_its_microgrid(
    acl_broker: CustomBroker,
) -> None:
    broker = acl_broker.broker
    admin = broker.client_kwargs("admin")
    for microgrid_id in (1, 2):
        layout = wire.TopicLayout.for_microgrid(microgrid_id)
        await publish(admin, layout.status, f"status of {microgrid_id}".encode())

    seen = await retained(broker, "microgrid/+/dispatch/#", user="actor-mg1")
    assert seen == {"microgrid/1/dispatch/status": b"status of 1"}
    # The shared `actor` user reads every microgrid.
    seen_all = await retained(broker, "microgrid/+/dispatch/#", user="actor")
    assert set(seen_all) >= {"microgrid/1/dispatch/status", "microgrid/2/dispatch/status"}


async def test_bridge_with_a_per_microgrid_user_publishes_its_microgrid_only(
    acl_broker: CustomBroker, api_server: ApiServerHandle, bridge_factory: BridgeFactory
) -> None:
    broker = acl_broker.broker
    bridge = bridge_factory(
        api_server,
        broker,
        (1, 2),
        extra_env={
            "MQTT_USERNAME": "bridge-mg1",
            "MQTT_PASSWORD": broker.passwords["bridge-mg1"] or "",
        },
    )
    bridge.wait_synced(2)

    def statuses() -> dict[str, bytes] | None:
        # The first status of a connection says `syncing`; `online` follows the sync.
        found = asyncio.run(retained(broker, "microgrid/+/dispatch/status"))
        mg1 = found.get("microgrid/1/dispatch/status")
        return found if mg1 and wire.decode_status(mg1).state == "online" else None

    found = await asyncio.to_thread(wait_until, statuses, 15, "mg 1's status online")
    assert "microgrid/2/dispatch/status" not in found


# --- anonymous clients --------------------------------------------------------------------


async def test_anonymous_client_is_refused_on_the_plain_listener(
    acl_broker: CustomBroker,
) -> None:
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with aiomqtt.Client("127.0.0.1", acl_broker.broker.port, timeout=5):
            pass
