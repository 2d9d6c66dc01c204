"""Benchmark: how late scheduled starts and stops arrive, ours vs frequenz-dispatch.

Run alone: `.venv/bin/python bench/lateness.py` (300 dispatches per side, about
40 s), or `--quick` (10 per side, a few seconds).

By default our SDK is measured in steady state: the dispatches are created once it
knows the bridge's clock (live messages in four different seconds), so it starts runs on
its own clock, as a long-running actor process does. `--fresh` (and `--quick`) measure
it just started, when every start waits for the bridge's snapshot to reach it.

What runs: Mosquitto (the repo's config), `dispatch-bridge api`, `dispatch-bridge run`
(microgrid 1), and in this process: a raw MQTT subscriber of the running snapshots
(what the bridge published, when), the actor SDK's `Dispatcher` (microgrid 1) and
`frequenz-dispatch`'s `Dispatcher` (microgrid 2, straight to the API server), both
managing every bench type with `merge_strategy=None` and a recording actor.

Each side gets the same mix, created a few seconds ahead: 60 % one-offs, and
recurrences started long ago whose occurrence falls in the window (minutely
started 30 minutes ago, hourly 2 days ago, daily 30 days ago), over one type per
10 dispatches. Every run lasts 2 s. The starts fall on whole seconds, many at
once: ours on even seconds, the reference's on odd ones, so the two never
compete for the CPU at the same instant.

`--bridge-only` leaves both SDKs out: the bridge alone publishes its snapshots at
each instant, and half a second later a plain paho client in this process
(`bench/_floor.py`) publishes as many messages (one per type the instant changes,
2,000 bytes each) to the same tap: the floor of the broker path on this machine,
next to the bridge's figure in the same run.

Lateness = wall-clock receive time minus the scheduled instant (one clock: all in
this process). For the bridge: the first running snapshot of the type that shows
the change, at the subscriber, and the snapshot's `as_of` (when the bridge
computed it). For the actors: `start()` and `stop()` of the recording actor.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (
    API_KEY,
    API_SECRET,
    Stack,
    async_wait_until,
    next_second,
    tap_messages,
    utcnow,
)
from bench._recorder import Recorder, retry_until_seen, stop_reference
from bench._table import Table, command_line, percentile

OURS_MG = 1
REF_MG = 2
RUN_S = 2
BUDGET_P99 = 0.002
REFERENCE_FIGURE = "3.3 ms p99 (frequenz-dispatch to its receiver, docs/contract.md)"


@dataclass(frozen=True)
class Planned:
    dispatch_id: int
    type: str
    start: float
    stop: float


def _mix(index: int, start: datetime) -> tuple[datetime, object | None]:
    from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule  # noqa: PLC0415

    kind = index % 5
    if kind == 3:
        return start - timedelta(minutes=30), RecurrenceRule(
            frequency=Frequency.MINUTELY, interval=1
        )
    if kind == 4 and index % 10 == 4:
        return start - timedelta(days=2), RecurrenceRule(frequency=Frequency.HOURLY, interval=1)
    if kind == 4:
        return start - timedelta(days=30), RecurrenceRule(frequency=Frequency.DAILY, interval=1)
    return start, None


@dataclass
class Run:
    """One run: its settings, what was planned and what was recorded."""

    per_side: int
    types: list[str]
    instants: int
    ours: Recorder = field(default_factory=Recorder)
    ref: Recorder = field(default_factory=Recorder)
    planned: dict[str, list[Planned]] = field(default_factory=lambda: {"o": [], "r": []})
    snapshots: list[tuple[float, str, frozenset[int], float]] = field(default_factory=list)


FLOOR_OFFSET_S = 0.5
"""The floor's bursts come this long after each of the bridge's instants."""
FLOOR_SIZE = 2000
"""Bytes per message of the floor's bursts (a snapshot of ten dispatches is about 4 KB,
one of none 0.2 KB)."""


async def measure(per_side: int, *, fresh: bool = False) -> Table:
    from frequenz.client.common.microgrid import MicrogridId  # noqa: PLC0415
    from frequenz.dispatch import Dispatcher as RefDispatcher  # noqa: PLC0415

    from actor_sdk import Dispatcher, wire  # noqa: PLC0415

    run = Run(
        per_side,
        types=[f"LATE_{n}" for n in range(max(2, per_side // 10))],
        instants=max(1, min(3, per_side // 100)),
    )
    with Stack() as stack:
        broker, api, _ = stack.start_pipeline((OURS_MG,))
        sdk = Dispatcher(microgrid_id=OURS_MG, broker=broker.url("actor"))
        reference = RefDispatcher(
            microgrid_id=MicrogridId(REF_MG),
            server_url=api.url,
            auth_key=API_KEY,
            sign_secret=API_SECRET,
        )
        layout = wire.TopicLayout.for_microgrid(OURS_MG)
        tap = stack.start_tap(broker, f"{layout.root}/+/running")
        try:
            await _drive(run, api.client(), sdk, reference, fresh=fresh)
        finally:
            await sdk.stop()
            await stop_reference(reference)
        for received, _, topic, payload in tap_messages(tap):
            if payload and topic.endswith("/running"):
                snap = wire.decode_running(payload)
                ids = frozenset(d.id for d in snap.running)
                run.snapshots.append((received, snap.type, ids, snap.as_of.timestamp()))
    return _table(run)


async def _drive(run: Run, client: Any, sdk: Any, reference: Any, *, fresh: bool) -> None:
    from frequenz.client.dispatch.types import TargetIds  # noqa: PLC0415

    from bridge.api import create_dispatch  # noqa: PLC0415

    ours, ref = run.ours, run.ref
    sdk.start()
    reference.start()
    await sdk.wait_for_initialization()
    await reference.wait_for_initialization()
    for dispatch_type in [*run.types, "WARMUP"]:
        await sdk.start_managing(dispatch_type, actor_factory=ours.factory, merge_strategy=None)
        await reference.start_managing(
            dispatch_type, actor_factory=ref.factory, merge_strategy=None
        )

    async def warm(microgrid_id: int) -> int:
        created = await create_dispatch(
            client,
            microgrid_id=microgrid_id,
            type="WARMUP",
            start_time=utcnow() - timedelta(seconds=5),
            duration=timedelta(seconds=60),
            target=TargetIds(1),
        )
        return int(created.id)

    # frequenz-dispatch 1.0.4 opens its stream after its first list.
    await retry_until_seen(lambda: warm(REF_MG), lambda i: ref.count("start", i) > 0)
    await retry_until_seen(lambda: warm(OURS_MG), lambda i: ours.count("start", i) > 0)
    if not fresh:  # steady state: own-clock starts (about four status heartbeats)
        await async_wait_until(lambda: sdk.knows_bridge_clock, 60, "the bridge's clock")

    # Enough lead time to create everything before the first instant.
    base = next_second(1.0 + run.per_side * 2 * 0.006)
    await _create(run, client, base, (("o", OURS_MG, 0), ("r", REF_MG, 1)))
    last = max(p.stop for p in run.planned["o"] + run.planned["r"])
    for side, recorder in (("o", ours), ("r", ref)):
        for p in run.planned[side]:
            await recorder.wait("stop", p.dispatch_id, timeout=last - time.time() + 10)


async def _create(
    run: Run, client: Any, base: datetime, sides: tuple[tuple[str, int, int], ...]
) -> None:
    """Create each side's dispatches (side, microgrid, parity of its seconds) ahead of `base`."""
    from frequenz.client.dispatch.types import TargetIds  # noqa: PLC0415

    from bridge.api import create_dispatch  # noqa: PLC0415

    for side, microgrid_id, parity in sides:
        for index in range(run.per_side):
            start = base + timedelta(seconds=2 * (index % run.instants) + parity)
            start_time, rule = _mix(index, start)
            dispatch_type = run.types[index % len(run.types)]
            created = await create_dispatch(
                client,
                microgrid_id=microgrid_id,
                type=dispatch_type,
                start_time=start_time,
                duration=timedelta(seconds=RUN_S),
                target=TargetIds(index + 1),
                recurrence=rule,  # type: ignore[arg-type]
            )
            run.planned[side].append(
                Planned(
                    int(created.id), dispatch_type, start.timestamp(), start.timestamp() + RUN_S
                )
            )
    if utcnow() >= base:
        raise RuntimeError("creating the dispatches took longer than the lead time")


