"""The wire contract between the bridge and its subscribers: topics and payloads.

Everything that crosses the broker is defined here, and only here: the topic
layout, the encoding of dispatch types into one topic level, the payload
structs and their JSON codecs, and the conversion to
`frequenz-client-dispatch`'s `Dispatch` (the other way is the bridge's:
`bridge.convert`). The bridge imports this module; it
imports nothing else of this project, so both sides can never disagree.

Schema evolution rules:

* A new field always gets a default, so that messages of older bridges decode.
* Readers never forbid unknown fields, so that messages of newer bridges decode.
* A field is never renamed, and its meaning never changes.

Times are RFC 3339 in UTC with a `Z` suffix, durations are whole seconds, and
field names follow `frequenz-client-dispatch`'s attribute names.

Its rooms: `_base` (limits, `WireError`), `_messages` (payload structs), `_codec`
(JSON), `_topics` (type names and the topic layout), `_client` (to the client
library's `Dispatch`), `_actors` (actor execution status), `_requests` (requests to
the bridge and its answers). Import from `actor_sdk.wire`, never from a room.
"""

from __future__ import annotations

from actor_sdk.wire._actors import (
    ACTOR_ID_CHARACTERS,
    ACTOR_STATUS_TOPIC,
    ActorState,
    ActorStatus,
    ActorTypeState,
    ActorTypeStatus,
    actor_id_of,
    actor_status_filter,
    actor_status_topic,
    check_actor_id,
    decode_actor_status,
    encode_actor_status,
)
from actor_sdk.wire._base import DEFAULT_TOPIC_ROOT, MAX_PAYLOAD_BYTES, UtcTime, WireError, _Wire
from actor_sdk.wire._client import to_client
from actor_sdk.wire._codec import (
    decode_dispatch,
    decode_event,
    decode_running,
    decode_status,
    decode_upcoming,
    encode,
    encode_payload,
    payload_of,
)
from actor_sdk.wire._messages import (
    STATUS_CONTRACT,
    BridgeStatus,
    Dispatch,
    DispatchEvent,
    EndCriteria,
    Recurrence,
    RunningSnapshot,
    Target,
    TargetCategory,
    TypeDigest,
    TypeTally,
    UpcomingRun,
    UpcomingRuns,
)
from actor_sdk.wire._requests import (
    MAX_REQUEST_BYTES,
    REQUEST_ACTIONS,
    Hold,
    Holds,
    Request,
    RequestAnswer,
    RequestError,
    decode_answer,
    decode_request,
)
from actor_sdk.wire._topics import TopicKind, TopicLayout, TopicRef, decode_type, encode_type

__all__ = [
    "ACTOR_ID_CHARACTERS",
    "ACTOR_STATUS_TOPIC",
    "DEFAULT_TOPIC_ROOT",
    "MAX_PAYLOAD_BYTES",
    "MAX_REQUEST_BYTES",
    "REQUEST_ACTIONS",
    "STATUS_CONTRACT",
    "ActorState",
    "ActorStatus",
    "ActorTypeState",
    "ActorTypeStatus",
    "BridgeStatus",
    "Dispatch",
    "DispatchEvent",
    "EndCriteria",
    "Hold",
    "Holds",
    "Recurrence",
    "Request",
    "RequestAnswer",
    "RequestError",
    "RunningSnapshot",
    "Target",
    "TargetCategory",
    "TopicKind",
    "TopicLayout",
    "TopicRef",
    "TypeDigest",
    "TypeTally",
    "UpcomingRun",
    "UpcomingRuns",
    "UtcTime",
    "WireError",
    "_Wire",
    "actor_id_of",
    "actor_status_filter",
    "actor_status_topic",
    "check_actor_id",
    "decode_actor_status",
    "decode_answer",
    "decode_dispatch",
    "decode_event",
    "decode_request",
    "decode_running",
    "decode_status",
    "decode_type",
    "decode_upcoming",
    "encode",
    "encode_actor_status",
    "encode_payload",
    "encode_type",
    "payload_of",
    "to_client",
]
