"""The bridge's state directory (`bridge.store`): cache, atomic writes, session counter."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actor_sdk import wire
from bridge.store import CacheWriter, DispatchCache, SessionCounter, atomic_write

T0 = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


def dispatch(dispatch_id: int) -> wire.Dispatch:
    return wire.Dispatch(
        id=dispatch_id,
        type="T",
        start_time=T0,
        duration=60,
        target=wire.Target(ids=(1,)),
        active=True,
        dry_run=False,
        payload={"n": dispatch_id},
        recurrence=wire.Recurrence(frequency="DAILY", interval=1),
        create_time=T0,
        update_time=T0,
        end_time=None,
        running=False,
        until=None,
        next_run=None,
    )


def test_cache_round_trips(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path / "mg", 4)
    assert cache.load() is None
    cache.save([dispatch(1), dispatch(2)], T0, T0 - timedelta(minutes=1))
    loaded = cache.load()
    assert loaded == ([dispatch(1), dispatch(2)], T0 - timedelta(minutes=1))
    assert [p.name for p in (tmp_path / "mg").iterdir()] == ["dispatches.json"]


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b'{"version": 1}', b"\xff\xfe", b"[]" * 1000]
)
def test_a_corrupt_cache_is_logged_and_ignored(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DispatchCache(tmp_path, 4)
    cache.path.write_bytes(content)
    with caplog.at_level(logging.ERROR, "bridge.store"):
        assert cache.load() is None
    assert "corrupt" in caplog.text and str(cache.path) in caplog.text


def test_a_cache_of_another_microgrid_is_ignored(tmp_path: Path) -> None:
    DispatchCache(tmp_path, 4).save([dispatch(1)], T0, None)
    assert DispatchCache(tmp_path, 5).load() is None


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


async def test_cache_writer_coalesces_a_burst_into_one_write(tmp_path: Path) -> None:
    cache = DispatchCache(tmp_path, 4)
    held = [dispatch(i) for i in range(1, 1001)]
    writer = CacheWriter(cache, lambda: (held, T0), lambda: T0, min_interval=0.05)
    task = asyncio.create_task(writer.run())
    try:
        for _ in range(1000):
            writer.mark()
        await asyncio.sleep(0)  # the writer starts its write
        for _ in range(1000):
            writer.mark()
        await writer.flush()
    finally:
        task.cancel()
    assert writer.writes <= 2
    loaded = cache.load()
    assert loaded is not None and len(loaded[0]) == 1000
