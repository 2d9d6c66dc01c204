"""The wire contract between the bridge and its subscribers: topics and payloads.

Everything that crosses the broker is defined here, and only here: the topic
layout, the encoding of dispatch types into one topic level, the payload
structs and their JSON codecs, and the conversion from and to
`frequenz-client-dispatch`'s `Dispatch`. The bridge imports this module; it
imports nothing else of this project, so both sides can never disagree.

Schema evolution rules:

* A new field always gets a default, so that messages of older bridges decode.
* Readers never forbid unknown fields, so that messages of newer bridges decode.
* A field is never renamed, and its meaning never changes.

Times are RFC 3339 in UTC with a `Z` suffix, durations are whole seconds, and
field names follow `frequenz-client-dispatch`'s attribute names.
"""

from __future__ import annotations

import hashlib
import math
import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from frequenz.api.dispatch.v1 import dispatch_pb2
from frequenz.client.common.microgrid.electrical_components import (
    ElectricalComponentCategory,
)
from frequenz.client.dispatch import recurrence as client_recurrence
from frequenz.client.dispatch import types as client_types

__all__ = [
    "ACTOR_STATUS_TOPIC",
    "MAX_PAYLOAD_BYTES",
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
    "TypeTally",
    "UpcomingRun",
    "UpcomingRuns",
    "WireError",
    "decode_answer",
    "actor_id_of",
    "actor_status_filter",
    "actor_status_topic",
    "check_actor_id",
    "decode_actor_status",
    "decode_dispatch",
    "decode_event",
    "decode_request",
    "decode_running",
    "decode_status",
    "decode_type",
    "decode_upcoming",
    "encode",
    "encode_actor_status",
    "encode_type",
    "from_client",
    "from_protobuf",
    "to_client",
]

MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""The largest payload a decoder accepts; larger ones are refused unread."""

DEFAULT_TOPIC_ROOT = "microgrid/{microgrid_id}/dispatch"
"""The topic root of one microgrid; `{microgrid_id}` is replaced by its id."""


class WireError(ValueError):
    """A topic or payload that does not follow this contract.

    The only error the decoders and topic parsers raise: the message says what
    was wrong, never more than a short excerpt of the offending input.
    """


UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]
"""A timezone-aware instant; encoded as RFC 3339 with `Z` once in UTC."""


class _Wire(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Settings shared by every payload struct."""


# --- Dispatch ---------------------------------------------------------------

Frequency = Literal["UNSPECIFIED", "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"]
WeekdayName = Literal[
    "UNSPECIFIED", "MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"
]


class EndCriteria(_Wire, frozen=True, kw_only=True):
    """When a recurrence ends: after `count` occurrences, or at `until`."""

    count: int | None = None
    until: UtcTime | None = None


class Recurrence(_Wire, frozen=True, kw_only=True):
    """A recurrence rule (RFC 5545 subset); empty `by...` lists are omitted."""

    frequency: Frequency
    interval: int
    end: EndCriteria | None = None
    byminutes: tuple[int, ...] = ()
    byhours: tuple[int, ...] = ()
    byweekdays: tuple[WeekdayName, ...] = ()
    bymonthdays: tuple[int, ...] = ()
    bymonths: tuple[int, ...] = ()


class TargetCategory(_Wire, frozen=True, kw_only=True):
    """A component category, optionally narrowed to one type of it."""

    category: str
    type: str | None = None


class Target(_Wire, frozen=True, kw_only=True):
    """The components a dispatch targets: either `ids` or `categories`."""

    ids: tuple[int, ...] | None = None
    categories: tuple[TargetCategory, ...] | None = None


class Dispatch(_Wire, frozen=True, kw_only=True):
    """One dispatch, with its schedule state computed by the bridge.

    `running`, `until` and `next_run` are the state at the `as_of` instant of
    the message carrying it: `until` is the end of the current run (`None`
    when not running or endless), `next_run` the next start after that instant.
    """

    id: int
    type: str
    start_time: UtcTime
    duration: int | None
    target: Target
    active: bool
    dry_run: bool
    payload: dict[str, Any]
    recurrence: Recurrence | None = None
    create_time: UtcTime
    update_time: UtcTime
    end_time: UtcTime | None
    running: bool
    until: UtcTime | None
    next_run: UtcTime | None


