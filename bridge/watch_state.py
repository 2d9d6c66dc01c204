"""What `dispatch-bridge watch` knows: the retained topics of one microgrid, folded.

`WatchState` takes messages (topic, payload, arrival time, retain flag) and
keeps what they say; no I/O and no clock. A bad topic or payload becomes a
warning line, never an exception. `liveness` applies the contract's liveness
rule to what the state holds at a given instant.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum

from actor_sdk import wire
from actor_sdk._resync import ResyncTally

__all__ = [
    "DEFAULT_STATUS_INTERVAL",
    "MAX_EVENTS",
    "MAX_WARNINGS",
    "Liveness",
    "WatchState",
    "liveness",
    "printable",
]

MAX_WARNINGS = 5
"""Warning lines kept (the newest)."""

MAX_EVENTS = 5
"""Lifecycle events kept (the newest)."""

DEFAULT_STATUS_INTERVAL = timedelta(seconds=5)
"""The bridge's status interval assumed while its status does not say (contract 1)."""


def printable(text: str, limit: int) -> str:
    """Make wire text safe for a terminal: no control characters, bounded length.

    >>> printable("a dispatch type far too long to show", 12)
    'a dispatc...'

    Args:
        text: Text from the wire.
        limit: The most characters to return.

    Returns:
        The text, control characters replaced by `?`, cut with `...` past `limit`.
    """
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[: max(limit - 3, 0)] + "..."


