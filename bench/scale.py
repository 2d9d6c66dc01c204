"""Benchmark: one bridge holding 1k, 10k and 100k dispatches, against frequenz-dispatch.

Run alone: `.venv/bin/python bench/scale.py` (1k, 10k and 100k; several minutes,
most of it frequenz-dispatch's `started` over 100k), `--sizes 10000` for one size,
or `--quick` (1k only, a few seconds); `--watch-only` measures the start-up and
`dispatch-bridge watch --once` alone.

Per size, a realistic mix (`testkit.populate.mix`): 40 % one-offs ahead (hours to weeks), 15 %
one-offs that ended days ago, 5 % running now, 40 % recurring (minutely started
up to 8 hours ago, hourly up to 30 days, daily, weekly with weekdays, monthly
with month days and yearly up to two years ago; a few with an end count or
date); 50 types; component-id and category targets; a small payload. The API
server's SQLite file is filled in bulk through
`bridge.api.store.DispatchStore.create` (the servicer's own store call, with the
end time the servicer computes) before the server starts.

Figures:

* bridge start-up → every retained topic published: from spawning
  `dispatch-bridge run` (state dir empty) until a `mosquitto_sub` of the tree,
  subscribed before, has seen every `dispatches/ID` and `running` topic;
* peak RSS of the bridge while doing so, and (RSS - RSS of an idle bridge with no
  dispatches) per dispatch;
* memory held per dispatch in this process (tracemalloc), converting the API's
  protobufs: ours into the schedule core as the bridge lists (`convert.ListingConverter`,
  equal parts held once), the reference into the dict of `frequenz.dispatch.Dispatch`
  its scheduler keeps;
* republish after a broker restart that kept its state (clean stop, same
  persistence): from the broker accepting connections until the bridge read the
  tree back and every running topic came again live, and how many dispatch
  topics it sent again (those the broker did not hold as the bridge does);
* full republish after a broker restart without its state (persistence
  deleted): until a new subscriber got every topic again live;
* CPU of the bridge per scheduled transition (minutely rules make some every
  second), idle cost included;
* a new subscriber sees every retained topic: a raw MQTT client; the actor SDK's
  `Dispatcher` (until its view holds every dispatch); `dispatch-bridge watch
  --once` (a new process, which stops once the tree adds up to the bridge's
  counts, and says whether it did);
  against frequenz-dispatch's `Dispatcher` listing the same dispatches from the
  API server (start → initialized);
* `running` over all dispatches: ours `schedule.run_state` for each, the
  reference `Dispatch.started` for each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (
    API_KEY,
    API_SECRET,
    Bridge,
    Mosquitto,
    Proc,
    Stack,
    TapLog,
    async_wait_until,
    dispatch_bridge,
    progress,
    wait_until,
)
from bench._recorder import stop_reference
from bench._table import Table, command_line
from bridge.watch import EXIT_INCOMPLETE
from testkit.populate import mix, populate

MG = 1
IDLE_MG = 9
TYPES = 50
PUBLISH_BUDGET_S = 10.0
KEPT_STATE_BUDGET_S = 3.0
"""#13: the republish after a broker restart that kept its state."""
MEMORY_BUDGET = 1000.0
SUBSCRIBER_BUDGET_S = 1.0
REFERENCE_INIT_MAX = 10_000
"""Above this, frequenz-dispatch's initial fetch would take hours (it is quadratic)."""


class Tap:
    """Reads a `mosquitto_sub` log incrementally: the first time each topic arrived."""

    def __init__(self, proc: Proc, live_only: bool = False) -> None:
        self.live_only = live_only
        self.first: dict[str, float] = {}
        self._log = TapLog(proc.log)

    def poll(self) -> int:
        """Read what arrived since the last poll; return how many distinct topics."""
        for at, retained, topic, _ in self._log.new_messages():
            if self.live_only and retained:
                continue
            if topic not in self.first and (topic.endswith("/running") or "/dispatches/" in topic):
                self.first[topic] = at
        return len(self.first)

    def wait_all(self, expected: int, timeout: float) -> float:
        """Wait until `expected` distinct topics arrived; return the last first-arrival."""
        wait_until(lambda: self.poll() >= expected, timeout, f"{expected} topics at the tap")
        return max(self.first.values())


def _peak_rss(proc: Proc, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        out.append(proc.rss())
        time.sleep(0.05)


def expected_topics(db_path: Path) -> int:
    """Dispatch topics plus running topics (one per type) of the bench microgrid."""
    with sqlite3.connect(db_path) as db:
        count, types = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT type) FROM dispatches WHERE microgrid_id = ?", (MG,)
        ).fetchone()
    return int(count) + int(types)


