"""The client's socket and receive path: bulk reads, queues, a close before CONNACK.

Part of `actor_sdk.mqtt`.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiomqtt

from actor_sdk.wall_clock import utc_now

__all__ = [
    "BufferedReads",
    "ReceivedQueue",
    "connection_lost",
    "fail_connect_when_closed",
    "handing_queue",
    "read_in_bulk",
]


def handing_queue(
    hand: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """Return a `queue_type` that hands each message to `hand` as it arrives, queueing none.

    Much cheaper than aiomqtt's message iterator (a task per message) when a
    tree of 100,000 retained topics arrives; the client's message iterator then
    only shows when the connection is lost.

    Args:
        hand: Takes each message (called from the client's read, must not block).

    Returns:
        The queue type.
    """

    class _Handing(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            hand(item)

    return _Handing


class ReceivedQueue(asyncio.Queue[aiomqtt.Message]):
    """A queue of received messages noting when each one arrived.

    Under load a message can wait in the queue for seconds before it is handled:
    comparing its `as_of` with the clock at handling time would look like skew.
    """

    def __init__(self, maxsize: int = 0, *, clock: Callable[[], datetime] = utc_now) -> None:
        """Create an empty queue.

        Args:
            maxsize: The most messages held; 0 for no limit.
            clock: The wall clock that stamps each message as it is put.
        """
        super().__init__(maxsize)
        self._clock = clock
        self.last_arrival: float | None = None
        """The event loop's time when the latest message arrived; None before the first."""
        self._arrivals: weakref.WeakKeyDictionary[aiomqtt.Message, datetime] = (
            weakref.WeakKeyDictionary()
        )
        self._arrival: asyncio.Future[None] | None = None

    def _put(self, item: aiomqtt.Message) -> None:
        # The hook every put goes through (as in `asyncio.PriorityQueue`).
        self._arrivals[item] = self._clock()
        self.last_arrival = asyncio.get_running_loop().time()
        super()._put(item)
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def arrival(self) -> asyncio.Future[None]:
        """Return a future done once a message is in the queue (at once when one is).

        Waiting on it wakes the waiter one turn of the event loop after the
        message arrived; `get` (and aiomqtt's message iterator on top of it) take
        several turns, in which the reader may handle more packets first. Only
        one waiter at a time: a second call returns the same future.
        """
        if self._arrival is None or self._arrival.done():
            self._arrival = asyncio.get_running_loop().create_future()
        if not self.empty():
            self._arrival.set_result(None)
        return self._arrival

    def received_at(self, message: aiomqtt.Message) -> datetime | None:
        """Return when a message was put into this queue.

        Args:
            message: A message taken from this queue.

        Returns:
            The wall-clock time it arrived; None for a message this queue never held.
        """
        return self._arrivals.get(message)


class BufferedReads:
    """The connection's socket, read 64 KiB at a time, one such read per wake-up.

    paho reads each packet's fixed header byte by byte (a system call per
    byte), and aiomqtt handles one packet per event-loop wake-up unless the
    socket says more is `pending` (as a TLS socket does). Served from a buffer,
    those reads cost no system call, and `pending` counts the buffer: one
    wake-up handles every packet of a 64 KiB read.

    A wake-up stops there, though more may wait in the socket: aiomqtt reads on
    while anything is pending, and a broker sending a tree of 20,000 retained
    topics kept the socket full for a whole second, blocking every timer of the
    loop (an actor's stop among them) as long. Once a wake-up's buffer is
    handed out, the next read says "nothing more now" (`BlockingIOError`, which
    paho takes as such, keeping a packet read halfway); the event loop runs its
    due callbacks, and the socket, still readable, wakes the reader again. Not
    while the socket itself holds decrypted TLS bytes (`pending` there): they
    would wake no one.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._read_this_wakeup = False

    def recv(self, size: int) -> bytes:
        if not self._buffer:
            if self._read_this_wakeup and not self._inner_pending():
                self._read_this_wakeup = False
                raise BlockingIOError("the rest at the next wake-up")
            data = self._sock.recv(65536)  # raises when nothing is there, b"" at the end
            self._read_this_wakeup = True
            if len(data) <= size:
                return bytes(data)
            self._buffer += data
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    def _inner_pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return inner() if inner is not None else 0

    def pending(self) -> int:
        return len(self._buffer) + self._inner_pending()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def read_in_bulk(client: aiomqtt.Client) -> None:
    """Wrap the client's socket in `BufferedReads` as it opens (before the first read).

    TCP_NODELAY is set here, and only here: aiomqtt applies its `socket_options` only to a plain
    socket, which the wrapper is not. Without it, Nagle holds a small packet back
    until the previous one is acknowledged: 40 ms (the peer's delayed ACK) were seen
    for a SUBACK behind a publish.

    Args:
        client: The client, before it connects.
    """
    paho = client._client
    opened: Callable[..., None] | None = paho.on_socket_open

    def on_socket_open(paho_client: Any, userdata: Any, sock: Any) -> None:
        # Called once the socket exists, before anything is read from it.
        if isinstance(sock, socket.socket):  # not for WebSockets' wrapper
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        paho_client._sock = BufferedReads(sock)
        if opened is not None:
            opened(paho_client, userdata, sock)

    paho.on_socket_open = on_socket_open


def connection_lost(client: aiomqtt.Client) -> asyncio.Future[None]:
    """Return the future that is done when the client's current connection ends.

    Its exception (if any) says why. Ask again after each connect: the client
    replaces it then.

    Args:
        client: A connected client.

    Returns:
        The future (aiomqtt's own; the caller must not resolve it).
    """
    return client._disconnected


def fail_connect_when_closed(client: aiomqtt.Client) -> None:
    """End a connect at once when the connection closes before the broker's CONNACK.

    aiomqtt ignores a disconnect before CONNACK and waits out its whole timeout (10 s):
    a broker that is still starting behind a proxy or a load balancer, or one at its
    connection limit, accepts the TCP connection and closes it, and every reconnect
    then stalled 10 s (a chaos run's reconnects after broker restarts behind its
    proxies timed out this way, most likely for this reason).
    """
    paho = client._client
    aiomqtt_handler: Callable[..., None] | None = paho.on_disconnect

    def on_disconnect(paho_client: Any, userdata: Any, *rest: Any) -> None:
        connecting = client._connected
        if not connecting.done():
            connecting.set_exception(
                aiomqtt.MqttError("the connection was closed before the broker accepted it")
            )
        if aiomqtt_handler is not None:
            aiomqtt_handler(paho_client, userdata, *rest)

    paho.on_disconnect = on_disconnect
