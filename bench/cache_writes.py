"""Benchmark: bytes written to the offline cache per change, SQLite against the old JSON file.

Run alone: `.venv/bin/python bench/cache_writes.py` (100,000 dispatches, about
a minute), or `--quick` (2,000 dispatches, a few seconds).

"ours" is the SQLite cache (`bridge.store`, `bridge.cache_writer`): each
change goes through `CacheWriter.note` and `mark` (one transaction), then
`DispatchCache.sync_to_disk` (the fsync, and a checkpoint once the log passes
4 MB), as the bridge does. "reference" is the format-1 cache of earlier
versions: the whole list encoded as JSON and written atomically with fsync,
at every change. Bytes are what the kernel counted for this process
(`write_bytes` of /proc/self/io), checkpoints included.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actor_sdk import wire
from bench._table import Table, command_line
from bridge.cache_writer import CacheWriter
from bridge.store import DispatchCache, atomic_write
from testkit.dispatches import CREATED, dispatch

_json = msgspec.json.Encoder()


def written_bytes() -> int:
    """Bytes this process caused to be written to storage so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(": ")
        if key == "write_bytes":
            return int(value)
    raise RuntimeError("no write_bytes in /proc/self/io")


def sample(dispatch_id: int, version: int = 0) -> wire.Dispatch:
    """A dispatch of about 400 bytes encoded, like those of the scale benchmark."""
    base = dispatch(
        start=CREATED + timedelta(minutes=dispatch_id),
        dispatch_id=dispatch_id,
        dispatch_type=f"TYPE_{dispatch_id % 10}",
        recurrence=wire.Recurrence(frequency="DAILY", interval=1),
    )
    return msgspec.structs.replace(
        base,
        payload={"power_w": 1000 + version, "ramp_w_per_s": 50, "mode": "peak-shaving"},
        update_time=CREATED + timedelta(seconds=version),
    )


async def measure_sqlite(
    directory: Path, held: list[wire.Dispatch], changes: int
) -> dict[str, float]:
    cache = DispatchCache(directory, 1)
    cache.load()
    started, before = time.perf_counter(), written_bytes()
    cache.replace(held, CREATED)
    cache.sync_to_disk()
    first = {"first_s": time.perf_counter() - started, "first_b": written_bytes() - before}
    by_id = {d.id: d for d in held}
    writer = CacheWriter(cache, by_id.values, lambda: CREATED)
    commits: list[float] = []
    before = written_bytes()
    for n in range(changes):
        changed = sample(held[(n * 7919) % len(held)].id, version=n + 1)
        by_id[changed.id] = changed
        started = time.perf_counter()
        writer.mark({changed.id: changed})
        commits.append(time.perf_counter() - started)
        await writer.flush()
    per_change = (written_bytes() - before) / changes
    cache.close()
    started = time.perf_counter()
    loaded = DispatchCache(directory, 1).load()
    load_s = time.perf_counter() - started
    assert loaded is not None and len(loaded[0]) == len(held)
    return first | {
        "per_change_b": per_change,
        "commit_p50": statistics.median(commits),
        "commit_max": max(commits),
        "load_s": load_s,
    }


def measure_json(directory: Path, held: list[wire.Dispatch], changes: int) -> dict[str, float]:
    path = directory / "dispatches.json"
    encode_times: list[float] = []
    before = written_bytes()
    started = time.perf_counter()
    for n in range(changes):
        held[n] = sample(held[n].id, version=n + 1)
        encoding = time.perf_counter()
        data = _json.encode(
            {"version": 1, "microgrid_id": 1, "saved_at": CREATED, "dispatches": held}
        )
        encode_times.append(time.perf_counter() - encoding)
        atomic_write(path, data)
    return {
        "per_change_b": (written_bytes() - before) / changes,
        "write_s": (time.perf_counter() - started) / changes,
        "encode_p50": statistics.median(encode_times),
        "size_b": path.stat().st_size,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 dispatches (a few seconds)")
    parser.add_argument("--dispatches", type=int, default=None, help="dispatches held")
    args = parser.parse_args()
    count = args.dispatches or (2_000 if args.quick else 100_000)
    changes = 50 if args.quick else 2_000
    held = [sample(i) for i in range(1, count + 1)]
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        ours = asyncio.run(measure_sqlite(Path(tmp) / "sqlite", held, changes))
        (Path(tmp) / "json").mkdir()
        ref = measure_json(Path(tmp) / "json", list(held), 5 if not args.quick else 20)
    table = Table(
        f"Cache writes: {count:,} dispatches held, one dispatch changed per write", command_line()
    )
    table.add("bytes written per change", ours["per_change_b"], ref["per_change_b"], "KB", "few KB")
    table.add("commit on the event loop, p50", ours["commit_p50"], ref["encode_p50"], "ms")
    table.add("commit on the event loop, max", ours["commit_max"], None, "ms")
    table.add("whole write per change (ref: encode + fsync)", None, ref["write_s"], "ms")
    table.add("first write of every dispatch: time", ours["first_s"], None, "s")
    table.add("first write of every dispatch: bytes", ours["first_b"], ref["size_b"], "MB")
    table.add("load at start", ours["load_s"], None, "s")
    table.note(
        f"ours: {changes} changes, each its own transaction and fsync (the bridge syncs at most "
        "every 0.2 s), checkpoints included; reference: the whole JSON file rewritten per change"
    )
    table.note(
        "commit on the event loop: ours is the SQLite transaction (mark); the "
        "reference column is the JSON encoding the old writer did on the loop"
    )
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
