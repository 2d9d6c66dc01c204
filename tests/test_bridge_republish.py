"""A bridge restarted onto a broker that kept its state sends (nearly) no dispatch topics.

#13 item 5: after each connect the bridge reads the broker's retained tree back
and republishes only the `dispatches/ID` topics the broker does not hold as it
does; every `running` snapshot and the status go out in each session. Real
Mosquitto, API server and `dispatch-bridge run` processes.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta

from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, TapFactory
from testkit.broker import Broker
from testkit.processes import wait_until
from tests.fixtures.bridge_flow import synced_bridge
from tests.fixtures.cache import cached_dispatches

MICROGRID = 4
COUNT = 30


async def test_a_restarted_bridge_sends_only_the_dispatch_topics_the_broker_lacks(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    tap, bridge, layout = synced_bridge(
        api_server, mqtt_broker, bridge_factory, mqtt_tap_factory, MICROGRID
    )
    async with api_server.client() as client:
        ids = [
            int(
                (
                    await client.create(
                        microgrid_id=MicrogridId(MICROGRID),
                        type="KEPT",
                        start_time=datetime.now(UTC) + timedelta(hours=2),
                        duration=timedelta(minutes=5),
                        target=TargetIds(1),
                    )
                ).id
            )
            for _ in range(COUNT)
        ]
    topics = {layout.dispatch("KEPT", number) for number in ids}
    await asyncio.to_thread(
        tap.wait_for,
        lambda messages: topics <= {m.topic for m in messages} or None,
        15,
        "every dispatch topic",
    )
    wait_until(
        lambda: set(ids) <= set(cached_dispatches(bridge.state_dir, MICROGRID)), 5, "the cache"
    )
    assert bridge.stop() == 0

    restarted_at = time.time()
    bridge.start()
    wait_until(lambda: bridge.output().count("retained tree read back") >= 2, 15, "the read-back")
    bridge.wait_synced(count=2)
    # The running snapshot of the new session came live: the session is confirmed.
    running_topic = layout.running("KEPT")

    def new_session_snapshot(_: object) -> bool | None:
        live = [m for m in tap.on(running_topic) if not m.retain and m.at >= restarted_at]
        return any(wire.decode_running(m.payload).session >= 2 for m in live) or None

    await asyncio.to_thread(tap.wait_for, new_session_snapshot, 15, "the new session's snapshot")
    read_back = re.findall(r"read back: (\d+) dispatch topics differ", bridge.output())
    assert read_back[-1] == "0", bridge.output()
    resent = [
        m.topic
        for m in tap.messages()
        if "/dispatches/" in m.topic and not m.retain and m.at >= restarted_at
    ]
    assert resent == []