class RunningSnapshot(_Wire, frozen=True, kw_only=True):
    """Every dispatch of one type that runs at `as_of`, sorted by id."""

    microgrid_id: int
    type: str
    running: tuple[Dispatch, ...]
    next_change: UtcTime | None
    as_of: UtcTime
    session: int
    seq: int
    dispatches: int | None = None
    """How many `dispatches/ID` topics of this type the bridge holds (None: older bridge)."""
    digest: str | None = None
    """`TypeTally.digest` of those topics' ids and update times (None: older bridge)."""
    held: bool = False
    """The site holds this type (`ROOT/request/hold`): nothing runs, whatever the schedule."""
    hold_reason: str | None = None
    """Why it is held, as the hold request said (set when `held`)."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TypeTally:
    """The `dispatches/ID` topics of one type: their count and an order-free digest.

    The digest is the XOR, over the topics, of the first 8 bytes (big-endian) of
    BLAKE2b of `"<id>/<update_time in whole microseconds since 1970>"`, written as
    16 lower-case hex digits: both ends keep it up to date in O(1) per topic, in
    whatever order the topics come.
    """

    __slots__ = ("_items", "_xor")

    def __init__(self) -> None:
        self._items: dict[int, int] = {}
        self._xor = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, dispatch_id: int, update_time: datetime) -> None:
        """Count the topic of a dispatch (replacing an earlier version of it)."""
        micros = (update_time - _EPOCH) // timedelta(microseconds=1)
        key = f"{dispatch_id}/{micros}".encode()
        item = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
        self._xor ^= self._items.get(dispatch_id, 0) ^ item
        self._items[dispatch_id] = item

    def remove(self, dispatch_id: int) -> None:
        """Stop counting the topic of a dispatch (cleared)."""
        self._xor ^= self._items.pop(dispatch_id, 0)

    @property
    def digest(self) -> str:
        """The digest as the running snapshot carries it."""
        return f"{self._xor:016x}"

    def matches(self, snapshot: RunningSnapshot) -> bool:
        """Whether these are the topics a snapshot counts (always, for an older bridge's)."""
        if snapshot.dispatches is None:
            return True
        return len(self._items) == snapshot.dispatches and self.digest == snapshot.digest


class DispatchEvent(_Wire, frozen=True, kw_only=True):
    """A lifecycle event of one dispatch, as the Dispatch API reported it."""

    event: Literal["created", "updated", "deleted"]
    dispatch: Dispatch
    as_of: UtcTime


STATUS_CONTRACT = 2
"""The contract version this bridge writes into its status (`BridgeStatus.contract`)."""


class BridgeStatus(_Wire, frozen=True, kw_only=True):
    """The bridge's status; the MQTT will carries the same `session`.

    `online` means the bridge vouches for the retained tree (it synced with the
    API in this run, or loaded a valid cache, and that knowledge is younger
    than its maximum age); `syncing` means connected but not vouching.
    """

    state: Literal["online", "syncing", "offline"]
    upstream: Literal["connected", "disconnected"]
    synced_at: UtcTime | None
    session: int
    bridge: str
    version: str
    dispatches: int
    as_of: UtcTime | None = None
    """When this status message was made."""
    status_interval: int = 0
    """The bridge republishes its status every this many seconds (0: unknown)."""
    knowledge_at: UtcTime | None = None
    """When the tree's knowledge was last confirmed (last listing, or the cache's)."""
    skipped: int = 0
    """Dispatches the bridge could not convert (kept the older version, or left out)."""
    refused: int = 0
    """Publishes the broker refused in this session."""
    error: str | None = None
    """The latest problem, in words a field engineer can act on."""
    contract: int = 1
    """The contract version; 1 for bridges older than this field."""
    tree_counts: bool = False
    """`dispatches` counts the dispatch topics held, each running snapshot its type's."""


class UpcomingRun(_Wire, frozen=True, kw_only=True):
    """One run of a dispatch: `end` is `None` for a run without end."""

    id: int
    start: UtcTime
    end: UtcTime | None


class UpcomingRuns(_Wire, frozen=True, kw_only=True):
    """The runs of one type that overlap `[as_of, until)`, sorted by start, then id.

    Complete up to `until` unless `truncated` is set (then the list was cut
    after its earliest runs). A run already going at `as_of` is listed with
    its real start.
    """

    microgrid_id: int
    type: str
    runs: tuple[UpcomingRun, ...]
    as_of: UtcTime
    until: UtcTime
    truncated: bool = False


# --- Codecs -----------------------------------------------------------------

_encoder = msgspec.json.Encoder()
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


# --- Topics -----------------------------------------------------------------

_KEPT_BYTES = frozenset((string.ascii_letters + string.digits + "_-").encode())
_HEX_DIGITS = frozenset(b"0123456789ABCDEF")


def encode_type(dispatch_type: str) -> str:
    """Encode a dispatch type as one topic level.

    Every UTF-8 byte outside `[A-Za-z0-9_-]` becomes `%XX` (upper-case hex),
    so no `/ + # .`, space or `$` ever reaches a topic.

    >>> encode_type("SET.POWER")
    'SET%2EPOWER'

    Args:
        dispatch_type: The dispatch type.

    Returns:
        The topic level.

    Raises:
        WireError: The type is empty, or holds a lone surrogate (not UTF-8).
    """
    if not dispatch_type:
        raise WireError("dispatch type must not be empty")
    try:
        # Strict: a lone surrogate would encode to a level that decodes to no string.
        raw = dispatch_type.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"dispatch type {dispatch_type[:64]!r} is not valid Unicode") from None
    return "".join(chr(byte) if byte in _KEPT_BYTES else f"%{byte:02X}" for byte in raw)


