"""`actor_sdk.mqtt.AckedPublishes` (the bridge's publish path) on a real Mosquitto.

A publish is done when the broker acknowledged it, never when it was written; a
refused publish resolves and is reported; a client without a connection refuses
the publish at once.
"""

from __future__ import annotations

import asyncio

import pytest

from actor_sdk.mqtt import (
    AckedPublishes,
    BrokerSettings,
    MqttError,
    new_client,
    on_refused_publish,
)
from testkit.broker import Broker
from testkit.proxy import TcpProxy


async def retained(broker: Broker, topic: str) -> bytes:
    async with new_client(BrokerSettings.from_url(broker.url("admin"))) as reader:
        await reader.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            async for message in reader.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("no message")


async def test_a_publish_is_done_when_the_broker_acknowledged_it(
    mqtt_broker_session: Broker,
) -> None:
    proxy = TcpProxy(mqtt_broker_session.host, mqtt_broker_session.port)
    await proxy.start()
    try:
        client = new_client(BrokerSettings.from_url(proxy.url(mqtt_broker_session, "admin")))
        async with client:
            acks = AckedPublishes(client)
            proxy.hold()
            held = [acks.publish(f"test/acked/{n}", b"x%d" % n, retain=True) for n in range(150)]
            await asyncio.wait_for(proxy.holding.wait(), 5)
            await asyncio.sleep(0.2)
            assert not any(future.done() for future in held)
            assert acks.waiting == 150
            proxy.release()
            await asyncio.wait_for(asyncio.gather(*held), 5)
            assert acks.waiting == 0
        assert await retained(mqtt_broker_session, "test/acked/149") == b"x149"
    finally:
        await proxy.close()


async def test_a_refused_publish_resolves_and_is_reported(mqtt_broker_session: Broker) -> None:
    refusals: list[tuple[str, str]] = []
    client = new_client(BrokerSettings.from_url(mqtt_broker_session.url("actor")), v5=True)
    on_refused_publish(client, lambda topic, why: refusals.append((topic, why)))
    async with client:
        acks = AckedPublishes(client)
        await asyncio.wait_for(acks.publish("not/for/actors", b"x", retain=True), 5)
    assert refusals and refusals[0][0] == "not/for/actors"
    assert "0x87" in refusals[0][1]


async def test_a_client_without_a_connection_refuses_the_publish() -> None:
    acks = AckedPublishes(new_client(BrokerSettings.from_url("mqtt://127.0.0.1:1")))
    with pytest.raises(MqttError):
        acks.publish("any", b"x", retain=False)
