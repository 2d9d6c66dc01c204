"""How the bridge reaches its MQTT broker: settings, URL parsing, reconnect backoff, errors.

`aiomqtt.MqttError` is translated into `BrokerError` where it crosses into the
bridge (`broker_errors()`), so the connection loop handles one kind of error.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import aiomqtt

__all__ = [
    "Backoff",
    "BrokerError",
    "BrokerSettings",
    "broker_errors",
    "describe_error",
    "parse_broker_url",
]


class BrokerError(Exception):
    """The broker could not be reached, refused the connection, or the connection broke.

    The publisher's own error: `aiomqtt.MqttError` is translated into it where
    it crosses in, and the connection loop turns it into a reconnect.
    """

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
    """Translate `aiomqtt.MqttError` into `BrokerError`."""
    try:
        yield
    except aiomqtt.MqttError as error:
        raise BrokerError(
            describe_error(error), refused_protocol=_refused_protocol(error)
        ) from error


def _refused_protocol(error: aiomqtt.MqttError) -> bool:
    if isinstance(error, aiomqtt.MqttCodeError):
        code = error.rc if isinstance(error.rc, int) else getattr(error.rc, "value", None)
        # 1: 3.1.1 "unacceptable protocol version"; 132: v5 "unsupported protocol version".
        return code in (1, 132)
    return False


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the broker; the password never appears in `repr` or logs."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    keepalive: int = 15

    def describe(self) -> str:
        """Describe the broker for logs, without the password.

        Returns:
            E.g. `mqtt://bridge@127.0.0.1:1883`.
        """
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerSettings:
    """Parse `mqtt://user:pass@host:port` or `mqtts://...` into settings.

    Args:
        url: The URL.

    Returns:
        The settings (default port 1883, or 8883 for `mqtts`).

    Raises:
        ValueError: The URL is not an MQTT URL; the message never holds the password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(
            "not a valid URL (expected mqtt://[user[:password]@]host[:port])"
        ) from None
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(
            f"unknown scheme {parts.scheme!r} (expected mqtt://host:port or mqtts://host:port)"
        )
    if not parts.hostname:
        raise ValueError("no host (expected mqtt://[user[:password]@]host[:port])")
    if parts.path not in ("", "/"):
        raise ValueError("an MQTT URL takes no path")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerSettings(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
    )


class Backoff:
    """Capped exponential backoff with jitter: each delay in [d/2, d], d doubling to `cap`."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        """Create the backoff.

        Args:
            initial: The first delay's upper bound, in seconds.
            cap: The largest delay's upper bound, in seconds.
        """
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        """Return the next delay in seconds, and grow the bound.

        Returns:
            The delay.
        """
        bound = min(self.cap, self.initial * float(2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return float(bound / 2 + random.random() * bound / 2)

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self.attempt = 0


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
