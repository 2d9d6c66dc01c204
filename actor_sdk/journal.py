"""A size-rotated JSONL journal, written off the caller's thread; and its reader.

One implementation for the bridge's audit journal and the SDK's actor journal
(the bridge imports it; nothing here imports `bridge`).

`JournalWriter.append(entry)` encodes the entry (one JSON object, one line) and
puts the bytes on a queue: about a microsecond, never a system call. A thread of
the writer's own wakes every `flush_interval`, writes what queued in one
`write`, and rotates when the file would grow past `max_bytes`: `NAME` becomes
`NAME.1`, `NAME.1` becomes `NAME.2`, ..., and the oldest beyond `files` in all
is deleted. So at most `files` files of about `max_bytes` each are kept.

A journal that cannot be written (the directory full, read-only or gone) never
fails its caller: the problem is logged once, passed to `on_problem` (text,
then None once writing works again), the entries of the failed write are
dropped and counted, and the next flush tries again. While writing is stuck,
at most `max_queued` entries wait; later ones are dropped and counted.

`read_journal(path)` reads a journal back, oldest file first; a line that is
not a JSON object is reported as a `CorruptLine`, never raised.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from actor_sdk.wall_clock import utc_now

__all__ = [
    "DEFAULT_FILES",
    "DEFAULT_MAX_BYTES",
    "ActorJournal",
    "CorruptLine",
    "JournalWriter",
    "format_time",
    "journal_files",
    "payload_digest",
    "read_journal",
]

_logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
"""The size at which a journal file is rotated (10 MiB)."""

DEFAULT_FILES = 5
"""How many files a journal keeps, the one being written included (50 MiB in all)."""

_encoder = msgspec.json.Encoder()


def format_time(instant: datetime | None) -> str | None:
    """An instant as the journals write it: RFC 3339, UTC, with a `Z`.

    Args:
        instant: The instant (aware), or None.

    Returns:
        The text, or None.
    """
    if instant is None:
        return None
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def journal_files(path: Path) -> list[Path]:
    """The files of a journal that exist, oldest first (`NAME.N`, ..., `NAME.1`, `NAME`).

    Args:
        path: The journal (the file being written).

    Returns:
        The files.
    """
    files = [file for _, file in sorted(_rotated(path), reverse=True)]
    if path.exists():
        files.append(path)
    return files


def _rotated(path: Path) -> list[tuple[int, Path]]:
    """The rotated files of a journal with their numbers, in no order."""
    found: list[tuple[int, Path]] = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdecimal():
            found.append((int(suffix), candidate))
    return found


class JournalWriter:
    """Appends JSON lines to a size-rotated journal from a thread of its own."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        files: int = DEFAULT_FILES,
        flush_interval: float = 0.2,
        max_queued: int = 100_000,
        on_problem: Callable[[str | None], None] = lambda problem: None,
        thread: bool = True,
    ) -> None:
        """Create the writer; `start()` or the first `append` starts its thread.

        Args:
            path: The file written; rotated files are `path` with `.1`, `.2`, ...
            max_bytes: Rotate before a write would make the file larger than this.
            files: How many files to keep, the one being written included (>= 1).
            flush_interval: How often queued entries are written, in seconds.
            max_queued: The most entries waiting; more are dropped (and counted).
            on_problem: Told (from the writer's thread) what went wrong, and None
                once a write succeeds again.
            thread: False: no thread, only `flush()` writes (tests).
        """
        if max_bytes < 1 or files < 1:
            raise ValueError("a journal needs max_bytes >= 1 and files >= 1")
        self.path = path
        self.max_bytes = max_bytes
        self.files = files
        self._flush_interval = flush_interval
        self._max_queued = max_queued
        self._on_problem = on_problem
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._closing = not thread
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self._size: int | None = None
        self.problem: str | None = None
        """The current problem writing the journal, None while it works."""
        self.written = 0
        """Entries written so far."""
        self.dropped = 0
        """Entries dropped (a failed write, or too many queued)."""

    @property
    def queued(self) -> int:
        """Entries waiting to be written."""
        return len(self._queue)

    def start(self) -> None:
        """Start the writing thread (once; the first `append` starts it too)."""
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(
                target=self._loop, name=f"journal-{self.path.name}", daemon=True
            )
            self._thread.start()

    def append(self, entry: Mapping[str, Any]) -> None:
        """Queue one entry (never blocks, never raises for I/O).

        Args:
            entry: A JSON-encodable mapping, written as one line.
        """
        if len(self._queue) >= self._max_queued:
            self.dropped += 1
            return
        self._queue.append(_encoder.encode(entry))
        if self._thread is None and not self._closing:
            self.start()

    def flush(self) -> None:
        """Write everything queued now, on the caller's thread (tests, shutdown)."""
        with self._write_lock:
            parts: list[bytes] = []
            queue = self._queue
            while queue:
                parts.append(queue.popleft())
            if parts:
                self._write(parts)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the thread (waits at most `timeout` s).

        Args:
            timeout: The longest wait for the thread.
        """
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self.flush()

    def _loop(self) -> None:
        while not self._closing:
            self._wake.wait(self._flush_interval)
            self.flush()
        self.flush()

    def _write(self, parts: list[bytes]) -> None:
        try:
            size = self._current_size()
            chunk: list[bytes] = []
            chunk_size = 0
            for part in parts:
                length = len(part) + 1
                if size + chunk_size > 0 and size + chunk_size + length > self.max_bytes:
                    self._append_lines(chunk)
                    self._rotate()
                    size = self._size = 0
                    chunk, chunk_size = [], 0
                chunk.append(part)
                chunk_size += length
            self._append_lines(chunk)
        except OSError as error:
            self._size = None
            self.dropped += len(parts)
            problem = (
                f"cannot write the journal {self.path} ({error.strerror or error}): "
                f"{self.dropped} entries dropped so far; retrying with the next entries"
            )
            if self.problem is None:
                _logger.error("%s", problem)
            self.problem = problem
            self._on_problem(problem)
            return
        self.written += len(parts)
        if self.problem is not None:
            _logger.info("writing the journal %s again", self.path)
            self.problem = None
            self._on_problem(None)

    def _append_lines(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        with self.path.open("ab") as stream:
            stream.write(data)
        self._size = (self._size or 0) + len(data)

    def _current_size(self) -> int:
        if self._size is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._size = self.path.stat().st_size
            except FileNotFoundError:
                self._size = 0
        return self._size

    def _rotate(self) -> None:
        # Numbered files move up by one; what would move past `files - 1` goes first.
        if self.files == 1:
            self.path.unlink(missing_ok=True)
            return
        for number, file in _rotated(self.path):
            if number >= self.files - 1:
                file.unlink(missing_ok=True)
        for number in range(self.files - 2, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{number + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


@dataclass(frozen=True, slots=True)
class CorruptLine:
    """A journal line that is not a JSON object."""

    file: Path
    line: int
    reason: str


def read_journal(path: Path) -> Iterator[dict[str, Any] | CorruptLine]:
    """Read every entry of a journal, oldest file first, line by line.

    A file that vanishes while being read (rotated meanwhile) is skipped.

    Args:
        path: The journal (the file being written).

    Yields:
        Each entry, or a `CorruptLine` for a line that cannot be read.
    """
    for file in journal_files(path):
        try:
            stream = file.open("rb")
        except FileNotFoundError:
            continue
        with stream:
            for number, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                try:
                    entry = msgspec.json.decode(raw)
                except msgspec.DecodeError as error:
                    yield CorruptLine(file, number, str(error))
                    continue
                if not isinstance(entry, dict):
                    yield CorruptLine(file, number, "not a JSON object")
                    continue
                yield entry


def _canonical(value: Any) -> Any:
    # The API carries a payload as a protobuf Struct, whose numbers are doubles:
    # 1000 and 1000.0 are the same payload, and must give the same digest.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


def payload_digest(payload: Any) -> str:
    """The sha256 of a payload's canonical JSON, in hex.

    Canonical: keys sorted, whole-number floats written as integers (the API
    turns every number into a double).

    Args:
        payload: The dispatch payload (JSON-like).

    Returns:
        The digest, prefixed `sha256:`.
    """
    canonical = msgspec.json.encode(_canonical(payload), order="sorted")
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


class ActorJournal:
    """The SDK's journal: starts, updates, stops and failures of actors.

    Each entry: `time`, `source: "sdk"`, `event` (`started`, `updated`, `stopped`,
    `failed`), `microgrid_id`, `type`, `dispatch_id`, `payload_digest` (sha256 of
    the payload's canonical JSON, never the payload), `dry_run`, `until`, and
    `reason` (a stop's message, a failure's cause).
    """

    def __init__(
        self,
        writer: JournalWriter,
        microgrid_id: int | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Wrap a writer.

        Args:
            writer: Where the entries go.
            microgrid_id: The microgrid of the actors.
            clock: The wall clock of the entries' `time`.
        """
        self.writer = writer
        self._microgrid_id = microgrid_id
        self._clock = clock

    @classmethod
    def open(cls, path: Path | str | None, microgrid_id: int) -> ActorJournal | None:
        """The journal of a `Dispatcher(journal=...)`, with the default retention.

        Args:
            path: The journal file; None for no journal.
            microgrid_id: The microgrid.

        Returns:
            The journal (its writer starts with the first entry), or None.
        """
        return None if path is None else cls(JournalWriter(Path(path)), microgrid_id)

    def record(
        self, dispatch_type: str, event: str, dispatch: Any, reason: str | None = None
    ) -> None:
        """Append one entry about an actor.

        Args:
            dispatch_type: The type the actor serves.
            event: `started`, `updated`, `stopped` or `failed`.
            dispatch: The dispatch it was given (`id`, `payload`, `until`, `dry_run`).
            reason: The stop message or the failure.
        """
        entry: dict[str, Any] = {
            "time": format_time(self._clock()),
            "source": "sdk",
            "event": event,
            "microgrid_id": self._microgrid_id,
            "type": dispatch_type,
            "dispatch_id": int(dispatch.id),
            "payload_digest": payload_digest(dispatch.payload),
            "dry_run": bool(dispatch.dry_run),
            "until": format_time(getattr(dispatch, "until", None)),
        }
        if reason is not None:
            entry["reason"] = reason
        self.writer.append(entry)
