"""Actor SDK over `mqtts://`: a Mosquitto TLS listener with a test CA made by openssl."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import subprocess
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import Dispatcher, wire
from testkit.broker import find_mosquitto
from testkit.processes import ProcessFactory, free_port, wait_for_port
from tests.fixtures.sdk import ActorLog, utcnow, wire_dispatch

OPENSSL = shutil.which("openssl")
T = "TLS_TYPE"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it."""

    def run(*args: str) -> None:
        assert OPENSSL is not None
        subprocess.run([OPENSSL, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=sdk-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


@pytest.fixture
def tls_broker(tmp_path: Path, process_factory: ProcessFactory) -> tuple[int, Path]:
    binary = find_mosquitto()
    if binary is None or OPENSSL is None:
        pytest.skip("needs the mosquitto binary and openssl")
    ca, cert, key = make_certificates(tmp_path)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        "allow_anonymous true",
        "persistence false",
        "set_tcp_nodelay true",
        "max_queued_messages 0",
        "log_dest stdout",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    process = process_factory([binary, "-c", str(conf)], name="mosquitto-tls")
    wait_for_port("127.0.0.1", port, 10, process)
    return port, ca


async def test_mqtts_with_a_ca_file_manages_actors(tls_broker: tuple[int, Path]) -> None:
    port, ca = tls_broker
    layout = wire.TopicLayout.for_microgrid(1)
    context = ssl.create_default_context(cafile=str(ca))
    log = ActorLog()
    async with aiomqtt.Client("127.0.0.1", port, tls_context=context) as publisher:
        status = wire.BridgeStatus(
            state="online",
            upstream="connected",
            synced_at=utcnow(),
            session=1,
            bridge="tls",
            version="0",
            dispatches=1,
        )
        await publisher.publish(layout.status, wire.encode(status), qos=1, retain=True)
        snapshot = wire.RunningSnapshot(
            microgrid_id=1,
            type=T,
            running=(wire_dispatch(1, T),),
            next_change=None,
            as_of=utcnow(),
            session=1,
            seq=1,
        )
        await publisher.publish(layout.running(T), wire.encode(snapshot), qos=1, retain=True)
        async with Dispatcher(
            microgrid_id=1, broker=f"mqtts://127.0.0.1:{port}", ca_file=str(ca)
        ) as dispatcher:
            await dispatcher.start_managing(T, actor_factory=log.factory)
            # Live: the bridge republishes its status while the SDK is subscribed.
            await publisher.publish(layout.status, wire.encode(status), qos=1, retain=True)
            await log.wait_count("start", 1)
            assert dispatcher.is_live


async def test_mqtts_refuses_a_broker_it_cannot_verify(
    tls_broker: tuple[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = tls_broker
    dispatcher = Dispatcher(
        microgrid_id=1,
        broker=f"mqtts://127.0.0.1:{port}",  # system CAs only: the test CA is unknown
        reconnect_delay=timedelta(seconds=0.1),
    )
    with caplog.at_level(logging.WARNING, logger="actor_sdk"):
        dispatcher.start()
        try:
            for _ in range(100):
                if any("cannot connect to the broker" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            assert not dispatcher.is_live
        finally:
            await dispatcher.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "cannot connect to the broker" in m and "certificate" in m.lower() for m in messages
    ), messages
