"""The socket of `actor_sdk.mqtt.new_client` (the bridge's and the SDK's), on a real broker.

Nagle's algorithm must be off: the socket is wrapped for bulk reads, and aiomqtt sets
its socket options only on a plain socket, so `new_client` sets TCP_NODELAY itself.
With Nagle on, a SUBACK sent while a publish was unacknowledged took 44 ms instead of
0.6 ms (`Dispatcher.start_managing`, which waits for it, on Mosquitto).
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiomqtt
import pytest

from actor_sdk.mqtt import BrokerSettings, MqttError, handing_queue, new_client
from testkit.broker import Broker


async def test_a_connected_client_has_nagle_off(mqtt_broker_session: Broker) -> None:
    client = new_client(BrokerSettings.from_url(mqtt_broker_session.url("actor")))
    async with client:
        sock = client._client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_a_connection_closed_before_the_connack_fails_the_connect_at_once() -> None:
    # As a broker still starting behind a proxy, or one at its connection limit: the
    # TCP connection is taken, the CONNECT read, and the connection closed. aiomqtt
    # alone waited out its whole timeout (10 s) before the next attempt could start.
    async def take_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the CONNECT
        writer.close()

    server = await asyncio.start_server(take_and_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        for v5 in (True, False):
            client = new_client(BrokerSettings.from_url(f"mqtt://127.0.0.1:{port}"), v5=v5)
            began = time.monotonic()
            with pytest.raises(MqttError, match="closed before the broker accepted it"):
                async with client:
                    pass
            assert time.monotonic() - began < 2.0


async def test_a_retained_burst_is_read_a_socket_read_per_wake_up(mqtt_broker: Broker) -> None:
    # A broker sending a big retained tree keeps the socket full: read on while anything
    # was pending, one wake-up took the whole tree (a second at 20,000 topics) and every
    # timer of the loop, an actor's stop among them, waited as long.
    topics = [f"microgrid/7/dispatch/BULK/dispatches/{index}" for index in range(3000)]
    payload = b"x" * 1000
    publisher = new_client(BrokerSettings.from_url(mqtt_broker.url("admin")))
    async with publisher:
        await asyncio.gather(*(publisher.publish(t, payload, qos=1, retain=True) for t in topics))

    received = 0
    most_between_ticks = 0
    everything = asyncio.Event()

    def hand(message: aiomqtt.Message) -> None:
        nonlocal received
        received += 1
        if received == len(topics):
            everything.set()

    async def tick() -> None:
        nonlocal most_between_ticks
        seen = 0
        while not everything.is_set():
            await asyncio.sleep(0)
            most_between_ticks = max(most_between_ticks, received - seen)
            seen = received

    reader = new_client(
        BrokerSettings.from_url(mqtt_broker.url("actor")), queue_type=handing_queue(hand)
    )
    async with reader:
        ticker = asyncio.ensure_future(tick())
        await reader.subscribe("microgrid/7/dispatch/BULK/dispatches/+", qos=1)
        await asyncio.wait_for(everything.wait(), 30)
        await ticker
    # 64 KiB hold 63 such messages; the socket's own buffer would give thousands.
    assert 0 < most_between_ticks <= 2 * 66
