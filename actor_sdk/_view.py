"""What the SDK knows of the bridge, built from the retained topics; pure (no I/O, no clock).

The view takes raw payloads in topic order and keeps:

* the bridge status (the latest `online`, or an `offline` of the same or a newer session;
  an `offline` of an older session is a stale will and is ignored), and when an `online`
  status last arrived live (retain flag 0) on this connection: the view is live only
  within 2 status intervals of that (a broker restored from its autosave replays a
  retained `online` of a bridge that may be long dead; the bridge republishes its status
  every interval); `syncing` (the bridge does not vouch for the tree) and a status
  that does not decode (a newer contract's state) count as not online,
* per type, the latest accepted running snapshot: a snapshot is accepted when its
  `(session, seq)` is newer than the last one of that type; a higher session always
  wins; a lower session only when the bridge's current online status carries it
  (a bridge whose state dir was wiped starts counting again),
  a snapshot of an older session than the current status is unconfirmed (`confirmed`)
  until the bridge republishes it in its session,
* every dispatch from the retained `T/dispatches/ID` topics, from which the lifecycle
  events come. The non-retained `T/events` topic is not used: retained state survives
  reconnects, a missed event does not.

After a (re)connect the SDK calls `begin_sync`, feeds the retained messages, and calls
`end_sync` at the barrier (the retained status, which the broker sends after the
retained messages of the earlier subscription): a dispatch whose topic did not come
back was deleted meanwhile. A running snapshot that did not come back was lost by the
broker (the bridge never clears one), so the last one received stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec

from actor_sdk import wire
from actor_sdk._dispatch_model import Dispatch, from_wire
from actor_sdk._event import Created, Deleted, DispatchEvent, Updated
from actor_sdk._resync import ResyncTally

__all__ = ["DEFAULT_STATUS_INTERVAL", "BridgeView", "is_newer"]

_logger = logging.getLogger(__name__)

DEFAULT_STATUS_INTERVAL = timedelta(seconds=5)
"""The bridge's status interval assumed when its status does not say (older bridges)."""


def status_interval(status: wire.BridgeStatus) -> timedelta:
    """Return how often the bridge said it republishes its status.

    Args:
        status: The status.

    Returns:
        Its `status_interval`; `DEFAULT_STATUS_INTERVAL` when it is 0 or missing.
    """
    seconds = status.status_interval
    return timedelta(seconds=seconds) if seconds > 0 else DEFAULT_STATUS_INTERVAL


def is_newer(
    session: int,
    seq: int,
    last: tuple[int, int] | None,
    online_session: int | None,
) -> bool:
    """Tell whether a snapshot supersedes the last accepted one of its type.

    Args:
        session: The snapshot's bridge session.
        seq: The snapshot's sequence number.
        last: `(session, seq)` of the last accepted snapshot, None if none.
        online_session: The session of the bridge's current online status, if any.

    Returns:
        True to accept it.
    """
    if last is None or session > last[0]:
        return True
    if session == last[0]:
        return seq > last[1]
    return session == online_session


class _Held:
    """One retained dispatch: the wire struct, its definition, its SDK form once needed.

    Converting to the client library's types costs far more than decoding, and a
    microgrid may hold many thousands of dispatches: it happens only when a receiver
    or an actor needs the dispatch.
    """

    __slots__ = ("converted", "definition", "message")

    def __init__(self, message: wire.Dispatch) -> None:
        self.message = message
        self.definition = msgspec.structs.replace(message, running=False, until=None, next_run=None)
        self.converted: Dispatch | None = None

    def dispatch(self) -> Dispatch:
        """Return the SDK's form (converted once).

        Raises:
            WireError: It names a target the client library does not know.
        """
        if self.converted is None:
            self.converted = from_wire(self.message)
        return self.converted


@dataclass(frozen=True)
class _Snapshot:
    session: int
    seq: int
    as_of: datetime | None
    running: tuple[Dispatch, ...]
    next_change: datetime | None = None


