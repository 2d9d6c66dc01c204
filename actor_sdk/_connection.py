"""Connecting to the broker: URL and credentials, TLS, reconnect delays, arrival stamps."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiomqtt

from actor_sdk._errors import BrokerUrlError

__all__ = ["BrokerSettings", "ReceivedQueue", "reconnect_delay"]

_logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


def _env_secret(name: str) -> str | None:
    """Read `NAME`, or the file named by `NAME_FILE` (one trailing newline dropped)."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").removesuffix("\n")
        except OSError as error:
            raise BrokerUrlError(f"{name}_FILE={path!r} cannot be read: {error}") from None
    return None


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect; build it with `from_url`."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    keepalive: int = 15

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive: int = 15,
    ) -> BrokerSettings:
        """Parse `mqtt://user:pass@host:port` or `mqtts://...`.

        Credentials come from the arguments, else the URL, else the environment
        (`MQTT_USERNAME`, `MQTT_PASSWORD` or `MQTT_PASSWORD_FILE`).

        Args:
            url: The broker URL.
            username: The user name (overrides the URL's).
            password: The password (overrides the URL's).
            tls_context: The TLS settings to use (implies TLS).
            ca_file: CA bundle to verify the broker with (`mqtts://`).
            cert_file: Client certificate (`mqtts://`).
            key_file: Key of the client certificate.
            keepalive: MQTT keepalive in seconds: how soon a dead connection is noticed.

        Returns:
            The settings.

        Raises:
            BrokerUrlError: The URL or an option is not usable.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as error:
            raise BrokerUrlError(f"broker URL is invalid: {error}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise BrokerUrlError(
                f"broker URL scheme {parts.scheme!r} is not supported: use mqtt:// or mqtts://"
            )
        if not parts.hostname:
            raise BrokerUrlError("broker URL has no host: expected mqtt://user:pass@host:port")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise BrokerUrlError("broker URL must not have a path, query or fragment")
        if keepalive < 1:
            raise BrokerUrlError(f"keepalive must be at least 1 s, not {keepalive}")
        user = username or (unquote(parts.username) if parts.username else None)
        secret = password or (unquote(parts.password) if parts.password else None)
        user = user or os.environ.get("MQTT_USERNAME") or None
        if secret is None and user is not None:
            secret = _env_secret("MQTT_PASSWORD")
        if tls_context is None and (scheme in ("mqtts", "ssl") or ca_file or cert_file):
            try:
                tls_context = ssl.create_default_context(cafile=ca_file)
                if cert_file:
                    tls_context.load_cert_chain(cert_file, key_file)
            except (OSError, ssl.SSLError) as error:
                raise BrokerUrlError(f"TLS settings are not usable: {error}") from None
        return cls(
            host=parts.hostname,
            port=port or _DEFAULT_PORTS[scheme],
            username=user,
            password=secret,
            tls_context=tls_context,
            keepalive=keepalive,
        )

    def describe(self) -> str:
        """Return `host:port` (with the scheme), never the credentials."""
        scheme = "mqtts" if self.tls_context is not None else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    def new_client(
        self, clock: Callable[[], datetime] | None = None
    ) -> tuple[aiomqtt.Client, ReceivedQueue]:
        """Return a fresh MQTT 3.1.1 client (aiomqtt does not reconnect: one per connection).

        Args:
            clock: The wall clock that stamps each message as it arrives; None for
                the system clock (UTC).

        Returns:
            The unconnected client, and its queue of received messages (through
            aiomqtt's `queue_type` option), so that a burst of retained messages can
            be taken in one go instead of one task wake-up per message.
        """
        queues: list[ReceivedQueue] = []
        stamp = clock or _utc_now

        class _Queue(ReceivedQueue):
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize, clock=stamp)
                queues.append(self)

        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            keepalive=self.keepalive,
            tls_context=self.tls_context,
            timeout=10,
            # Retained state of a whole microgrid arrives at once: never drop any.
            max_queued_incoming_messages=0,
            queue_type=_Queue,
        )
        return client, queues[0]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ReceivedQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's queue of received messages, noting when each one arrived.

    Under load a message can wait in the queue for seconds before it is handled:
    comparing its `as_of` with the clock at handling time would look like skew.
    """

    def __init__(self, maxsize: int = 0, *, clock: Callable[[], datetime] = _utc_now) -> None:
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

    def _put(self, item: aiomqtt.Message) -> None:
        # The hook every put goes through (as in `asyncio.PriorityQueue`).
        self._arrivals[item] = self._clock()
        self.last_arrival = asyncio.get_running_loop().time()
        super()._put(item)

    def received_at(self, message: aiomqtt.Message) -> datetime | None:
        """Return when a message was put into this queue.

        Args:
            message: A message taken from this queue.

        Returns:
            The wall-clock time it arrived; None for a message this queue never held.
        """
        return self._arrivals.get(message)


def reconnect_delay(
    attempt: int,
    *,
    first: float,
    cap: float,
    rng: random.Random | None = None,
) -> float:
    """Return the wait before reconnect attempt `attempt` (0 for the first retry).

    Doubles from `first` up to `cap`, then draws uniformly from the upper half of
    that value, so that many SDKs cut off together do not reconnect in lockstep.

    Args:
        attempt: How many attempts failed in a row, minus one.
        first: The base delay in seconds.
        cap: The longest delay in seconds.
        rng: The random source (tests pass a seeded one).

    Returns:
        Seconds to wait.
    """
    ceiling = min(cap, first * 2.0 ** min(attempt, 32))
    jitter = (rng or random).uniform(0, ceiling / 2)
    return ceiling / 2 + jitter
