"""Advance notice: each upcoming run of a type, once, when its start comes within a window.

The bridge publishes, per type, the runs of the coming hours (`ROOT/T/upcoming`,
a `wire.UpcomingRuns`). `Dispatcher.new_upcoming_receiver(type, within=...)`
hands out a receiver of `UpcomingRun`s; its rules (docs/actor-sdk.md, "Advance
notice"):

* A run is delivered once, when `start - within <= now < start` (the bridge's
  clock as the SDK estimates it). A run whose start is already within the window
  when it becomes known is delivered at once; a run that already started is not
  delivered (the running state receivers and the actors cover it).
* A run is identified by its dispatch id and start. It is delivered again when
  its end changes. A start that moved is another run: the old one is delivered
  with `cancelled=True` (if it had been delivered), the new one when due.
* A delivered run that disappears from the list before its start (the dispatch
  was deleted, deactivated or moved) is delivered once more with
  `cancelled=True`. A run missing from a list cut short (`truncated`) after its
  last run, or beyond the list's `until`, is not cancelled.
* Notices are advisory and outlive connections: on a reconnect the retained list
  comes again and nothing already delivered is repeated; what changed while
  disconnected is delivered then. Without a connection, runs of the last list
  still come due. Whether an actor starts is decided by the running snapshot and
  the SDK's fail-safe rules, never by a notice.

`UpcomingNotices` is the pure part (one receiver's memory); `UpcomingFeeds` the
async shell the `Dispatcher` drives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from frequenz.channels import BroadcastChannel, Receiver, Sender

from actor_sdk import wire
from actor_sdk._dispatch_model import Dispatch

__all__ = ["UpcomingFeeds", "UpcomingNotices", "UpcomingRun"]

_logger = logging.getLogger(__name__)

_CHANNEL_LIMIT = 16384


@dataclass(frozen=True, slots=True)
class UpcomingRun:
    """A run of a dispatch that starts soon (or no longer will: `cancelled`)."""

    dispatch_id: int
    start: datetime
    end: datetime | None
    """None: the run has no end."""
    dispatch: Dispatch | None
    """The dispatch, when the SDK holds it."""
    cancelled: bool = False
    """True: a run delivered before will not happen (deleted, deactivated, moved)."""


_Key = tuple[int, datetime]


class UpcomingNotices:
    """What one receiver was told, and what is due; pure (every call takes `now`)."""

    def __init__(self, within: timedelta) -> None:
        """Create an empty memory.

        Args:
            within: How long before its start a run is delivered.
        """
        self.within = within
        self._runs: dict[_Key, datetime | None] = {}
        self._sent: dict[_Key, datetime | None] = {}

    def update(self, runs: wire.UpcomingRuns | None, now: datetime) -> list[UpcomingRun]:
        """Take a new list (None: the topic was cleared); return the cancellations.

        Args:
            runs: The bridge's list of the type.
            now: The current instant.

        Returns:
            The delivered runs that will not happen after all.
        """
        listed = () if runs is None else runs.runs
        self._runs = {(run.id, run.start): run.end for run in listed}
        covered_until = None if runs is None else runs.until
        if runs is not None and runs.truncated and listed:
            covered_until = min(covered_until or listed[-1].start, listed[-1].start)
        cancelled: list[UpcomingRun] = []
        for key, end in list(self._sent.items()):
            if key in self._runs:
                continue
            dispatch_id, start = key
            if start <= now:
                del self._sent[key]  # started: no longer ours to follow
            elif covered_until is None or start < covered_until:
                del self._sent[key]
                cancelled.append(UpcomingRun(dispatch_id, start, end, None, cancelled=True))
        return cancelled

    def due(self, now: datetime) -> list[UpcomingRun]:
        """The runs to deliver now: new in the window, or with another end.

        Args:
            now: The current instant.

        Returns:
            The runs, by start then id, without their dispatch (the shell adds it).
        """
        horizon = now + self.within
        out: list[UpcomingRun] = []
        for key, end in sorted(self._runs.items()):
            dispatch_id, start = key
            if now < start <= horizon and (key not in self._sent or self._sent[key] != end):
                self._sent[key] = end
                out.append(UpcomingRun(dispatch_id, start, end, None))
        for key in [key for key in self._sent if key[1] <= now and key not in self._runs]:
            del self._sent[key]
        return sorted(out, key=lambda run: (run.start, run.dispatch_id))

    def next_due(self, now: datetime) -> datetime | None:
        """When the next run comes within the window, if any.

        Args:
            now: The current instant.

        Returns:
            The instant, None when no listed run is still to come.
        """
        later = [
            key[1] - self.within
            for key in self._runs
            if key[1] - self.within > now and key not in self._sent
        ]
        return min(later, default=None)


@dataclass
class _Feed:
    dispatch_type: str
    notices: UpcomingNotices
    sender: Sender[UpcomingRun]


class UpcomingFeeds:
    """The upcoming receivers of a `Dispatcher`, fed from the `upcoming` topics."""

    def __init__(
        self,
        clock: Callable[[], datetime],
        dispatch_of: Callable[[str, int], Dispatch | None],
    ) -> None:
        """Create a set without receivers.

        Args:
            clock: The bridge's time as estimated here.
            dispatch_of: The dispatch held for (type, id), if any.
        """
        self._clock = clock
        self._dispatch_of = dispatch_of
        self._payloads: dict[str, bytes] = {}
        self._feeds: list[_Feed] = []
        self._wakeup = asyncio.Event()

    def follows(self, dispatch_type: str) -> bool:
        """Tell whether a receiver of the type was handed out.

        Args:
            dispatch_type: The type.

        Returns:
            True once `receiver` was called for it.
        """
        return any(feed.dispatch_type == dispatch_type for feed in self._feeds)

    def receiver(self, dispatch_type: str, within: timedelta) -> Receiver[UpcomingRun]:
        """A new receiver of the type's runs whose start comes within `within`.

        Args:
            dispatch_type: The type.
            within: How long before its start a run is delivered.

        Returns:
            The receiver; the runs already within the window come first.
        """
        if within <= timedelta(0):
            raise ValueError(f"within must be positive, not {within}")
        sender, receiver = BroadcastChannel[UpcomingRun](
            name=f"upcoming-{dispatch_type}", limit=_CHANNEL_LIMIT
        )
        feed = _Feed(dispatch_type, UpcomingNotices(within), sender)
        self._feeds.append(feed)
        payload = self._payloads.get(dispatch_type)
        if payload is not None:
            feed.notices.update(self._decode(dispatch_type, payload), self._clock())
        self._wakeup.set()
        return receiver

    async def apply(self, dispatch_type: str, payload: bytes) -> None:
        """Take the type's `upcoming` message (the `Dispatcher` subscribes followed types).

        Args:
            dispatch_type: The type.
            payload: The message (empty: cleared).
        """
        self._payloads[dispatch_type] = payload
        feeds = [feed for feed in self._feeds if feed.dispatch_type == dispatch_type]
        if not feeds:
            return
        runs = self._decode(dispatch_type, payload)
        now = self._clock()
        for feed in feeds:
            for run in feed.notices.update(runs, now):
                await self._send(feed, run)
        self._wakeup.set()

    async def _send(self, feed: _Feed, run: UpcomingRun) -> None:
        dispatch = self._dispatch_of(feed.dispatch_type, run.dispatch_id)
        await feed.sender.send(
            UpcomingRun(run.dispatch_id, run.start, run.end, dispatch, cancelled=run.cancelled)
        )

    def _decode(self, dispatch_type: str, payload: bytes) -> wire.UpcomingRuns | None:
        if not payload:
            return None
        try:
            return wire.decode_upcoming(payload)
        except wire.WireError as error:
            _logger.warning(
                "the upcoming runs of type %r cannot be read (%s): taken as none listed",
                dispatch_type,
                error,
            )
            return None

    async def run(self) -> None:
        """Deliver runs as they come due, until cancelled."""
        while True:
            self._wakeup.clear()
            now = self._clock()
            wake: datetime | None = None
            for feed in self._feeds:
                for run in feed.notices.due(now):
                    await self._send(feed, run)
                due = feed.notices.next_due(now)
                if due is not None and (wake is None or due < wake):
                    wake = due
            timeout = None if wake is None else max((wake - now).total_seconds(), 0.0) + 0.001
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def close(self) -> None:
        """Close every receiver handed out."""
        for feed in self._feeds:
            await feed.sender.aclose()
        self._feeds.clear()