def decode_type(level: str) -> str:
    """Decode a topic level made by `encode_type` back into the dispatch type.

    Only the exact output of `encode_type` is accepted, so that every type has
    one topic level and every level one type.

    >>> decode_type("SET%2EPOWER")
    'SET.POWER'

    Args:
        level: The topic level.

    Returns:
        The dispatch type.

    Raises:
        WireError: The level is not an encoded dispatch type.
    """
    raw = bytearray()
    ascii_level = level.encode("utf-8", "surrogatepass")
    index = 0
    while index < len(ascii_level):
        byte = ascii_level[index]
        if byte == ord("%"):
            digits = ascii_level[index + 1 : index + 3]
            if len(digits) != 2 or not _HEX_DIGITS.issuperset(digits):
                raise WireError(f"invalid percent escape in type level {level[:64]!r}")
            decoded = int(digits, 16)
            if decoded in _KEPT_BYTES:
                raise WireError(f"needless percent escape in type level {level[:64]!r}")
            raw.append(decoded)
            index += 3
        elif byte in _KEPT_BYTES:
            raw.append(byte)
            index += 1
        else:
            raise WireError(f"unencoded character in type level {level[:64]!r}")
    if not raw:
        raise WireError("empty type level")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"type level {level[:64]!r} is not UTF-8 once decoded") from None


