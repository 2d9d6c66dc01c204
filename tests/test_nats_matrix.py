"""The SDK's broker scenarios and the bridge's end-to-end flow, again on NATS.

The tests of tests/test_sdk_broker.py and tests/test_bridge_e2e.py are collected here
a second time with the brokers they ask for (`mqtt_broker`, `mqtt_broker_session`)
replaced by NATS (MQTT over JetStream, 3.1.1 only): one server, and a node of the
3-node cluster; so are those of tests/test_sdk_subscribed.py. The bridge's flow runs
a third time on a cluster one of whose nodes is killed (SIGKILL) mid-flow and
restarted. They carry the `nats` marker: `pytest -m nats` runs them (minutes, like a
bench); the default run keeps tests/test_nats_smoke.py and tests/test_nats_resync.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator

import pytest

from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, MqttTap, Received, TapFactory, retained_snapshot
from testkit.broker import Broker
from testkit.nats import NatsCluster, NatsNode, start_nats_cluster, start_nats_server
from testkit.processes import wait_until
from tests.fixtures.bridge_flow import running_ids
from tests.test_bridge_e2e import *  # noqa: F403 (collected again, on NATS)
from tests.test_bridge_e2e import (
    MICROGRID,
    test_dispatches_flow_from_the_api_to_retained_topics_on_time,
)
from tests.test_sdk_broker import *  # noqa: F403 (collected again, on NATS)
from tests.test_sdk_subscribed import *  # noqa: F403 (collected again, on NATS)

pytestmark = pytest.mark.nats  # (replaces the star-imported modules' own marks)


@pytest.fixture(scope="module", params=["one server", "3-node cluster"])
def nats_matrix_broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    """The broker of this round of the matrix (a cluster's first node)."""
    workdir = tmp_path_factory.mktemp("nats-matrix")
    if request.param == "one server":
        node = start_nats_server(workdir)
        try:
            yield node
        finally:
            node.close()
        return
    cluster: NatsCluster = start_nats_cluster(workdir)
    try:
        yield cluster[0]
    finally:
        cluster.close()


@pytest.fixture
def mqtt_broker(nats_matrix_broker: Broker) -> Broker:
    """NATS instead of a fresh Mosquitto (tests here use unique microgrid ids)."""
    return nats_matrix_broker


@pytest.fixture
def mqtt_broker_session(nats_matrix_broker: Broker) -> Broker:
    """NATS instead of the session's Mosquitto."""
    return nats_matrix_broker


def flipped(topic: str, count: int) -> Callable[[list[Received]], bool | None]:
    """A tap predicate: whether anything runs on `topic` changed `count` times (from no)."""

    def probe(messages: list[Received]) -> bool | None:
        states = [bool(running_ids(m.payload)) for m in messages if m.topic == topic]
        changes = sum(before != now for before, now in itertools.pairwise([False, *states]))
        return changes >= count or None

    return probe


async def kill_and_restart_mid_flow(tap: MqttTap, victim: NatsNode) -> float:
    """Kill `victim` once the flow's one-off ran and stopped, restart it once the
    recurring dispatch runs the second time; return how long it was down (seconds).

    Not earlier: a QoS 1 subscriber whose JetStream consumer the dead node led gets
    nothing until a new leader is elected (6.5 s seen), and the flow's updates and
    one-off allow 3 s and 0.5 s. The dead node's cluster carries the second round.
    """
    root = f"microgrid/{MICROGRID}/dispatch"
    await asyncio.to_thread(tap.wait_for, flipped(f"{root}/ONE_OFF/running", 2), 60)
    victim.kill9()
    killed = time.monotonic()
    await asyncio.to_thread(tap.wait_for, flipped(f"{root}/REC/running", 3), 90)
    await asyncio.to_thread(victim.start)
    return time.monotonic() - killed


@pytest.mark.timeout(300)
async def test_the_bridge_flow_goes_on_while_a_cluster_node_is_killed_and_restarted(
    api_server: ApiServerHandle,
    nats_cluster: NatsCluster,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    # The bridge and the flow's subscriber on one node; another is killed and restarted.
    serving, victim, _ = nats_cluster.nodes
    tap = mqtt_tap_factory(serving, f"microgrid/{MICROGRID}/dispatch/#")
    # A failing chaos task ends the flow at once; a failing flow ends the group once the
    # chaos task's wait (a thread, not cancellable) returns: within its 90 s.
    async with asyncio.TaskGroup() as group:
        chaos = group.create_task(kill_and_restart_mid_flow(tap, victim))
        await test_dispatches_flow_from_the_api_to_retained_topics_on_time(
            api_server, serving, bridge_factory, mqtt_tap_factory
        )
    print(f"NATS cluster: {victim.name} SIGKILLed mid-flow, restarted after {chaos.result():.1f} s")

    # The restarted node serves the same retained tree as the serving one.
    everything = f"microgrid/{MICROGRID}/dispatch/#"
    expected = retained_snapshot(serving, everything)
    await asyncio.to_thread(
        wait_until,
        lambda: retained_snapshot(victim, everything) == expected or None,
        60,
        f"{victim.name} to serve the retained tree again",
    )
