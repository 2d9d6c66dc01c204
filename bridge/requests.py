"""Requests to the bridge, without I/O: reading them, the holds, and the answers.

An operator (the `operator` user of the shipped ACL) publishes a request on
`ROOT/request/<action>` and the bridge answers on `ROOT/response/<action>`
(contract: "Requests and responses"):

* `resync`: list the Dispatch API again and republish every topic held;
* `hold`: publish a type (or every type) as not running, until released;
* `release`: end a hold of one type, or every hold.

`parse_request` turns a payload into a `Parsed` request or the error answer
to send; `HoldBook` holds the holds of one microgrid and knows which types a
change touches; `answer` makes every answer. The async shell, which reads
the clock, writes the hold file and talks to the service and the broker, is
`bridge.request_handler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from actor_sdk import wire

__all__ = [
    "DEFAULT_REASON",
    "HOLD_FILE_VERSION",
    "OTHER_REASON",
    "HoldBook",
    "Parsed",
    "answer",
    "decode_hold_file",
    "encode_hold_file",
    "parse_request",
]

DEFAULT_REASON = "held by a local request"
"""The reason a hold carries when its request gave none."""

OTHER_REASON = "by a local request"
"""The reason of a release or resync that gave none (for the log and the journal)."""

MAX_REASON_CHARS = 500
"""The longest reason a hold request may give (it goes into every snapshot of the type)."""

HOLD_FILE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Parsed:
    """A request that can be carried out."""

    action: str
    transaction: Any
    dispatch_type: str | None
    """The type to hold or release; None: every type (always None for a resync)."""
    reason: str


def parse_request(action: str, payload: bytes) -> Parsed | tuple[str, Any]:
    """Read the payload of a request.

    Args:
        action: The request, from its topic: `resync`, `hold` or `release`.
        payload: The payload as it arrived.

    Returns:
        The request, or `(error, transaction)`: what is wrong with it, and its
        transaction when one could be read (else None).
    """
    try:
        request = wire.decode_request(payload)
    except wire.RequestError as error:
        return str(error), error.transaction
    transaction = request.transaction
    dispatch_type = request.type
    if action == "resync":
        if dispatch_type is not None:
            return 'a resync is always of every type: leave out "type"', transaction
    elif dispatch_type is not None:
        try:
            wire.encode_type(dispatch_type)
        except wire.WireError as error:
            return f'invalid "type": {error}', transaction
    default = DEFAULT_REASON if action == "hold" else OTHER_REASON
    reason = default if request.reason is None else request.reason.strip()
    if not reason:
        return '"reason" is empty: leave it out, or say why', transaction
    if len(reason) > MAX_REASON_CHARS:
        return f'"reason" is longer than {MAX_REASON_CHARS} characters', transaction
    return Parsed(action, transaction, dispatch_type, reason)


class HoldBook:
    """The holds of one microgrid: of every type, and of named types."""

    def __init__(self, holds: wire.Holds | None = None) -> None:
        """Start with these holds (e.g. from the hold file), or none.

        Args:
            holds: The holds.
        """
        holds = holds or wire.Holds()
        self._all = holds.all_types
        self._types = dict(holds.types)

    def of(self, dispatch_type: str) -> wire.Hold | None:
        """The hold a type is under, if any (a hold of every type first).

        Args:
            dispatch_type: The type.

        Returns:
            The hold, or None when the type runs as scheduled.
        """
        if self._all is not None:
            return self._all
        return self._types.get(dispatch_type)

    def __bool__(self) -> bool:
        return self._all is not None or bool(self._types)

    def snapshot(self) -> wire.Holds:
        """Every hold, as the answers and the hold file carry them.

        Returns:
            The holds.
        """
        return wire.Holds(all_types=self._all, types=dict(sorted(self._types.items())))

    def hold(self, dispatch_type: str | None, reason: str, now: datetime) -> None:
        """Hold a type, or every type; holding again keeps `since` and takes the new reason.

        Args:
            dispatch_type: The type; None: every type.
            reason: Why.
            now: The current instant.
        """
        held = self._all if dispatch_type is None else self._types.get(dispatch_type)
        hold = wire.Hold(since=now if held is None else held.since, reason=reason)
        if dispatch_type is None:
            self._all = hold
        else:
            self._types[dispatch_type] = hold

    def release(self, dispatch_type: str | None) -> str | None:
        """End the hold of a type, or every hold.

        Args:
            dispatch_type: The type; None: every hold (of every type and of each).

        Returns:
            None, or why the type still does not run (a hold of every type stays
            in force when one type is released).
        """
        if dispatch_type is None:
            self._all = None
            self._types.clear()
            return None
        self._types.pop(dispatch_type, None)
        if self._all is not None:
            return (
                f"type {dispatch_type!r} stays held: every type is held (since "
                f"{self._all.since.isoformat()}); a release without a type ends every hold"
            )
        return None


class _HoldFile(msgspec.Struct, frozen=True, kw_only=True):
    """What `holds.json` in the microgrid's state directory holds."""

    version: int
    microgrid_id: int
    holds: wire.Holds


def encode_hold_file(microgrid_id: int, book: HoldBook) -> bytes:
    """The content of the hold file.

    Args:
        microgrid_id: The microgrid.
        book: Its holds.

    Returns:
        The file's bytes (JSON).
    """
    content = _HoldFile(version=HOLD_FILE_VERSION, microgrid_id=microgrid_id, holds=book.snapshot())
    return msgspec.json.encode(content)


_decode_hold_file = msgspec.json.Decoder(_HoldFile)


def decode_hold_file(microgrid_id: int, data: bytes) -> wire.Holds:
    """Read the hold file.

    Args:
        microgrid_id: The microgrid the file must be of.
        data: The file's bytes.

    Returns:
        The holds.

    Raises:
        ValueError: The file is not a hold file of this microgrid in this format.
    """
    try:
        content = _decode_hold_file.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not a hold file: {error}") from None
    if content.version != HOLD_FILE_VERSION or content.microgrid_id != microgrid_id:
        raise ValueError(
            f"format {content.version} of microgrid {content.microgrid_id}, expected format "
            f"{HOLD_FILE_VERSION} of microgrid {microgrid_id}"
        )
    return content.holds


def answer(
    action: str,
    transaction: Any,
    error: str | None,
    *,
    microgrid_id: int,
    now: datetime,
    dispatches: int | None = None,
    synced_at: datetime | None = None,
    holds: HoldBook | None = None,
) -> bytes:
    """Make the payload of an answer.

    Args:
        action: The request answered.
        transaction: The request's transaction (None when unreadable).
        error: What went wrong, or None for `ok`.
        microgrid_id: The microgrid.
        now: The current instant.
        dispatches: For a resync: how many dispatches the bridge holds.
        synced_at: For a resync: when it last listed them.
        holds: For a hold or release: the holds in force after it.

    Returns:
        The payload.
    """
    status: Literal["ok", "error"] = "ok" if error is None else "error"
    return wire.encode(
        wire.RequestAnswer(
            status=status,
            transaction=transaction,
            error=error,
            request=action,
            microgrid_id=microgrid_id,
            as_of=now,
            dispatches=dispatches,
            synced_at=synced_at,
            holds=None if holds is None else holds.snapshot(),
        )
    )
