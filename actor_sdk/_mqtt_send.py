"""The sending side of `actor_sdk.mqtt`: QoS 1 publishes in a window, and refused publishes.

Internal to the MQTT layer: import the names from `actor_sdk.mqtt`.

aiomqtt's `publish` costs, per message, a scan of every pending call (twice),
an `asyncio.Event` and a `wait_for` task; with 100 publishes in flight that
bookkeeping takes as much CPU as paho's own work (`bench/mqtt_io.py`, "publish
rate"). `AckedPublishes` hands each publish to paho directly and returns a
future that paho's PUBACK callback resolves: the same window, the same
ordering, without the per-message bookkeeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


class AckedPublishes:
    """QoS 1 publishes of one client, each with a future its acknowledgement resolves.

    Create it before the client's first publish (it chains paho's publish callback).
    A publish whose acknowledgement never comes (the connection was lost)
    leaves its future pending: its waiter is cancelled with the connection's
    tasks, as with aiomqtt's `publish(timeout=math.inf)`. A broker's refusal
    (an MQTT v5 reason code ≥ 0x80) resolves the future too; `on_refused_publish`
    is how it is told.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        """Hook into a client's acknowledgements.

        Args:
            client: The client, before its first publish.
        """
        self._paho = client._client
        self._waiting: dict[int, asyncio.Future[None]] = {}

        def acknowledged(mid: int, reason: Any) -> None:
            future = self._waiting.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(None)

        _before_on_publish(client, acknowledged)
        _plain_successes_decoded_once(self._paho)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool, at_once: bool = False
    ) -> asyncio.Future[None]:
        """Send a QoS 1 publish (paho queues it beyond the in-flight window).

        Args:
            topic: The topic.
            payload: The payload.
            retain: Whether the broker retains it.
            at_once: Write it to the socket now, with whatever waits before it, instead
                of at the event loop's next turn together with the publishes made until
                then: a system call of its own, for the few messages that start and
                stop actors (the others' encoding no longer delays them).

        Returns:
            A future resolved by the publish's acknowledgement.

        Raises:
            aiomqtt.MqttCodeError: paho refused the publish (not connected).
        """
        info = self._paho.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if at_once:
            self._paho.loop_write()  # what the socket does not take now waits as before
        future = asyncio.get_running_loop().create_future()
        if info.is_published():
            future.set_result(None)
        else:
            self._waiting[info.mid] = future
        return future

    @property
    def waiting(self) -> int:
        """How many publishes await their acknowledgement."""
        return len(self._waiting)


def on_refused_publish(client: aiomqtt.Client, refused: Callable[[str, str], None]) -> None:
    """Be told of each publish the broker refused (an MQTT v5 PUBACK reason code ≥ 0x80).

    aiomqtt drops PUBACK reason codes, so this wraps paho's callback.

    Args:
        client: The client, before it connects.
        refused: Called with the topic and the broker's reason.
    """
    paho_client = client._client

    def acknowledged(mid: int, reason: Any) -> None:
        if getattr(reason, "is_failure", False):
            message = paho_client._out_messages.get(mid)
            topic = message.topic if message is not None else "?"
            refused(topic, f"reason code 0x{reason.value:02X} {reason}")

    _before_on_publish(client, acknowledged)


def _before_on_publish(client: aiomqtt.Client, handler: Callable[[int, Any], None]) -> None:
    """Call `handler(mid, reason)` on each acknowledgement, before the callback set so far."""
    paho_client = client._client
    forward: Callable[..., None] | None = paho_client.on_publish

    def on_publish(paho_client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        handler(mid, reason)
        if forward is not None:
            forward(paho_client, userdata, mid, reason, props)

    paho_client.on_publish = on_publish


_SUCCESSES = {
    b"": ReasonCode(PacketTypes.PUBACK),
    b"\x00": ReasonCode(PacketTypes.PUBACK),
    b"\x10": ReasonCode(PacketTypes.PUBACK, identifier=0x10),
}
"""The two success reason codes of a PUBACK (MQTT 5, 3.4.2.1), by the bytes after the
packet id; none at all is a success too (MQTT 3.1.1, and MQTT 5's short form)."""
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


def _plain_successes_decoded_once(paho_client: paho.Client) -> None:
    """Acknowledge a PUBACK that says success, without properties, with objects made once.

    paho decodes every PUBACK into a new `ReasonCode` and a new `Properties` (whose
    constructor builds two tables): 11 µs a packet, 1.1 s of CPU for the 100,000
    acknowledgements of a 100k start-up. A success without properties (Mosquitto's
    "success" and "no matching subscribers") gets one of `_SUCCESSES` and one shared
    empty `Properties`: the callbacks only read them. Any other PUBACK (a refusal,
    properties), and PUBCOMP, take paho's own path (and its debug log line).
    """
    internals = ("_handle_pubackcomp", "_in_packet", "_out_message_mutex", "_out_messages")
    if not all(hasattr(paho_client, name) for name in (*internals, "_do_on_publish")):
        return  # another paho than 2.2's: its own path, as before
    handle = paho_client._handle_pubackcomp

    def handle_pubackcomp(cmd: Any) -> MQTTErrorCode:
        packet = paho_client._in_packet["packet"]
        reason = _SUCCESSES.get(bytes(packet[2:])) if cmd == "PUBACK" else None
        if reason is None or len(packet) < 2:
            return handle(cmd)
        mid = packet[0] << 8 | packet[1]
        with paho_client._out_message_mutex:
            if mid in paho_client._out_messages:
                return paho_client._do_on_publish(mid, reason, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho_client._handle_pubackcomp = handle_pubackcomp  # type: ignore[method-assign]
