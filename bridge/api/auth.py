"""Authentication of Dispatch API requests: the API key and the HMAC signature.

The checks mirror what `frequenz-client-base` sends, byte for byte:

* `key`: the API key, compared in constant time with the configured one.
* With a signing secret: `ts` (unix seconds, decimal), `nonce` (url-safe
  base64 of 16 random bytes, as sent, padding included) and `sig`, the url-safe
  base64 (padding stripped) of HMAC-SHA256(secret, key + ts + nonce + method),
  where method is the last segment of the gRPC path (`ListMicrogridDispatches`).
  The request body is not signed.

A timestamp further than `window` from the server clock is stale; a nonce is
remembered until its timestamp leaves the window, so replaying a signed request
within the window fails, and a replay after it fails as stale. The nonce memory
is bounded: when full, new signed requests are refused (not remembered less),
which only a client holding the secret can cause.

No I/O and no clock of its own: the caller passes `now`.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["AuthConfig", "AuthError", "Authenticator", "sign"]

DEFAULT_WINDOW_S = 60.0
"""How far a request's `ts` may be from the server clock, either way."""

DEFAULT_MAX_NONCES = 100_000
"""How many nonces the server remembers at most within one window."""


class AuthError(Exception):
    """A request is not authenticated; the message says why, never the secret."""

    def __init__(self, message: str, *, overloaded: bool = False) -> None:
        """Create the error.

        Args:
            message: What is wrong and what to do about it.
            overloaded: The request may be fine, but the nonce memory is full.
        """
        super().__init__(message)
        self.overloaded = overloaded


@dataclass(frozen=True)
class AuthConfig:
    """The credentials the server accepts.

    `key=None` disables authentication entirely (only with the explicit
    `--insecure-no-auth` of the CLI). `sign_secret=None` accepts requests with
    the right key and no signature; signature metadata, if sent, is ignored.
    """

    key: str | None
    sign_secret: str | None = None
    window_s: float = DEFAULT_WINDOW_S
    max_nonces: int = DEFAULT_MAX_NONCES

    def __repr__(self) -> str:
        """Describe the configuration without revealing any secret.

        Returns:
            A description such as `AuthConfig(key=<set>, sign_secret=<set>)`.
        """
        key = "<set>" if self.key is not None else None
        secret = "<set>" if self.sign_secret is not None else None
        return f"AuthConfig(key={key}, sign_secret={secret}, window_s={self.window_s})"

    def describe(self) -> str:
        """Say what the server requires, for its startup log line.

        Returns:
            A short phrase, e.g. "API key and signature".
        """
        if self.key is None:
            return "NO authentication (insecure)"
        if self.sign_secret is None:
            return "API key"
        return f"API key and HMAC signature (window ±{self.window_s:g} s)"


def sign(secret: str, key: str, ts: str, nonce: str, method: str) -> str:
    """Compute the `sig` metadata value the way the Frequenz client does.

    Args:
        secret: The shared signing secret.
        key: The API key sent in `key`.
        ts: The `ts` metadata value (unix seconds, decimal).
        nonce: The `nonce` metadata value, exactly as sent.
        method: The last segment of the gRPC method path.

    Returns:
        The url-safe base64 of the HMAC-SHA256, without padding.
    """
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    for part in (key, ts, nonce, method):
        mac.update(part.encode())
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


@dataclass
class Authenticator:
    """Checks the metadata of each request against an `AuthConfig`."""

    config: AuthConfig
    _nonces: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _expiry: list[tuple[float, str]] = field(default_factory=list, init=False, repr=False)

    def check(self, metadata: Iterable[tuple[str, str | bytes]], method: str, now: float) -> None:
        """Accept a request or say why not.

        Args:
            metadata: The request's invocation metadata.
            method: The last segment of the gRPC method path.
            now: The server clock, unix seconds.

        Raises:
            AuthError: Missing or wrong credentials, stale timestamp, replayed
                nonce; or the nonce memory is full (`overloaded`).
        """
        config = self.config
        if config.key is None:
            return
        values: dict[str, str] = {}
        for name, value in metadata:
            if name in ("key", "ts", "nonce", "sig"):
                values[name] = value.decode("latin-1") if isinstance(value, bytes) else value
        key = values.get("key")
        if key is None:
            raise AuthError(
                "missing API key: send it as `key` metadata "
                "(dispatch-cli: --auth-key or DISPATCH_API_AUTH_KEY)"
            )
        if not hmac.compare_digest(key.encode(), config.key.encode()):
            raise AuthError("unknown API key: check the key configured for this server")
        if config.sign_secret is None:
            return
        missing = [name for name in ("ts", "nonce", "sig") if not values.get(name)]
        if missing:
            raise AuthError(
                f"missing signature metadata ({', '.join(missing)}): this server requires "
                "signed requests (dispatch-cli: --sign-secret or DISPATCH_API_SIGN_SECRET)"
            )
        ts_text, nonce, sig = values["ts"], values["nonce"], values["sig"]
        expected = sign(config.sign_secret, key, ts_text, nonce, method)
        if not hmac.compare_digest(sig.rstrip("=").encode(), expected.encode()):
            raise AuthError(
                "invalid signature: the signing secret does not match this server's "
                "(or the key, ts, nonce or method were altered)"
            )
        try:
            ts = int(ts_text)
        except ValueError:
            raise AuthError("invalid `ts` metadata: expected unix seconds") from None
        if abs(now - ts) > config.window_s:
            raise AuthError(
                f"stale timestamp: request ts is {now - ts:+.0f} s from the server clock, "
                f"allowed ±{config.window_s:g} s; check the clocks of client and server"
            )
        self._forget_expired(now)
        if nonce in self._nonces:
            raise AuthError("replayed request: this nonce was already used")
        if len(self._nonces) >= config.max_nonces:
            raise AuthError(
                "too many signed requests within the replay window; retry shortly",
                overloaded=True,
            )
        # The nonce must be remembered while its ts is still acceptable.
        expires = ts + config.window_s
        self._nonces[nonce] = expires
        heapq.heappush(self._expiry, (expires, nonce))

    @property
    def remembered_nonces(self) -> int:
        """How many nonces are remembered now."""
        return len(self._nonces)

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, nonce = heapq.heappop(self._expiry)
            self._nonces.pop(nonce, None)
