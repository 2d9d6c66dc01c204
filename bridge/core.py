"""The schedule of one microgrid as a pure, synchronous core: dispatches in, topics out.

`ScheduleCore` holds the dispatches of one microgrid, asks `bridge.schedule`
what runs, and returns an `Outbox` of the topics to set or clear, the events
to send and the transitions to log. It never reads the clock: every method
takes `now`. `bridge.service` is its async shell.

A step costs O(changes): each type keeps a heap of `(changes_at, id)` with
lazy deletion (an entry is valid only while it equals the dispatch's current
`changes_at`), and a set of its running ids.

Decisions worth knowing:

* A type that has no dispatch left keeps its `running` topic, with an empty
  snapshot (`running: []`), instead of having it cleared: a subscriber of a
  type always finds a decodable snapshot that says "nothing runs". Only
  `dispatches/ID` topics are ever cleared.
* A dispatch that changes type clears its old `dispatches/ID` topic, and
  both types get a new running snapshot.
* Lifecycle events are sent for stream events and for what a re-sync finds
  changed; not for the very first sync of a bridge that had no cache (every
  dispatch would look "created").
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Literal

import msgspec

from actor_sdk import wire
from bridge import schedule
from bridge.requests import HoldBook

__all__ = ["EventKind", "Outbox", "RetainedValue", "ScheduleCore", "Transition", "strip_state"]

EventKind = Literal["created", "updated", "deleted"]
RetainedValue = bytes | wire.Dispatch | wire.RunningSnapshot


def strip_state(dispatch: wire.Dispatch) -> wire.Dispatch:
    """Return the dispatch without its computed state (as the API defines it).

    Args:
        dispatch: A dispatch, possibly with `running`, `until`, `next_run` set.

    Returns:
        The same dispatch with `running=False`, `until=None`, `next_run=None`.
    """
    if not dispatch.running and dispatch.until is None and dispatch.next_run is None:
        return dispatch
    return msgspec.structs.replace(dispatch, running=False, until=None, next_run=None)


@dataclass(frozen=True, slots=True)
class Transition:
    """A dispatch started or stopped running (for the log)."""

    dispatch_type: str
    dispatch_id: int
    started: bool
    until: datetime | None


@dataclass(slots=True)
class Outbox:
    """What one step of the core decided: topics to set or clear, events, transitions.

    `retained` maps a running topic to its new snapshot, or a dispatch topic
    to None to clear it; `dispatches` holds the dispatch topics to set, by id
    (each on `ScheduleCore.dispatch_topic(type, id)`, built when handed on: a
    first sync of 100k dispatches would otherwise make every topic string at
    once, and their freed memory stayed resident). Structs are encoded by whoever
    sends them (the publisher holds the same immutable struct as the core, not a copy).
    """

    retained: dict[str, RetainedValue | None] = field(default_factory=dict)
    dispatches: dict[int, wire.Dispatch] = field(default_factory=dict)
    events: list[tuple[str, bytes]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    stored: dict[int, wire.Dispatch | None] = field(default_factory=dict)
    """What the offline cache must write: each dispatch put (new or changed) by id, None
    for each removed; a new run state alone is no change."""
    counts: dict[str, int] = field(default_factory=dict)
    """How many lifecycle events of each kind were decided."""
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """Dispatches that cannot be published (id, why), e.g. an empty type."""
    changes: list[tuple[EventKind, wire.Dispatch, wire.Dispatch | None]] = field(
        default_factory=list
    )
    """Each lifecycle event with the version held before (for the audit journal)."""

    @property
    def changed(self) -> bool:
        """Whether the set of dispatches changed (the cache must be saved)."""
        return bool(self.stored)

    def __bool__(self) -> bool:
        return bool(
            self.retained
            or self.dispatches
            or self.events
            or self.transitions
            or self.stored
            or self.rejected
        )


class ScheduleCore:
    """The dispatches of one microgrid and their schedule; pure and synchronous.

    Each dispatch is held once, as published: with its `running`, `until` and
    `next_run` as of the last step that touched it, and its payload encoded
    (`wire.encode_payload`, whatever form it came in: equal versions compare equal).
    Running snapshots reuse those structs, so a transition costs the dispatches of
    its type that run, not a copy of each.
    """

    def __init__(self, microgrid_id: int, layout: wire.TopicLayout) -> None:
        """Create an empty core.

        Args:
            microgrid_id: The microgrid.
            layout: Its topics.
        """
        self.microgrid_id = microgrid_id
        self.layout = layout
        self._dispatches: dict[int, wire.Dispatch] = {}
        self._table_view = MappingProxyType(self._dispatches)
        self._changes_at: dict[int, datetime] = {}
        self._running: dict[str, set[int]] = {}
        self._heaps: dict[str, list[tuple[datetime, int]]] = {}
        self._levels: dict[str, str] = {}
        self._dirty_types: dict[str, None] = {}
        self._tallies: dict[str, wire.TypeDigest] = {}
        """Per type, its dispatch topics as the running snapshot counts them."""
        self.holds = HoldBook()
        """The types held by a local request (`bridge.requests`): their snapshots run nothing."""

    # ---- queries --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._dispatches)

    @property
    def table(self) -> Mapping[int, wire.Dispatch]:
        """The dispatches held, by id, as of the last step: a read-only view, not a copy.

        The publisher's queue reads the structs it sends from it (`PublishQueue`).
        """
        return self._table_view

    def dispatches(self) -> list[wire.Dispatch]:
        """Every dispatch held, with its state as of the step that last touched it.

        Returns:
            The dispatches, in no particular order.
        """
        return list(self._dispatches.values())

    def get(self, dispatch_id: int) -> wire.Dispatch | None:
        """The dispatch with this id, without computed state.

        Args:
            dispatch_id: The id.

        Returns:
            The dispatch, or None.
        """
        held = self._dispatches.get(dispatch_id)
        return None if held is None else strip_state(held)

    def running_ids(self, dispatch_type: str) -> list[int]:
        """The ids of the running dispatches of a type, sorted, as of the last step.

        Args:
            dispatch_type: The type.

        Returns:
            The ids.
        """
        return sorted(self._running.get(dispatch_type, ()))

    def next_change(self) -> datetime | None:
        """The earliest instant at which any dispatch starts or stops running.

        Returns:
            The instant, or None when nothing is scheduled to change.
        """
        earliest: datetime | None = None
        for dispatch_type in self._heaps:
            head = self._head(dispatch_type)
            if head is not None and (earliest is None or head < earliest):
                earliest = head
        return earliest

    def dispatch_topic(self, dispatch_type: str, dispatch_id: int) -> str:
        """Return the topic of one dispatch (its type's level is made once).

        Args:
            dispatch_type: The type, one the core accepted.
            dispatch_id: The id.

        Returns:
            The topic.
        """
        return f"{self._level(dispatch_type)}/dispatches/{dispatch_id}"

    # ---- inputs ---------------------------------------------------------------

    def load(self, dispatches: list[wire.Dispatch], now: datetime) -> Outbox:
        """Replace everything held with these dispatches, without events.

        Used for the cache at start and for the first sync of a bridge with
        no cache: every topic is set, no lifecycle event is sent.

        Args:
            dispatches: The dispatches, handed over: emptied as in `sync`.
            now: The current instant.

        Returns:
            The topics to set or clear.
        """
        return self.sync(dispatches, now, events=False)

    def sync(
        self,
        dispatches: list[wire.Dispatch],
        now: datetime,
        *,
        events: bool,
        keep: Collection[int] = (),
        listed_before: Collection[int] = (),
    ) -> Outbox:
        """Replace everything held with a full list, publishing the differences.

        The list is handed over and emptied as it is applied: each listed struct
        goes as soon as the core holds its own (with the run state), so the struct
        held can take its memory. Kept to the end, the 100k listed structs of a
        start-up left as many free blocks behind, resident (120 B per dispatch).

        Args:
            dispatches: Every dispatch of the microgrid, as just listed (emptied),
                but those of `listed_before`.
            now: The current instant.
            events: Whether to send lifecycle events for what differs.
            keep: Ids listed but not convertible: a held version stays as it is
                (never turned into a deletion).
            listed_before: Ids of the same listing applied before it (`put_listed`):
                listed too.

        Returns:
            What to publish.
        """
        out = Outbox()
        listed = {d.id for d in dispatches}
        for dispatch_id in [
            i
            for i in self._dispatches
            if i not in listed and i not in listed_before and i not in keep
        ]:
            old = self._remove(dispatch_id, out)
            if events:
                self._event(out, "deleted", _stopped(old), now, old)
        self._put_listed(dispatches, now, events, out)
        self._flush_types(now, out)
        return out

    def put_listed(self, dispatches: list[wire.Dispatch], now: datetime, *, events: bool) -> Outbox:
        """Apply part of a listing under way; nothing is deleted until `sync` ends it.

        Each listed version is as true as a streamed one, so it is published at
        once: a large listing's first topics go out while the rest is still listed.

        Args:
            dispatches: Part of the listing (emptied, as in `sync`).
            now: The current instant.
            events: Whether to send lifecycle events for what differs.

        Returns:
            What to publish.
        """
        out = Outbox()
        self._put_listed(dispatches, now, events, out)
        self._flush_types(now, out)
        return out

    def apply(
        self, kind: EventKind, dispatch: wire.Dispatch, now: datetime, *, only_newer: bool = False
    ) -> Outbox:
        """Apply one stream event.

        A deletion always applies, even when its `update_time` equals the
        held one (the API may send it so).

        Args:
            kind: What happened.
            dispatch: The dispatch as the event carries it.
            now: The current instant.
            only_newer: Skip a create or update whose `update_time` is not
                newer than the held one (for events buffered during a list).

        Returns:
            What to publish.
        """
        out = Outbox()
        dispatch = wire.encode_payload(dispatch)
        held = self._dispatches.get(dispatch.id)
        if kind == "deleted":
            if held is None:
                return out
            self._remove(dispatch.id, out)
            self._event(out, "deleted", _stopped(dispatch), now, held)
        else:
            if not self._acceptable(dispatch, out):
                return out
            if held is not None and only_newer and dispatch.update_time <= held.update_time:
                return out
            if held is not None and _same(held, dispatch):
                return out
            put = self._put(dispatch, now, out)
            self._event(out, "created" if held is None else "updated", put, now, held)
        self._flush_types(now, out)
        return out

    def advance(self, now: datetime) -> Outbox:
        """Apply every scheduled change due at or before `now`.

        Args:
            now: The current instant.

        Returns:
            What to publish (nothing when no change is due).
        """
        out = Outbox()
        for dispatch_type, heap in self._heaps.items():
            while heap and heap[0][0] <= now:
                when, dispatch_id = heapq.heappop(heap)
                held = self._dispatches.get(dispatch_id)
                if (
                    held is None
                    or self._changes_at.get(dispatch_id) != when
                    or held.type != dispatch_type
                ):
                    continue
                new = schedule.run_state(held, now)
                running = self._running.setdefault(dispatch_type, set())
                if new.running != held.running:
                    if new.running:
                        running.add(dispatch_id)
                    else:
                        running.discard(dispatch_id)
                    out.transitions.append(
                        Transition(dispatch_type, dispatch_id, new.running, new.until)
                    )
                if new.changes_at is None:
                    del self._changes_at[dispatch_id]
                else:
                    self._changes_at[dispatch_id] = new.changes_at
                    heapq.heappush(heap, (new.changes_at, dispatch_id))
                updated = _with_state(held, new)
                self._dispatches[dispatch_id] = updated
                out.dispatches[dispatch_id] = updated
                self._dirty_types[dispatch_type] = None
        self._flush_types(now, out)
        return out

    def all_topics(self, now: datetime) -> Outbox:
        """Every retained topic as of the last step (for a full republish).

        Args:
            now: The current instant (the `as_of` of the snapshots).

        Returns:
            Every dispatch topic and every running snapshot.
        """
        out = Outbox()
        for dispatch_id, held in self._dispatches.items():
            out.dispatches[dispatch_id] = held
        for dispatch_type in self._running:
            self._dirty_types[dispatch_type] = None
        self._flush_types(now, out)
        return out

    def refresh(self, dispatch_types: Iterable[str] | None, now: datetime) -> Outbox:
        """New running snapshots of some types, or of all (after a hold or release).

        Args:
            dispatch_types: The types; None: every type held.
            now: The current instant.

        Returns:
            The snapshots of those types the core holds.
        """
        for dispatch_type in self._running if dispatch_types is None else dispatch_types:
            if dispatch_type in self._running:
                self._dirty_types[dispatch_type] = None
        out = Outbox()
        self._flush_types(now, out)
        return out

    # ---- internals ------------------------------------------------------------

    def _put(self, dispatch: wire.Dispatch, now: datetime, out: Outbox) -> wire.Dispatch:
        held = self._dispatches.get(dispatch.id)
        if held is not None and held.type != dispatch.type:
            self._remove(dispatch.id, out)
            held = None
        dispatch_type = dispatch.type
        state = schedule.run_state(dispatch, now)
        put = _with_state(dispatch, state)
        self._dispatches[dispatch.id] = put
        tally = self._tallies.setdefault(dispatch_type, wire.TypeDigest())
        if held is not None:
            tally.discard(held.id, held.update_time)
        tally.add(dispatch.id, dispatch.update_time)
        running = self._running.setdefault(dispatch_type, set())
        if state.running:
            running.add(dispatch.id)
        else:
            running.discard(dispatch.id)
        if state.changes_at is None:
            self._changes_at.pop(dispatch.id, None)
        else:
            self._changes_at[dispatch.id] = state.changes_at
            heapq.heappush(
                self._heaps.setdefault(dispatch_type, []), (state.changes_at, dispatch.id)
            )
        if out.retained:  # a clear of the same topic in this step gives way
            out.retained.pop(self.dispatch_topic(dispatch_type, dispatch.id), None)
        out.dispatches.pop(dispatch.id, None)
        out.dispatches[dispatch.id] = put
        self._dirty_types[dispatch_type] = None
        out.stored[dispatch.id] = put
        return put

    def _put_listed(
        self, dispatches: list[wire.Dispatch], now: datetime, events: bool, out: Outbox
    ) -> None:
        dispatches.reverse()
        while dispatches:
            dispatch = wire.encode_payload(dispatches.pop())
            held = self._dispatches.get(dispatch.id)
            if not self._acceptable(dispatch, out):
                if held is not None:  # listed, but not as anything the core can hold
                    self._remove(dispatch.id, out)
                    if events:
                        self._event(out, "deleted", _stopped(held), now, held)
                continue
            if held is not None and _same(held, dispatch):
                continue
            put = self._put(dispatch, now, out)
            if events:
                self._event(out, "created" if held is None else "updated", put, now, held)

    def _remove(self, dispatch_id: int, out: Outbox) -> wire.Dispatch:
        held = self._dispatches.pop(dispatch_id)
        self._tallies[held.type].discard(dispatch_id, held.update_time)
        self._changes_at.pop(dispatch_id, None)
        self._running.get(held.type, set()).discard(dispatch_id)
        out.dispatches.pop(dispatch_id, None)
        out.retained[self.dispatch_topic(held.type, dispatch_id)] = None
        self._dirty_types[held.type] = None
        out.stored[dispatch_id] = None
        return held

    def _head(self, dispatch_type: str) -> datetime | None:
        heap = self._heaps[dispatch_type]
        while heap:
            when, dispatch_id = heap[0]
            held = self._dispatches.get(dispatch_id)
            if (
                held is not None
                and self._changes_at.get(dispatch_id) == when
                and held.type == dispatch_type
            ):
                return when
            heapq.heappop(heap)
        return None

    def _acceptable(self, dispatch: wire.Dispatch, out: Outbox) -> bool:
        try:
            self._level(dispatch.type)
        except wire.WireError as error:
            out.rejected.append((dispatch.id, str(error)))
            return False
        return True

    def _level(self, dispatch_type: str) -> str:
        level = self._levels.get(dispatch_type)
        if level is None:
            level = self._levels[dispatch_type] = (
                f"{self.layout.root}/{wire.encode_type(dispatch_type)}"
            )
        return level

    def _flush_types(self, now: datetime, out: Outbox) -> None:
        for dispatch_type in self._dirty_types:
            held = self._dispatches
            running = tuple(map(held.__getitem__, sorted(self._running.get(dispatch_type, ()))))
            next_change = self._head(dispatch_type) if dispatch_type in self._heaps else None
            hold = self.holds.of(dispatch_type) if self.holds else None
            if hold is not None:
                running, next_change = (), None
            topic = f"{self._level(dispatch_type)}/running"
            tally = self._tallies.get(dispatch_type) or wire.TypeDigest()
            out.retained.pop(topic, None)
            out.retained[topic] = wire.RunningSnapshot(
                microgrid_id=self.microgrid_id,
                type=dispatch_type,
                running=running,
                next_change=next_change,
                as_of=now,
                session=0,
                seq=0,
                dispatches=len(tally),
                digest=tally.digest,
                held=hold is not None,
                hold_reason=None if hold is None else hold.reason,
            )
        self._dirty_types.clear()

    def _event(
        self,
        out: Outbox,
        kind: EventKind,
        dispatch: wire.Dispatch,
        now: datetime,
        before: wire.Dispatch | None,
    ) -> None:
        payload = wire.encode(wire.DispatchEvent(event=kind, dispatch=dispatch, as_of=now))
        out.events.append((f"{self._level(dispatch.type)}/events", payload))
        out.changes.append((kind, dispatch, before))
        out.counts[kind] = out.counts.get(kind, 0) + 1


def _with_state(dispatch: wire.Dispatch, state: schedule.RunState) -> wire.Dispatch:
    if (dispatch.running, dispatch.until, dispatch.next_run) == (
        state.running,
        state.until,
        state.next_run,
    ):
        return dispatch
    return msgspec.structs.replace(
        dispatch, running=state.running, until=state.until, next_run=state.next_run
    )


def _stopped(dispatch: wire.Dispatch) -> wire.Dispatch:
    return strip_state(dispatch)


def _same(held: wire.Dispatch, incoming: wire.Dispatch) -> bool:
    """Whether two dispatches are equal, computed state aside."""
    if held.update_time != incoming.update_time:
        return False
    return strip_state(held) == strip_state(incoming)
