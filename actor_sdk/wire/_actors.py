"""Actor execution status: `microgrid/<id>/actors/<actor_id>`, one topic per SDK connection.

Retained, outside the dispatch topic root (beside `dispatch`), so no type name can
collide with it. Written by the SDK (its will says `offline`), read by `watch` and
field engineers.
"""

from __future__ import annotations

import string
from typing import Literal

from actor_sdk.wire._base import UtcTime, WireError, _Wire
from actor_sdk.wire._codec import _decode, _decoder, encode

ACTOR_STATUS_TOPIC = "microgrid/{microgrid_id}/actors/{actor_id}"
"""The topic of one actor host's execution status."""

ACTOR_ID_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_-")
"""What an actor id (also the MQTT client id) is made of."""

ActorState = Literal["running", "idle", "failed", "offline"]
"""Overall: `failed` over `running` over `idle`; `offline` is the will or a clean stop."""

ActorTypeState = Literal["running", "idle", "failed"]
"""What one managed type does on an actor host."""


class ActorTypeStatus(_Wire, frozen=True, kw_only=True):
    """What one managed type runs on an actor host.

    `running`: an actor of the type runs; `failed`: a start failed and is retried
    while its dispatch runs; `idle`: nothing of the type runs.
    """

    state: ActorTypeState
    dispatches: tuple[int, ...]
    """The ids of the dispatches an actor of the type runs now, sorted."""


class ActorStatus(_Wire, frozen=True, kw_only=True):
    """The execution status of one actor host (one SDK connection)."""

    state: ActorState
    types: dict[str, ActorTypeStatus]
    """Per managed dispatch type (the type's name, not its topic level)."""
    since: UtcTime
    """When `state` began (in the will: when the connection that left it was made)."""
    as_of: UtcTime
    """When this message was made (in the will: when that connection was made)."""
    host: str
    """The host name the SDK runs on."""
    error: str | None
    """The latest failure while `state` is `failed`, otherwise null."""
    version: str
    """The SDK's version."""


def check_actor_id(actor_id: str) -> str:
    """Return an actor id unchanged if it is usable as an MQTT client id and topic level.

    Args:
        actor_id: The id.

    Returns:
        The same id.

    Raises:
        WireError: It is empty, longer than 128 characters, or has a character
            outside `[A-Za-z0-9_-]`.
    """
    if not actor_id or len(actor_id) > 128 or not ACTOR_ID_CHARACTERS.issuperset(actor_id):
        raise WireError(
            f"invalid actor id {actor_id[:64]!r}: use 1 to 128 characters of [A-Za-z0-9_-]"
        )
    return actor_id


def actor_status_topic(microgrid_id: int, actor_id: str) -> str:
    """Return the status topic of one actor host.

    Args:
        microgrid_id: The microgrid.
        actor_id: The actor id (checked with `check_actor_id`).

    Returns:
        `microgrid/<microgrid_id>/actors/<actor_id>`.

    Raises:
        WireError: The actor id is not valid.
    """
    return ACTOR_STATUS_TOPIC.format(microgrid_id=microgrid_id, actor_id=check_actor_id(actor_id))


def actor_status_filter(microgrid_id: int | None = None) -> str:
    """Return the subscription filter of every actor status of a microgrid (or of all).

    Args:
        microgrid_id: The microgrid; None for every microgrid.

    Returns:
        `microgrid/<microgrid_id>/actors/+` (`+` for the microgrid when None).
    """
    return ACTOR_STATUS_TOPIC.format(
        microgrid_id="+" if microgrid_id is None else microgrid_id, actor_id="+"
    )


def actor_id_of(topic: str) -> tuple[int, str]:
    """Parse an actor status topic.

    Args:
        topic: `microgrid/<microgrid_id>/actors/<actor_id>`.

    Returns:
        The microgrid id and the actor id.

    Raises:
        WireError: The topic is not an actor status topic.
    """
    levels = topic.split("/")
    if (
        len(levels) != 4
        or levels[0] != "microgrid"
        or levels[2] != "actors"
        or not levels[1].isascii()
        or not levels[1].isdigit()
    ):
        raise WireError(f"not an actor status topic: {topic[:128]!r}")
    return int(levels[1]), check_actor_id(levels[3])


_decode_actor_status = _decoder(ActorStatus)


def decode_actor_status(data: bytes | bytearray) -> ActorStatus:
    """Decode an `actors/<actor_id>` payload.

    Args:
        data: The raw payload.

    Returns:
        The actor status.

    Raises:
        WireError: The payload is not a valid actor status (an empty payload, the
            cleared topic, is not one either).
    """
    return _decode(_decode_actor_status, "actor status", data)


def encode_actor_status(status: ActorStatus) -> bytes:
    """Encode an actor status (the same as `encode`, named for symmetry).

    Args:
        status: The status.

    Returns:
        The JSON bytes.
    """
    return encode(status)
