"""Encoding payloads to JSON and decoding them, raising only `WireError`."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from actor_sdk.wire._base import MAX_PAYLOAD_BYTES, WireError, _Wire
from actor_sdk.wire._messages import (
    BridgeStatus,
    Dispatch,
    DispatchEvent,
    RunningSnapshot,
    UpcomingRuns,
)

_encoder = msgspec.json.Encoder()

_sorted_encoder = msgspec.json.Encoder(order="sorted")

_T = TypeVar("_T")


def encode(message: _Wire) -> bytes:
    """Encode a payload struct as compact UTF-8 JSON.

    Args:
        message: The struct to encode.

    Returns:
        The JSON bytes.
    """
    return _encoder.encode(message)


def _decoder(kind: type[_T]) -> msgspec.json.Decoder[_T]:
    return msgspec.json.Decoder(kind)


_decode_dispatch = _decoder(Dispatch)

_decode_running = _decoder(RunningSnapshot)

_decode_event = _decoder(DispatchEvent)

_decode_status = _decoder(BridgeStatus)

_decode_upcoming = _decoder(UpcomingRuns)


def _decode(decoder: msgspec.json.Decoder[_T], what: str, data: bytes | bytearray) -> _T:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise WireError(f"{what} payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES} bytes")
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a JSON string.
        raise WireError(f"invalid {what} payload: {error}") from None


def decode_dispatch(data: bytes | bytearray) -> Dispatch:
    """Decode a `/dispatches/ID` payload.

    Args:
        data: The raw payload.

    Returns:
        The dispatch.

    Raises:
        WireError: The payload is not a valid dispatch.
    """
    return _decode(_decode_dispatch, "dispatch", data)


def decode_running(data: bytes | bytearray) -> RunningSnapshot:
    """Decode a `/running` payload.

    Args:
        data: The raw payload.

    Returns:
        The running snapshot.

    Raises:
        WireError: The payload is not a valid running snapshot.
    """
    return _decode(_decode_running, "running snapshot", data)


def decode_event(data: bytes | bytearray) -> DispatchEvent:
    """Decode an `/events` payload.

    Args:
        data: The raw payload.

    Returns:
        The lifecycle event.

    Raises:
        WireError: The payload is not a valid lifecycle event.
    """
    return _decode(_decode_event, "event", data)


def decode_status(data: bytes | bytearray) -> BridgeStatus:
    """Decode a `/status` payload.

    Args:
        data: The raw payload.

    Returns:
        The bridge status.

    Raises:
        WireError: The payload is not a valid status.
    """
    return _decode(_decode_status, "status", data)


def decode_upcoming(data: bytes | bytearray) -> UpcomingRuns:
    """Decode an `/upcoming` payload.

    Args:
        data: The raw payload.

    Returns:
        The upcoming runs.

    Raises:
        WireError: The payload is not a valid list of upcoming runs.
    """
    return _decode(_decode_upcoming, "upcoming runs", data)


_decode_payload = msgspec.json.Decoder(dict[str, Any])


def encode_payload(dispatch: Dispatch) -> Dispatch:
    """Return the dispatch with its payload held encoded, as the bridge holds its dispatches.

    The payload becomes a `msgspec.Raw` of its JSON with the keys of every object
    sorted: one bytes object instead of a dict, its key table and a number object per
    value (two numbers: 256 B -> 112-128 B), and one form for equal payloads, so two
    versions of a dispatch compare equal exactly when their payloads do (the API's
    payload keys come in no fixed order). `encode` writes the bytes as they are.

    Args:
        dispatch: A dispatch, its payload decoded or already encoded.

    Returns:
        The dispatch with its payload encoded (the same struct if it already was).
    """
    if isinstance(dispatch.payload, msgspec.Raw):
        return dispatch
    # Through a bytearray, for a bytes object of the exact size: `encode` returns
    # one with the room of its buffer (a 60-byte payload took a 112-byte block).
    buffer = bytearray()
    _sorted_encoder.encode_into(dispatch.payload, buffer)
    return msgspec.structs.replace(dispatch, payload=msgspec.Raw(bytes(buffer)))


def payload_of(dispatch: Dispatch) -> dict[str, Any]:
    """Return the payload of a dispatch as a dict, whether decoded or held encoded.

    Args:
        dispatch: The dispatch.

    Returns:
        Its payload (the struct's own dict when it holds one).
    """
    payload = dispatch.payload
    if isinstance(payload, msgspec.Raw):
        return _decode_payload.decode(payload)
    return payload
