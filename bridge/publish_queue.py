"""What the bridge still has to publish, in which order, with which stamps (no I/O).

The queue holds the desired retained state of one microgrid (topic to value)
and an ordered, coalescing set of keys still to send: marking a topic again
moves it to the end, so the newest state always wins and goes out last.

Two priorities: running snapshots, the status and events go ahead of dispatch
topics and clears, so that a start or a stop is never stuck behind the 100,000
dispatch topics of a first sync or a full republish.

Values are encoded when they are taken, not when they are set: a running
snapshot then gets the connection's session and the next sequence number, the
status is made from its board as of that moment.

A dispatch struct is held by its id, not by its topic: the topic
(`layout.dispatch(type, id)`) is built when it is sent, so the queue keeps no
topic string per dispatch (about 100 bytes each, 10 MB at 100k dispatches).
The bridge's queue reads the structs from the schedule core's own table
(`read_dispatches_from`), where they are already held by id: a table of its own cost
52 bytes per dispatch at 100k.

After a reconnect, dispatch topics are not republished blindly: they wait
(`requeue_all`) while the broker's retained tree is read back (`confirm` for
each retained dispatch topic), and only those the broker does not hold with
the same payload are sent (`release_unconfirmed`). Running snapshots and the
status go out in every session.

`bridge.publisher` is the async shell around it: its workers `take` an item,
publish it, and report `sent` or `failed`.
"""

from __future__ import annotations

import builtins
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import msgspec

from actor_sdk import wire
from bridge.status import StatusBoard

__all__ = ["Outgoing", "PublishQueue", "RetainedValue"]

RetainedValue = bytes | wire.Dispatch | wire.RunningSnapshot | StatusBoard
_HeldByTopic = bytes | wire.RunningSnapshot | StatusBoard


@dataclass(frozen=True, slots=True)
class _EventNumber:
    """A pending event, by its number."""

    number: int


_Key = str | int | _EventNumber
"""A pending item: a retained topic held by topic or to clear (str), a held dispatch
struct by its id (int), or an event."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One publish to make."""

    key: _Key
    topic: str
    payload: bytes
    retain: bool
    value: RetainedValue | None
    """The held value it was made from (None for a clear or an event)."""