def load_protobufs(db_path: Path) -> list[bytes]:
    """Every stored dispatch of the bench microgrid, as the API returns it."""
    with sqlite3.connect(db_path) as db:
        return [
            bytes(row[0])
            for row in db.execute("SELECT dispatch FROM dispatches WHERE microgrid_id = ?", (MG,))
        ]


def in_process(blobs: list[bytes], reference: bool, now: datetime) -> dict[str, float]:
    """Memory per dispatch held and time for `running` over all, ours or the reference."""
    from frequenz.api.dispatch.v1 import dispatch_pb2 as pb  # noqa: PLC0415
    from frequenz.client.dispatch.types import Dispatch as ClientDispatch  # noqa: PLC0415

    from actor_sdk import wire  # noqa: PLC0415
    from bridge import convert, schedule  # noqa: PLC0415
    from bridge.service import ScheduleCore  # noqa: PLC0415

    def client(blob: bytes) -> ClientDispatch:
        message = pb.Dispatch()
        message.ParseFromString(blob)
        return ClientDispatch.from_protobuf(message)

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    if reference:
        from frequenz.dispatch import Dispatch as RefDispatch  # noqa: PLC0415

        held: Any = {}
        for blob in blobs:
            dispatch = RefDispatch(client(blob))
            held[dispatch.id] = dispatch
    else:
        # As the bridge lists: straight from protobuf, equal parts held once per listing.
        held = ScheduleCore(MG, wire.TopicLayout.for_microgrid(MG))
        converter = convert.ListingConverter()
        held.load([converter.convert(pb.Dispatch.FromString(b)) for b in blobs], now)
        del converter
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    started = time.perf_counter()
    if reference:
        running = sum(1 for d in held.values() if d.started_at(now))
    else:
        running = sum(1 for d in held.dispatches() if schedule.run_state(d, now).running)
    elapsed = time.perf_counter() - started
    return {"bytes": (after - before) / len(blobs), "running_s": elapsed, "running": running}


async def new_subscribers(
    broker: Mosquitto, api_url: str | None, expected: int
) -> dict[str, float]:
    """Time for new subscribers of each kind to see every retained topic."""
    import aiomqtt  # noqa: PLC0415
    from frequenz.client.common.microgrid import MicrogridId  # noqa: PLC0415
    from frequenz.dispatch import Dispatcher as RefDispatcher  # noqa: PLC0415

    from actor_sdk import Dispatcher, wire  # noqa: PLC0415

    layout = wire.TopicLayout.for_microgrid(MG)
    result: dict[str, float] = {}
    seen: set[str] = set()
    started = time.perf_counter()
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username="actor",
        password=broker.passwords["actor"],
        max_queued_incoming_messages=0,
    ) as client:
        await client.subscribe(
            [(f"{layout.root}/+/running", 1), (f"{layout.root}/+/dispatches/+", 1)]
        )
        async for message in client.messages:
            seen.add(message.topic.value)
            if len(seen) >= expected:
                break
    progress(f"raw subscriber saw {len(seen)} topics")
    result["raw"] = time.perf_counter() - started

    dispatches = expected - TYPES
    started = time.perf_counter()
    sdk = Dispatcher(microgrid_id=MG, broker=broker.url("actor"))
    for index in range(TYPES):  # it holds the dispatches of the types it follows
        sdk._follow(f"SCALE_TYPE_{index}")
    sdk.start()
    await sdk.wait_for_initialization()
    view = sdk._view

    def held() -> int:
        # The view's own dicts: `view.dispatches()` copies, too slow to poll at 100k.
        return sum(len(of_type) for of_type in view._dispatches.values())

    try:
        await async_wait_until(lambda: held() >= dispatches, 120, "the SDK to hold all")
        result["sdk"] = time.perf_counter() - started
    except TimeoutError:
        result["sdk"] = float("nan")
        result["sdk_held"] = held()
    progress(f"the SDK holds {held()} dispatches")
    await sdk.stop()

    if api_url is None:
        return result
    started = time.perf_counter()
    reference = RefDispatcher(
        microgrid_id=MicrogridId(MG), server_url=api_url, auth_key=API_KEY, sign_secret=API_SECRET
    )
    reference.start()
    await reference.wait_for_initialization()
    result["reference"] = time.perf_counter() - started
    progress("frequenz-dispatch initialized")
    result["reference_count"] = len(reference._bg_service._dispatches)
    await stop_reference(reference)
    return result