@dataclass
class WatchState:
    """What the retained topics of one microgrid say, folded message by message.

    Attributes:
        layout: The topics of the microgrid.
        microgrid_id: The microgrid, whose actor status topics
            (`microgrid/<id>/actors/<actor_id>`) are read too; None reads none.
        status: The bridge status, None until one arrives (or after it is cleared).
        status_unreadable: Why the newest status did not decode, None when it did.
        online_heard_at: When an `online` status last arrived live (retain flag 0);
            None until one does, and again after any other status.
        snapshots: The running snapshot of each type.
        running_since: When each `(type, id)` was first seen in a running snapshot.
        dispatches: Every dispatch, by type and id.
        upcoming: The upcoming runs of each type.
        actors: The execution status of each actor host, by actor id.
        tree: What arrived of the retained tree, against the counts the bridge
            publishes (`actor_sdk`'s resync rule; see `tree_gaps`).
        warnings: The newest warnings (garbage payloads, unknown topics).
        events: The newest lifecycle events, as `(received, event)`.
        messages: How many messages were applied.
        revision: Grows whenever a dispatch, a running snapshot or the upcoming
            runs change (a hint to redraw the dispatch list).
    """

    layout: wire.TopicLayout
    microgrid_id: int | None = None
    status: wire.BridgeStatus | None = None
    status_unreadable: str | None = None
    online_heard_at: datetime | None = None
    snapshots: dict[str, wire.RunningSnapshot] = field(default_factory=dict)
    running_since: dict[tuple[str, int], datetime] = field(default_factory=dict)
    dispatches: dict[str, dict[int, wire.Dispatch]] = field(default_factory=dict)
    upcoming: dict[str, wire.UpcomingRuns] = field(default_factory=dict)
    actors: dict[str, wire.ActorStatus] = field(default_factory=dict)
    tree: ResyncTally = field(default_factory=ResyncTally)
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_WARNINGS))
    events: deque[tuple[datetime, wire.DispatchEvent]] = field(
        default_factory=lambda: deque(maxlen=MAX_EVENTS)
    )
    messages: int = 0
    revision: int = 0

    def apply(
        self, topic: str, payload: bytes, received: datetime, *, retained: bool = True
    ) -> None:
        """Fold one message into the state; a bad topic or payload becomes a warning.

        Args:
            topic: The topic it arrived on.
            payload: Its payload; empty clears a retained topic.
            received: When it arrived (for events and the liveness rule).
            retained: Its retain flag: True for a replay of a retained message.
        """
        self.messages += 1
        try:
            if self.microgrid_id is not None and not topic.startswith(self.layout.root + "/"):
                self._apply_actor(topic, payload)
                return
            ref = self.layout.parse(topic)
            self._apply(ref, payload, received, retained)
        except wire.WireError as error:
            if topic == self.layout.status:
                # A status we cannot read counts as not live (the contract's liveness rule).
                self.status_unreadable = printable(str(error), 120)
                self.online_heard_at = None
            self.warnings.append(f"{printable(topic, 60)}: {printable(str(error), 120)}")

    def _apply(
        self, ref: wire.TopicRef, payload: bytes, received: datetime, retained: bool
    ) -> None:
        match ref.kind:
            case wire.TopicKind.STATUS:
                self._apply_status(payload, received, retained)
            case wire.TopicKind.RUNNING:
                assert ref.dispatch_type is not None
                self._apply_running(ref.dispatch_type, payload, received)
            case wire.TopicKind.DISPATCH:
                assert ref.dispatch_type is not None and ref.dispatch_id is not None
                self._apply_dispatch(ref.dispatch_type, ref.dispatch_id, payload)
            case wire.TopicKind.UPCOMING:
                assert ref.dispatch_type is not None
                if not payload:
                    self.upcoming.pop(ref.dispatch_type, None)
                    return
                upcoming = wire.decode_upcoming(payload)
                if upcoming.type != ref.dispatch_type:
                    raise wire.WireError(f"upcoming runs of type {upcoming.type!r} on this topic")
                self.upcoming[ref.dispatch_type] = upcoming
                self.revision += 1
            case wire.TopicKind.EVENTS:
                self.events.append((received, wire.decode_event(payload)))

    def _apply_status(self, payload: bytes, received: datetime, retained: bool) -> None:
        self.tree.status_seen = True
        status = wire.decode_status(payload) if payload else None
        self.status = status
        self.status_unreadable = None
        if status is None or status.state != "online":
            self.online_heard_at = None
        elif not retained:
            self.online_heard_at = received

    def _apply_running(self, dispatch_type: str, payload: bytes, received: datetime) -> None:
        if not payload:
            self.snapshots.pop(dispatch_type, None)
            snapshot = None
        else:
            snapshot = wire.decode_running(payload)
            if snapshot.type != dispatch_type:
                raise wire.WireError(f"snapshot of type {snapshot.type!r} on this topic")
            self.snapshots[dispatch_type] = snapshot
            self.tree.snapshot(dispatch_type)
        self.revision += 1
        now_running = {d.id for d in snapshot.running} if snapshot is not None else set()
        for key in [k for k in self.running_since if k[0] == dispatch_type]:
            if key[1] not in now_running:
                del self.running_since[key]
        for dispatch_id in now_running:
            self.running_since.setdefault((dispatch_type, dispatch_id), received)

    def _apply_dispatch(self, dispatch_type: str, dispatch_id: int, payload: bytes) -> None:
        of_type = self.dispatches.setdefault(dispatch_type, {})
        if not payload:
            self.tree.dispatch(dispatch_type, dispatch_id, None)
            if of_type.pop(dispatch_id, None) is not None:
                self.revision += 1
            if not of_type:
                del self.dispatches[dispatch_type]
            return
        dispatch = wire.decode_dispatch(payload)
        if dispatch.id != dispatch_id or dispatch.type != dispatch_type:
            raise wire.WireError(f"dispatch #{dispatch.id} of another topic")
        of_type[dispatch_id] = dispatch
        self.tree.dispatch(dispatch_type, dispatch_id, dispatch.update_time)
        self.revision += 1

    def _apply_actor(self, topic: str, payload: bytes) -> None:
        microgrid_id, actor_id = wire.actor_id_of(topic)
        if microgrid_id != self.microgrid_id:
            raise wire.WireError(f"actor status of microgrid {microgrid_id}")
        if not payload:
            self.actors.pop(actor_id, None)
            return
        self.actors[actor_id] = wire.decode_actor_status(payload)

    def actors_running(self, dispatch_type: str, dispatch_id: int) -> list[str]:
        """Return the actors that report running a dispatch, sorted.

        Args:
            dispatch_type: The dispatch's type.
            dispatch_id: The dispatch's id.

        Returns:
            The actor ids whose status (not `offline`) lists the dispatch as run now.
        """
        running: list[str] = []
        for actor_id, status in self.actors.items():
            of_type = status.types.get(dispatch_type)
            if (
                status.state != "offline"
                and of_type is not None
                and dispatch_id in of_type.dispatches
            ):
                running.append(actor_id)
        return sorted(running)

    def __repr__(self) -> str:
        """Say what is held in one short line.

        The generated repr spelled out every dispatch, and `asyncio.run` formats
        the repr of its result (Python 3.11 names the task in its SIGINT handler's
        repr): with 100,000 dispatches that took 3 s of `watch --once`.
        """
        return (
            f"WatchState({self.layout.root!r}: {self.messages} messages, "
            f"{self.dispatch_topics()} dispatch topics, {len(self.snapshots)} running snapshots)"
        )

    def counts_tree(self) -> bool:
        """Tell whether the status says how many dispatch topics the whole tree holds.

        Only an `online` status that says so (`tree_counts`) counts them: a bridge not
        vouching for its tree, and one older than the counts, leave completeness unknown.
        """
        status = self.status
        return status is not None and status.state == "online" and status.tree_counts

    def tree_gaps(self) -> list[str]:
        """Say what the retained tree lacks by the counts the bridge publishes.

        Returns:
            One line per gap, empty when none is known: with `counts_tree`, the
            dispatch topics the status counts, every type's running snapshot and each
            type's topics as its snapshot counts them; without, only the last
            (and the status itself, until one arrived).
        """
        return self.tree.missing(self.status, self.snapshots)

    def dispatch_topics(self) -> int:
        """Return how many dispatch topics are held (of every type)."""
        return sum(len(of_type) for of_type in self.dispatches.values())

    def types(self) -> list[str]:
        """Return every type something is known of, sorted."""
        return sorted(set(self.snapshots) | set(self.dispatches) | set(self.upcoming))


