"""TLS of the shipped broker config, proven with real clients.

The tests make a throwaway CA and server certificate with the `openssl` CLI, start
Mosquitto with the shipped config's TLS block uncommented (paths rewritten to the
temp dir; `tests/fixtures/custom_broker.py`), and connect with aiomqtt,
`mosquitto_sub`, the bridge and the SDK: with the CA it works, without it (or with
another CA) the handshake fails. Anonymous clients are refused on the TLS listener;
the access control is tested in `tests/test_broker_acl.py`.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import Dispatcher, wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from tests.fixtures.custom_broker import (
    MOSQUITTO_SUB,
    NEEDS_MOSQUITTO,
    OPENSSL,
    TYPE,
    CustomBroker,
    messages_of,
    publish,
    start_custom_broker,
)
from tests.fixtures.sdk import ActorLog, ScriptedBridge, wire_dispatch

pytestmark = NEEDS_MOSQUITTO


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[CustomBroker]:
    """A broker with the shipped TLS listener enabled, certificates from a test CA."""
    if OPENSSL is None:
        pytest.skip("needs the openssl command to make a throwaway CA")
    custom = start_custom_broker(tmp_path / "tls-broker", tls=True)
    try:
        yield custom
    finally:
        custom.broker.close()


# --- anonymous clients --------------------------------------------------------------------


async def test_anonymous_client_is_refused_on_the_tls_listener(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with aiomqtt.Client(**tls_broker.tls_kwargs(None, tls_broker.certs.ca)):  # type: ignore[arg-type]
            pass


# --- TLS --------------------------------------------------------------------------------


async def test_tls_connect_with_the_test_ca_reads_and_writes(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None
    ca = tls_broker.certs.ca
    topic = wire.TopicLayout.for_microgrid(1).status
    await publish(tls_broker.tls_kwargs("bridge", ca), topic, b"over tls")
    async with aiomqtt.Client(**tls_broker.tls_kwargs("actor", ca)) as client:  # type: ignore[arg-type]
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            message = await anext(messages_of(client))
    assert (message.payload, message.retain) == (b"over tls", True)


@pytest.mark.parametrize("ca", ["system", "other"], ids=["system-cas", "unrelated-ca"])
async def test_tls_connect_without_the_test_ca_fails(tls_broker: CustomBroker, ca: str) -> None:
    assert tls_broker.certs is not None
    trusted = None if ca == "system" else tls_broker.certs.other_ca
    with pytest.raises(aiomqtt.MqttError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        async with aiomqtt.Client(**tls_broker.tls_kwargs("actor", trusted)):  # type: ignore[arg-type]
            pass


def _mosquitto_sub(
    custom: CustomBroker, *tls_args: str, wait_s: int = 5
) -> subprocess.CompletedProcess[str]:
    assert MOSQUITTO_SUB is not None and custom.tls_port is not None
    return subprocess.run(
        [
            MOSQUITTO_SUB,
            "-h",
            "127.0.0.1",
            "-p",
            str(custom.tls_port),
            *tls_args,
            "-u",
            "actor",
            "-P",
            str(custom.broker.passwords["actor"]),
            "-t",
            "microgrid/1/dispatch/status",
            "-C",
            "1",
            "-W",
            str(wait_s),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


async def test_mosquitto_sub_over_tls_needs_the_ca_file(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None
    topic = wire.TopicLayout.for_microgrid(1).status
    await publish(tls_broker.broker.client_kwargs("bridge"), topic, b"retained")

    with_ca = await asyncio.to_thread(
        _mosquitto_sub, tls_broker, "--cafile", str(tls_broker.certs.ca)
    )
    assert (with_ca.returncode, with_ca.stdout) == (0, "retained\n"), with_ca.stderr

    system = await asyncio.to_thread(
        _mosquitto_sub, tls_broker, "--capath", "/etc/ssl/certs", wait_s=2
    )
    assert system.returncode != 0 and system.stdout == ""
    assert "TLS error" in system.stderr, system.stderr
    plain = await asyncio.to_thread(_mosquitto_sub, tls_broker, wait_s=2)  # no TLS at all
    assert plain.returncode != 0 and plain.stdout == ""


async def test_bridge_publishes_over_tls_with_its_ca_file(
    tls_broker: CustomBroker, api_server: ApiServerHandle, bridge_factory: BridgeFactory
) -> None:
    assert tls_broker.certs is not None and tls_broker.tls_port is not None
    bridge = bridge_factory(
        api_server,
        tls_broker.broker,
        (1,),
        extra_env={
            "MQTT_URL": f"mqtts://127.0.0.1:{tls_broker.tls_port}",
            "MQTT_CA_FILE": str(tls_broker.certs.ca),
        },
    )
    bridge.wait_synced(1)
    kwargs = tls_broker.tls_kwargs("actor", tls_broker.certs.ca)
    async with aiomqtt.Client(**kwargs) as client:  # type: ignore[arg-type]
        await client.subscribe("microgrid/1/dispatch/status", qos=1)
        async with asyncio.timeout(10):
            message = await anext(messages_of(client))
    assert wire.decode_status(message.payload).state == "online"  # type: ignore[arg-type]
    assert f":{tls_broker.tls_port}" in bridge.output()
    assert "mqtts://" in bridge.output()


async def test_sdk_follows_the_schedule_over_tls(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None and tls_broker.tls_port is not None
    broker = tls_broker.broker
    log = ActorLog()
    async with ScriptedBridge(broker, 5) as bridge:
        await bridge.status("online")
        await bridge.running(TYPE, [wire_dispatch(3, TYPE, duration=600)])
        dispatcher = Dispatcher(
            microgrid_id=5,
            broker=f"mqtts://127.0.0.1:{tls_broker.tls_port}",
            username="actor",
            password=broker.passwords["actor"],
            ca_file=str(tls_broker.certs.ca),
            sync_timeout=timedelta(seconds=5),
        )
        async with dispatcher:
            await dispatcher.start_managing(TYPE, actor_factory=log.factory)
            await log.wait_count("start", 1)
    assert log.running_dispatch_ids() == []  # stopped with the dispatcher
    assert [r.dispatch_id for r in log.of("start")] == [3]
