"""The bridge's state directory: the offline cache of dispatches and the session counter.

Layout, one directory per microgrid under the state dir:

* `microgrid-M/dispatches.json`: every dispatch of microgrid `M` as last
  known (the wire struct, JSON), so that a bridge started while the Dispatch
  API is unreachable publishes the right schedule from it.
* `microgrid-M/session`: the MQTT session counter, so that `session` keeps
  growing across restarts of the bridge.

Every write is atomic (temp file, fsync, rename): a crash leaves the old file
or the new one, never half of one. A cache that cannot be read is logged and
ignored (the bridge then starts empty and waits for the API), never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import msgspec

from actor_sdk import wire

__all__ = ["CACHE_VERSION", "CacheWriter", "DispatchCache", "SessionCounter", "atomic_write"]

_logger = logging.getLogger("bridge.store")

CACHE_VERSION = 1
"""The format version of `dispatches.json`; other versions are ignored."""


class _CacheFile(msgspec.Struct, kw_only=True):
    """What `dispatches.json` holds."""

    version: int
    microgrid_id: int
    saved_at: wire.UtcTime
    synced_at: wire.UtcTime | None = None
    dispatches: list[wire.Dispatch]


_decode_cache = msgspec.json.Decoder(_CacheFile)
_encoder = msgspec.json.Encoder()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace a file with new content, atomically and durably.

    Args:
        path: The file.
        data: Its new content.

    Raises:
        OSError: The file could not be written (the old one is left as it was).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    # The rename itself is durable only once the directory is synced.
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DispatchCache:
    """The offline cache of one microgrid's dispatches."""

    def __init__(self, directory: Path, microgrid_id: int) -> None:
        """Create the cache; nothing is read or written yet.

        Args:
            directory: The microgrid's directory in the state dir.
            microgrid_id: The microgrid.
        """
        self.path = directory / "dispatches.json"
        self.microgrid_id = microgrid_id

    def load(self) -> tuple[list[wire.Dispatch], datetime | None] | None:
        """Read the cache.

        Returns:
            The dispatches and when they were last synced with the API; None
            when there is no cache, or it cannot be used (logged).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            _logger.info("no dispatch cache at %s yet: starting empty", self.path)
            return None
        except OSError as error:
            _logger.error(
                "cannot read the dispatch cache %s (%s): starting empty, "
                "waiting for the Dispatch API",
                self.path,
                error.strerror,
            )
            return None
        try:
            cache = _decode_cache.decode(data)
        except (msgspec.DecodeError, RecursionError) as error:
            _logger.error(
                "the dispatch cache %s is corrupt (%s): ignoring it, starting empty, "
                "waiting for the Dispatch API; it is rewritten at the next sync",
                self.path,
                str(error)[:200],
            )
            return None
        if cache.version != CACHE_VERSION or cache.microgrid_id != self.microgrid_id:
            _logger.warning(
                "the dispatch cache %s is of version %d / microgrid %d, expected %d / %d: "
                "ignoring it",
                self.path,
                cache.version,
                cache.microgrid_id,
                CACHE_VERSION,
                self.microgrid_id,
            )
            return None
        return cache.dispatches, cache.synced_at

    def encode(
        self, dispatches: Iterable[wire.Dispatch], saved_at: datetime, synced_at: datetime | None
    ) -> bytes:
        """Encode the cache content.

        Args:
            dispatches: The dispatches to save.
            saved_at: Now.
            synced_at: When the dispatches were last synced with the API.

        Returns:
            The file content.
        """
        return _encoder.encode(
            _CacheFile(
                version=CACHE_VERSION,
                microgrid_id=self.microgrid_id,
                saved_at=saved_at,
                synced_at=synced_at,
                dispatches=list(dispatches),
            )
        )

    def save(
        self, dispatches: Iterable[wire.Dispatch], saved_at: datetime, synced_at: datetime | None
    ) -> None:
        """Write the cache atomically (blocking).

        Args:
            dispatches: The dispatches to save.
            saved_at: Now.
            synced_at: When the dispatches were last synced with the API.

        Raises:
            OSError: The file could not be written.
        """
        atomic_write(self.path, self.encode(dispatches, saved_at, synced_at))


class CacheWriter:
    """Saves the cache in the background, coalescing bursts of changes into one write.

    `mark()` is cheap and synchronous; `run()` writes at most once per
    `min_interval`, always the newest content, off the event loop thread.
    """

    def __init__(
        self,
        cache: DispatchCache,
        snapshot: Callable[[], tuple[list[wire.Dispatch], datetime | None]],
        clock: Callable[[], datetime],
        min_interval: float = 0.2,
    ) -> None:
        """Create the writer.

        Args:
            cache: Where to write.
            snapshot: Returns the dispatches to save and the last sync time.
            clock: Returns now (only used for `saved_at`).
            min_interval: The shortest time between two writes, in seconds.
        """
        self._cache = cache
        self._snapshot = snapshot
        self._clock = clock
        self._min_interval = min_interval
        self._dirty = asyncio.Event()
        self.writes = 0

    def mark(self) -> None:
        """Note that the dispatches changed and must be saved."""
        self._dirty.set()

    async def run(self) -> None:
        """Write whenever marked, until cancelled."""
        while True:
            await self._dirty.wait()
            await self.flush()
            await asyncio.sleep(self._min_interval)

    async def flush(self) -> None:
        """Write now if anything changed since the last write."""
        if not self._dirty.is_set():
            return
        self._dirty.clear()
        dispatches, synced_at = self._snapshot()
        started = time.monotonic()
        data = self._cache.encode(dispatches, self._clock(), synced_at)
        try:
            await asyncio.to_thread(atomic_write, self._cache.path, data)
        except OSError as error:
            _logger.error(
                "cannot write the dispatch cache %s (%s): a restart while the API is "
                "unreachable would start from an older cache; retrying at the next change",
                self._cache.path,
                error.strerror,
            )
            return
        self.writes += 1
        _logger.debug(
            "saved %d dispatches to %s in %.0f ms",
            len(dispatches),
            self._cache.path,
            (time.monotonic() - started) * 1000,
        )


class SessionCounter:
    """The MQTT session number of one microgrid, persisted so it grows across restarts."""

    def __init__(self, directory: Path) -> None:
        """Create the counter; reads the last value.

        Args:
            directory: The microgrid's directory in the state dir.
        """
        self.path = directory / "session"
        self._last = self._read()

    def _read(self) -> int:
        try:
            return int(self.path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            _logger.warning(
                "cannot read the session counter %s (%s): starting from a time-based value",
                self.path,
                error,
            )
            # Still larger than any counter of an earlier run, in practice.
            return int(time.time())

    @property
    def last(self) -> int:
        """The last session number used (0: none yet)."""
        return self._last

    def peek_next(self) -> int:
        """The session number the next connection uses."""
        return self._last + 1

    def commit(self, session: int) -> None:
        """Record that `session` was used (a connection succeeded with it).

        Args:
            session: The session number.
        """
        self._last = max(self._last, session)
        try:
            atomic_write(self.path, f"{self._last}\n".encode("ascii"))
        except OSError as error:
            _logger.warning(
                "cannot save the session counter %s (%s): after a restart the session may repeat",
                self.path,
                error.strerror,
            )