class TopicKind(Enum):
    """What a topic of the contract carries."""

    RUNNING = "running"
    DISPATCH = "dispatches"
    EVENTS = "events"
    STATUS = "status"
    UPCOMING = "upcoming"
    REQUEST = "request"
    RESPONSE = "response"


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic: its kind, and the type and dispatch id it is about."""

    kind: TopicKind
    dispatch_type: str | None = None
    dispatch_id: int | None = None
    action: str | None = None
    """For a request or response topic: `resync`, `hold` or `release`."""


@dataclass(frozen=True)
class TopicLayout:
    """The topics of one microgrid under its root, e.g. `microgrid/7/dispatch`."""

    root: str

    @classmethod
    def for_microgrid(cls, microgrid_id: int, template: str = DEFAULT_TOPIC_ROOT) -> TopicLayout:
        """Build the layout of one microgrid from a root template.

        Args:
            microgrid_id: The microgrid.
            template: The root, with `{microgrid_id}` where the id goes.

        Returns:
            The layout.

        Raises:
            WireError: The resulting root is not a valid topic prefix.
        """
        root = template.format(microgrid_id=microgrid_id).rstrip("/")
        if not root or any(char in root for char in "+#\0"):
            raise WireError(f"invalid topic root {root!r}: empty, or has a wildcard or NUL")
        return cls(root)

    @property
    def status(self) -> str:
        """The bridge status topic."""
        return f"{self.root}/status"

    @property
    def everything(self) -> str:
        """A subscription filter matching every topic of this layout."""
        return f"{self.root}/#"

    def running(self, dispatch_type: str) -> str:
        """Return the running-snapshot topic of a type.

        Args:
            dispatch_type: The dispatch type.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/running"

    def dispatch(self, dispatch_type: str, dispatch_id: int) -> str:
        """Return the topic of one dispatch.

        Args:
            dispatch_type: The dispatch type.
            dispatch_id: The dispatch id.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/dispatches/{dispatch_id}"

    def events(self, dispatch_type: str) -> str:
        """Return the lifecycle-event topic of a type.

        Args:
            dispatch_type: The dispatch type.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/events"

    def upcoming(self, dispatch_type: str) -> str:
        """Return the upcoming-runs topic of a type.

        Args:
            dispatch_type: The dispatch type.

        Returns:
            The topic.
        """
        return f"{self.root}/{encode_type(dispatch_type)}/upcoming"

    def request(self, action: str) -> str:
        """Return the topic of a request to the bridge (see `REQUEST_ACTIONS`).

        Args:
            action: `resync`, `hold` or `release`.

        Returns:
            The topic.
        """
        return f"{self.root}/request/{action}"

    def response(self, action: str) -> str:
        """Return the topic of the bridge's answers to one kind of request.

        Args:
            action: `resync`, `hold` or `release`.

        Returns:
            The topic.
        """
        return f"{self.root}/response/{action}"

    def parse(self, topic: str) -> TopicRef:
        """Tell which topic of this layout a topic is.

        Args:
            topic: A topic under this layout's root.

        Returns:
            What the topic carries.

        Raises:
            WireError: The topic is not one of this layout.
        """
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise WireError(f"topic {topic[:128]!r} is not under {self.root!r}")
        levels = topic[len(prefix) :].split("/")
        match levels:
            case ["status"]:
                return TopicRef(TopicKind.STATUS)
            case [level, "running"]:
                return TopicRef(TopicKind.RUNNING, decode_type(level))
            case [level, "events"]:
                return TopicRef(TopicKind.EVENTS, decode_type(level))
            case [level, "upcoming"]:
                return TopicRef(TopicKind.UPCOMING, decode_type(level))
            # No action is a kind above, so a type called "request" keeps its topics.
            case ["request" | "response" as side, action] if action in REQUEST_ACTIONS:
                return TopicRef(TopicKind(side), action=action)
            case [level, "dispatches", dispatch_id] if (
                # Canonical ids only (one dispatch, one topic); at most 20 digits (uint64),
                # which also keeps int() clear of its 4300-digit limit (ValueError).
                len(dispatch_id) <= 20
                and dispatch_id.isascii()
                and dispatch_id.isdigit()
                and str(int(dispatch_id)) == dispatch_id
            ):
                return TopicRef(TopicKind.DISPATCH, decode_type(level), int(dispatch_id))
        raise WireError(f"topic {topic[:128]!r} is not part of the dispatch contract")


# --- Conversion from and to frequenz-client-dispatch -------------------------

_TYPE_ENUMS: dict[str, type[Enum]] = {
    "BATTERY": client_types.BatteryType,
    "INVERTER": client_types.InverterType,
    "EV_CHARGER": client_types.EvChargerType,
}


def _utc(instant: datetime) -> datetime:
    return instant.astimezone(UTC)


def _target_from_client(target: client_types.TargetComponents) -> Target:
    if isinstance(target, client_types.TargetIds):
        return Target(ids=tuple(sorted(target)))
    categories = (
        TargetCategory(
            category=item.category2.name,
            type=None if item.type is None else item.type.name,
        )
        for item in target
    )
    return Target(categories=tuple(sorted(categories, key=lambda c: (c.category, c.type or ""))))


def _target_to_client(target: Target) -> client_types.TargetComponents:
    if target.categories is None:
        return client_types.TargetIds(*(target.ids or ()))
    items: list[client_types.TargetCategoryInputType] = []
    for item in target.categories:
        if item.type is None:
            items.append(ElectricalComponentCategory[item.category])
        else:
            items.append(_TYPE_ENUMS[item.category][item.type])  # type: ignore[arg-type]
    return client_types.TargetCategories(*items)


def _recurrence_from_client(rule: client_recurrence.RecurrenceRule) -> Recurrence | None:
    end = None
    if rule.end_criteria is not None:
        criteria = rule.end_criteria
        end = EndCriteria(
            count=criteria.count,
            until=None if criteria.until is None else _utc(criteria.until),
        )
    wire_rule = Recurrence(
        frequency=rule.frequency.name,  # type: ignore[arg-type]
        interval=rule.interval,
        end=end,
        byminutes=tuple(rule.byminutes),
        byhours=tuple(rule.byhours),
        byweekdays=tuple(day.name for day in rule.byweekdays),  # type: ignore[misc]
        bymonthdays=tuple(rule.bymonthdays),
        bymonths=tuple(rule.bymonths),
    )
    # The API encodes "no recurrence" as an all-default rule.
    return None if wire_rule == _NO_RECURRENCE else wire_rule


_NO_RECURRENCE = Recurrence(frequency="UNSPECIFIED", interval=0)


