"""The floor of the broker path: plain paho clients, doing nothing but MQTT.

`FloorPublisher` writes a burst of retained QoS 1 messages of `size` bytes on
`bench/floor/<n>`, in a tight loop starting at each instant (a thread of its own
sleeps, then spins, until the instant; paho's network thread writes and reads the
socket), so that a tap shows how late a burst of messages reaches a subscriber
through this broker on this machine when nothing but the publishing is done.

`BrokerHop` sends one message at a time from a plain paho publisher to a plain paho
subscriber through the broker and times it: one hop, the part of our path from the API
to the actor that frequenz-dispatch does not have, with no work on either side.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

FLOOR_TOPICS = "bench/floor/+"
_SPIN_S = 0.002


class FloorPublisher:
    """Bursts of retained messages at given instants, from a thread of its own."""

    def __init__(self, broker_url: str, bursts: list[tuple[float, int]], size: int) -> None:
        """Connect (as the URL's user) and start waiting for the first burst.

        Args:
            broker_url: `mqtt://user:password@host:port`.
            bursts: (unix time, messages), ascending in time.
            size: Bytes per message.
        """
        url = urlsplit(broker_url)
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self._client.username_pw_set(unquote(url.username or ""), unquote(url.password or ""))
        self._client.connect(url.hostname or "127.0.0.1", url.port or 1883)
        self._client.loop_start()
        self._payload = b"f" * size
        self._bursts = bursts
        self._thread = threading.Thread(target=self._run, name="floor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for instant, count in self._bursts:
            pause = instant - time.time() - _SPIN_S
            if pause > 0:
                time.sleep(pause)
            while time.time() < instant:
                pass
            for index in range(count):
                self._client.publish(f"bench/floor/{index}", self._payload, qos=1, retain=True)

    def close(self) -> None:
        """Wait for the last burst, then disconnect."""
        self._thread.join()
        self._client.disconnect()
        self._client.loop_stop()


class BrokerHop:
    """One retained QoS 1 message at a time, publisher to subscriber, timed."""

    TOPIC = "bench/floor/hop"

    def __init__(self, broker_url: str, size: int = 1000) -> None:
        """Connect a publisher and a subscriber (as the URL's user); wait for the subscription.

        Args:
            broker_url: `mqtt://user:password@host:port`.
            size: Bytes per message.
        """
        url = urlsplit(broker_url)
        self._arrived = threading.Event()
        self._payload = b"h" * size
        subscribed = threading.Event()
        self._clients: list[paho.Client] = []
        for role in ("pub", "sub"):
            client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
            client.username_pw_set(unquote(url.username or ""), unquote(url.password or ""))
            client.connect(url.hostname or "127.0.0.1", url.port or 1883)
            client.loop_start()
            self._clients.append(client)
            if role == "sub":
                client.on_message = lambda *_: self._arrived.set()
                client.on_subscribe = lambda *_: subscribed.set()
                client.subscribe(self.TOPIC, qos=1)
        if not subscribed.wait(10):
            raise TimeoutError("the floor's subscriber was not acknowledged")
        self._publisher = self._clients[0]
        self.sample()  # the retained message the subscription may bring, then a warm path

    def sample(self, timeout: float = 5.0) -> float:
        """Publish one message; return the seconds until the subscriber had it."""
        self._arrived.clear()
        began = time.perf_counter()
        self._publisher.publish(self.TOPIC, self._payload, qos=1, retain=True)
        if not self._arrived.wait(timeout):
            raise TimeoutError("the floor's message did not arrive")
        return time.perf_counter() - began

    def close(self) -> None:
        """Disconnect both clients."""
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
