"""Writing the offline cache as the schedule changes: `CacheWriter` and the sink it watches.

See `bridge.store` for the cache itself. The writer learns what changed from
the topics the service hands the publisher, so it writes only those rows, and
it commits them before the event loop lets the publisher send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from actor_sdk import wire
from bridge.service import strip_state
from bridge.store import DispatchCache, describe_error

__all__ = ["CacheWriter", "RecordingSink"]

_logger = logging.getLogger("bridge.store")


def _dispatch_id(topic: str) -> int | None:
    """The dispatch id of a dispatch topic (`.../dispatches/ID`), None for other topics."""
    _, separator, tail = topic.rpartition("/dispatches/")
    return int(tail) if separator and tail.isdecimal() else None


class RecordingSink:
    """Passes the service's topics on to the publisher, noting changed dispatches for the cache.

    Every attribute other than `set` and `clear` is the wrapped sink's.
    """

    def __init__(self, sink: Any, writer: CacheWriter) -> None:
        """Wrap a sink.

        Args:
            sink: Where topics go (the publisher).
            writer: Notes every dispatch set or cleared.
        """
        self._sink = sink
        self._writer = writer

    def set(self, topic: str, payload: Any) -> None:
        """Note a dispatch, then hold and publish the topic.

        Args:
            topic: The topic.
            payload: Its payload.
        """
        if isinstance(payload, wire.Dispatch):
            self._writer.note(payload)
        self._sink.set(topic, payload)

    def clear(self, topic: str) -> None:
        """Note a deleted dispatch, then clear the topic.

        Args:
            topic: The topic.
        """
        dispatch_id = _dispatch_id(topic)
        if dispatch_id is not None:
            self._writer.note_removed(dispatch_id)
        self._sink.clear(topic)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)


class CacheWriter:
    """Writes what changed to the cache before it reaches the network.

    The service's sink is wrapped (`watch`) so that every dispatch set or
    cleared is noted in `pending`; `mark()`, which the service calls at the
    end of the step that changed the set of dispatches (before the event loop
    lets the publisher send anything), commits `pending` in one transaction.
    A commit is in the operating system's hands once it returns: a `kill -9`
    right after loses nothing. `run()` then makes the commits durable against
    power loss off the event loop, at most once per `min_interval`.

    When a write fails (state dir full or read-only, database gone) the
    bridge runs from memory: the error is logged once and exposed as
    `cache_error`, and every `retry_interval` the whole cache is rewritten
    until that succeeds.
    """

    def __init__(
        self,
        cache: DispatchCache,
        dispatches: Callable[[], Iterable[wire.Dispatch]],
        synced_at: Callable[[], datetime | None],
        *,
        held: Iterable[wire.Dispatch] = (),
        min_interval: float = 0.2,
        retry_interval: float = 5.0,
        on_problem: Callable[[str | None], None] = lambda problem: None,
    ) -> None:
        """Create the writer.

        Args:
            cache: Where to write (loaded, or not open when it could not be).
            dispatches: Returns every dispatch held (for a full rewrite).
            synced_at: Returns when the dispatches were last synced with the API.
            held: The dispatches the cache holds (as loaded).
            min_interval: The shortest time between two syncs to disk, in seconds.
            retry_interval: How often a failed write is retried, in seconds.
            on_problem: Told why the cache cannot be written (for the status), and
                None once it is written again.
        """
        self._cache = cache
        self._dispatches = dispatches
        self._synced_at = synced_at
        self._min_interval = min_interval
        self._retry_interval = retry_interval
        self._on_problem = on_problem
        self.pending: dict[int, wire.Dispatch | None] = {}
        """Dispatches changed since the last commit, by id (None: deleted)."""
        self._written = {d.id: d for d in held}
        # What the cache holds (or is about to) of each dispatch: a topic set again
        # only for a new run state is not a change.
        self._unsynced = asyncio.Event()
        self._error = None if cache.is_open else cache.open_error or "not open"
        self.writes = 0
        """How many transactions were committed."""

    @property
    def cache_ok(self) -> bool:
        """Whether the last write to the cache succeeded (False: running from memory)."""
        return self._error is None

    @property
    def cache_error(self) -> str | None:
        """Why the cache cannot be written (None when it can), for the status."""
        return self._error

    def watch(self, sink: Any) -> RecordingSink:
        """Wrap the service's sink so that changed dispatches are noted.

        Args:
            sink: The publisher.

        Returns:
            The sink to hand the service.
        """
        return RecordingSink(sink, self)

    def note(self, dispatch: wire.Dispatch) -> None:
        """Note a dispatch handed to the publisher; a change is written at the next `mark`.

        Args:
            dispatch: The dispatch, with its computed state.
        """
        written = self._written.get(dispatch.id)
        self._written[dispatch.id] = dispatch
        if written is not None and (
            written is dispatch
            or (
                written.update_time == dispatch.update_time
                and strip_state(written) == strip_state(dispatch)
            )
        ):
            # Only its run state changed: nothing to write. Holding the new struct lets
            # the old one go (it would otherwise stay a second copy beside the core's).
            return
        self.pending[dispatch.id] = dispatch

    def note_removed(self, dispatch_id: int) -> None:
        """Note that a dispatch's topic was cleared.

        On a type change the old topic is cleared before the new one is set:
        the later note wins.

        Args:
            dispatch_id: The dispatch.
        """
        if self._written.pop(dispatch_id, None) is not None:
            self.pending[dispatch_id] = None

    def mark(self) -> None:
        """Commit the dispatches changed since the last commit (blocking, a few ms).

        While the cache cannot be written, the change waits for the next retry.
        """
        if self._error is None:
            self._commit()

    def _commit(self) -> None:
        full = self._error is not None
        synced_at = self._synced_at()
        if not full and not self.pending and self._cache.holds_synced_at(synced_at):
            return
        started = time.monotonic()
        count = len(self.pending)
        try:
            if full:
                if not self._cache.is_open:
                    self._cache.open()
                held = list(self._dispatches())
                count = len(held)
                self._written = {d.id: d for d in held}
                self._cache.replace(held, synced_at)
            else:
                self._cache.update(self.pending, synced_at)
        except (sqlite3.Error, OSError) as error:
            self._failed(describe_error(error))
            return
        self.pending.clear()
        self.writes += 1
        self._unsynced.set()
        if full:
            self._error = None
            self._on_problem(None)
            _logger.warning(
                "the dispatch cache %s is written again (%d dispatches): back from running "
                "from memory",
                self._cache.path,
                count,
            )
        _logger.debug(
            "cache %s: wrote %d changed dispatches in %.1f ms",
            self._cache.path,
            count,
            (time.monotonic() - started) * 1000,
        )

    def _failed(self, reason: str) -> None:
        # The full rewrite that follows covers whatever was pending.
        self.pending.clear()
        if self._error is None:
            _logger.error(
                "cannot write the dispatch cache %s (%s): running from memory (a restart "
                "while the API is unreachable would start from an older cache); retrying "
                "every %.0f s",
                self._cache.path,
                reason,
                self._retry_interval,
            )
            self._on_problem(self._problem(reason))
        self._error = reason

    def _problem(self, reason: str) -> str:
        return (
            f"cannot write the dispatch cache {self._cache.path} ({reason}): running from "
            "memory, a restart while the Dispatch API is unreachable would start from an "
            "older cache; free space or fix permissions in the state directory"
        )

    async def run(self) -> None:
        """Sync commits to disk and retry failed writes, until cancelled."""
        if self._error is not None:  # the cache could not even be opened
            self._on_problem(self._problem(self._error))
        while True:
            if self._error is None:
                await self._unsynced.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._unsynced.wait(), self._retry_interval)
                self._commit()
            await self._sync_to_disk()
            await asyncio.sleep(self._min_interval)

    async def flush(self) -> None:
        """Commit whatever is pending and sync it to disk (at shutdown)."""
        self._commit()
        await self._sync_to_disk()

    async def _sync_to_disk(self) -> None:
        if not self._unsynced.is_set():
            return
        self._unsynced.clear()
        try:
            await asyncio.to_thread(self._cache.sync_to_disk)
        except (sqlite3.Error, OSError) as error:
            _logger.error(
                "cannot sync the dispatch cache %s to disk (%s): a power loss could lose "
                "the last changes; retrying at the next change",
                self._cache.path,
                describe_error(error),
            )
