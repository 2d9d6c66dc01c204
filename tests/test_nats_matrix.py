"""The SDK's broker scenarios and the bridge's end-to-end flow, again on NATS.

The tests of tests/test_sdk_broker.py and tests/test_bridge_e2e.py are collected here
a second time with the brokers they ask for (`mqtt_broker`, `mqtt_broker_session`)
replaced by NATS (MQTT over JetStream, 3.1.1 only): one server, and a node of the
3-node cluster. They carry the `nats` marker: `pytest -m nats` runs them (minutes,
like a bench); the default run keeps tests/test_nats_smoke.py and
tests/test_nats_resync.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.broker import Broker
from testkit.nats import NatsCluster, start_nats_cluster, start_nats_server
from tests.test_bridge_e2e import *  # noqa: F403 (collected again, on NATS)
from tests.test_sdk_broker import *  # noqa: F403 (collected again, on NATS)

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
