"""The payload structs: dispatch, running snapshot, event, bridge status, upcoming runs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from actor_sdk.wire._base import UtcTime, _Wire

Frequency = Literal["UNSPECIFIED", "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"]

WeekdayName = Literal[
    "UNSPECIFIED", "MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"
]


# A bridge holds 100,000 dispatches and their parts: untracked by the garbage collector
# (`gc=False`), each struct saves its 16-byte GC header. They hold values and tuples of
# values only (the payload is decoded JSON, or its encoding), so they can be part of no
# reference cycle.


class EndCriteria(_Wire, frozen=True, kw_only=True, gc=False):
    """When a recurrence ends: after `count` occurrences, or at `until`."""

    count: int | None = None
    until: UtcTime | None = None


class Recurrence(_Wire, frozen=True, kw_only=True, gc=False):
    """A recurrence rule (RFC 5545 subset); empty `by...` lists are omitted."""

    frequency: Frequency
    interval: int
    end: EndCriteria | None = None
    byminutes: tuple[int, ...] = ()
    byhours: tuple[int, ...] = ()
    byweekdays: tuple[WeekdayName, ...] = ()
    bymonthdays: tuple[int, ...] = ()
    bymonths: tuple[int, ...] = ()


class TargetCategory(_Wire, frozen=True, kw_only=True, gc=False):
    """A component category, optionally narrowed to one type of it."""

    category: str
    type: str | None = None


class Target(_Wire, frozen=True, kw_only=True, gc=False):
    """The components a dispatch targets: either `ids` or `categories`."""

    ids: tuple[int, ...] | None = None
    categories: tuple[TargetCategory, ...] | None = None


class Dispatch(_Wire, frozen=True, kw_only=True, gc=False):
    """One dispatch, with its schedule state computed by the bridge.

    `running`, `until` and `next_run` are the state at the `as_of` instant of
    the message carrying it: `until` is the end of the current run (`None`
    when not running or endless), `next_run` the next start after that instant.

    `payload` is a JSON object. Decoded, it is always a dict; the bridge holds the
    payloads of its own dispatches encoded (`encode_payload`: a `msgspec.Raw` of the
    object's JSON, keys sorted, written out as it is). `payload_of` gives the dict
    whichever the form.
    """

    id: int
    type: str
    start_time: UtcTime
    duration: int | None
    target: Target
    active: bool
    dry_run: bool
    payload: dict[str, Any] | msgspec.Raw
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
_MICROSECOND = timedelta(microseconds=1)


def _tally_item(dispatch_id: int, update_time: datetime) -> int:
    # Once per retained dispatch topic read back (100k after a restart): the constant
    # saves a third of its time.
    micros = (update_time - _EPOCH) // _MICROSECOND
    key = f"{dispatch_id}/{micros}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class TypeDigest:
    """The `dispatches/ID` topics of one type: their count and an order-free digest.

    The digest is the XOR, over the topics, of the first 8 bytes (big-endian) of
    BLAKE2b of `"<id>/<update_time in whole microseconds since 1970>"`, written as
    16 lower-case hex digits: both ends keep it up to date in O(1) per topic, in
    whatever order the topics come. This one keeps nothing per topic: its holder
    names the version it replaces or removes (the bridge's core holds every
    dispatch anyway); `TypeTally` remembers them for a holder that does not.
    """

    __slots__ = ("_count", "_xor")

    def __init__(self) -> None:
        self._count = 0
        self._xor = 0

    def __len__(self) -> int:
        return self._count

    def add(self, dispatch_id: int, update_time: datetime) -> None:
        """Count the topic of a dispatch at this version (not counted before)."""
        self._xor ^= _tally_item(dispatch_id, update_time)
        self._count += 1

    def discard(self, dispatch_id: int, update_time: datetime) -> None:
        """Stop counting the topic of a dispatch at this version (counted before)."""
        self._xor ^= _tally_item(dispatch_id, update_time)
        self._count -= 1

    @property
    def digest(self) -> str:
        """The digest as the running snapshot carries it."""
        return f"{self._xor:016x}"


class TypeTally:
    """A `TypeDigest` that remembers each topic's version, for a holder that does not."""

    __slots__ = ("_items", "_xor")

    def __init__(self) -> None:
        self._items: dict[int, int] = {}
        self._xor = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, dispatch_id: int, update_time: datetime) -> None:
        """Count the topic of a dispatch (replacing an earlier version of it)."""
        item = _tally_item(dispatch_id, update_time)
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