def _recurrence_to_client(rule: Recurrence | None) -> client_recurrence.RecurrenceRule:
    if rule is None:
        return client_recurrence.RecurrenceRule()
    end = None
    if rule.end is not None:
        end = client_recurrence.EndCriteria(count=rule.end.count, until=rule.end.until)
    return client_recurrence.RecurrenceRule(
        frequency=client_recurrence.Frequency[rule.frequency],
        interval=rule.interval,
        end_criteria=end,
        byminutes=list(rule.byminutes),
        byhours=list(rule.byhours),
        byweekdays=[client_recurrence.Weekday[day] for day in rule.byweekdays],
        bymonthdays=list(rule.bymonthdays),
        bymonths=list(rule.bymonths),
    )


def from_client(
    dispatch: client_types.Dispatch,
    *,
    running: bool = False,
    until: datetime | None = None,
    next_run: datetime | None = None,
) -> Dispatch:
    """Convert a `frequenz-client-dispatch` dispatch into the wire struct.

    Args:
        dispatch: The dispatch as the client library gives it.
        running: Whether it runs at the instant its state is computed for.
        until: The end of the current run.
        next_run: The next start after that instant.

    Returns:
        The wire struct.
    """
    return Dispatch(
        id=int(dispatch.id),
        type=dispatch.type,
        start_time=_utc(dispatch.start_time),
        duration=None if dispatch.duration is None else round(dispatch.duration.total_seconds()),
        target=_target_from_client(dispatch.target),
        active=dispatch.active,
        dry_run=dispatch.dry_run,
        payload=dispatch.payload,
        recurrence=_recurrence_from_client(dispatch.recurrence),
        create_time=_utc(dispatch.create_time),
        update_time=_utc(dispatch.update_time),
        end_time=None if dispatch.end_time is None else _utc(dispatch.end_time),
        running=running,
        until=None if until is None else _utc(until),
        next_run=None if next_run is None else _utc(next_run),
    )


def to_client(dispatch: Dispatch) -> client_types.Dispatch:
    """Convert the wire struct into a `frequenz-client-dispatch` dispatch.

    The computed state (`running`, `until`, `next_run`) has no place there and
    is dropped.

    Args:
        dispatch: The wire struct.

    Returns:
        The dispatch as the client library models it.

    Raises:
        WireError: A category or component type the client library does not know
            (a well-formed payload can still name one, e.g. from a newer bridge).
    """
    try:
        target = _target_to_client(dispatch.target)
    except KeyError as error:
        raise WireError(
            f"dispatch {dispatch.id}: unknown target category or type {error}"
        ) from None
    try:
        dispatch_id = client_types.DispatchId(dispatch.id)  # ValueError when negative
        duration = None if dispatch.duration is None else timedelta(seconds=dispatch.duration)
    except (OverflowError, ValueError) as error:
        raise WireError(f"dispatch {dispatch.id}: id or duration out of range: {error}") from None
    return client_types.Dispatch(
        id=dispatch_id,
        type=dispatch.type,
        start_time=dispatch.start_time,
        duration=duration,
        target=target,
        active=dispatch.active,
        dry_run=dispatch.dry_run,
        payload=dispatch.payload,
        recurrence=_recurrence_to_client(dispatch.recurrence),
        create_time=dispatch.create_time,
        update_time=dispatch.update_time,
        end_time=dispatch.end_time,
    )


# --- Conversion straight from the Dispatch API's protobuf --------------------


def _pb_time(seconds: int, nanos: int) -> datetime:
    # The client library's `to_datetime`, to the same float rounding.
    return datetime.fromtimestamp(seconds + int(nanos / 1000) * 1e-6, tz=UTC)


def _pb_value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError("a payload number is infinite or NaN")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _pb_struct(value.struct_value)
    if kind == "list_value":
        return [_pb_value(item) for item in value.list_value.values]
    return None


def _pb_struct(struct: Any) -> dict[str, Any]:
    fields = struct.fields
    return {key: _pb_value(fields[key]) for key in fields}


_PB_TYPES: dict[str, tuple[str, type[Enum]]] = {
    "battery": ("BATTERY", client_types.BatteryType),
    "ev_charger": ("EV_CHARGER", client_types.EvChargerType),
    "inverter": ("INVERTER", client_types.InverterType),
}

# As the client library's `ElectricalComponentCategory.from_proto`: unknown → UNSPECIFIED.
_PB_CATEGORIES: dict[int, str] = {
    member.value: member.name for member in ElectricalComponentCategory
}