def _startup(stack: Stack, table: Table, size: int, expected: int) -> tuple[Mosquitto, Any, Bridge]:
    """Start everything; measure the bridge's start-up, its peak RSS and RSS per dispatch."""
    broker = stack.start_mosquitto()
    api = stack.start_api(stack.workdir / "api.sqlite3")
    idle = stack.start_bridge(api, broker, (IDLE_MG,), name="idle-bridge")
    idle.wait_synced()
    tap = Tap(stack.start_tap(broker, f"microgrid/{MG}/dispatch/#"))
    spawned = time.time()
    bridge = stack.start_bridge(api, broker, (MG,))
    samples: list[int] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=_peak_rss, args=(bridge.proc, stop_sampling, samples))
    sampler.start()
    try:
        last = tap.wait_all(expected, 120)
    finally:
        stop_sampling.set()
        sampler.join()
    startup_s = last - spawned
    progress(f"bridge published {expected} topics in {startup_s:.2f} s")
    bridge.wait_synced()
    time.sleep(0.5)
    rss_held = bridge.proc.rss()
    rss_idle = idle.proc.rss()
    table.add(
        "bridge start-up → every retained topic published",
        startup_s,
        None,
        "s",
        f"≤ {PUBLISH_BUDGET_S:.0f} s (100k)",
    )
    table.add("bridge peak RSS during start-up", max(samples), None, "MB")
    table.add(
        "bridge RSS - idle bridge RSS, per dispatch", (rss_held - rss_idle) / size, None, "KB"
    )
    return broker, api, bridge


def _cpu_per_transition(table: Table, bridge: Bridge, window: float) -> None:
    """CPU of the bridge per scheduled transition over `window` seconds, idle work included."""
    log_before = len(bridge.proc.output())
    cpu_before = bridge.proc.cpu_seconds()
    time.sleep(window)
    cpu = bridge.proc.cpu_seconds() - cpu_before
    log = bridge.proc.output()[log_before:]
    transitions = log.count(" started, until ") + log.count(" stopped")
    progress(f"CPU: {cpu:.2f} s for {transitions} transitions")
    table.add(
        f"bridge CPU per scheduled transition ({transitions} in {window:.0f} s)",
        cpu / transitions if transitions else None,
        None,
        "ms",
    )


def _subscribers(
    table: Table, broker: Mosquitto, api: Any, expected: int, with_reference: bool
) -> None:
    """New subscribers of each kind: how long until they see every retained topic."""
    size = expected - TYPES
    with_init = with_reference and size <= REFERENCE_INIT_MAX
    subs = asyncio.run(new_subscribers(broker, api.url if with_init else None, expected))
    if with_reference and not with_init:
        table.note(
            f"frequenz-dispatch's initial fetch was not run at {size:,}: it is quadratic "
            "(each new dispatch scans its whole schedule list): see the 10,000 run"
        )
    table.add(
        "new raw MQTT subscriber: every retained topic",
        subs["raw"],
        None,
        "s",
        f"≤ {SUBSCRIBER_BUDGET_S:.0f} s (10k)",
    )
    table.add(
        "new actor SDK Dispatcher: every dispatch (vs frequenz-dispatch initialized)",
        subs["sdk"],
        subs.get("reference"),
        "s",
    )
    if "sdk_held" in subs:
        table.note(
            f"the actor SDK held only {subs['sdk_held']:,.0f} of {size:,} dispatches after 120 s"
        )
    _watch_once(table, broker)


