"""The one MQTT module of the bridge, the SDK and the tools.

Everything that touches the MQTT client library (aiomqtt on paho-mqtt) lives
here, so that the rest of the code names only this module:

* **Broker URLs** (`parse_broker_url`): `mqtt://[user[:password]@]host[:port]`
  (default port 1883), `mqtts://` (TLS, 8883), `ws://` and `wss://` (MQTT over
  WebSockets, 80 / 443, the path is the WebSockets path). `tcp://` and `ssl://`
  are accepted as other names of `mqtt://` and `mqtts://`. The scheme is read
  case-insensitively; a query or a fragment is refused, never silently ignored.
  User and password are percent-decoded; `user:@host` is an empty password.
* **Secrets** (`read_secret_file`, `env_secret`): a secret is `NAME`, else the
  content of the file named by `NAME_FILE`. The one stripping rule: trailing line
  ends (LF or CR LF, any number) are dropped, nothing else; spaces are part of
  the secret.
* **TLS** (`BrokerSettings.ssl_context`): the system's CAs or `ca_file`, and a
  client certificate (`cert_file`, `key_file`) for brokers that require one
  (mTLS). TLS files with a plain `mqtt://` URL are a mistake, refused.
* **Reconnecting** (`Backoff`, `reconnect_delay`): capped, jittered exponential
  delays; `ProtocolChoice`: MQTT v5 until a broker refuses it, then 3.1.1 (NATS
  speaks 3.1.1 only).
* **Clients** (`new_client`): a fresh client per connection (paho may otherwise
  deliver publishes queued before a disconnect after the reconnect), with
  TCP_NODELAY, a will, a client id, and the hooks aiomqtt lacks
  (`on_refused_publish`, `subscribe_no_local`, queues that stamp or hand over
  each message as it arrives, `AckedPublishes`: QoS 1 publishes in a window
  without aiomqtt's per-publish bookkeeping).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from actor_sdk._errors import BrokerUrlError
from actor_sdk._mqtt_receive import (
    ReceivedQueue,
    connection_lost,
    fail_connect_when_closed,
    handing_queue,
    read_in_bulk,
)
from actor_sdk._mqtt_send import AckedPublishes, on_refused_publish
from actor_sdk.wall_clock import utc_now

__all__ = [
    "AckedPublishes",
    "Backoff",
    "BrokerError",
    "BrokerSettings",
    "BrokerUrlError",
    "Client",
    "Message",
    "MqttError",
    "ProtocolChoice",
    "ReceivedQueue",
    "Will",
    "broker_errors",
    "connection_lost",
    "describe_error",
    "env_secret",
    "handing_queue",
    "new_client",
    "on_refused_publish",
    "parse_broker_url",
    "read_secret_file",
    "receiving_client",
    "reconnect_delay",
    "subscribe_no_local",
]

Client = aiomqtt.Client
Message = aiomqtt.Message
MqttError = aiomqtt.MqttError
Will = aiomqtt.Will

_SCHEMES = {
    # scheme: (TLS, WebSockets, default port)
    "mqtt": (False, False, 1883),
    "tcp": (False, False, 1883),
    "mqtts": (True, False, 8883),
    "ssl": (True, False, 8883),
    "ws": (False, True, 80),
    "wss": (True, True, 443),
}

_URL_FORM = "mqtt://[user[:password]@]host[:port]"


# ---- secrets ----------------------------------------------------------------------


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """Read a secret from a file: its text without trailing line ends.

    `echo secret > file` and editors end the file with LF or CR LF; no
    secret ends with one. Spaces are kept: they may be part of a password.

    Args:
        path: The file.

    Returns:
        The secret (may be empty: the caller decides whether that is allowed).

    Raises:
        OSError: The file cannot be read.
    """
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")


def env_secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Return `NAME` from the environment, else the secret in the file `NAME_FILE` names.

    Args:
        name: The variable, e.g. `MQTT_PASSWORD`.
        environ: The environment (default: the process's).

    Returns:
        The secret, or None when neither is set (an empty variable is unset).

    Raises:
        BrokerUrlError: The file cannot be read or holds nothing.
    """
    env = os.environ if environ is None else environ
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE")
    if not path:
        return None
    try:
        value = read_secret_file(path)
    except OSError as error:
        raise BrokerUrlError(f"{name}_FILE={path!r} cannot be read: {error.strerror}") from None
    if not value:
        raise BrokerUrlError(f"{name}_FILE={path!r} is empty")
    return value


