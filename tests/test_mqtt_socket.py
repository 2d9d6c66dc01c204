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

import pytest

from actor_sdk.mqtt import BrokerSettings, MqttError, new_client
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