class Liveness(Enum):
    """The bridge as a reader sees it, by the contract's liveness rule."""

    LIVE = "live"
    """`online`, and a live `online` arrived less than 2 status intervals ago."""
    UNCONFIRMED = "unconfirmed"
    """A retained `online` only: no live status since we connected."""
    STALE = "stale"
    """`online`, but no live status for 2 status intervals."""
    SYNCING = "syncing"
    """Connected, but not vouching for the tree."""
    OFFLINE = "offline"
    """Its will fired, or it stopped."""
    UNKNOWN = "unknown"
    """No status, or one that does not decode."""


def liveness(state: WatchState, now: datetime) -> tuple[Liveness, str]:
    """Apply the contract's liveness rule: what the bridge is, in one line.

    Args:
        state: What the topics said.
        now: The instant to judge at (the local clock).

    Returns:
        The verdict and a line saying it.
    """
    status = state.status
    if state.status_unreadable is not None or status is None:
        reason = (
            f"status unreadable: {state.status_unreadable}"
            if state.status_unreadable is not None
            else "no status published (bridge never connected, wrong topic root?)"
        )
        return Liveness.UNKNOWN, reason
    if status.state == "offline":
        return Liveness.OFFLINE, "OFFLINE: the bridge stopped or its will fired"
    if status.state == "syncing":
        reason = printable(status.error or "no reason given", 160)
        return Liveness.SYNCING, f"SYNCING (not vouching for the tree): {reason}"
    interval = (
        timedelta(seconds=status.status_interval)
        if status.status_interval > 0
        else DEFAULT_STATUS_INTERVAL
    )
    heard = state.online_heard_at
    if heard is None:
        return Liveness.UNCONFIRMED, "online? (retained only: waiting for a live status)"
    if now - heard >= 2 * interval:
        silent = int((now - heard).total_seconds())
        return Liveness.STALE, f"STALE: online, but no live status for {silent}s"
    return Liveness.LIVE, "LIVE"
