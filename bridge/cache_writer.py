"""Writing the offline cache as the schedule changes: `CacheWriter`.

See `bridge.store` for the cache itself. The writer is told what changed by the
schedule core (`Outbox.stored`, through `MicrogridService.on_change`), so it writes
only those rows, and it commits them before the service hands the step's topics to
the publisher. It holds nothing per dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from actor_sdk import wire
from bridge.store import DispatchCache, describe_error

__all__ = ["CacheWriter"]

_logger = logging.getLogger("bridge.store")


class CacheWriter:
    """Writes what changed to the cache before it reaches the network.

    `mark()`, which the service calls in the step that changed the set of
    dispatches before it hands the publisher any topic of it,
    commits what the core said the cache must store in one transaction.
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
        min_interval: float = 0.2,
        retry_interval: float = 5.0,
        on_problem: Callable[[str | None], None] = lambda problem: None,
    ) -> None:
        """Create the writer.

        Args:
            cache: Where to write (loaded, or not open when it could not be).
            dispatches: Returns every dispatch held (for a full rewrite).
            synced_at: Returns when the dispatches were last synced with the API.
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
        """Dispatches changed and not yet committed, by id (None: deleted)."""
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

    def mark(self, stored: Mapping[int, wire.Dispatch | None]) -> None:
        """Commit what the core says the cache must store, and the sync time (blocking, a few ms).

        While the cache cannot be written, nothing is noted: the retry rewrites it whole.

        Args:
            stored: Each dispatch put (new or changed) by id, None for each removed.
        """
        if self._error is None:
            self.pending.update(stored)
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
