"""The bridge's state directory: the offline cache of dispatches and the session counter.

Layout, one directory per microgrid under the state dir:

* `microgrid-M/dispatches.sqlite` (with its `-wal` file): every dispatch of
  microgrid `M` as last known, one row per dispatch keyed by
  `(microgrid_id, id)` holding the encoded wire payload, and a `meta` table
  (format version, microgrid, when the dispatches were last synced with the
  API). A bridge started while the Dispatch API is unreachable publishes the
  right schedule from it.
* `microgrid-M/session`: the MQTT session counter, so that `session` keeps
  growing across restarts of the bridge.

The cache is written in proportion to what changed: one SQLite transaction
per step of the schedule that changed the set of dispatches, upserting and
deleting only those rows (a few KB per change, where the JSON file of
earlier versions was rewritten whole). It is written before the step's topics
reach the network (see `CacheWriter`), so a `kill -9` at any point never
loses what the bridge published. The JSON cache of earlier versions
(`dispatches.json`, format 1) is migrated on the first start.

A cache that cannot be read is logged and ignored (the bridge then starts
empty and waits for the API); a state dir that cannot be written (full,
read-only) is logged and reported (`CacheWriter.cache_error`), and the
bridge keeps running from memory. Neither is ever fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from actor_sdk import wire
from bridge.convert import share_parts

__all__ = [
    "CACHE_FORMAT",
    "CacheUnusableError",
    "DispatchCache",
    "SessionCounter",
    "atomic_write",
    "describe_error",
    "fsync_directory",
]

_logger = logging.getLogger("bridge.store")

CACHE_FORMAT = 2
"""The format version of `dispatches.sqlite` (format 1 was `dispatches.json`)."""

_LEGACY_JSON_VERSION = 1

_CHECKPOINT_BYTES = 4 << 20
"""The size of the write-ahead log beyond which it is copied into the database."""


class _LegacyCacheFile(msgspec.Struct, kw_only=True):
    """What `dispatches.json` (format 1, before the SQLite cache) holds."""

    version: int
    microgrid_id: int
    saved_at: wire.UtcTime
    synced_at: wire.UtcTime | None = None
    dispatches: list[wire.Dispatch]


_decode_legacy = msgspec.json.Decoder(_LegacyCacheFile)
_decode_time = msgspec.json.Decoder(wire.UtcTime)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dispatches ("
    " microgrid_id INTEGER NOT NULL, id INTEGER NOT NULL, payload BLOB NOT NULL,"
    " PRIMARY KEY (microgrid_id, id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)


class CacheUnusableError(Exception):
    """The cache file exists but holds no usable cache (corrupt, other format or microgrid)."""


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
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make renames and unlinks in a directory durable (best effort).

    Args:
        directory: The directory.
    """
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def describe_error(error: BaseException) -> str:
    """A short reason for a log line: the OS's message, or the exception's text."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)[:200] or type(error).__name__


class DispatchCache:
    """The offline cache of one microgrid's dispatches, in SQLite.

    Every method runs on the caller's thread and blocks; `sync_to_disk` is
    meant for a worker thread (it opens its own connection when it must).
    """

    def __init__(self, directory: Path, microgrid_id: int) -> None:
        """Create the cache; nothing is read or written yet.

        Args:
            directory: The microgrid's directory in the state dir.
            microgrid_id: The microgrid.
        """
        self.path = directory / "dispatches.sqlite"
        self.legacy_path = directory / "dispatches.json"
        self.microgrid_id = microgrid_id
        self._db: sqlite3.Connection | None = None
        self._synced_at: str | None = None
        self.open_error: str | None = None
        """Why the database could not be opened at `load` (None: it was)."""

    @property
    def is_open(self) -> bool:
        """Whether the database is open for writing."""
        return self._db is not None

    def load(self) -> tuple[list[wire.Dispatch], datetime | None] | None:
        """Open the cache (creating or migrating it) and read it.

        Never raises: whatever goes wrong is logged, and the cache is then
        either empty (a corrupt file is moved aside) or not open (the state
        dir cannot be written; `open` may be retried later).

        Returns:
            The dispatches (payloads encoded, as the core holds them) and when they
            were last synced with the API; None when there is no cache, or it cannot
            be used (logged).
        """
        existed = self.path.exists()
        try:
            self.open()
            return self._read() if existed else self._migrate_legacy()
        except CacheUnusableError as error:
            _logger.error(
                "the dispatch cache %s %s: moving it aside, starting empty, waiting for the "
                "Dispatch API; it is rewritten at the next sync",
                self.path,
                error,
            )
        except (sqlite3.Error, OSError) as error:
            self.close()
            self.open_error = describe_error(error)
            _logger.error(
                "cannot open the dispatch cache %s (%s): running from memory, the cache is "
                "not written until the state dir is writable again",
                self.path,
                describe_error(error),
            )
            return None if existed else self._read_legacy()
        self._move_aside()
        try:
            self.open()
        except (sqlite3.Error, OSError) as error:
            self.open_error = describe_error(error)
            _logger.error(
                "cannot recreate the dispatch cache %s (%s): running from memory",
                self.path,
                describe_error(error),
            )
        return None

    def open(self) -> None:
        """Open the database, creating its tables when new.

        Raises:
            CacheUnusableError: The file is not a database, or a damaged one.
            sqlite3.Error: The database cannot be opened or written.
            OSError: The directory cannot be created.
        """
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # WAL: a commit appends the changed pages only. NORMAL: a commit is in the
            # OS's hands when it returns (safe from kill -9); `sync_to_disk` makes it
            # safe from power loss off the event loop, and checkpoints run there too.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(f"PRAGMA journal_size_limit={_CHECKPOINT_BYTES}")
            db.execute("PRAGMA busy_timeout=2000")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                db.execute(statement)
            known = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not known:
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("format", str(CACHE_FORMAT)), ("microgrid_id", str(self.microgrid_id))],
                )
            db.execute("COMMIT")
        except sqlite3.DatabaseError as error:
            db.close()
            if _is_corruption(error):
                raise CacheUnusableError(f"is corrupt ({describe_error(error)})") from error
            raise
        except BaseException:
            db.close()
            raise
        self._synced_at = known.get("synced_at")
        self._db = db

    def close(self) -> None:
        """Close the database (a no-op when not open)."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _read(self) -> tuple[list[wire.Dispatch], datetime | None] | None:
        db = self._require()
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != str(CACHE_FORMAT):
                raise CacheUnusableError(f"is of format {meta.get('format')}, not {CACHE_FORMAT}")
            if meta.get("microgrid_id") != str(self.microgrid_id):
                raise CacheUnusableError(f"belongs to microgrid {meta.get('microgrid_id')}")
            rows = db.execute(
                "SELECT payload FROM dispatches WHERE microgrid_id = ?", (self.microgrid_id,)
            ).fetchall()
            shared: dict[Any, Any] = {}
            dispatches = [share_parts(wire.decode_dispatch(p), shared) for (p,) in rows]
            synced = meta.get("synced_at")
            synced_at = None if synced is None else _decode_time.decode(synced)
        except sqlite3.DatabaseError as error:
            if _is_corruption(error):
                raise CacheUnusableError(f"is corrupt ({describe_error(error)})") from error
            raise
        except (msgspec.DecodeError, wire.WireError, TypeError) as error:
            raise CacheUnusableError(f"is corrupt ({describe_error(error)})") from error
        if not dispatches and synced_at is None:
            _logger.info("the dispatch cache %s is empty: starting empty", self.path)
            return None
        return dispatches, synced_at

    def _move_aside(self) -> None:
        self.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(OSError):
                source.rename(source.with_name(f"{self.path.name}.corrupt-{stamp}{suffix}"))

    def _read_legacy(self) -> tuple[list[wire.Dispatch], datetime | None] | None:
        try:
            data = self.legacy_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            _logger.error(
                "cannot read the old dispatch cache %s (%s): ignoring it",
                self.legacy_path,
                error.strerror,
            )
            return None
        try:
            cache = _decode_legacy.decode(data)
        except (msgspec.DecodeError, RecursionError) as error:
            _logger.error(
                "the old dispatch cache %s is corrupt (%s): ignoring it, starting empty, "
                "waiting for the Dispatch API",
                self.legacy_path,
                str(error)[:200],
            )
            return None
        if cache.version != _LEGACY_JSON_VERSION or cache.microgrid_id != self.microgrid_id:
            _logger.warning(
                "the old dispatch cache %s is of version %d / microgrid %d, expected %d / %d: "
                "ignoring it",
                self.legacy_path,
                cache.version,
                cache.microgrid_id,
                _LEGACY_JSON_VERSION,
                self.microgrid_id,
            )
            return None
        return [wire.encode_payload(d) for d in cache.dispatches], cache.synced_at

    def _migrate_legacy(self) -> tuple[list[wire.Dispatch], datetime | None] | None:
        legacy = self._read_legacy()
        if legacy is None:
            return None
        dispatches, synced_at = legacy
        try:
            self.replace(dispatches, synced_at)
            self.sync_to_disk()
        except (sqlite3.Error, OSError) as error:
            _logger.error(
                "cannot migrate the old dispatch cache %s to %s (%s): running from the old "
                "cache, kept in place",
                self.legacy_path,
                self.path,
                describe_error(error),
            )
            return legacy
        with contextlib.suppress(OSError):
            self.legacy_path.unlink()
            fsync_directory(self.legacy_path.parent)
        _logger.info(
            "migrated %d dispatches from the old dispatch cache %s (format %d) to %s (format %d)",
            len(dispatches),
            self.legacy_path,
            _LEGACY_JSON_VERSION,
            self.path,
            CACHE_FORMAT,
        )
        return legacy

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the dispatch cache is not open")
        return self._db

    def update(
        self, changes: Mapping[int, wire.Dispatch | None], synced_at: datetime | None
    ) -> None:
        """Write what changed, in one transaction.

        Args:
            changes: The new version of each changed dispatch by id; None: deleted.
            synced_at: When the dispatches were last synced with the API.

        Raises:
            sqlite3.Error: The transaction failed (and was rolled back).
        """
        # Encoded row by row as SQLite takes them: a first sync of 100k dispatches
        # held all their payloads at once (about 60 MB more at the peak of start-up).
        upserts = (
            (self.microgrid_id, i, wire.encode(d)) for i, d in changes.items() if d is not None
        )
        deletes = [(self.microgrid_id, i) for i, d in changes.items() if d is None]
        self._transaction(upserts, deletes, synced_at, replace=False)

    def replace(self, dispatches: Iterable[wire.Dispatch], synced_at: datetime | None) -> None:
        """Replace every row with these dispatches, in one transaction.

        Args:
            dispatches: Every dispatch held.
            synced_at: When the dispatches were last synced with the API.

        Raises:
            sqlite3.Error: The transaction failed (and was rolled back).
        """
        upserts = ((self.microgrid_id, d.id, wire.encode(d)) for d in dispatches)
        self._transaction(upserts, [], synced_at, replace=True)

    def holds_synced_at(self, synced_at: datetime | None) -> bool:
        """Whether the cache already records this sync time.

        Args:
            synced_at: When the dispatches were last synced with the API.

        Returns:
            True when writing it would change nothing.
        """
        return _encode_time(synced_at) == self._synced_at

    def _transaction(
        self,
        upserts: Iterable[tuple[int, int, bytes]],
        deletes: list[tuple[int, int]],
        synced_at: datetime | None,
        *,
        replace: bool,
    ) -> None:
        db = self._require()
        synced = _encode_time(synced_at)
        try:
            db.execute("BEGIN IMMEDIATE")
            if replace:
                db.execute("DELETE FROM dispatches WHERE microgrid_id = ?", (self.microgrid_id,))
            db.executemany(
                "INSERT INTO dispatches (microgrid_id, id, payload) VALUES (?, ?, ?) "
                "ON CONFLICT (microgrid_id, id) DO UPDATE SET payload = excluded.payload",
                upserts,
            )
            db.executemany("DELETE FROM dispatches WHERE microgrid_id = ? AND id = ?", deletes)
            if synced != self._synced_at:
                if synced is None:
                    db.execute("DELETE FROM meta WHERE key = 'synced_at'")
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('synced_at', ?)",
                        (synced,),
                    )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._synced_at = synced

    def sync_to_disk(self) -> None:
        """Make every commit durable against power loss; checkpoint a long log.

        Safe to call from a worker thread while the owner commits.

        Raises:
            OSError: The log could not be synced.
            sqlite3.Error: The checkpoint failed.
        """
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > _CHECKPOINT_BYTES:
            checkpointer = sqlite3.connect(self.path, isolation_level=None)
            try:
                checkpointer.execute("PRAGMA busy_timeout=2000")
                checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                checkpointer.close()


def _is_corruption(error: sqlite3.DatabaseError) -> bool:
    """Whether an error says the file is no (sound) database, not that it cannot be used now."""
    return not isinstance(error, sqlite3.OperationalError)


def _encode_time(instant: datetime | None) -> str | None:
    return None if instant is None else msgspec.json.encode(instant).decode()


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
