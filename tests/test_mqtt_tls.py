"""Client certificates (mTLS) on both sides: the bridge's publisher and the SDK's client.

A Mosquitto TLS listener that requires a client certificate (`require_certificate
true`), with a throw-away CA made by the `openssl` CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from actor_sdk import mqtt, wire
from bridge.health import check
from bridge.publisher import Publisher
from bridge.run_command import add_arguments, load_settings
from bridge.store import SessionCounter
from bridge.watch import add_target_arguments, load_target
from testkit.broker import find_mosquitto
from testkit.processes import ProcessFactory, free_port, wait_for_port

OPENSSL = shutil.which("openssl")
LAYOUT = wire.TopicLayout.for_microgrid(4)


def _openssl(directory: Path, *args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=directory, check=True, capture_output=True)


def _signed(directory: Path, name: str, subject: str, extension: str | None) -> None:
    _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={subject}")  # fmt: skip
    extra = []
    if extension is not None:
        (directory / f"{name}.ext").write_text(extension + "\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey",
             "ca.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *extra)  # fmt: skip


@pytest.fixture
def mtls_broker(tmp_path: Path, process_factory: ProcessFactory) -> tuple[int, Path]:
    """A broker port that requires client certificates, and the certificates' directory."""
    binary = find_mosquitto()
    if binary is None or OPENSSL is None:
        pytest.skip("needs the mosquitto binary and openssl")
    _openssl(tmp_path, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "2", "-subj", "/CN=mtls-test-ca")  # fmt: skip
    _signed(tmp_path, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1")
    _signed(tmp_path, "client", "client", None)
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {tmp_path / 'ca.crt'}",
        f"certfile {tmp_path / 'server.crt'}",
        f"keyfile {tmp_path / 'server.key'}",
        "require_certificate true",
        "allow_anonymous true",
        "persistence false",
        "set_tcp_nodelay true",
        "log_dest stdout",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    process = process_factory([binary, "-c", str(conf)], name="mosquitto-mtls")
    wait_for_port("127.0.0.1", port, 10, process)
    return port, tmp_path


async def test_bridge_publishes_and_the_sdk_reads_with_client_certificates(
    mtls_broker: tuple[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, certs = mtls_broker
    files = {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "client.crt"),
        "key_file": str(certs / "client.key"),
    }
    # The bridge's way: flags through `dispatch-bridge run`'s settings.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--microgrid-id=4",
            "--dispatch-url=grpc://127.0.0.1:1?ssl=false",
            f"--broker=mqtts://127.0.0.1:{port}",
            f"--broker-ca-file={files['ca_file']}",
            f"--broker-cert-file={files['cert_file']}",
            f"--broker-key-file={files['key_file']}",
            f"--state-dir={tmp_path}",
        ]
    )
    monkeypatch.setenv("DISPATCH_API_AUTH_KEY", "k")
    bridge_settings = load_settings(args).broker
    assert bridge_settings.cert_file == files["cert_file"]
    publisher = Publisher(
        bridge_settings,
        microgrid_id=4,
        layout=LAYOUT,
        sessions=SessionCounter(tmp_path),
        bridge_name="mtls",
        backoff=mqtt.Backoff(initial=0.1, cap=0.5),
    )
    topic = LAYOUT.dispatch("T", 1)
    publisher.set(topic, b"over mTLS")
    task = asyncio.create_task(publisher.run())
    try:
        # The SDK's way: keyword arguments.
        sdk_settings = mqtt.BrokerSettings.from_url(
            f"mqtts://127.0.0.1:{port}",
            ca_file=files["ca_file"],
            cert_file=files["cert_file"],
            key_file=files["key_file"],
            environ={},
        )
        client, received = mqtt.receiving_client(sdk_settings)
        async with client:
            await client.subscribe(topic, qos=1)
            message = await asyncio.wait_for(received.get(), 15)
        assert message.payload == b"over mTLS"
        # The tools' way (`health`, `watch`): flags through `load_target`.
        tool_parser = argparse.ArgumentParser()
        add_target_arguments(tool_parser)
        tool_args = tool_parser.parse_args(
            [
                f"--broker=mqtts://127.0.0.1:{port}",
                f"--broker-ca-file={files['ca_file']}",
                f"--broker-cert-file={files['cert_file']}",
                f"--broker-key-file={files['key_file']}",
                "--microgrid-id=4",
            ]
        )
        target, layout = load_target(tool_args)
        verdict = await check(target, layout, max_wait=10)
        assert "unreachable" not in verdict.reason and "connection lost" not in verdict.reason
    finally:
        publisher.stop(grace=1)
        await asyncio.wait_for(task, 10)


async def test_without_a_client_certificate_the_broker_refuses(
    mtls_broker: tuple[int, Path],
) -> None:
    port, certs = mtls_broker
    settings = mqtt.BrokerSettings.from_url(
        f"mqtts://127.0.0.1:{port}", ca_file=str(certs / "ca.crt"), environ={}
    )
    with pytest.raises(mqtt.MqttError):
        async with mqtt.new_client(settings, timeout=5):
            pass
