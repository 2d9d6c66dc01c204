"""The end of a resync, recognised from what arrived rather than from which message came last.

After each connect the broker sends the retained tree again, in an order of its
own (NATS: not the publish order, the status possibly first). The tree describes
itself: the bridge's status counts the dispatches it holds, and each type's
running snapshot counts the `dispatches/ID` topics of its type with a digest of
their ids and update times (`wire.TypeTally`). `ResyncTally` keeps what arrived
since the connect and says what is still missing; the sync is complete when
nothing is.

Complete means all of these:

* a status arrived (readable or not);
* per type, the dispatch topics that arrived are those its latest snapshot counts
  (a snapshot of an older bridge, without the count, is taken as matching);
* while the status is `online` and says it counts the tree (`tree_counts`, not
  set by bridges older than this rule): as many dispatch topics arrived as it
  counts, and every type with a dispatch topic, and every type whose last known
  snapshot runs something, has had its running snapshot again.

Without counts (an older bridge, or one not vouching for its tree) the status
ends the sync, as its coming last does on Mosquitto.

An SDK subscribes to the `dispatches/ID` topics of the types it follows only
(`followed`), and to every type's running snapshot. The status's count is then
checked against the sum of the counts of the snapshots that arrived (every
dispatch topic is counted by the snapshot of its type, so the sum reaches the
status's count only once every type's snapshot came), and the count and digest
against the arrived topics in the followed types only.

The counts converge while the bridge publishes: a snapshot may announce a topic a
moment before the topic itself arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from actor_sdk import wire

__all__ = ["ResyncTally"]


class ResyncTally:
    """What arrived of the retained tree since the last connect."""

    def __init__(self) -> None:
        self.status_seen = False
        self._tallies: dict[str, wire.TypeTally] = {}
        self._received = 0
        self._snapshots: set[str] = set()

    def reset(self) -> None:
        """Start again (a new connection)."""
        self.status_seen = False
        self._tallies.clear()
        self._received = 0
        self._snapshots.clear()

    def dispatch(self, dispatch_type: str, dispatch_id: int, update_time: datetime | None) -> None:
        """Record a dispatch topic.

        Args:
            dispatch_type: Its type.
            dispatch_id: Its id.
            update_time: The update time of its payload; None when cleared.
        """
        tally = self._tallies.setdefault(dispatch_type, wire.TypeTally())
        before = len(tally)
        if update_time is None:
            tally.remove(dispatch_id)
        else:
            tally.put(dispatch_id, update_time)
        self._received += len(tally) - before

    def snapshot(self, dispatch_type: str) -> None:
        """Record that a running snapshot of a type arrived (accepted or not).

        Args:
            dispatch_type: The type.
        """
        self._snapshots.add(dispatch_type)

    def complete_type(self, dispatch_type: str, latest: wire.RunningSnapshot | None) -> bool:
        """Whether a type's snapshot came again and its dispatch topics match it.

        Args:
            dispatch_type: The type.
            latest: The latest accepted snapshot of the type.

        Returns:
            True when complete.
        """
        if dispatch_type not in self._snapshots or latest is None:
            return False
        return self._tallies.get(dispatch_type, wire.TypeTally()).matches(latest)

    def missing(
        self,
        status: wire.BridgeStatus | None,
        latest: Mapping[str, wire.RunningSnapshot],
        expected: Iterable[str] = (),
        followed: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Say what the sync still waits for.

        Args:
            status: The current status (None: none, or unreadable).
            latest: The latest accepted snapshot of each type.
            expected: Types whose snapshot must come again (the last known runs something).
            followed: Whether the dispatch topics of a type are subscribed; None: all.

        Returns:
            One line per gap; empty when the sync is complete.
        """
        if not self.status_seen:
            return ["the bridge status"]
        if status is None or status.state != "online" or not status.tree_counts:
            # No counts to go by (a bridge older than them, or not vouching): the
            # status ends the sync, as its coming last does on Mosquitto.
            return self._mismatches(latest, followed)
        if followed is None:
            counted, what = self._received, "dispatch topics"
        else:
            counted = sum(latest[t].dispatches or 0 for t in self._snapshots if t in latest)
            what = "dispatch topics counted by the running snapshots"
        if counted != status.dispatches:
            # The cheap test first: during a large sync it fails for every message but the last.
            return [f"{counted} of the {status.dispatches} {what} the status counts"]
        types = {t for t, tally in self._tallies.items() if len(tally)} | set(expected)
        gaps = [f"the running snapshot of type {t!r}" for t in sorted(types - self._snapshots)]
        return gaps + self._mismatches(latest, followed)

    def _mismatches(
        self, latest: Mapping[str, wire.RunningSnapshot], followed: Callable[[str], bool] | None
    ) -> list[str]:
        gaps = []
        for dispatch_type in sorted(self._snapshots):
            if followed is not None and not followed(dispatch_type):
                continue
            snapshot = latest.get(dispatch_type)
            tally = self._tallies.get(dispatch_type, wire.TypeTally())
            if snapshot is not None and not tally.matches(snapshot):
                gaps.append(
                    f"type {dispatch_type!r}: {len(tally)} dispatch topics arrived, its running "
                    f"snapshot counts {snapshot.dispatches}"
                    + (" (same count, other versions)" if len(tally) == snapshot.dispatches else "")
                )
        return gaps
