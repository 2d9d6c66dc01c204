"""An MQTT 3.1.1 broker inside this process, for `dispatch-bridge demo` without Mosquitto.

`amqtt` (the optional extra `embedded-broker`) runs in the caller's event loop
with the same security model as the shipped `mosquitto.conf`: no anonymous
clients, users with passwords, and the ACL of `deploy/mosquitto/acl` (the
bridge user reads and writes `microgrid/+/dispatch/#`, the actor user only
reads it). Retained messages live in memory only: this broker is for demos,
not for a site.

Clients that try MQTT v5 first (the bridge does, then falls back to 3.1.1)
need a prompt refusal. amqtt parses a v5 CONNECT as if it were 3.1.1, gets
the lengths wrong and waits for bytes that never come, so the client times
out instead of falling back. The listener here is therefore our own: it reads
the start of each CONNECT, answers a v5 one with a v5 CONNACK "unsupported
protocol version" (0x84), and hands every other connection to amqtt with the
bytes it read replayed in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DISPATCH_TOPICS", "EmbeddedBrokerError", "PasswordAuthPlugin", "embedded_broker"]

_logger = logging.getLogger("bridge.embedded_broker")

DISPATCH_TOPICS = "microgrid/+/dispatch/#"
"""The tree the ACL is about, as in `deploy/mosquitto/acl`."""


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker is not installed or cannot start."""


try:  # The optional extra; only `embedded_broker()` needs it.
    from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
    from amqtt.broker import Broker
    from amqtt.plugins.base import BaseAuthPlugin
except ImportError:  # pragma: no cover - depends on the installation
    Broker = None
    BaseAuthPlugin = object
    ReaderAdapter = object

_V5_REFUSAL = bytes([0x20, 0x03, 0x00, 0x84, 0x00])
"""CONNACK (v5): no session present, reason 0x84 unsupported protocol version, no properties."""

_LISTENER = "default"
_HANDSHAKE_TIMEOUT = 10.0


class _ReplayReader(ReaderAdapter):  # type: ignore[misc]
    """A reader that returns bytes already read from the socket before the rest."""

    def __init__(self, head: bytes, inner: Any) -> None:
        self._head = head
        self._inner = inner

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            data: bytes = await self._inner.read(n)
            return data
        if n == -1:
            head, self._head = self._head, b""
            rest: bytes = await self._inner.read(-1)
            return head + rest
        taken, self._head = self._head[:n], self._head[n:]
        if len(taken) < n:
            taken += await self._inner.read(n - len(taken))
        return taken

    def feed_eof(self) -> None:
        self._inner.feed_eof()


async def _read_connect_start(reader: asyncio.StreamReader) -> tuple[bytes, int | None]:
    """Read the fixed header and protocol name/level of a CONNECT.

    Returns:
        The bytes read, and the protocol level (None if this is not an MQTT CONNECT).
    """
    head = await reader.readexactly(1)
    if head[0] != 0x10:
        return head, None
    for _ in range(4):  # the remaining length: a varint of at most 4 bytes
        byte = await reader.readexactly(1)
        head += byte
        if byte[0] < 0x80:
            break
    start = await reader.readexactly(7)  # name length (2), b"MQTT", level
    head += start
    if start[:6] != b"\x00\x04MQTT":
        return head, None
    return head, start[6]


class PasswordAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt authentication: a known user with the right password, nobody else.

    The passwords are handed in by the configuration (they are throw-away demo
    passwords, generated at start) and compared in constant time.
    """

    @dataclass
    class Config:
        """The accepted users and their passwords."""

        users: dict[str, str] = field(default_factory=dict)

    async def authenticate(self, *, session: Any) -> bool:
        """Accept a session only with a known user name and its password.

        Args:
            session: The amqtt session of the connecting client.

        Returns:
            Whether the client may connect.
        """
        users: dict[str, str] = self.context.config.users
        username = getattr(session, "username", None)
        password = getattr(session, "password", None) or ""
        expected = users.get(username) if username else None
        if expected is None:
            _logger.info("embedded broker: refused client without a known user")
            return False
        accepted = hmac.compare_digest(expected.encode(), str(password).encode())
        if not accepted:
            _logger.info("embedded broker: refused user %r: wrong password", username)
        return accepted


def _config(users: Mapping[str, str], writers: set[str]) -> dict[str, Any]:
    everyone = {user: [DISPATCH_TOPICS] for user in users}
    return {
        # "external": amqtt opens no socket; connections come from our listener.
        "listeners": {_LISTENER: {"type": "external"}},
        "plugins": {
            f"{__name__}.PasswordAuthPlugin": {"users": dict(users)},
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                "acl": everyone,
                "publish_acl": {user: [DISPATCH_TOPICS] for user in writers},
            },
        },
    }


@asynccontextmanager
async def embedded_broker(
    host: str, port: int, users: Mapping[str, str], *, writers: set[str]
) -> AsyncIterator[int]:
    """Run the embedded broker for the duration of the block.

    Args:
        host: The address to listen on.
        port: The port to listen on; 0 lets the system pick a free one.
        users: User name to password; no one else may connect.
        writers: The users that may publish to the dispatch tree; the others
            may only subscribe to it.

    Yields:
        The port it listens on, until the block ends.

    Raises:
        EmbeddedBrokerError: amqtt is not installed, or the broker cannot start
            (e.g. the port is taken).
    """
    if Broker is None:
        raise EmbeddedBrokerError(
            "the embedded broker needs amqtt: pip install 'dispatch-bridge[embedded-broker]'"
        )
    broker = Broker(_config(users, writers))
    connections: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            try:
                head, level = await asyncio.wait_for(
                    _read_connect_start(reader), _HANDSHAKE_TIMEOUT
                )
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            if level == 5:
                writer.write(_V5_REFUSAL)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                writer.close()
                return
            await broker.external_connected(
                _ReplayReader(head, StreamReaderAdapter(reader)),
                StreamWriterAdapter(writer),
                _LISTENER,
            )
        finally:
            connections.discard(task)

    try:
        await broker.start()
        server = await asyncio.start_server(handle, host, port)
    except Exception as error:
        with contextlib.suppress(Exception):
            await broker.shutdown()
        raise EmbeddedBrokerError(
            f"embedded broker cannot listen on {host}:{port}: {error}"
        ) from None
    bound: int = server.sockets[0].getsockname()[1]
    _logger.info("embedded MQTT 3.1.1 broker (amqtt) listening on %s:%d", host, bound)
    try:
        yield bound
    finally:
        server.close()
        await broker.shutdown()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()
        _logger.info("embedded broker on %s:%d stopped", host, bound)