# ---- settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to reach a broker; the password never shows in `repr` or `describe`."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    """Given TLS settings (implies TLS; the files are then not used)."""
    websocket_path: str | None = None
    """MQTT over WebSockets on this path; None for plain TCP."""
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
        environ: Mapping[str, str] | None = None,
    ) -> BrokerSettings:
        """Parse a URL and complete it from arguments, then the environment (the SDK's way).

        Credentials come from the arguments, else the URL, else `MQTT_USERNAME`
        and `MQTT_PASSWORD` (or `MQTT_PASSWORD_FILE`).

        Args:
            url: The broker URL (see `parse_broker_url`).
            username: The user name (overrides the URL's).
            password: The password (overrides the URL's).
            tls_context: The TLS settings to use (implies TLS).
            ca_file: CA bundle to verify the broker with (`mqtts://`).
            cert_file: Client certificate (`mqtts://`).
            key_file: Key of the client certificate (default: in `cert_file`).
            keepalive: MQTT keepalive in seconds: how soon a dead connection is noticed.
            environ: The environment (default: the process's).

        Returns:
            The settings.

        Raises:
            BrokerUrlError: The URL, a credential or a TLS option is not usable.
        """
        env = os.environ if environ is None else environ
        settings = parse_broker_url(url)
        user = username or settings.username or env.get("MQTT_USERNAME") or None
        secret = password if password is not None else settings.password
        if secret is None and user is not None:
            secret = env_secret("MQTT_PASSWORD", env)
        if keepalive < 1:
            raise BrokerUrlError(f"keepalive must be at least 1 s, not {keepalive}")
        settings = replace(settings, username=user, password=secret, keepalive=keepalive)
        if tls_context is not None:
            return replace(settings, tls=True, tls_context=tls_context)
        return settings.with_tls_files(ca_file, cert_file, key_file)

    def with_tls_files(
        self, ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
    ) -> BrokerSettings:
        """Return these settings with TLS files, checked by loading them once.

        Args:
            ca_file: CA bundle to verify the broker with (None: the system's).
            cert_file: Client certificate, for brokers that require one (mTLS).
            key_file: Its key (None: the key is in `cert_file`).

        Returns:
            The settings.

        Raises:
            BrokerUrlError: A file is given for a plain `mqtt://` broker, a key
                without a certificate, or a file cannot be used.
        """
        if ca_file is None and cert_file is None and key_file is None:
            return self
        given = ", ".join(
            name
            for name, value in (("CA", ca_file), ("cert", cert_file), ("key", key_file))
            if value is not None
        )
        if not self.tls:
            raise BrokerUrlError(
                f"TLS files ({given}) are given but the broker URL is not mqtts:// (or wss://)"
            )
        if key_file is not None and cert_file is None:
            raise BrokerUrlError("a client key file is given without a client certificate file")
        for name, path in (("CA", ca_file), ("cert", cert_file), ("key", key_file)):
            if path is not None and not Path(path).is_file():
                raise BrokerUrlError(f"TLS {name} file {path}: no such file")
        settings = replace(self, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        settings.ssl_context()
        return settings

    def ssl_context(self) -> ssl.SSLContext | None:
        """Build the TLS settings of a connection (None for a plain one).

        Returns:
            The context: the given one, or the system's (or `ca_file`'s) CAs and
            the client certificate.

        Raises:
            BrokerUrlError: A TLS file cannot be used.
        """
        if self.tls_context is not None or not self.tls:
            return self.tls_context
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            raise BrokerUrlError(f"TLS settings are not usable: {error}") from None
        return context

    def describe(self) -> str:
        """Describe the broker for logs: scheme, user, host and port, never the password.

        Returns:
            E.g. `mqtt://bridge@127.0.0.1:1883`.
        """
        web = self.websocket_path is not None
        scheme = ("wss" if self.tls else "ws") if web else ("mqtts" if self.tls else "mqtt")
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}{self.websocket_path or ''}"


