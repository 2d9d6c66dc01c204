"""Benchmark: what the audit journal costs the bridge's schedule loop, per entry and per step.

Run alone: `.venv/bin/python bench/journal_cost.py` (a few seconds; `--quick`
for a smaller run).

Measured on the loop's thread, as the bridge spends it:

* `append`: one bridge entry encoded and queued (`JournalWriter.append`);
* entries of a step: `BridgeJournal` turning a step's outcome (100 dispatches
  starting at one instant) into entries, per entry;
* the step itself with and without the journal hooks, in a running loop (the
  hooks only schedule the work 10 ms later: their cost inside the step is
  what could delay a publish);
* the writer's thread: entries written per second to a local file.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actor_sdk import wire
from actor_sdk.journal import JournalWriter
from bridge.journal import BridgeJournal
from bridge.service import MicrogridService, Outbox, ScheduleCore, StreamEvent

T0 = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)
LAYOUT = wire.TopicLayout.for_microgrid(1)


class _NullSink:
    def set(self, topic: str, payload: object) -> None: ...
    def clear(self, topic: str) -> None: ...
    def event(self, topic: str, payload: bytes) -> None: ...
    def mark_authoritative(self) -> None: ...
    def set_status(self, **_: object) -> None: ...


def _dispatch(dispatch_id: int, start: datetime) -> wire.Dispatch:
    return wire.Dispatch(
        id=dispatch_id,
        type="BENCH",
        start_time=start,
        duration=60,
        target=wire.Target(ids=(1, 2)),
        active=True,
        dry_run=False,
        payload={"power_w": 5000},
        create_time=T0 - timedelta(hours=1),
        update_time=T0 - timedelta(hours=1),
        end_time=None,
        running=False,
        until=None,
        next_run=None,
    )


def _step_costs(count: int, rounds: int, journal: BridgeJournal | None) -> list[float]:
    """Seconds of the step in which `count` dispatches start, per round."""
    costs = []
    for _ in range(rounds):
        service = MicrogridService(ScheduleCore(1, LAYOUT), _NullSink(), clock=lambda: T0)
        if journal is not None:  # in a running loop: the hooks schedule their entries
            service.on_upstream = journal.upstream
            service.on_outbox = journal.outbox
        for number in range(count):
            service.put(StreamEvent("created", _dispatch(number + 1, T0 + timedelta(seconds=1))))
        service.step(T0)
        begin = time.perf_counter()
        service.step(T0 + timedelta(seconds=1))
        costs.append(time.perf_counter() - begin)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    entries = 20_000 if args.quick else 200_000
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "journal.jsonl"
        writer = JournalWriter(path, thread=False, max_queued=entries * 2)
        journal = BridgeJournal(writer, 1, lambda: 7, clock=lambda: T0)
        entry = {
            "time": "2026-12-04T06:00:00Z",
            "source": "bridge",
            "event": "updated",
            "microgrid_id": 1,
            "session": 7,
            "dispatch_id": 123456,
            "type": "BENCH",
            "changed": ["duration", "payload"],
        }
        begin = time.perf_counter()
        for _ in range(entries):
            writer.append(entry)
        append_us = (time.perf_counter() - begin) / entries * 1e6
        begin = time.perf_counter()
        writer.flush()
        write_rate = entries / (time.perf_counter() - begin)

        service = MicrogridService(ScheduleCore(1, LAYOUT), _NullSink(), clock=lambda: T0)
        outs: list[Outbox] = []
        service.on_outbox = outs.append
        for number in range(100):
            service.put(StreamEvent("created", _dispatch(number + 1, T0 + timedelta(seconds=1))))
        service.step(T0)
        outs.clear()
        service.step(T0 + timedelta(seconds=1))
        (out,) = outs
        rounds = 200 if args.quick else 2000
        begin = time.perf_counter()
        for _ in range(rounds):
            for _ in journal._outcome(out, T0, 7):  # the deferred part, alone
                pass
        per_entry_us = (time.perf_counter() - begin) / (rounds * len(out.transitions)) * 1e6
        writer.close()

        step_rounds = 20 if args.quick else 100

        async def steps(with_journal: bool) -> float:
            return statistics.median(
                _step_costs(100, step_rounds, journal if with_journal else None)
            )

        without = asyncio.run(steps(False)) * 1e3
        with_hooks = asyncio.run(steps(True)) * 1e3
    print(f"append (encode + queue), one entry:        {append_us:.2f} µs")
    print(f"a step's outcome to entries, per entry:     {per_entry_us:.2f} µs (deferred 10 ms)")
    print(f"step with 100 starts, without the journal:  {without:.2f} ms")
    print(f"step with 100 starts, with the hooks:       {with_hooks:.2f} ms")
    print(f"writer thread, entries written per second: {write_rate:,.0f}")


if __name__ == "__main__":
    main()