def _watch_once(table: Table, broker: Mosquitto) -> None:
    """`dispatch-bridge watch --once` in a new process: how long, and whether it got everything.

    Complete or not is what the command says: its `retained tree: complete` line, or
    exit `EXIT_INCOMPLETE` with what was missing on stderr.
    """
    started = time.perf_counter()
    result = subprocess.run(
        [
            *dispatch_bridge(),
            "watch",
            "--once",
            "--broker",
            broker.url("actor"),
            "--microgrid-id",
            str(MG),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode == EXIT_INCOMPLETE:
        verdict = "INCOMPLETE"
        table.note(f"watch --once: {result.stderr.strip()}")
    elif result.returncode == 0:
        complete = "retained tree: complete" in result.stdout
        verdict = "complete" if complete else "completeness not said"
    else:
        raise RuntimeError(f"watch --once exited {result.returncode}: {result.stderr}")
    progress(f"watch --once done in {elapsed:.2f} s: {verdict}")
    table.add(f"`dispatch-bridge watch --once` (new process): {verdict}", elapsed, None, "s")


def _republish(
    stack: Stack, table: Table, broker: Mosquitto, bridge: Bridge, *, expected: int, types: int
) -> None:
    """Restart the broker cleanly, then without its state; time the bridge's republish."""
    # Kept its state: the running topics go out again, of the dispatch topics only
    # those the broker does not hold as the bridge does (#13 item 5).
    before = bridge.proc.output().count("retained tree read back")
    broker.stop()
    broker.start()
    up = time.time()
    running_tap = Tap(
        stack.start_tap(broker, f"microgrid/{MG}/dispatch/+/running", name="tap-2"), True
    )
    bridge.proc.wait_output("retained tree read back", 60, before + 1)
    running_tap.wait_all(types, 60)
    table.add(
        "republish after broker restart that kept its state (broker up → read back, every "
        "running topic live)",
        time.time() - up,
        None,
        "s",
        f"≤ {KEPT_STATE_BUDGET_S:.0f} s (100k)",
    )
    counts = re.findall(r"read back: (\d+) dispatch topics differ", bridge.proc.output())
    table.add("dispatch topics republished after that restart", float(counts[-1]), None, "")
    # Without its state (persistence deleted): every topic again.
    broker.stop()
    for saved in (stack.workdir / "mosquitto" / "data").glob("*.db"):
        saved.unlink()
    broker.start()
    up = time.time()
    live_tap = Tap(stack.start_tap(broker, f"microgrid/{MG}/dispatch/#", name="tap-3"), True)
    last = live_tap.wait_all(expected, 120)
    table.add(
        "full republish after broker restart without its state (broker up → every topic again)",
        last - up,
        None,
        "s",
        f"≤ {PUBLISH_BUDGET_S:.0f} s (100k)",
    )


def run_size(size: int, with_reference: bool, watch_only: bool = False) -> Table:
    now = datetime.now(UTC)
    table = Table(f"Scale: {size:,} dispatches", command_line())
    with Stack() as stack:
        db = stack.workdir / "api.sqlite3"
        started = time.perf_counter()
        populate(db, MG, mix(size, now, microgrid_id=MG, types=TYPES), now)
        fill_s = time.perf_counter() - started
        progress(f"filled {size} dispatches in {fill_s:.1f} s")
        expected = expected_topics(db)
        broker, api, bridge = _startup(stack, table, size, expected)
        if watch_only:
            _watch_once(table, broker)
            table.note(f"--watch-only: the other figures were not measured; {expected:,} topics")
            return table
        blobs = load_protobufs(db)
        _cpu_per_transition(table, bridge, 3.0 if size <= 1000 else 6.0)
        _subscribers(table, broker, api, expected, with_reference)
        with sqlite3.connect(db) as connection:
            (types,) = connection.execute(
                "SELECT COUNT(DISTINCT type) FROM dispatches WHERE microgrid_id = ?", (MG,)
            ).fetchone()
        _republish(stack, table, broker, bridge, expected=expected, types=int(types))
    ours = in_process(blobs, reference=False, now=now)
    ref = in_process(blobs, reference=True, now=now) if with_reference else None
    table.add(
        "memory held per dispatch (tracemalloc, from the API's protobuf)",
        ours["bytes"],
        ref["bytes"] if ref else None,
        "KB",
        "≤ 1 KB",
    )
    table.add(
        f"`running` over all {size:,} dispatches",
        ours["running_s"],
        ref["running_s"] if ref else None,
        "s",
        "≤ 0.3 s (100k)",
    )
    if ref and ours["running"] != ref["running"]:
        table.note(f"running counts differ: ours {ours['running']}, reference {ref['running']}")
    table.note(
        f"filled the API server's SQLite with {size:,} dispatches in {fill_s:.1f} s "
        f"(bulk, through bridge.api.store.DispatchStore.create); {expected:,} retained topics"
    )
    if not with_reference:
        table.note("reference figures skipped (--no-reference)")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k dispatches only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="sizes to run")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip frequenz-dispatch (slow at 100k)"
    )
    parser.add_argument(
        "--watch-only",
        action="store_true",
        help="measure the start-up and `dispatch-bridge watch --once` only",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = args.sizes or ([1000] if args.quick else [1000, 10_000, 100_000])
    for size in sizes:
        run_size(size, not args.no_reference, args.watch_only).print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