def parse_broker_url(url: str) -> BrokerSettings:
    """Parse a broker URL (see the module's description) into settings.

    Args:
        url: The URL.

    Returns:
        The settings, without anything from the environment.

    Raises:
        BrokerUrlError: Not an MQTT URL (a `ValueError`); the message never holds
            the password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BrokerUrlError(f"broker URL is not a valid URL (expected {_URL_FORM})") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise BrokerUrlError(
            f"broker URL has an unknown scheme {parts.scheme!r} "
            "(expected mqtt://, mqtts://, ws:// or wss://)"
        )
    if not parts.hostname:
        raise BrokerUrlError(f"broker URL has no host (expected {_URL_FORM})")
    tls, web, default_port = _SCHEMES[scheme]
    if parts.query or parts.fragment or (not web and parts.path not in ("", "/")):
        raise BrokerUrlError(
            "broker URL must not have a query or fragment, nor a path unless ws:// or wss://"
        )
    return BrokerSettings(
        host=parts.hostname,
        port=port or default_port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        websocket_path=(parts.path or "/") if web else None,
    )


# ---- reconnecting -----------------------------------------------------------------


def reconnect_delay(
    attempt: int, *, first: float, cap: float, rng: random.Random | None = None
) -> float:
    """Return the wait before reconnect attempt `attempt` (0 for the first retry).

    The bound doubles from `first` up to `cap`; the delay is drawn uniformly from
    the upper half of the bound, so that many clients cut off together do not
    reconnect in lockstep.

    Args:
        attempt: How many attempts failed in a row, minus one.
        first: The first bound in seconds.
        cap: The largest bound in seconds.
        rng: The random source (tests pass a seeded one).

    Returns:
        Seconds to wait.
    """
    bound = min(cap, first * 2.0 ** min(attempt, 32))
    return bound / 2 + (rng or random).uniform(0, bound / 2)


class Backoff:
    """`reconnect_delay` with its own count of failed attempts."""

    QUICK_S = 0.2
    """The bound of a quick attempt's delay."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0, *, quick: int = 0) -> None:
        """Create the backoff.

        Args:
            initial: The first delay's upper bound, in seconds.
            cap: The largest delay's upper bound, in seconds.
            quick: How many attempts come first, each after at most `QUICK_S`: a
                broker that restarts is back within a second or two, and a client
                that waited its doubling delays came back up to a second after it.
                For a client of its own on its site (the bridge); many clients cut
                off together keep 0.
        """
        self.initial = initial
        self.cap = cap
        self.quick = quick
        self.attempt = 0

    def next(self) -> float:
        """Return the next delay in seconds, and grow the bound.

        Returns:
            The delay.
        """
        if self.attempt < self.quick:
            delay = reconnect_delay(0, first=self.QUICK_S, cap=self.QUICK_S)
        else:
            attempt = self.attempt - self.quick
            delay = reconnect_delay(attempt, first=self.initial, cap=self.cap)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self.attempt = 0


class BrokerError(Exception):
    """The broker could not be reached, refused the connection, or the connection broke."""

    def __init__(self, message: str, *, refused_protocol: bool = False) -> None:
        """Create the error.

        Args:
            message: What happened, for the log.
            refused_protocol: The broker refused the MQTT protocol version.
        """
        super().__init__(message)
        self.refused_protocol = refused_protocol


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    """Translate the client library's errors into `BrokerError`."""
    try:
        yield
    except aiomqtt.MqttError as error:
        refused = False
        if isinstance(error, aiomqtt.MqttCodeError):
            code = error.rc if isinstance(error.rc, int) else getattr(error.rc, "value", None)
            # 1: 3.1.1 "unacceptable protocol version"; 132: v5 "unsupported protocol version".
            refused = code in (1, 132)
        raise BrokerError(describe_error(error), refused_protocol=refused) from error


def describe_error(error: BaseException) -> str:
    """Describe an error and its cause in one line.

    Args:
        error: The error.

    Returns:
        The text.
    """
    text = str(error) or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


