"""`actor_sdk.mqtt.AckedPublishes` (the bridge's publish path) on a real Mosquitto.

A publish is done when the broker acknowledged it, never when it was written; a
refused publish resolves and is reported; a client without a connection refuses
the publish at once.
"""

from __future__ import annotations

import asyncio
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from actor_sdk._mqtt_send import _plain_successes_decoded_once
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


async def test_a_plain_acknowledgement_builds_no_paho_objects(
    mqtt_broker_session: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # paho built a ReasonCode and a Properties for every PUBACK: 11 us each, 1.1 s of
    # CPU in the 100,000 acknowledgements of a 100k start-up.
    built: list[int] = []

    class CountedProperties(Properties):
        def __init__(self, packet_type: int) -> None:
            built.append(packet_type)
            super().__init__(packet_type)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(_packet, "Properties", CountedProperties)
    settings = BrokerSettings.from_url(mqtt_broker_session.url("admin"))
    async with new_client(settings, v5=True) as client, new_client(settings) as reader:
        acks = AckedPublishes(client)
        # No subscriber: Mosquitto's "no matching subscribers" (0x10); then plain successes.
        published = [acks.publish(f"test/plain/{n}", b"x", retain=False) for n in range(50)]
        await asyncio.wait_for(asyncio.gather(*published), 5)
        await reader.subscribe("test/plain/#", qos=1)
        published = [acks.publish(f"test/plain/{n}", b"x", retain=False) for n in range(50)]
        await asyncio.wait_for(asyncio.gather(*published), 5)
        assert PacketTypes.PUBACK not in built and acks.waiting == 0


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


async def test_an_at_once_publish_is_on_the_wire_before_the_loop_turns(
    mqtt_broker_session: Broker,
) -> None:
    # A subscriber on its own thread receives it while this event loop is blocked:
    # the packet left with the call, not at the loop's next turn.
    subscribed, received = threading.Event(), threading.Event()
    subscriber = paho.Client(paho.CallbackAPIVersion.VERSION2)
    subscriber.username_pw_set(
        mqtt_broker_session.usernames["admin"], mqtt_broker_session.passwords["admin"]
    )
    subscriber.on_subscribe = lambda *_: subscribed.set()
    subscriber.on_message = lambda *_: received.set()
    subscriber.connect(mqtt_broker_session.host, mqtt_broker_session.port)
    subscriber.subscribe("test/at-once", qos=1)
    subscriber.loop_start()
    try:
        assert await asyncio.to_thread(subscribed.wait, 5)
        async with new_client(BrokerSettings.from_url(mqtt_broker_session.url("admin"))) as client:
            acks = AckedPublishes(client)
            done = acks.publish("test/at-once", b"now", retain=False, at_once=True)
            assert received.wait(5), "the publish waited for the loop's next turn"
            await asyncio.wait_for(done, 5)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()


def test_a_paho_without_the_internals_it_knows_keeps_its_own_acknowledgement_path() -> None:
    class OtherPaho:  # another paho version: none of 2.2's private names
        pass

    other = OtherPaho()
    _plain_successes_decoded_once(other)  # type: ignore[arg-type]
    assert vars(other) == {}