def _pb_target(target: Any) -> Target:
    which = target.WhichOneof("components")
    if which == "component_ids":
        return Target(ids=tuple(sorted(set(target.component_ids.ids))))
    items: set[tuple[str, str | None]] = set()
    if which == "component_categories":
        for value in target.component_categories.categories:
            items.add((_PB_CATEGORIES.get(value, "UNSPECIFIED"), None))
    elif which == "component_categories_types":
        for item in target.component_categories_types.categories:
            kind = item.WhichOneof("type")
            if kind in _PB_TYPES:
                category, enum = _PB_TYPES[kind]
                items.add((category, enum(getattr(item, kind)).name))
            else:  # a type the client library does not know counts as none, as there
                items.add((_PB_CATEGORIES.get(item.category, "UNSPECIFIED"), None))
    else:
        raise ValueError("Invalid target components")
    ordered = sorted(items, key=lambda item: (item[0], item[1] or ""))
    return Target(categories=tuple(TargetCategory(category=c, type=t) for c, t in ordered))


def _pb_recurrence(rule: Any) -> Recurrence | None:
    end = None
    if rule.HasField("end_criteria"):
        criteria = rule.end_criteria
        which = criteria.WhichOneof("count_or_until")
        if which == "count":
            end = EndCriteria(count=criteria.count)
        elif which == "until_time":
            until = criteria.until_time
            end = EndCriteria(until=_pb_time(until.seconds, until.nanos))
        else:
            end = EndCriteria()
    wire_rule = Recurrence(
        frequency=client_recurrence.Frequency(rule.freq).name,  # type: ignore[arg-type]
        interval=rule.interval,
        end=end,
        byminutes=tuple(rule.byminutes),
        byhours=tuple(rule.byhours),
        byweekdays=tuple(
            client_recurrence.Weekday(day).name  # type: ignore[misc]
            for day in rule.byweekdays
        ),
        bymonthdays=tuple(rule.bymonthdays),
        bymonths=tuple(rule.bymonths),
    )
    return None if wire_rule == _NO_RECURRENCE else wire_rule


def from_protobuf(pb: dispatch_pb2.Dispatch) -> Dispatch:
    """Convert the Dispatch API's protobuf dispatch straight into the wire struct.

    The same result as `from_client(client_types.Dispatch.from_protobuf(pb))`,
    without building the client library's dataclasses in between (listing 100k
    dispatches spent most of its time there). Enum values map to names through
    the client library's enums, so unknown values fail or fall back alike.

    Args:
        pb: The protobuf dispatch, as listed or streamed by the API.

    Returns:
        The wire struct (`running` false, no `until` or `next_run`).

    Raises:
        ValueError: A dispatch the client library could not convert either
            (no target, an unknown frequency or weekday, a NaN payload number).
    """
    data = pb.data
    meta = pb.metadata
    start = data.start_time
    create = meta.create_time
    update = meta.update_time
    end_time = meta.end_time if meta.HasField("end_time") else None
    return Dispatch(
        id=meta.dispatch_id,
        type=data.type,
        start_time=_pb_time(start.seconds, start.nanos),
        duration=data.duration if data.HasField("duration") else None,
        target=_pb_target(data.target),
        active=data.is_active,
        dry_run=data.is_dry_run,
        payload=_pb_struct(data.payload),
        recurrence=_pb_recurrence(data.recurrence),
        create_time=_pb_time(create.seconds, create.nanos),
        update_time=_pb_time(update.seconds, update.nanos),
        end_time=None if end_time is None else _pb_time(end_time.seconds, end_time.nanos),
        running=False,
        until=None,
        next_run=None,
    )


def sorted_by_id(dispatches: Iterable[Dispatch]) -> tuple[Dispatch, ...]:
    """Return dispatches sorted by id, the order of a running snapshot.

    Args:
        dispatches: The dispatches.

    Returns:
        The same dispatches, sorted by id.
    """
    return tuple(sorted(dispatches, key=lambda d: d.id))


# --- Actor execution status --------------------------------------------------
#
# `microgrid/<id>/actors/<actor_id>`: what one SDK connection runs, retained, with
# an `offline` will. Outside the dispatch topic root, beside `dispatch`, so no type
# name can collide with it. Written by the SDK, read by `watch` and field engineers.

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

# --- Requests to the bridge and its answers (contract: "Requests and responses") ---

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
            f"the request must be a JSON object such as {{\"transaction\": 1}}, "
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