class ProtocolChoice:
    """MQTT v5 until the broker refuses it, then MQTT 3.1.1 for good."""

    def __init__(self, v5: bool = True) -> None:
        """Start with v5 (or 3.1.1).

        Args:
            v5: Try MQTT v5 first.
        """
        self.v5 = v5

    @property
    def name(self) -> str:
        """The version for logs: "5" or "3.1.1"."""
        return "5" if self.v5 else "3.1.1"

    def fall_back(self, error: BrokerError) -> bool:
        """Switch to 3.1.1 when `error` is v5's refusal.

        Args:
            error: Why the connection failed.

        Returns:
            Whether to retry at once with 3.1.1.
        """
        if not self.v5 or not error.refused_protocol:
            return False
        self.v5 = False
        return True


# ---- clients ----------------------------------------------------------------------


def new_client(
    settings: BrokerSettings,
    *,
    identifier: str | None = None,
    v5: bool = False,
    will: aiomqtt.Will | None = None,
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
    max_inflight: int = 20,
    timeout: float = 10,
    logger: logging.Logger | None = None,
) -> aiomqtt.Client:
    """Return a fresh, unconnected client (one per connection: none reconnects).

    Every incoming message is kept (no silent drop when a retained burst of a
    whole microgrid arrives), and TCP_NODELAY is on (without it, Nagle holds
    publishes back while acknowledgements are pending).

    Args:
        settings: The broker.
        identifier: The MQTT client id (None: a random one).
        v5: Speak MQTT v5 (else 3.1.1 with a clean session).
        will: The message the broker publishes when the connection dies.
        queue_type: The queue of received messages (see `handing_queue`, `ReceivedQueue`).
        max_inflight: The most QoS 1 publishes awaiting their acknowledgement; 0 for no
            limit in the client, for a caller that keeps its own window (paho then skips
            its scan of every message in flight at each acknowledgement).
        timeout: Seconds for connecting and for each call that waits for the broker.
        logger: Where the client library logs (None: nowhere).

    Returns:
        The client.

    Raises:
        BrokerUrlError: A TLS file cannot be used.
    """
    web = settings.websocket_path is not None
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        will=will,
        clean_session=None if v5 else True,
        keepalive=settings.keepalive,
        timeout=timeout,
        tls_context=settings.ssl_context(),
        transport="websockets" if web else "tcp",
        websocket_path=settings.websocket_path,
        max_inflight_messages=max_inflight,
        max_queued_incoming_messages=0,
        queue_type=queue_type,
        logger=logger,
    )
    # aiomqtt warns about, and scans, its pending calls beyond this many.
    client.pending_calls_threshold = max_inflight * 4 + 16
    read_in_bulk(client)
    fail_connect_when_closed(client)
    return client


async def subscribe_no_local(client: aiomqtt.Client, filters: list[str], qos: int) -> None:
    """Subscribe with MQTT v5's no-local option: the client's own publishes do not come back.

    Args:
        client: A connected MQTT v5 client.
        filters: The topic filters.
        qos: Their QoS.
    """
    options = SubscribeOptions(qos=qos, noLocal=True)
    await client.subscribe([(topic, options) for topic in filters])


def receiving_client(
    settings: BrokerSettings,
    *,
    clock: Callable[[], datetime] | None = None,
    identifier: str | None = None,
    will: aiomqtt.Will | None = None,
) -> tuple[aiomqtt.Client, ReceivedQueue]:
    """Return a fresh MQTT 3.1.1 client whose received messages are stamped on arrival.

    Args:
        settings: The broker.
        clock: The wall clock that stamps each message (None: the system clock, UTC).
        identifier: The MQTT client id (None: a random one).
        will: The message the broker publishes when the connection dies.

    Returns:
        The unconnected client, and its queue of received messages, so that a
        burst of retained messages can be taken in one go instead of one task
        wake-up per message.
    """
    queues: list[ReceivedQueue] = []
    stamp = clock or utc_now

    class _Queue(ReceivedQueue):
        def __init__(self, maxsize: int = 0) -> None:
            super().__init__(maxsize, clock=stamp)
            queues.append(self)

    client = new_client(settings, identifier=identifier, will=will, queue_type=_Queue)
    return client, queues[0]
