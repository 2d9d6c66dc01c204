"""One bridge with 10,000 dispatches: every retained topic is published, and seen by a newcomer.

The dispatches are the realistic mix of `bench/scale.py` (one-offs ahead and long
ended, running now, recurrences of every frequency, 50 types), put into the API
server's SQLite file in bulk before it starts.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import wire
from bench._harness import populate
from bench.scale import mix
from tests.fixtures.api_server import ApiServerHandle
from tests.fixtures.bridge import BridgeFactory
from tests.fixtures.broker import Broker

pytestmark = pytest.mark.slow

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
