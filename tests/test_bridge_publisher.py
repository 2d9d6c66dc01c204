"""The MQTT publisher (`bridge.publisher`) in-process against a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from actor_sdk import wire
from actor_sdk.mqtt import Backoff, BrokerSettings, parse_broker_url
from bridge.publisher import Publisher
from bridge.store import SessionCounter
from testkit.bridge import TapFactory, retained_snapshot
from testkit.broker import Broker
from testkit.processes import async_wait_until, free_port
from testkit.proxy import TcpProxy
from tests.fixtures.wire_examples import contract_example
from tests.fixtures.wire_examples import nothing_running as nothing_running_in

MICROGRID = 6
LAYOUT = wire.TopicLayout.for_microgrid(MICROGRID)


def broker_settings(broker: Broker) -> BrokerSettings:
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        username=broker.username("bridge"),
        password=broker.bridge_password,
    )


@contextlib.asynccontextmanager
async def running(publisher: Publisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        publisher.stop(grace=1)
        try:
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()


def make(broker_or_settings: Broker | BrokerSettings, state: Path) -> Publisher:
    settings = (
        broker_settings(broker_or_settings)
        if isinstance(broker_or_settings, Broker)
        else broker_or_settings
    )
    return Publisher(
        settings,
        microgrid_id=MICROGRID,
        layout=LAYOUT,
        sessions=SessionCounter(state),
        bridge_name="pub-test",
        backoff=Backoff(initial=0.1, cap=0.5),
    )


def nothing_running(dispatch_type: str) -> wire.RunningSnapshot:
    """A running snapshot of a type with nothing running (the publisher stamps it)."""
    return nothing_running_in(MICROGRID, dispatch_type)


async def snapshot(broker: Broker) -> dict[str, bytes]:
    return await asyncio.to_thread(retained_snapshot, broker, LAYOUT.everything)


async def test_newest_state_wins_after_an_outage_and_nothing_blocks(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    publisher = make(mqtt_broker, tmp_path)
    a, b = LAYOUT.dispatch("T", 1), LAYOUT.dispatch("T", 2)
    now = datetime.now(UTC)
    # As the service does after a sync: the status vouches (online), not syncing.
    publisher.set_status(upstream="connected", synced_at=now, dispatches=2, knowledge_at=now)
    async with running(publisher):
        publisher.set(a, b"v0")
        publisher.set(b, b"keep")
        await asyncio.wait_for(publisher.connected.wait(), 10)
        await async_wait_until(lambda: publisher.pending == 0, 5, "the first publishes")
        await asyncio.to_thread(mqtt_broker.stop)
        for value in range(1, 101):
            publisher.set(a, f"v{value}".encode())  # never blocks while the broker is down
        publisher.clear(b)
        await asyncio.to_thread(mqtt_broker.start)
        await async_wait_until(lambda: publisher.session == 2, 15, "the reconnect")

        async def settled() -> dict[str, bytes] | None:
            tree = await snapshot(mqtt_broker)
            return tree if tree.get(a) == b"v100" and b not in tree else None

        tree: dict[str, bytes] = await async_wait_until(settled, 15, "the newest state")
    status = wire.decode_status(tree[LAYOUT.status])
    assert status.state == "online" and status.session == 2
    final = wire.decode_status((await snapshot(mqtt_broker))[LAYOUT.status])
    assert final.state == "offline" and final.session == 2


async def test_stale_topics_on_the_broker_are_cleared_or_emptied_once_authoritative(
    mqtt_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "bridge.publisher")
    stale_dispatch = LAYOUT.dispatch("GONE", 99)
    stale_running = LAYOUT.running("GONE")
    async with aiomqtt.Client(**mqtt_broker.client_kwargs("admin")) as admin:
        await admin.publish(stale_dispatch, b'{"old": true}', qos=1, retain=True)
        await admin.publish(stale_running, b'{"old": true}', qos=1, retain=True)
        await admin.publish("microgrid/7/dispatch/X/dispatches/1", b"other", qos=1, retain=True)
    publisher = make(mqtt_broker, tmp_path)
    kept = LAYOUT.dispatch("KEPT", 1)
    publisher.set(kept, b"kept")
    async with running(publisher):
        # Before the first sync (no cache), nothing is cleared: the tree may be right.
        await async_wait_until(
            lambda: "cleared after the first sync" in caplog.text, 10, "the deferred scan"
        )
        tree = await snapshot(mqtt_broker)
        assert stale_dispatch in tree and kept in tree
        publisher.mark_authoritative()

        async def cleaned() -> dict[str, bytes] | None:
            tree = await snapshot(mqtt_broker)
            if stale_dispatch in tree or tree.get(stale_running, b"").startswith(b'{"old'):
                return None
            return tree if kept in tree else None

        tree = await async_wait_until(cleaned, 10, "the stale topics dealt with")
    empty = wire.decode_running(tree[stale_running])
    assert empty.running == () and empty.type == "GONE" and empty.session == 1
    # Another microgrid's tree is not ours to touch.
    other = await asyncio.to_thread(retained_snapshot, mqtt_broker, "microgrid/7/dispatch/#")
    assert other == {"microgrid/7/dispatch/X/dispatches/1": b"other"}


async def test_session_grows_across_publishers_and_seq_within_a_session(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    sessions = []
    for _ in range(2):
        publisher = make(mqtt_broker, tmp_path)
        snap = nothing_running("T")
        async with running(publisher):
            publisher.set(LAYOUT.running("T"), snap)
            publisher.set(LAYOUT.running("T"), snap)
            await asyncio.wait_for(publisher.connected.wait(), 10)
            # Acknowledged by the broker, not only taken from the queue.
            await asyncio.wait_for(publisher.flushed(), 5)
            publisher.set(LAYOUT.running("T"), snap)
            await asyncio.wait_for(publisher.flushed(), 5)
            tree = await snapshot(mqtt_broker)
        published = wire.decode_running(tree[LAYOUT.running("T")])
        sessions.append((published.session, published.seq))
    assert sessions[0][0] == 1 and sessions[1][0] == 2
    assert sessions[0][1] == 2 and sessions[1][1] == 2


async def test_falls_back_to_mqtt_3_1_1_when_the_broker_refuses_v5(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedded = pytest.importorskip("bridge.embedded_broker")
    port = free_port()
    users = {"bridge": "bridge-pw", "admin": "admin-pw"}
    topic = LAYOUT.dispatch("T", 1)
    async with (
        embedded.embedded_broker("127.0.0.1", port, users, writers={"bridge", "admin"}),
        # Subscribed first: amqtt is not at ease with subscribes racing publishes.
        aiomqtt.Client("127.0.0.1", port, username="admin", password="admin-pw") as reader,
    ):
        await reader.subscribe(topic, qos=1)
        settings = BrokerSettings(
            host="127.0.0.1", port=port, username="bridge", password="bridge-pw"
        )
        publisher = make(settings, tmp_path)
        publisher.set(topic, b"hello")
        async with running(publisher):
            message = await asyncio.wait_for(anext(aiter(reader.messages)), 15)
    assert message.payload == b"hello"
    assert "refused MQTT v5" in caplog.text and "using MQTT 3.1.1" in caplog.text


def test_broker_url_defaults() -> None:
    assert parse_broker_url("mqtts://h").port == 8883
    assert parse_broker_url("mqtt://h").port == 1883
    assert not parse_broker_url("mqtt://h").tls


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(initial=1, cap=8)
    delays = [backoff.next() for _ in range(10)]
    assert 0.5 <= delays[0] <= 1
    assert all(4 <= d <= 8 for d in delays[4:])
    backoff.reset()
    assert backoff.next() <= 1


async def test_a_change_goes_ahead_of_a_full_republish(mqtt_broker: Broker, tmp_path: Path) -> None:
    publisher = make(mqtt_broker, tmp_path)
    publisher.mark_authoritative()
    for index in range(3000):
        publisher.set(LAYOUT.dispatch("BULK", index), b"x" * 300)
    urgent = LAYOUT.running("URGENT")
    now = wire.RunningSnapshot(
        microgrid_id=MICROGRID,
        type="URGENT",
        running=(),
        next_change=None,
        as_of=datetime(2026, 1, 1, tzinfo=UTC),
        session=0,
        seq=0,
    )
    async with running(publisher):
        await async_wait_until(lambda: publisher.pending == 0, 60, "the first publish")
        await asyncio.to_thread(mqtt_broker.restart)
        await async_wait_until(publisher.connected.is_set, 15, "the reconnect")
        publisher.set(urgent, now)
        backlog = publisher.pending
        # Taken out of the queue (sent) while most of the republish still waits.
        await async_wait_until(
            lambda: not publisher.queue.is_waiting(urgent), 10, "the change sent", interval=0.001
        )
        left = publisher.pending
        await async_wait_until(lambda: publisher.pending == 0, 60, "the republish")
        tree = await snapshot(mqtt_broker)
    assert wire.decode_running(tree[urgent]).type == "URGENT"
    assert len([t for t in tree if "/BULK/" in t]) == 3000
    assert backlog > 2000 and left > 1000, (backlog, left)


@pytest.mark.parametrize("reader_refused", [False, True], ids=["own-connection", "refused"])
async def test_a_restart_onto_a_broker_that_kept_its_state_sends_only_the_differences(
    mqtt_broker: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    reader_refused: bool,
) -> None:
    # #13 item 5: every running snapshot and the status go out in each session; of the
    # dispatch topics only those the broker does not hold as held (changed, new). The
    # tree is read on a connection of its own (MQTT 3.1.1, QoS 0); a broker that
    # refuses it gets the tree read on the publishing connection, with the same result.
    caplog.set_level(logging.INFO, "bridge.publisher")

    def dispatch(number: int, **changes: Any) -> wire.Dispatch:
        return contract_example(id=number, type="T", **changes)

    running_topic = LAYOUT.running("T")
    snapshot_value = wire.RunningSnapshot(
        microgrid_id=MICROGRID,
        type="T",
        running=(),
        next_change=None,
        as_of=datetime(2026, 1, 1, tzinfo=UTC),
        session=0,
        seq=0,
    )
    first = make(mqtt_broker, tmp_path)
    first.mark_authoritative()
    for number in range(200):
        first.set(LAYOUT.dispatch("T", number), dispatch(number))
    first.set(running_topic, snapshot_value)
    async with running(first):
        await async_wait_until(lambda: first.pending == 0, 30, "the first bridge's tree")
        await first.flushed()

    # The second bridge reaches the broker through a proxy that, when the reader is to
    # be refused, passes on one connection only (the publishing one).
    proxy = TcpProxy(mqtt_broker.host, mqtt_broker.port)
    proxy.passes = 1 if reader_refused else None
    await proxy.start()
    second = make(replace(broker_settings(mqtt_broker), port=proxy.port), tmp_path)
    second.mark_authoritative()
    for number in range(200):
        second.set(LAYOUT.dispatch("T", number), dispatch(number))
    second.set(LAYOUT.dispatch("T", 5), dispatch(5, payload={"power_w": 1}))
    second.set(LAYOUT.dispatch("T", 500), dispatch(500))
    second.set(running_topic, snapshot_value)
    marker = f"{LAYOUT.root}/MARKER/dispatches/1"
    live: list[str] = []
    async with aiomqtt.Client(**mqtt_broker.client_kwargs("admin")) as tap:
        await tap.subscribe(f"{LAYOUT.root}/#", qos=1)

        async def collect() -> None:
            async for message in tap.messages:
                if not message.retain:
                    live.append(message.topic.value)

        collector = asyncio.create_task(collect())
        try:
            async with running(second):
                await async_wait_until(lambda: second.pending == 0, 30, "the second bridge")
                await second.flushed()
                # Published after every acknowledged publish of the bridge: once the tap
                # has it, the tap has everything the bridge sent before.
                await tap.publish(marker, b"m", qos=1)
                await async_wait_until(lambda: marker in live, 10, "the marker")
        finally:
            collector.cancel()
            await proxy.close()
    sent_dispatches = {t for t in live if "/dispatches/" in t and t != marker}
    assert sent_dispatches == {LAYOUT.dispatch("T", 5), LAYOUT.dispatch("T", 500)}
    assert running_topic in live and LAYOUT.status in live
    fell_back = "could not read the retained tree on a connection of its own" in caplog.text
    assert fell_back == reader_refused
    # Mosquitto's log: p2 is MQTT 3.1.1.
    readers = mqtt_broker.log().count("as dispatch-bridge-pub-test-mg6-scan (p2,")
    assert readers == (1 if reader_refused else 2)


async def test_one_change_wakes_one_worker_not_the_whole_window(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    # Waking all 100 idle workers for one publish cost a task step each before the
    # first byte went out: about 0.6 ms of every change's latency (bench/latency.py).
    publisher = make(mqtt_broker, tmp_path)
    publisher.mark_authoritative()
    publisher.set(LAYOUT.dispatch("WAKE", 1), b"first")
    takes = 0
    take = publisher.queue.take

    def counting_take() -> Any:
        nonlocal takes
        takes += 1
        return take()

    async with running(publisher):
        await async_wait_until(lambda: publisher.pending == 0, 10, "the first publish")
        # Flushed as soon as the scan of the broker's tree found nothing stale (no worker
        # is woken for nothing to say so: that once waited for the 5 s heartbeat).
        await asyncio.wait_for(publisher.flushed(), 3)
        publisher.queue.take = counting_take  # type: ignore[method-assign]
        publisher.set(LAYOUT.dispatch("WAKE", 1), b"second")
        await publisher.flushed()
        tree = await snapshot(mqtt_broker)
    assert tree[LAYOUT.dispatch("WAKE", 1)] == b"second"
    # The woken worker takes the publish, and once it is acknowledged finds none left.
    assert takes == 2


async def test_a_running_snapshot_reaches_the_broker_before_the_event_loop_turns(
    mqtt_broker: Broker, mqtt_tap_factory: TapFactory, tmp_path: Path
) -> None:
    # A scheduled start or stop must not wait for a worker's turn: the schedule loop
    # goes on with its step after it (100 transitions at one instant: about 1 ms).
    publisher = make(mqtt_broker, tmp_path)
    topic = LAYOUT.running("AT_ONCE")
    tap = mqtt_tap_factory(mqtt_broker, topic)
    first = nothing_running("AT_ONCE")
    later = msgspec.structs.replace(first, next_change=datetime(2026, 1, 2, tzinfo=UTC))
    async with running(publisher):
        await publisher.connected.wait()
        publisher.set(topic, first)
        await async_wait_until(lambda: tap.on(topic), 10, "the first snapshot at the tap")
        publisher.set(topic, later)
        # No await from here on: the event loop does not turn while the tap waits.
        seen = tap.wait_for(lambda messages: tap.on(topic)[1:], 5, "the second snapshot")
    assert wire.decode_running(seen[0].payload).next_change == later.next_change


async def test_the_client_leaves_the_window_to_the_workers(tmp_path: Path) -> None:
    # Each worker awaits its acknowledgement, so the workers bound what is in flight;
    # a limit of paho's own only added a scan of every message in flight per PUBACK.
    publisher = make(BrokerSettings(host="127.0.0.1", port=free_port()), tmp_path)
    client = publisher._new_client(session=1)
    assert client._client._max_inflight_messages == 0
