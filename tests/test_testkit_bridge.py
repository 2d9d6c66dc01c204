"""`BridgeHandle.wait_vouching` (testkit/bridge.py) waits for this run of the bridge.

A chaos run restarts the bridge and then waits for it to vouch for the tree again: a
retained `online` of the run before, still held by the broker while the new run cannot
reach it, must not end that wait.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from actor_sdk import wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from testkit.broker import Broker

MICROGRID = 41


def test_a_previous_runs_online_status_does_not_count(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    layout = wire.TopicLayout.for_microgrid(MICROGRID)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    previous = wire.BridgeStatus(
        state="online",
        upstream="connected",
        synced_at=an_hour_ago,
        session=1,
        bridge="previous",
        version="0",
        dispatches=0,
        as_of=an_hour_ago,
    )
    subprocess.run(
        [
            "mosquitto_pub",
            "-L",
            f"{mqtt_broker.url('admin')}/{layout.status}",
            "-r",
            "-q",
            "1",
            "-s",
        ],
        input=wire.encode(previous),
        check=True,
        timeout=10,
    )
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
        bridge.wait_vouching(timeout=2)