class BridgeView:
    """The SDK's picture of one microgrid's topics."""

    def __init__(self, microgrid_id: int) -> None:
        """Create an empty view.

        Args:
            microgrid_id: The microgrid whose topics are fed in.
        """
        self._microgrid_id = microgrid_id
        self.status: wire.BridgeStatus | None = None
        self.in_sync = False
        self._snapshots: dict[str, _Snapshot] = {}
        self._dispatches: dict[str, dict[int, _Held]] = {}
        self._starts: dict[str, dict[int, datetime]] = {}
        """Per type, the `next_run` each held active dispatch was told (own-clock starts)."""
        self.followed: Callable[[str], bool] | None = None
        """Whether the dispatch topics of a type are subscribed; None: every type's."""
        self._seen_dispatches: set[tuple[str, int]] = set()
        self.resync = ResyncTally()
        """What arrived of the retained tree since the connect (`missing`)."""
        self._latest: dict[str, wire.RunningSnapshot] = {}
        self._online_heard_at: datetime | None = None
        self.live_status_at: datetime | None = None
        """When a status last arrived live (retain 0), on the local clock; for metrics."""

    @property
    def live_until(self) -> datetime | None:
        """Until when the view is live; None when it is not live at all.

        Live: in sync with the broker, the bridge's status is `online`, and such a
        status arrived live on this connection; for 2 status intervals after the
        latest one (local clock).
        """
        status = self.status
        if not self.in_sync or status is None or status.state != "online":
            return None
        if self._online_heard_at is None:
            return None
        return self._online_heard_at + 2 * status_interval(status)

    def is_live(self, now: datetime) -> bool:
        """Tell whether the view is live at a local instant.

        Args:
            now: The local clock.

        Returns:
            True when in sync and an `online` status arrived live less than 2
            status intervals ago.
        """
        until = self.live_until
        return until is not None and now < until

    def confirmed(self, dispatch_type: str) -> bool:
        """Tell whether the running snapshot of a type is of the current bridge session.

        A snapshot of an older session than the current status was published by an
        earlier run of the bridge and is unconfirmed until this run republishes it.

        Args:
            dispatch_type: The type.

        Returns:
            False when a status of a newer session than the snapshot's is held.
        """
        snapshot = self._snapshots.get(dispatch_type)
        status = self.status
        return snapshot is None or status is None or snapshot.session >= status.session

    def types(self) -> set[str]:
        """Return every type that has a running snapshot or a dispatch."""
        return set(self._snapshots) | set(self._dispatches)

    def running(self, dispatch_type: str) -> tuple[Dispatch, ...]:
        """Return the dispatches of a type the latest accepted snapshot says run.

        Args:
            dispatch_type: The type.

        Returns:
            The dispatches, sorted by id.
        """
        snapshot = self._snapshots.get(dispatch_type)
        return () if snapshot is None else snapshot.running

    def snapshot_times(self, dispatch_type: str) -> tuple[datetime | None, datetime | None]:
        """Return `as_of` and `next_change` of the latest accepted snapshot of a type.

        Args:
            dispatch_type: The type.

        Returns:
            Both None when no snapshot of the type was accepted.
        """
        snapshot = self._snapshots.get(dispatch_type)
        return (None, None) if snapshot is None else (snapshot.as_of, snapshot.next_change)

    def agrees(self, dispatch_type: str) -> bool:
        """Tell whether the held dispatch topics of a type are those its snapshot counts.

        The latest snapshot (since the connect) carries the count and digest of the
        type's `dispatches/ID` topics as the bridge made it (an older bridge's
        carries none: taken as agreeing); a change whose topic is still on its way
        shows as a difference.

        Args:
            dispatch_type: The type.

        Returns:
            False when they differ or no snapshot of the type came since the connect.
        """
        return self.resync.complete_type(dispatch_type, self._latest.get(dispatch_type))

    def told_starts(self, dispatch_type: str, until: datetime) -> list[Dispatch]:
        """Return the held active dispatches of a type told to start at or before `until`.

        Args:
            dispatch_type: The type.
            until: The latest `next_run` wanted (the bridge's clock).

        Returns:
            Each dispatch as last received (one not representable is logged, left out).
        """
        starts = self._starts.get(dispatch_type, {})
        due = [dispatch_id for dispatch_id, start in starts.items() if start <= until]
        return [d for i in due if (d := self.dispatch(dispatch_type, i)) is not None]

    def told_start_of(self, dispatch_type: str, dispatch_id: int) -> datetime | None:
        """Return the `next_run` the held message of one active dispatch tells.

        Args:
            dispatch_type: Its type.
            dispatch_id: Its id.

        Returns:
            The instant (the bridge's clock); None when unknown, inactive or none.
        """
        return self._starts.get(dispatch_type, {}).get(dispatch_id)

    def next_told_start(self, dispatch_type: str, after: datetime) -> datetime | None:
        """Return the earliest `next_run` after an instant told of a held dispatch of a type.

        Args:
            dispatch_type: The type.
            after: The instant (the bridge's clock).

        Returns:
            The instant; None when no start is told after it.
        """
        return min(
            (start for start in self._starts.get(dispatch_type, {}).values() if start > after),
            default=None,
        )

    def dispatches(self, dispatch_type: str) -> dict[int, Dispatch]:
        """Return the known dispatches of a type, by id.

        Args:
            dispatch_type: The type.

        Returns:
            The dispatches (one the client library cannot represent is logged, left out).
        """
        result = {}
        for dispatch_id in self._dispatches.get(dispatch_type, {}):
            dispatch = self.dispatch(dispatch_type, dispatch_id)
            if dispatch is not None:
                result[dispatch_id] = dispatch
        return result

    def dispatch(self, dispatch_type: str, dispatch_id: int) -> Dispatch | None:
        """Return one known dispatch.

        Args:
            dispatch_type: Its type.
            dispatch_id: Its id.

        Returns:
            The dispatch; None when unknown or not representable (logged).
        """
        held = self._dispatches.get(dispatch_type, {}).get(dispatch_id)
        if held is None:
            return None
        try:
            return held.dispatch()
        except wire.WireError as error:
            _logger.warning(
                "ignoring dispatch %d of type %r: %s", dispatch_id, dispatch_type, error
            )
            return None

    def _forget(self, dispatch_type: str, dispatch_id: int) -> _Held:
        of_type = self._dispatches[dispatch_type]
        gone = of_type.pop(dispatch_id)
        if not of_type:
            del self._dispatches[dispatch_type]
        self._told(dispatch_type, dispatch_id, None)
        return gone

    def _told(self, dispatch_type: str, dispatch_id: int, message: wire.Dispatch | None) -> None:
        starts = self._starts.setdefault(dispatch_type, {})
        if message is not None and message.active and message.next_run is not None:
            starts[dispatch_id] = message.next_run
        else:
            starts.pop(dispatch_id, None)
            if not starts:
                del self._starts[dispatch_type]

    def _deleted(self, dispatch_type: str, held: _Held) -> list[DispatchEvent]:
        try:
            return [Deleted(held.dispatch().with_state(running=False, deleted=True))]
        except wire.WireError:
            return []

    # --- connection --------------------------------------------------------------

    def begin_sync(self) -> None:
        """Start receiving the retained state again (after a connect)."""
        self.in_sync = False
        self._online_heard_at = None
        self._seen_dispatches.clear()
        self.resync.reset()

    def missing(self) -> list[str]:
        """Say what the retained tree of this connection still lacks (`_resync`).

        Returns:
            One line per gap; empty when the sync is complete.
        """
        expected = [t for t, snapshot in self._snapshots.items() if snapshot.running]
        return self.resync.missing(self.status, self._latest, expected, self.followed)

    def end_sync(self, events_for: Callable[[str], bool] = lambda _: True) -> list[DispatchEvent]:
        """Finish a sync: a dispatch whose retained topic did not come back is gone.

        A type whose running snapshot did not come back keeps its last one: the
        bridge never clears a running topic (it publishes an empty snapshot), so a
        missing one means the broker lost it, and the bridge republishes it after its
        own reconnect. Deletions are only concluded when the bridge is online.

        Args:
            events_for: Whether anyone wants the lifecycle events of a type.

        Returns:
            A `Deleted` for each dispatch whose retained topic disappeared.
        """
        events: list[DispatchEvent] = []
        # A sync ended by its timeout concludes deletions only in the complete types.
        whole = not self.missing()
        if self.status is not None and self.status.state == "online":
            for key in [
                (dispatch_type, dispatch_id)
                for dispatch_type, of_type in self._dispatches.items()
                for dispatch_id in of_type
                if (dispatch_type, dispatch_id) not in self._seen_dispatches
                and (
                    whole
                    or self.resync.complete_type(dispatch_type, self._latest.get(dispatch_type))
                )
            ]:
                gone = self._forget(*key)
                if events_for(key[0]):
                    events += self._deleted(key[0], gone)
        self.in_sync = True
        return events

    def lost_connection(self) -> None:
        """Record that the broker connection is gone: the view is no longer live."""
        self.in_sync = False
        self._online_heard_at = None

    # --- messages ----------------------------------------------------------------

    def apply_status(self, payload: bytes, *, retained: bool, arrived: datetime) -> bool:
        """Apply a status payload.

        Args:
            payload: The raw payload; empty when the retained status was cleared.
            retained: The MQTT retain flag: a replay of the retained status on
                subscribing (not proof that the bridge is alive now).
            arrived: When it arrived (local clock).

        Returns:
            True when the status changed.

        Raises:
            WireError: The payload is not a status this SDK understands (for
                example a state of a newer contract); the status is then unknown and
                the view not live.
        """
        self.resync.status_seen = True
        if not retained:
            self.live_status_at = arrived
        if not payload:
            changed = self.status is not None
            self.status = None
            self._online_heard_at = None
            return changed
        try:
            status = wire.decode_status(payload)
        except wire.WireError:
            self.status = None
            self._online_heard_at = None
            raise
        current = self.status
        if current is not None and status.state == "offline" and status.session < current.session:
            _logger.info(
                "ignoring a stale offline status of bridge session %d (current session %d)",
                status.session,
                current.session,
            )
            return False
        self.status = status
        if status.state != "online":
            self._online_heard_at = None
        elif not retained:
            self._online_heard_at = arrived
        # Not `as_of` and the counters: the bridge republishes its status every few seconds.
        return current is None or (status.state, status.session, status.upstream) != (
            current.state,
            current.session,
            current.upstream,
        )

    def apply_running(self, dispatch_type: str, payload: bytes) -> wire.RunningSnapshot | None:
        """Apply a running snapshot of a type.

        Args:
            dispatch_type: The type from the topic.
            payload: The raw payload; empty when the retained snapshot was cleared.

        Returns:
            The snapshot when accepted; None when it was old, a duplicate, or a clearing.

        Raises:
            WireError: The payload is not a running snapshot of this type and microgrid,
                or names a target the client library does not know.
        """
        if not payload:
            snapshot = self._snapshots.get(dispatch_type)
            if snapshot is not None and snapshot.running:
                self._snapshots[dispatch_type] = _Snapshot(
                    snapshot.session, snapshot.seq, snapshot.as_of, (), snapshot.next_change
                )
            return None
        message = wire.decode_running(payload)
        if message.type != dispatch_type or message.microgrid_id != self._microgrid_id:
            raise wire.WireError(
                f"snapshot of type {message.type!r}, microgrid {message.microgrid_id} "
                f"on the topic of type {dispatch_type!r}, microgrid {self._microgrid_id}"
            )
        self.resync.snapshot(dispatch_type)
        last = self._snapshots.get(dispatch_type)
        online = self.status.session if self.status and self.status.state == "online" else None
        if not is_newer(
            message.session, message.seq, None if last is None else (last.session, last.seq), online
        ):
            return None
        running = []
        for item in message.running:
            try:
                if item.type != dispatch_type:
                    raise wire.WireError(f"dispatch {item.id} is of type {item.type!r}")
                running.append(from_wire(item, as_of=message.as_of))
            except wire.WireError as error:
                _logger.warning(
                    "ignoring dispatch %d in the running snapshot of type %r: %s",
                    item.id,
                    dispatch_type,
                    error,
                )
        self._snapshots[dispatch_type] = _Snapshot(
            message.session, message.seq, message.as_of, tuple(running), message.next_change
        )
        self._latest[dispatch_type] = message
        return message

    def apply_dispatch(
        self, dispatch_type: str, dispatch_id: int, payload: bytes, *, events: bool = True
    ) -> list[DispatchEvent]:
        """Apply the retained message of one dispatch.

        Args:
            dispatch_type: The type from the topic.
            dispatch_id: The id from the topic.
            payload: The raw payload; empty when the dispatch was deleted.
            events: Whether to return lifecycle events (they need the conversion
                to the client library's types, which is otherwise put off).

        Returns:
            The lifecycle events it causes (none when only its computed state changed).

        Raises:
            WireError: The payload is not this dispatch, or (with `events`) names a
                target the client library does not know.
        """
        self._seen_dispatches.add((dispatch_type, dispatch_id))
        known = self._dispatches.get(dispatch_type, {}).get(dispatch_id)
        if not payload:
            self.resync.dispatch(dispatch_type, dispatch_id, None)
            if known is None:
                return []
            self._forget(dispatch_type, dispatch_id)
            return self._deleted(dispatch_type, known) if events else []
        message = wire.decode_dispatch(payload)
        if message.id != dispatch_id or message.type != dispatch_type:
            raise wire.WireError(
                f"dispatch {message.id} of type {message.type!r} on the topic of "
                f"dispatch {dispatch_id} of type {dispatch_type!r}"
            )
        self.resync.dispatch(dispatch_type, dispatch_id, message.update_time)
        held = _Held(message)
        if events:
            held.dispatch()  # a target the client library cannot represent is garbage
        self._dispatches.setdefault(dispatch_type, {})[dispatch_id] = held
        self._told(dispatch_type, dispatch_id, message)
        if not events:
            return []
        if known is None:
            return [Created(held.dispatch())]
        if known.definition != held.definition:
            return [Updated(held.dispatch())]
        return []