async def measure_bridge_only(per_side: int) -> Table:
    from actor_sdk import wire  # noqa: PLC0415
    from bench._floor import FLOOR_TOPICS, FloorPublisher  # noqa: PLC0415

    run = Run(per_side, types=[f"LATE_{n}" for n in range(max(2, per_side // 10))], instants=3)
    with Stack() as stack:
        broker, api, _ = stack.start_pipeline((OURS_MG,))
        layout = wire.TopicLayout.for_microgrid(OURS_MG)
        tap = stack.start_tap(broker, f"{layout.root}/+/running", FLOOR_TOPICS)
        base = next_second(1.0 + run.per_side * 0.006)
        await _create(run, api.client(), base, (("o", OURS_MG, 0),))
        changing: dict[float, set[str]] = {}  # the types each instant changes
        for planned in run.planned["o"]:
            for instant in (planned.start, planned.stop):
                changing.setdefault(instant, set()).add(planned.type)
        instants = sorted(changing)
        bursts = [(t + FLOOR_OFFSET_S, len(changing[t])) for t in instants]
        floor = FloorPublisher(broker.url("admin"), bursts, size=FLOOR_SIZE)
        await asyncio.sleep(max(instants) + 1 + FLOOR_OFFSET_S - time.time())
        floor.close()
        received = tap_messages(tap)
    sizes, floor_late = [], []
    for at, retained, topic, payload in received:
        if topic.startswith("bench/floor/") and not retained:
            instant = max(t for t in instants if t + FLOOR_OFFSET_S <= at)
            floor_late.append(at - instant - FLOOR_OFFSET_S)
        elif payload and topic.endswith("/running"):
            snap = wire.decode_running(payload)
            ids = frozenset(d.id for d in snap.running)
            run.snapshots.append((at, snap.type, ids, snap.as_of.timestamp()))
            if any(0 <= at - t < FLOOR_OFFSET_S for t in instants):  # not a create's
                sizes.append(len(payload))
    return _table(run, floor_late, sizes)


def _table(run: Run, floor: list[float] | None = None, sizes: list[int] | None = None) -> Table:
    planned, ours, ref = run.planned, run.ours, run.ref

    def bridge_lateness(p: Planned, start: bool) -> tuple[float, float]:
        instant = p.start if start else p.stop
        for received, dispatch_type, ids, as_of in run.snapshots:
            if dispatch_type != p.type or received < instant - 0.5:
                continue
            if (p.dispatch_id in ids) == start:
                return received - instant, as_of - instant
        return float("nan"), float("nan")

    publish = [bridge_lateness(p, s) for p in planned["o"] for s in (True, False)]
    received = [r for r, _ in publish]
    computed = [c for _, c in publish]
    table = Table(
        f"Lateness of scheduled starts and stops ({run.per_side} dispatches per side, "
        f"{run.instants} start instant(s), {len(run.types)} types)",
        command_line(),
    )
    table.add("bridge: computed (snapshot as_of), p50", percentile(computed, 50), None, "ms")
    table.add("bridge: computed (snapshot as_of), p99", percentile(computed, 99), None, "ms")
    table.add(
        "bridge: published (subscriber receives), p50",
        percentile(received, 50),
        None if floor is None else percentile(floor, 50),
        "ms",
    )
    table.add(
        "bridge: published (subscriber receives), p99",
        percentile(received, 99),
        None if floor is None else percentile(floor, 99),
        "ms",
        "≤ 2 ms",
    )
    table.add("bridge: published, max", max(received), None if floor is None else max(floor), "ms")
    for label, kind in (("start", "start"), ("stop", "stop")):
        if floor is not None:
            break  # no actors
        late: dict[str, list[float]] = {}
        for side, recorder in (("o", ours), ("r", ref)):
            late[side] = [
                recorder.times[(kind, p.dispatch_id)][0] - (p.start if kind == "start" else p.stop)
                for p in planned[side]
            ]
        table.add_spread(f"actor {label}() late", late["o"], late["r"], "ms")
    p99 = percentile(received, 99)
    table.note(
        f"budget: a scheduled start/stop published late by ≤ 2 ms at p99 (100 at once) — "
        f"{'met' if p99 <= BUDGET_P99 else 'MISSED'} ({p99 * 1000:.2f} ms); "
        f"reference figure: {REFERENCE_FIGURE}"
    )
    if floor is None:
        table.note(
            "ours: bridge schedule loop → Mosquitto → actor SDK → actor; reference: "
            "frequenz-dispatch's own timer in the actor's process → actor"
        )
    else:
        sizes = sizes or [0]
        table.note(
            f"bridge only, no actor processes; reference: a plain paho client publishing, "
            f"at each instant, one message of {FLOOR_SIZE} bytes per type the instant changes "
            f"to the same tap (the bridge's snapshots there: median "
            f"{percentile(sizes, 50):.0f} bytes, from {min(sizes)} to {max(sizes)}), "
            f"{len(floor)} received"
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 dispatches per side")
    parser.add_argument("--dispatches", type=int, default=None, help="dispatches per side")
    parser.add_argument(
        "--fresh", action="store_true", help="do not wait until our SDK knows the bridge's clock"
    )
    parser.add_argument(
        "--bridge-only",
        action="store_true",
        help="no actor processes: the bridge's snapshots next to a plain paho client's",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    per_side = args.dispatches or (10 if args.quick else 300)
    if args.bridge_only:
        table = asyncio.run(measure_bridge_only(per_side))
    else:
        table = asyncio.run(measure(per_side, fresh=args.fresh or args.quick))
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
