"""The bridge's state directory (`bridge.store`, `bridge.cache_writer`): cache, migration."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from actor_sdk import wire
from bridge.cache_writer import CacheWriter
from bridge.store import DispatchCache, SessionCounter, atomic_write

T0 = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
V1_SAMPLE = Path(__file__).parent / "data" / "v1-cache"


def dispatch(dispatch_id: int, *, dispatch_type: str = "T", power: int = 0) -> wire.Dispatch:
    """A dispatch with its payload encoded, as the core holds it and a cache gives it back."""
    return wire.encode_payload(
        wire.Dispatch(
            id=dispatch_id,
            type=dispatch_type,
            start_time=T0,
            duration=60,
            target=wire.Target(ids=(1,)),
            active=True,
            dry_run=False,
            payload={"n": dispatch_id, "power_w": power},
            recurrence=wire.Recurrence(frequency="DAILY", interval=1),
            create_time=T0,
            update_time=T0 + timedelta(seconds=power),
            end_time=None,
            running=False,
            until=None,
            next_run=None,
        )
    )


def wal_size(cache: DispatchCache) -> int:
    wal = cache.path.with_name(cache.path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


# ---- the SQLite cache --------------------------------------------------------------


def test_cache_round_trips(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path / "mg", 4)
    assert cache.load() is None
    cache.replace([dispatch(1), dispatch(2)], T0 - timedelta(minutes=1))
    cache.update({2: dispatch(2, power=5), 3: dispatch(3), 1: None}, T0)
    cache.close()
    loaded = DispatchCache(tmp_path / "mg", 4).load()
    assert loaded is not None
    dispatches, synced_at = loaded
    assert sorted(dispatches, key=lambda d: d.id) == [dispatch(2, power=5), dispatch(3)]
    assert synced_at == T0
    assert "dispatches.sqlite" in [p.name for p in (tmp_path / "mg").iterdir()]


def test_one_change_among_many_writes_a_few_kb(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    cache.replace([dispatch(i) for i in range(1, 5001)], T0)
    cache.sync_to_disk()
    before = wal_size(cache)
    cache.update({2500: dispatch(2500, power=7)}, T0)
    grown = wal_size(cache) - before
    assert 0 < grown <= 3 * 4096 + 100, grown


def test_an_unchanged_sync_time_is_not_rewritten(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    cache.replace([dispatch(1)], T0)
    assert cache.holds_synced_at(T0) and not cache.holds_synced_at(T0 + timedelta(seconds=1))
    cache.close()
    reopened = DispatchCache(tmp_path, 4)
    reopened.load()
    assert reopened.holds_synced_at(T0)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 5000],
    ids=["empty", "garbage", "bad-header"],
)
def test_a_corrupt_database_is_logged_moved_aside_and_treated_as_no_cache(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.path.write_bytes(content)
    with caplog.at_level(logging.INFO, "bridge.store"):
        assert cache.load() is None
    if content:
        assert "corrupt" in caplog.text and str(cache.path) in caplog.text
        assert [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    # A fresh cache took its place and is written as usual.
    cache.replace([dispatch(1)], T0)
    assert DispatchCache(tmp_path, 4).load() == ([dispatch(1)], T0)


def test_a_database_with_a_mangled_row_is_treated_as_no_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    cache.replace([dispatch(1), dispatch(2)], T0)
    cache.close()
    with sqlite3.connect(cache.path) as db:
        db.execute("UPDATE dispatches SET payload = ? WHERE id = 2", (b'{"id": "x"}',))
    with caplog.at_level(logging.ERROR, "bridge.store"):
        assert DispatchCache(tmp_path, 4).load() is None
    assert "is corrupt" in caplog.text


def test_a_truncated_database_is_treated_as_no_cache(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    cache.replace([dispatch(i) for i in range(1, 2001)], T0)
    db = sqlite3.connect(cache.path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    cache.close()
    data = cache.path.read_bytes()
    cache.path.write_bytes(data[: len(data) // 3])
    assert DispatchCache(tmp_path, 4).load() is None


def test_a_cache_of_another_microgrid_or_format_is_ignored(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path / "a", 4)
    cache.load()
    cache.replace([dispatch(1)], None)
    cache.close()
    assert DispatchCache(tmp_path / "a", 5).load() is None
    newer = DispatchCache(tmp_path / "b", 4)
    newer.load()
    newer.replace([dispatch(1)], None)
    newer.close()
    with sqlite3.connect(newer.path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    assert DispatchCache(tmp_path / "b", 4).load() is None


# ---- migration of the JSON cache (format 1) ------------------------------------------


def test_the_json_cache_of_the_previous_version_is_migrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "microgrid-7"
    shutil.copytree(V1_SAMPLE / "microgrid-7", directory)
    sample = msgspec.json.decode((directory / "dispatches.json").read_bytes())
    with caplog.at_level(logging.INFO, "bridge.store"):
        loaded = DispatchCache(directory, 7).load()
    assert loaded is not None
    dispatches, synced_at = loaded
    assert [d.id for d in dispatches] == [101, 102, 103]
    expected = msgspec.json.decode(
        msgspec.json.encode(sample["dispatches"]), type=list[wire.Dispatch]
    )
    assert dispatches == [wire.encode_payload(d) for d in expected]
    assert wire.payload_of(dispatches[0])["note"] == "ünïcode ✓"
    assert dispatches[1].target.categories is not None and dispatches[1].recurrence is not None
    assert synced_at == datetime(2026, 11, 28, 6, 9, tzinfo=UTC)
    assert "migrated 3 dispatches from the old dispatch cache" in caplog.text
    assert not (directory / "dispatches.json").exists()
    # From now on the SQLite cache is read.
    assert DispatchCache(directory, 7).load() == loaded
    assert SessionCounter(directory).peek_next() == 42


def test_a_corrupt_json_cache_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "dispatches.json").write_bytes(b'{"version": 1, "dispatches": [')
    with caplog.at_level(logging.ERROR, "bridge.store"):
        assert DispatchCache(tmp_path, 4).load() is None
    assert "old dispatch cache" in caplog.text and "corrupt" in caplog.text


# ---- a state dir that cannot be written ----------------------------------------------


def test_a_database_path_that_cannot_be_opened_is_no_cache_and_no_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.path.mkdir()  # as unwritable as it gets, also for root
    with caplog.at_level(logging.ERROR, "bridge.store"):
        assert cache.load() is None
    assert "cannot open the dispatch cache" in caplog.text and "running from memory" in caplog.text
    assert not cache.is_open and cache.open_error
    writer = CacheWriter(cache, lambda: [dispatch(1)], lambda: T0)
    assert not writer.cache_ok and writer.cache_error
    writer.mark({1: dispatch(1)})  # waits for the retry, never raises
    assert writer.writes == 0


async def test_the_writer_runs_from_memory_while_the_cache_fails_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    held = {1: dispatch(1)}
    writer = CacheWriter(cache, lambda: list(held.values()), lambda: T0, retry_interval=0.05)
    writer.mark({1: held[1]})
    assert writer.cache_ok and writer.writes == 1
    # The database goes away under the bridge and its path cannot be created again.
    cache.close()
    for suffix in ("", "-wal", "-shm"):
        cache.path.with_name(cache.path.name + suffix).unlink(missing_ok=True)
    cache.path.mkdir()
    held[2] = dispatch(2)
    with caplog.at_level(logging.WARNING, "bridge.store"):
        writer.mark({2: held[2]})
        # The next change fails too: a bare "not open" leads to a reopen, which fails.
        assert not writer.cache_ok and writer.cache_error
        task = asyncio.create_task(writer.run())
        try:
            await asyncio.sleep(0.2)
            assert not writer.cache_ok
            cache.path.rmdir()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if writer.cache_ok:
                    break
        finally:
            task.cancel()
    assert writer.cache_ok, caplog.text
    assert caplog.text.count("cannot write the dispatch cache") == 1
    assert "written again (2 dispatches)" in caplog.text
    cache.close()
    loaded = DispatchCache(tmp_path, 4).load()
    assert loaded is not None and sorted(d.id for d in loaded[0]) == [1, 2]


# ---- the writer ---------------------------------------------------------------------


def test_the_writer_commits_what_it_is_told_and_holds_nothing_per_dispatch(
    tmp_path: Path,
) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    loaded = [dispatch(1), dispatch(2)]
    cache.replace(loaded, T0)
    writer = CacheWriter(cache, lambda: loaded, lambda: T0)
    writer.mark({})  # a sync that changed nothing
    assert writer.writes == 0
    # An update, a deletion, a type change (as the core's outbox says them).
    updated, moved = dispatch(1, power=3), dispatch(3, dispatch_type="U")
    writer.mark({1: updated, 2: None, 3: moved})
    assert writer.writes == 1 and writer.pending == {}
    # Written, the structs are the core's alone: the writer kept no table of them
    # (52 bytes per dispatch at 100k) to tell a new run state from a change.
    references = (sys.getrefcount(updated), sys.getrefcount(moved))
    assert references == (2, 2)
    cache.close()
    again = DispatchCache(tmp_path, 4).load()
    assert again is not None
    assert sorted(again[0], key=lambda d: d.id) == [updated, moved]


async def test_a_new_sync_time_alone_is_written(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    synced: list[datetime | None] = [None]
    writer = CacheWriter(cache, list, lambda: synced[0])
    writer.mark({})
    assert writer.writes == 0
    synced[0] = T0
    writer.mark({})
    await writer.flush()
    assert writer.writes == 1
    cache.close()
    assert DispatchCache(tmp_path, 4).load() == ([], T0)


# ---- atomic files and the session counter ----------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    atomic_write(target, b"old")
    with pytest.raises(OSError):
        atomic_write(target / "below-a-file", b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_session_counter_grows_across_instances(tmp_path: Path) -> None:
    first = SessionCounter(tmp_path)
    assert first.last == 0 and first.peek_next() == 1
    first.commit(1)
    first.commit(2)
    second = SessionCounter(tmp_path)
    assert second.peek_next() == 3


def test_unreadable_session_counter_starts_above_any_earlier_one(tmp_path: Path) -> None:
    (tmp_path / "session").write_text("garbage")
    assert SessionCounter(tmp_path).peek_next() > 1_000_000_000


def test_a_large_write_encodes_row_by_row_instead_of_holding_every_payload(
    tmp_path: Path,
) -> None:
    # A first sync writes every dispatch at once; holding all encoded rows raised the
    # bridge's peak memory at 100k by the size of the whole cache.
    cache = DispatchCache(tmp_path, 4)
    cache.load()
    changes: dict[int, wire.Dispatch | None] = {n: dispatch(n) for n in range(1, 5001)}
    encoded = sum(len(wire.encode(d)) for d in changes.values() if d is not None)
    tracemalloc.start()
    try:
        held = tracemalloc.get_traced_memory()[0]
        cache.update(changes, T0)
        peak = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    assert peak < encoded / 4
    cache.close()
    again = DispatchCache(tmp_path, 4).load()
    assert again is not None and len(again[0]) == 5000
