"""The loop of one microgrid: dispatches in, retained topics out, one clock read per step.

`MicrogridService` is the thin async shell of `bridge.core.ScheduleCore`: it
reads the clock once per step, feeds the core what the upstream delivered,
hands the outbox to the publisher, marks the cache dirty, and sleeps until
the next scheduled change or the next upstream item, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from actor_sdk import wire
from actor_sdk.wall_clock import utc_now
from bridge.core import EventKind, Outbox, RetainedValue, ScheduleCore, Transition, strip_state

__all__ = [
    "DeletedById",
    "EventKind",
    "LinkChanged",
    "Listed",
    "MicrogridService",
    "Outbox",
    "ScheduleCore",
    "StreamEvent",
    "Synced",
    "Transition",
    "UpstreamItem",
    "strip_state",
]

_logger = logging.getLogger("bridge.service")


@dataclass(frozen=True, slots=True)
class Listed:
    """Part of a listing under way: published at once, nothing deleted before `Synced`."""

    dispatches: list[wire.Dispatch]
    """Handed over: `ScheduleCore.put_listed` empties the list as it applies it."""


@dataclass(frozen=True, slots=True)
class Synced:
    """The upstream listed every dispatch of the microgrid (the last part, if in parts)."""

    dispatches: list[wire.Dispatch]
    """Handed over: `ScheduleCore.sync` empties the list as it applies it."""
    unconvertible: frozenset[int] = frozenset()
    """Ids listed that could not be converted: their held versions are kept."""
    listed_before: Collection[int] = frozenset()
    """Ids of the `Listed` parts of the same listing, handed over before: listed too."""


@dataclass(frozen=True, slots=True)
class DeletedById:
    """The upstream streamed a deletion it could not convert; the id is enough."""

    dispatch_id: int


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """The upstream streamed a change (or replays one buffered during a list)."""

    kind: EventKind
    dispatch: wire.Dispatch
    buffered: bool = False


@dataclass(frozen=True, slots=True)
class LinkChanged:
    """The upstream connected or lost its connection."""

    connected: bool
    reason: str = ""


UpstreamItem = Listed | Synced | StreamEvent | LinkChanged | DeletedById


class Sink(Protocol):
    """Where the service sends topics: the publisher, or a fake in tests."""

    def set(self, topic: str, payload: RetainedValue) -> None:
        """Hold and publish a retained topic."""

    def clear(self, topic: str) -> None:
        """Clear a retained topic."""

    def event(self, topic: str, payload: bytes) -> None:
        """Send a non-retained event."""

    def mark_authoritative(self) -> None:
        """Declare that what was set is the whole truth (stale topics may be cleared)."""

    def set_status(
        self,
        *,
        upstream: Literal["connected", "disconnected"],
        synced_at: datetime | None,
        dispatches: int,
        knowledge_at: datetime | None,
    ) -> None:
        """Publish the bridge status."""


@dataclass(slots=True)
class _Listing:
    """A listing applied in parts, for the log line of its `Synced`.

    The parts of a listing that failed count in the next one.
    """

    held_before: int
    """How many dispatches were held before its first part."""
    counts: Counter[str] = field(default_factory=Counter)
    """Its lifecycle events so far, by kind."""


_LOG_DELAY_S = 0.01
"""How long the log lines of a step wait, so that they never delay its topics."""

_SPIN_S = 0.002
"""How long before a scheduled change the loop stops sleeping and yields instead."""


class MicrogridService:
    """Runs the schedule of one microgrid: feed it upstream items, it publishes."""

    on_step: Callable[[], None] | None = None
    """Called after every step of the schedule loop (`bridge.notify.Watchdog` pings)."""

    max_idle: float = 3600.0
    """The loop steps at least this often in seconds, with nothing due (for `on_step`)."""

    on_due: Callable[[datetime, datetime], None] | None = None
    """Told `(instant, step)` when a step ran for a due change (`bridge.metrics` lateness)."""

    on_types_changed: Callable[[list[str]], None] | None = None
    """Told the types whose dispatches changed (`bridge.upcoming` recomputes them)."""

    on_upstream: Callable[[UpstreamItem, datetime], None] | None = None
    """Told each upstream item as it is applied, and the step's instant (`bridge.journal`)."""

    on_outbox: Callable[[Outbox], None] | None = None
    """Told each outbox with lifecycle changes or transitions, once handed on (`bridge.journal`)."""

    on_listing: Callable[[str | None], None] | None = None
    """Told how each listing of the API ended, once applied: None, or why it failed
    (`bridge.request_handler` answers a resync with it)."""

    def __init__(
        self,
        core: ScheduleCore,
        sink: Sink,
        *,
        clock: Callable[[], datetime] = utc_now,
        on_change: Callable[[Mapping[int, wire.Dispatch | None]], None] = lambda stored: None,
        synced_at: datetime | None = None,
        had_state: bool = False,
    ) -> None:
        """Create the service.

        Args:
            core: The schedule core (possibly loaded from the cache).
            sink: Where topics go.
            clock: Returns the current instant; read once per step.
            on_change: Told what the cache must store (`Outbox.stored`) whenever the set of
                dispatches changed, and nothing after a sync (its time is saved too).
            synced_at: When the held dispatches were last synced with the API.
            had_state: Whether the core holds a previous state (then the
                first sync sends lifecycle events for what differs).
        """
        self.core = core
        self._sink = sink
        self._clock = clock
        self.on_change = on_change
        self.synced_at = synced_at
        self._had_state = had_state
        self._upstream: Literal["connected", "disconnected"] = "disconnected"
        self._link_reported = False
        self._listing: _Listing | None = None
        """The listing being applied in parts, until its `Synced`."""
        self._inbox: deque[UpstreamItem] = deque()
        self._wake: asyncio.Future[None] | None = None
        """What `run` sleeps on: `put` resolves it, or the timer of the next change."""
        self.steps = 0

    def now(self) -> datetime:
        """Read the service's clock.

        Returns:
            The current instant.
        """
        return self._clock()

    def put(self, item: UpstreamItem) -> None:
        """Hand the service an upstream item (never blocks).

        Args:
            item: What the upstream delivered.
        """
        self._inbox.append(item)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def start(self, now: datetime | None = None) -> None:
        """Publish everything held (e.g. from the cache) and the status.

        Args:
            now: The current instant; read from the clock when None.
        """
        now = self._clock() if now is None else now
        self._deliver(self.core.all_topics(now))
        if self._had_state:
            self._sink.mark_authoritative()
        self._publish_status()

    async def run(self) -> None:
        """Step until cancelled: apply upstream items, publish changes on time."""
        due: datetime | None = None
        while True:
            now = self._clock()
            self.step(now)
            if self.on_due is not None and due is not None and now >= due:
                self.on_due(due, now)
            if self.on_step is not None:
                self.on_step()
            wake = due = self.core.next_change()
            if self._inbox:
                continue
            if wake is None:
                await self._sleep(self.max_idle)
                continue
            # From the clock again, not from the step's `now`: a step with hundreds of
            # transitions takes tens of ms, and every later change was that late
            # (bench/lateness.py: 16-47 ms at 100 starts per instant).
            delay = min((wake - self._clock()).total_seconds(), self.max_idle)
            if delay <= 0:
                continue
            if delay <= _SPIN_S:
                # The event loop's timers fire up to a millisecond late (epoll rounds
                # up): the last stretch is yielded away instead, re-reading the clock.
                await asyncio.sleep(0)
                continue
            await self._sleep(delay - _SPIN_S)

    async def _sleep(self, delay: float) -> None:
        """Sleep until `put` hands an item over, or for `delay` seconds.

        On a future of its own that either resolves: the service runs one turn of
        the event loop after the wake-up, where an `Event` waited on with
        `wait_for` took three (an API change reached the step ~0.05 ms later).
        """
        loop = asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        timer = loop.call_later(delay, _resolve, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    def step(self, now: datetime) -> None:
        """One step at `now`: apply every queued upstream item, then due changes.

        Args:
            now: The current instant (one clock read).
        """
        self.steps += 1
        while self._inbox:
            item = self._inbox.popleft()
            if self.on_upstream is not None:
                self.on_upstream(item, now)
            try:
                self._handle(item, now)
            except Exception:  # one bad item must not stop the schedule of all others
                _logger.exception(
                    "microgrid %d: cannot apply %s from the Dispatch API: skipped it; "
                    "the next sync tries again",
                    self.core.microgrid_id,
                    type(item).__name__,
                )
        self._deliver(self.core.advance(now))

    def _handle(self, item: UpstreamItem, now: datetime) -> None:
        match item:
            case LinkChanged(connected=connected, reason=reason):
                was = self._upstream
                self._upstream = "connected" if connected else "disconnected"
                if not connected and (was == "connected" or not self._link_reported):
                    self._link_reported = True
                    _logger.warning(
                        "microgrid %d: Dispatch API disconnected (%s); publishing the schedule "
                        "from the %d dispatches held, reconnecting",
                        self.core.microgrid_id,
                        reason,
                        len(self.core),
                    )
                self._publish_status()
                if not connected and self.on_listing is not None:
                    self.on_listing(reason)
            case DeletedById(dispatch_id=dispatch_id):
                held = self.core.get(dispatch_id)
                if held is not None:
                    self._handle(StreamEvent("deleted", held), now)
            case Listed(dispatches=dispatches):
                listing = self._listing_so_far()
                out = self.core.put_listed(dispatches, now, events=self._had_state)
                listing.counts.update(out.counts)
                self._deliver(out)
            case Synced(dispatches=dispatches, unconvertible=unconvertible, listed_before=before):
                listing = self._listing_so_far()
                self._listing = None
                first = not self._had_state
                out = self.core.sync(
                    dispatches, now, events=not first, keep=unconvertible, listed_before=before
                )
                listing.counts.update(out.counts)
                self._had_state = True
                self.synced_at = now
                if first:
                    _logger.info(
                        "microgrid %d: synced %d dispatches from the Dispatch API (first sync, "
                        "no cache before)",
                        self.core.microgrid_id,
                        len(self.core),
                    )
                else:
                    _logger.info(
                        "microgrid %d: synced %d dispatches from the Dispatch API (held before: "
                        "%d; created %d, updated %d, deleted %d while disconnected)",
                        self.core.microgrid_id,
                        len(self.core),
                        listing.held_before,
                        listing.counts["created"],
                        listing.counts["updated"],
                        listing.counts["deleted"],
                    )
                self._deliver(out)
                self._sink.mark_authoritative()
                self.on_change({})
                self._publish_status()
                if self.on_listing is not None:
                    self.on_listing(None)
            case StreamEvent(kind=kind, dispatch=dispatch, buffered=buffered):
                out = self.core.apply(kind, dispatch, now, only_newer=buffered)
                if out:
                    self._deliver(
                        out, cause=f"dispatch {dispatch.id} of type {dispatch.type!r} {kind}"
                    )
                    self._publish_status()

    def _listing_so_far(self) -> _Listing:
        if self._listing is None:
            self._listing = _Listing(len(self.core))
        return self._listing

    def refresh(self, dispatch_types: Collection[str] | None) -> None:
        """Publish new running snapshots of some types, or of all (after a hold or release).

        Args:
            dispatch_types: The types; None: every type.
        """
        self._deliver(self.core.refresh(dispatch_types, self._clock()))

    def _deliver(self, out: Outbox, *, cause: str | None = None) -> None:
        # The publisher sends in the order it is handed topics: the running
        # snapshots go first (they are what starts and stops actors), then the
        # dispatch topics, then the events; logging waits until all is sent
        # (`cause`: a line said first, e.g. the API's change that made `out`).
        # bench/lateness.py, 100 dispatches starting at once: snapshots published
        # 65-78 ms late when they queued behind the dispatch topics, 16-20 ms first.
        # The cache is written first: a snapshot goes to the socket as it is set, and
        # nothing may reach the network that a restart would not find in the cache.
        if out.changed:
            self.on_change(out.stored)
        for topic, value in out.retained.items():
            if isinstance(value, wire.RunningSnapshot):
                self._sink.set(topic, value)
        for topic, value in out.retained.items():
            if value is None:
                self._sink.clear(topic)
        for dispatch in out.dispatches.values():
            self._sink.set(self.core.dispatch_topic(dispatch.type, dispatch.id), dispatch)
        for topic, payload in out.events:
            self._sink.event(topic, payload)
        if self.on_outbox is not None and (out.changes or out.transitions):
            self.on_outbox(out)
        if out.changed and self.on_types_changed is not None:
            # A type whose dispatches changed got a new running snapshot.
            self.on_types_changed(
                [v.type for v in out.retained.values() if isinstance(v, wire.RunningSnapshot)]
            )
        if cause is not None or out.rejected or out.transitions:
            # Once the publisher wrote its first window: a hundred log lines
            # written before that delay the snapshots by milliseconds, and even
            # one line before a created dispatch's snapshot delayed its actor.
            try:
                asyncio.get_running_loop().call_later(_LOG_DELAY_S, self._log_outcome, out, cause)
            except RuntimeError:  # stepped without a loop (tests)
                self._log_outcome(out, cause)

    def _log_outcome(self, out: Outbox, cause: str | None) -> None:
        if cause is not None:
            _logger.info("microgrid %d: %s", self.core.microgrid_id, cause)
        for dispatch_id, reason in out.rejected:
            _logger.error(
                "microgrid %d: dispatch %d cannot be published (%s): ignored",
                self.core.microgrid_id,
                dispatch_id,
                reason,
            )
        for transition in out.transitions:
            # By schedule; a held type's snapshot runs nothing all the same.
            holds = self.core.holds
            on_hold = bool(holds) and holds.of(transition.dispatch_type) is not None
            held = " (type held: published as not running)" if on_hold else ""
            if transition.started:
                _logger.info(
                    "microgrid %d: dispatch %d of type %r started, until %s%s",
                    self.core.microgrid_id,
                    transition.dispatch_id,
                    transition.dispatch_type,
                    "changed" if transition.until is None else transition.until.isoformat(),
                    held,
                )
            else:
                _logger.info(
                    "microgrid %d: dispatch %d of type %r stopped%s",
                    self.core.microgrid_id,
                    transition.dispatch_id,
                    transition.dispatch_type,
                    held,
                )

    def _publish_status(self) -> None:
        self._sink.set_status(
            upstream=self._upstream,
            synced_at=self.synced_at,
            dispatches=len(self.core),
            knowledge_at=self.synced_at,
        )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
