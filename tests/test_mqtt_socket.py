"""The socket of `actor_sdk.mqtt.new_client` (the bridge's and the SDK's), on a real broker.

Nagle's algorithm must be off: the socket is wrapped for bulk reads, and aiomqtt sets
its socket options only on a plain socket, so `new_client` sets TCP_NODELAY itself.
With Nagle on, a SUBACK sent while a publish was unacknowledged took 44 ms instead of
0.6 ms (`Dispatcher.start_managing`, which waits for it, on Mosquitto).
"""

from __future__ import annotations

import socket

from actor_sdk.mqtt import BrokerSettings, new_client
from testkit.broker import Broker


async def test_a_connected_client_has_nagle_off(mqtt_broker_session: Broker) -> None:
    client = new_client(BrokerSettings.from_url(mqtt_broker_session.url("actor")))
    async with client:
        sock = client._client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
