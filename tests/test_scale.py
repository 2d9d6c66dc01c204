"""One bridge with 10,000 dispatches: every retained topic is published, and seen by a newcomer.

The dispatches are the realistic mix of `bench/scale.py` (one-offs ahead and long
ended, running now, recurrences of every frequency, 50 types), put into the API
server's SQLite file in bulk before it starts.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import wire
from bridge.service import MicrogridService, ScheduleCore, Synced
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from testkit.populate import mix, populate

pytestmark = [
    pytest.mark.slow,
    # frequenz-client-dispatch converting category targets (the fill) warns on every one.
    pytest.mark.filterwarnings("ignore:.*ElectricalComponentCategory.*:DeprecationWarning"),
]

MG = 1
COUNT = 10_000


def expected_topics(db_path: Path, layout: wire.TopicLayout) -> set[str]:
    """Every `dispatches/ID` topic and every `running` topic the bridge must publish."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT id, type FROM dispatches WHERE microgrid_id = ?", (MG,)
        ).fetchall()
    topics = {layout.dispatch(dispatch_type, dispatch_id) for dispatch_id, dispatch_type in rows}
    topics |= {layout.running(dispatch_type) for _, dispatch_type in rows}
    return topics


async def collect(
    broker: Broker,
    layout: wire.TopicLayout,
    expected: set[str],
    timeout: float,  # noqa: ASYNC109 - a deadline for the whole collection
    subscribed: asyncio.Event | None = None,
) -> dict[str, aiomqtt.Message]:
    """Subscribe to the microgrid's tree; collect messages until every expected topic came."""
    found: dict[str, aiomqtt.Message] = {}
    async with aiomqtt.Client(**broker.client_kwargs("actor")) as client:
        await client.subscribe(f"{layout.root}/#", qos=1)
        if subscribed is not None:
            subscribed.set()
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                topic = message.topic.value
                if topic in expected:
                    found[topic] = message
                    if len(found) == len(expected):
                        break
    return found


async def test_bridge_with_10k_dispatches_publishes_every_retained_topic_and_a_new_subscriber_sees_all(  # noqa: E501
    mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    api = ApiServerHandle(tmp_path / "api")
    api.directory.mkdir()
    assert populate(api.db_path, MG, mix(COUNT, now), now) == COUNT
    layout = wire.TopicLayout.for_microgrid(MG)
    expected = expected_topics(api.db_path, layout)
    assert len(expected) == COUNT + 50
    api.start()
    try:
        # A subscriber that is there before the bridge sees every topic published live.
        subscribed = asyncio.Event()
        live = asyncio.create_task(collect(mqtt_broker, layout, expected, 60, subscribed))
        await subscribed.wait()
        bridge = bridge_factory(api, mqtt_broker, (MG,))
        published = await live
        assert published.keys() == expected
        bridge.wait_synced()

        # A subscriber that connects afterwards gets all of them as retained messages.
        started = time.monotonic()
        retained = await collect(mqtt_broker, layout, expected, 30)
        elapsed = time.monotonic() - started
        assert retained.keys() == expected
        assert all(message.retain for message in retained.values())
        for topic, message in retained.items():
            assert isinstance(message.payload, bytes) and message.payload
            ref = layout.parse(topic)
            if ref.kind == wire.TopicKind.DISPATCH:
                dispatch = wire.decode_dispatch(message.payload)
                assert (dispatch.id, dispatch.type) == (ref.dispatch_id, ref.dispatch_type)
            else:
                snapshot = wire.decode_running(message.payload)
                assert snapshot.type == ref.dispatch_type
        print(f"a new subscriber received {len(retained)} retained topics in {elapsed:.2f} s")
    finally:
        api.stop()


class _OrderSink:
    """Records the order in which the service hands topics and events over."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def set(self, topic: str, payload: object) -> None:
        self.calls.append(topic)

    def clear(self, topic: str) -> None:
        self.calls.append(topic)

    def event(self, topic: str, payload: bytes) -> None:
        self.calls.append(topic)

    def mark_authoritative(self) -> None:
        pass

    def set_status(self, **_: object) -> None:
        pass


def _dispatch(dispatch_id: int, kind: str, start: datetime) -> wire.Dispatch:
    return wire.Dispatch(
        id=dispatch_id,
        type=kind,
        start_time=start,
        duration=60,
        target=wire.Target(ids=(1,)),
        active=True,
        dry_run=False,
        payload={},
        recurrence=None,
        create_time=start - timedelta(hours=1),
        update_time=start - timedelta(hours=1),
        end_time=None,
        running=False,
        until=None,
        next_run=None,
    )


def test_many_dispatches_starting_at_once_hand_over_the_running_snapshots_first() -> None:
    # The publisher sends in hand-over order: with 100 starts at one instant, the
    # snapshots that start the actors must not queue behind 100 dispatch topics.
    start = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    layout = wire.TopicLayout.for_microgrid(MG)
    sink = _OrderSink()
    service = MicrogridService(ScheduleCore(MG, layout), sink, clock=lambda: start)
    service.put(Synced([_dispatch(i, f"T{i % 10}", start) for i in range(1, 101)]))
    service.step(start - timedelta(seconds=1))
    sink.calls.clear()
    service.step(start)  # all 100 start now
    snapshots = [i for i, topic in enumerate(sink.calls) if topic.endswith("/running")]
    dispatch_topics = [i for i, topic in enumerate(sink.calls) if "/dispatches/" in topic]
    assert len(snapshots) == 10 and len(dispatch_topics) == 100
    assert max(snapshots) < min(dispatch_topics)


class _SlowSink(_OrderSink):
    """Takes `pause` seconds to accept the first snapshot that runs something (a long step)."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause
        self.snapshots: list[wire.RunningSnapshot] = []

    def set(self, topic: str, payload: object) -> None:
        if isinstance(payload, wire.RunningSnapshot):
            if payload.running and not any(s.running for s in self.snapshots):
                time.sleep(self.pause)
            self.snapshots.append(payload)


async def test_a_long_step_does_not_make_the_next_scheduled_change_late() -> None:
    # The sleep until the next change counts from after the step, not from its start.
    sink = _SlowSink(pause=0.15)
    layout = wire.TopicLayout.for_microgrid(MG)
    service = MicrogridService(ScheduleCore(MG, layout), sink)
    first = datetime.now(UTC) + timedelta(milliseconds=300)
    second = first + timedelta(milliseconds=400)
    service.put(Synced([_dispatch(1, "A", first), _dispatch(2, "B", second)]))
    task = asyncio.create_task(service.run())
    try:
        deadline = time.monotonic() + 5
        while not any(s.type == "B" and s.running for s in sink.snapshots):
            assert time.monotonic() < deadline, "dispatch 2 never started"
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
    started = next(s for s in sink.snapshots if s.type == "B" and s.running)
    late = (started.as_of - second).total_seconds()
    assert 0 <= late < 0.1, f"the second start was computed {late * 1000:.0f} ms late"


async def test_a_big_step_logs_its_transitions_after_the_publisher_had_its_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A hundred log lines written inside the step would hold the publisher back.
    start = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    sink = _OrderSink()
    service = MicrogridService(ScheduleCore(MG, wire.TopicLayout.for_microgrid(MG)), sink)
    service.put(Synced([_dispatch(i, f"T{i % 10}", start) for i in range(1, 101)]))
    service.step(start - timedelta(seconds=1))
    with caplog.at_level(logging.INFO, "bridge.service"):
        service.step(start)
        assert len(sink.calls) > 100 and " started, until " not in caplog.text
        await asyncio.sleep(0.1)
    assert caplog.text.count(" started, until ") == 100
