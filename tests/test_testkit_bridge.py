"""`BridgeHandle.wait_vouching` (testkit/bridge.py) waits for this run of the bridge.

A chaos run restarts the bridge and then waits for it to vouch for the tree again: a
retained `online` of the run before, still held by the broker while the new run cannot
reach it, must not end that wait.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from tests.fixtures.sdk import ScriptedBridge

MICROGRID = 41


async def test_a_previous_runs_online_status_does_not_count(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    async with ScriptedBridge(mqtt_broker, MICROGRID) as previous_run:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        await previous_run.status("online", heartbeat=False, as_of=an_hour_ago)
    # This run cannot reach the broker: the previous run's status stays retained.
    bridge = bridge_factory(
        api_server,
        mqtt_broker,
        (MICROGRID,),
        extra_env={"MQTT_PASSWORD": "not-the-password"},
        start=False,
    )
    bridge.start(wait_online=False)
    with pytest.raises(TimeoutError, match="this run of the bridge to say online"):
        await asyncio.to_thread(bridge.wait_vouching, 2)