class PublishQueue:
    """The retained state of one microgrid and the order in which it goes out."""

    def __init__(
        self,
        *,
        microgrid_id: int,
        layout: wire.TopicLayout,
        clock: Callable[[], datetime],
        max_events: int = 10_000,
    ) -> None:
        """Create an empty queue.

        Args:
            microgrid_id: The microgrid (for snapshots and the log).
            layout: Its topics.
            clock: Returns now (the status's instant, replacement snapshots' `as_of`).
            max_events: The most events held; beyond it the oldest is dropped.
        """
        self.microgrid_id = microgrid_id
        self.layout = layout
        self._clock = clock
        self._max_events = max_events
        self._held: dict[str, _HeldByTopic] = {}
        """Retained topics other than the dispatch structs, topic to value."""
        self._own: dict[int, wire.Dispatch] | None = {}
        """The queue's own table of dispatch structs, unless it reads another's."""
        self._dispatches: Mapping[int, wire.Dispatch] = self._own
        """The dispatch structs held, by id: each on the topic `layout.dispatch(type, id)`."""
        self._urgent: OrderedDict[_Key, None] = OrderedDict()
        self._bulk: OrderedDict[_Key, None] = OrderedDict()
        self._events: dict[int, tuple[str, bytes]] = {}
        self._event_counter = 0
        self._in_flight = 0
        self._unconfirmed: builtins.set[int] = builtins.set()
        """Ids of held dispatches whose topic waits for the broker's copy to be compared."""
        self.session = 0
        self._seq = 0

    # ---- what to hold -------------------------------------------------------------

    def read_dispatches_from(self, table: Mapping[int, wire.Dispatch]) -> None:
        """Read the dispatch structs from whoever holds them by id, instead of a table of its own.

        The bridge gives the schedule core's table (`ScheduleCore.table`): each struct
        `set` is already in it, and each removed from it has its topic cleared. Before
        any dispatch struct is set.

        Args:
            table: The structs by id.

        Raises:
            ValueError: The queue holds dispatch structs already.
        """
        if self._dispatches:
            raise ValueError("the queue holds dispatch structs already")
        self._own = None
        self._dispatches = table

    def set(self, topic: str, payload: RetainedValue) -> None:
        """Hold a retained topic and mark it to be sent.

        Args:
            topic: The topic; for a dispatch struct, `layout.dispatch(type, id)`.
            payload: Its value.
        """
        if isinstance(payload, wire.Dispatch):
            self._held.pop(topic, None)
            if self._own is not None:
                self._own[payload.id] = payload
            self._mark(payload.id)
        else:
            self._forget_dispatch(topic)
            self._held[topic] = payload
            self._mark(topic)

    def clear(self, topic: str) -> None:
        """Stop holding a topic and mark it to be cleared (an empty retained payload).

        Args:
            topic: The topic.
        """
        self._forget_dispatch(topic)
        self._held.pop(topic, None)
        self._mark(topic)

    def event(self, topic: str, payload: bytes) -> bool:
        """Add a non-retained event (kept in order).

        Args:
            topic: The topic.
            payload: The payload.

        Returns:
            False when the oldest waiting event was dropped to make room.
        """
        kept = True
        if len(self._events) >= self._max_events:
            oldest = next(iter(self._events))
            del self._events[oldest]
            self._urgent.pop(_EventNumber(oldest), None)
            kept = False
        self._event_counter += 1
        self._events[self._event_counter] = (topic, payload)
        self._mark(_EventNumber(self._event_counter))
        return kept

    def held(self) -> dict[str, RetainedValue]:
        """The retained topics held, topic to value (a copy)."""
        held: dict[str, RetainedValue] = dict(self._held)
        held.update((self._topic_of(d), d) for d in self._dispatches.values())
        return held

    @property
    def held_count(self) -> int:
        """How many retained topics are held."""
        return len(self._held) + len(self._dispatches)

    # ---- what to send -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many topics and events wait to be sent (or to be compared with the broker's)."""
        return len(self._urgent) + len(self._bulk) + len(self._unconfirmed)

    @property
    def waiting(self) -> int:
        """How many publishes `take` can give now."""
        return len(self._urgent) + len(self._bulk)

    def is_waiting(self, key: str) -> bool:
        """Whether a topic waits to be sent (taken ones are in flight or sent).

        Args:
            key: The topic.

        Returns:
            True while it waits.
        """
        pending = self._held_dispatch_id(key)
        if pending is None:
            return key in self._urgent or key in self._bulk
        return pending in self._bulk

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing is in flight."""
        return self._in_flight == 0 and not self._urgent and not self._bulk and not self.unconfirmed

    def new_session(self, session: int) -> None:
        """A connection is up: stamp with its session, number snapshots from 1 again.

        Args:
            session: The connection's session number.
        """
        self.session = session
        self._seq = 0

    @property
    def unconfirmed(self) -> int:
        """How many dispatch topics wait for the broker's copy to be compared."""
        return len(self._unconfirmed)

    def requeue_all(self, *, compare_dispatches: bool = False) -> None:
        """Mark everything held to be sent again (after a connect).

        What changed while disconnected stays ahead in its queue; the rest follows.

        Args:
            compare_dispatches: Hold back every dispatch topic, also one that
                changed while disconnected or before the first connection, until
                the broker's copies were compared (`confirm`, then
                `release_unconfirmed`).
        """
        keys: list[_Key] = [*self._held, *self._dispatches]
        for key in keys:
            if compare_dispatches and isinstance(key, int):
                # Changed while disconnected or not: the broker's copy decides.
                self._bulk.pop(key, None)
                self._unconfirmed.add(key)
            elif key not in self._urgent and key not in self._bulk:
                self._queue_of(key)[key] = None

    def confirm(self, topic: str, payload: bytes) -> None:
        """The broker holds `payload` retained on `topic`: no need to send it if it is ours.

        Args:
            topic: A retained topic read back from the broker.
            payload: Its payload.
        """
        if not self._unconfirmed:
            return
        dispatch_id = self._held_dispatch_id(topic)
        if dispatch_id in self._unconfirmed and (
            wire.encode(self._dispatches[dispatch_id]) == payload
        ):
            self._unconfirmed.discard(dispatch_id)

    def release_unconfirmed(self) -> int:
        """Send the dispatch topics the broker did not hold as held here (the read-back ended).

        Returns:
            How many.
        """
        released = len(self._unconfirmed)
        for dispatch_id in self._unconfirmed:
            self._bulk[dispatch_id] = None
        self._unconfirmed.clear()
        return released

    def take(self) -> Outgoing | None:
        """Take the next publish, urgent ones first, and count it in flight.

        Returns:
            The publish, or None when nothing waits.
        """
        if self._urgent:
            key, _ = self._urgent.popitem(last=False)
        elif self._bulk:
            key, _ = self._bulk.popitem(last=False)
            if not self._bulk:
                # A drained OrderedDict keeps the table of its largest size (6 MB after
                # the 100k topics of a start-up); a new one gives it back.
                self._bulk = OrderedDict()
        else:
            return None
        return self._outgoing(key)

    def take_waiting(self, topic: str) -> Outgoing | None:
        """Take one waiting retained topic ahead of its turn, and count it in flight.

        Args:
            topic: The topic (a running snapshot, to be written at once).

        Returns:
            The publish, or None when the topic does not wait.
        """
        if topic not in self._urgent:
            return None
        del self._urgent[topic]
        return self._outgoing(topic)

    def _outgoing(self, key: _Key) -> Outgoing:
        self._in_flight += 1
        if isinstance(key, _EventNumber):
            topic, payload = self._events[key.number]
            return Outgoing(key, topic, payload, retain=False, value=None)
        if isinstance(key, int):
            dispatch = self._dispatches[key]
            topic = self._topic_of(dispatch)
            return Outgoing(key, topic, wire.encode(dispatch), retain=True, value=dispatch)
        value = self._held.get(key)
        payload = b"" if value is None else self._encode(value)
        return Outgoing(key, key, payload, retain=True, value=value)

    def sent(self, item: Outgoing) -> None:
        """The broker acknowledged a publish.

        Args:
            item: What `take` returned.
        """
        self._in_flight -= 1
        if isinstance(item.key, _EventNumber):
            self._events.pop(item.key.number, None)

    def failed(self, item: Outgoing) -> None:
        """A publish was not sent (or not confirmed): send it again first.

        Unless a newer state of the same topic already waits (it goes instead).

        Args:
            item: What `take` returned.
        """
        self._in_flight -= 1
        key = item.key
        if key in self._urgent or key in self._bulk:
            return
        if isinstance(key, _EventNumber) and key.number not in self._events:
            return
        if isinstance(key, int) and key not in self._dispatches:
            return
        queue = self._queue_of(key)
        queue[key] = None
        queue.move_to_end(key, last=False)

    def _queue_of(self, key: _Key) -> OrderedDict[_Key, None]:
        if isinstance(key, _EventNumber) or (
            isinstance(key, str)
            and isinstance(self._held.get(key), wire.RunningSnapshot | StatusBoard)
        ):
            return self._urgent
        return self._bulk

    def _mark(self, key: _Key) -> None:
        if isinstance(key, int):
            self._unconfirmed.discard(key)
        self._bulk.pop(key, None)
        self._urgent.pop(key, None)
        self._queue_of(key)[key] = None

    def _topic_of(self, dispatch: wire.Dispatch) -> str:
        return self.layout.dispatch(dispatch.type, dispatch.id)

    def _held_dispatch_id(self, topic: str) -> int | None:
        """The id of the dispatch struct held on `topic`, None when none is."""
        dispatch_id = _dispatch_id_in(topic)
        dispatch = None if dispatch_id is None else self._dispatches.get(dispatch_id)
        if dispatch is None or self._topic_of(dispatch) != topic:
            return None
        return dispatch.id

    def _forget_dispatch(self, topic: str) -> None:
        """Stop holding the dispatch struct on `topic`, if one is (it is cleared or replaced).

        Read from another's table, the struct is gone from it already: its id, if it
        waits, waits no more. An id that holds a struct on another topic now (its type
        changed) is left alone.
        """
        dispatch_id = _dispatch_id_in(topic)
        if dispatch_id is None:
            return
        held = self._dispatches.get(dispatch_id)
        if held is not None:
            if self._topic_of(held) != topic:
                return
            if self._own is not None:
                del self._own[dispatch_id]
        self._bulk.pop(dispatch_id, None)
        self._unconfirmed.discard(dispatch_id)

    def _encode(self, value: _HeldByTopic) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, wire.RunningSnapshot):
            self._seq += 1
            return wire.encode(msgspec.structs.replace(value, session=self.session, seq=self._seq))
        return self.status_payload(value)

    def status_payload(
        self, board: StatusBoard, *, offline: bool = False, session: int | None = None
    ) -> bytes:
        """Encode the status as of now.

        Args:
            board: The facts behind it.
            offline: The offline status (the will, or the goodbye).
            session: Its session (None: the current one).

        Returns:
            The payload.
        """
        stamp = self.session if session is None else session
        return wire.encode(board.status(self._clock(), stamp, offline=offline))

    # ---- stale topics on the broker -----------------------------------------------

    def clear_stale(self, retained_on_broker: builtins.set[str]) -> tuple[int, int]:
        """Clear what the broker holds under the tree and this queue does not.

        A `dispatches/ID` topic not held is cleared; a `running` topic of a type
        not held gets an empty snapshot; an `upcoming` topic is cleared unless its
        type still has a running topic held (it is republished soon).

        Args:
            retained_on_broker: The retained topics the broker holds (the scan).

        Returns:
            How many topics were cleared, and how many running topics emptied.
        """
        cleared = replaced = 0
        upcoming: list[tuple[str, str]] = []
        emptied: builtins.set[str] = builtins.set()
        for topic in retained_on_broker:
            if topic in self._held or self._held_dispatch_id(topic) is not None:
                continue
            try:
                ref = self.layout.parse(topic)
            except wire.WireError:
                continue
            if ref.kind == wire.TopicKind.DISPATCH:
                self._mark(topic)
                cleared += 1
            elif ref.kind == wire.TopicKind.RUNNING and ref.dispatch_type is not None:
                self.set(topic, self._empty_snapshot(ref.dispatch_type))
                emptied.add(topic)
                replaced += 1
            elif ref.kind == wire.TopicKind.UPCOMING and ref.dispatch_type is not None:
                upcoming.append((topic, self.layout.running(ref.dispatch_type)))
        for topic, running in upcoming:
            if running not in self._held or running in emptied:
                self._mark(topic)
                cleared += 1
        return cleared, replaced

    def _empty_snapshot(self, dispatch_type: str) -> wire.RunningSnapshot:
        return wire.RunningSnapshot(
            microgrid_id=self.microgrid_id,
            type=dispatch_type,
            running=(),
            next_change=None,
            as_of=self._clock(),
            session=0,
            seq=0,
        )


def _dispatch_id_in(topic: str) -> int | None:
    """The id a dispatch topic (`.../dispatches/ID`) names; None for any other topic."""
    _, separator, tail = topic.rpartition("/dispatches/")
    return int(tail) if separator and tail.isdecimal() else None
