"""Requests to the bridge and its answers (the contract's "Requests and responses")."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from actor_sdk.wire._base import UtcTime, WireError, _Wire
from actor_sdk.wire._codec import _decode, _decoder

REQUEST_ACTIONS = ("resync", "hold", "release")
"""The requests a bridge answers, each on `ROOT/request/<action>`, answered on
`ROOT/response/<action>`. None of them is a kind of type topic (`running`,
`dispatches`, `events`, `upcoming`), so a type called `request` or `response`
never meets them."""

MAX_REQUEST_BYTES = 64 * 1024
"""The largest request payload a bridge reads; larger ones are answered with an error."""


class Request(_Wire, frozen=True, kw_only=True):
    """A request to the bridge: `transaction` is echoed in the answer, whatever it is.

    `type` names the dispatch type to hold or release (None: every type);
    `reason` says why, and is shown in the held type's running snapshot.
    """

    transaction: Any = None
    type: str | None = None
    reason: str | None = None


class Hold(_Wire, frozen=True, kw_only=True):
    """One hold: since when, and why."""

    since: UtcTime
    reason: str


class Holds(_Wire, frozen=True, kw_only=True):
    """Every hold of one microgrid: of every type (`all_types`), and of named types."""

    all_types: Hold | None = None
    types: dict[str, Hold] = msgspec.field(default_factory=dict)


class RequestAnswer(_Wire, frozen=True, kw_only=True):
    """The bridge's answer to one request, sent on `ROOT/response/<request>`.

    `transaction` is the request's (null when the request could not be read);
    `error` is null exactly when `status` is `ok`. A resync answer says how many
    dispatches the bridge holds and when it last listed them; a hold or release
    answer gives every hold in force after it.
    """

    status: Literal["ok", "error"]
    transaction: Any
    error: str | None
    request: str
    microgrid_id: int
    as_of: UtcTime
    dispatches: int | None = None
    synced_at: UtcTime | None = None
    holds: Holds | None = None


class RequestError(WireError):
    """A request that cannot be carried out as sent; `transaction` is what it carried."""

    def __init__(self, message: str, transaction: Any = None) -> None:
        """Create the error.

        Args:
            message: What is wrong with the request.
            transaction: The request's transaction, when it could be read.
        """
        super().__init__(message)
        self.transaction = transaction


_decode_any = msgspec.json.Decoder()

_decode_answer = _decoder(RequestAnswer)


def decode_request(data: bytes | bytearray) -> Request:
    """Decode a request payload: a JSON object, e.g. `{"transaction": "abc"}`.

    Args:
        data: The raw payload.

    Returns:
        The request.

    Raises:
        RequestError: The payload is not a request; carries the transaction when
            the payload was an object with one.
    """
    if len(data) > MAX_REQUEST_BYTES:
        raise RequestError(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES} bytes")
    try:
        raw = _decode_any.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
        raise RequestError(f"the request is not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise RequestError(
            f'the request must be a JSON object such as {{"transaction": 1}}, '
            f"not {type(raw).__name__}"
        )
    transaction = raw.get("transaction")
    try:
        return msgspec.convert(raw, Request)
    except msgspec.ValidationError as error:
        raise RequestError(f"invalid request: {error}", transaction) from None


def decode_answer(data: bytes | bytearray) -> RequestAnswer:
    """Decode an answer of the bridge (`ROOT/response/<request>`).

    Args:
        data: The raw payload.

    Returns:
        The answer.

    Raises:
        WireError: The payload is not a valid answer.
    """
    return _decode(_decode_answer, "request answer", data)
