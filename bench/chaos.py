"""Chaos run: the whole system on loopback, random changes, overlapping faults, then the invariants.

    python bench/chaos.py --minutes 60 --seed 1             # the long run
    python bench/chaos.py --minutes 0.5 --seed 7 --quick    # what tests/test_chaos.py runs

Parts (all started here, on free loopback ports, in a temp dir; see
`bench/_chaos_system.py`): Mosquitto with the repo's `mosquitto.conf`, the local
Dispatch API server, the bridge, and actor hosts (`bench/_chaos_sdk.py`: the actor
SDK's `Dispatcher` with actors that record every start, update and stop):

* `sdk-1` manages CHAOS_A and CHAOS_B, one actor per dispatch;
* `sdk-2` manages CHAOS_A merged by type, on a clock `--clock-offset` seconds off;
* `sdk-3` manages CHAOS_B, one actor per dispatch (not with --quick).

The bridge and the hosts reach the broker and the API through TCP proxies the run
owns, so a link can be partitioned. A driver creates, updates and deletes dispatches
at random through the Dispatch API client (short windows starting 1-8 s ahead,
minutely recurrences of 2-4 runs, overlaps that merge), keeping every version as
the API returned it. Meanwhile `--overlap` fault tasks (default 2) each pick a fault
from the seeded plan (kill -9 of a part, a silent partition of a link, an API
outage during a bridge restart without its cache or with a corrupt one, a broker
restart that lost its database), undo it after a random time and wait until the
system is whole again; faults of different parts overlap. When no fault is active
and `--audit-gap` seconds passed since the last audit, the run pauses its changes
and faults and checks the retained tree against the API. After the last fault and a
quiet period it audits once more and checks the actors (see `testkit.chaos_check`), with
the oracle of `testkit.chaos_oracle` (the client library's own schedule).

The run ends with lines a script can read, each at the start of its line:
`kills survived: N ...`, `partitions survived: N ...`, `violations: N` and
`worst lateness: X s (tolerance T s) ...`. Exit code 1 on any violation (the logs
are kept), 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# First: importing the SDK silences a harmless warning frequenz-client-common's import logs.
import actor_sdk  # noqa: F401  # isort: skip
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule
from frequenz.client.dispatch.types import Dispatch, DispatchId, TargetIds

from actor_sdk import wire
from bench._chaos_system import MG, TYPES, System
from testkit.bridge import retained_snapshot
from testkit.broker import find_mosquitto
from testkit.chaos_check import Fault, Report, Truth, actor_runs, check, percentile
from testkit.chaos_tree import check_retained

LAYOUT = wire.TopicLayout.for_microgrid(MG)


@dataclass
class Stats:
    """Counters of the run."""

    ops: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    kills: dict[str, int] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    audits: int = 0
    late_audits: list[float] = field(default_factory=list)
    """Per audit whose first read differed but which caught up: seconds until it did."""
    most_at_once: int = 0

    def count(self, table: dict[str, int], key: str, by: int = 1) -> None:
        """Add `by` to `table[key]`."""
        table[key] = table.get(key, 0) + by


# --- the driver -----------------------------------------------------------------------------


class Driver:
    """Creates, updates and deletes dispatches at random; keeps the truth."""

    def __init__(self, rng: random.Random, stats: Stats) -> None:
        self.rng = rng
        self.stats = stats
        self.truth = Truth()
        self.alive: dict[int, Dispatch] = {}
        self.unsure_since: float | None = None
        self.paused = asyncio.Lock()
        """Held by an audit: no change is made meanwhile."""

    def _recurrence(self) -> RecurrenceRule | None:
        if self.rng.random() < 0.3:
            return RecurrenceRule(
                frequency=Frequency.MINUTELY,
                interval=1,
                end_criteria=EndCriteria(count=self.rng.randint(2, 4)),
            )
        return None

    async def step(self, client: Any) -> None:
        """One random operation (waits while an audit runs)."""
        async with self.paused:
            if self.unsure_since is not None:
                await self.reconcile(client)
            else:
                await self._change(client)

    async def _change(self, client: Any) -> None:
        roll = self.rng.random()
        if roll < 0.55 or len(self.alive) < 3:
            kind = "create"
        elif roll < 0.8:
            kind = "update"
        else:
            kind = "delete"
        sent = time.time()
        try:
            if kind == "create":
                start = datetime.now(UTC) + timedelta(seconds=self.rng.uniform(1, 8))
                created = await client.create(
                    microgrid_id=MicrogridId(MG),
                    type=self.rng.choice(TYPES),
                    start_time=start,
                    duration=timedelta(seconds=self.rng.randint(2, 12)),
                    target=TargetIds(self.rng.choice([1, 2])),
                    payload={"n": self.rng.randint(0, 10**6)},
                    recurrence=self._recurrence(),
                )
                self._got(int(created.id), created)
            elif kind == "update":
                dispatch_id = self.rng.choice(sorted(self.alive))
                fields: dict[str, Any] = self.rng.choice(
                    [
                        {"duration": timedelta(seconds=self.rng.randint(1, 12))},
                        {"active": not self.alive[dispatch_id].active},
                        {"payload": {"n": self.rng.randint(0, 10**6)}},
                        {
                            "start_time": datetime.now(UTC)
                            + timedelta(seconds=self.rng.uniform(1, 6))
                        },
                    ]
                )
                updated = await client.update(
                    microgrid_id=MicrogridId(MG),
                    dispatch_id=DispatchId(dispatch_id),
                    new_fields=fields,
                )
                self._got(dispatch_id, updated)
            else:
                dispatch_id = self.rng.choice(sorted(self.alive))
                await client.delete(
                    microgrid_id=MicrogridId(MG), dispatch_id=DispatchId(dispatch_id)
                )
                self._got(dispatch_id, None)
            self.stats.count(self.stats.ops, kind)
        except Exception:  # the API server may be down: the outcome is unknown
            self.stats.count(self.stats.failed, kind)
            self.unsure_since = sent

    def _got(self, dispatch_id: int, dispatch: Dispatch | None) -> None:
        self.truth.record(time.time(), dispatch_id, dispatch)
        if dispatch is None:
            self.alive.pop(dispatch_id, None)
        else:
            self.alive[dispatch_id] = dispatch

    async def listed(self, client: Any) -> dict[int, Dispatch]:
        """Every dispatch the API holds now, as it returns them."""
        found: dict[int, Dispatch] = {}
        async for page in client.list(MicrogridId(MG)):
            for dispatch in page:
                found[int(dispatch.id)] = dispatch
        return found

    async def reconcile(self, client: Any) -> None:
        """After a failed request: learn what the API holds, mark the gap uncertain."""
        assert self.unsure_since is not None
        try:
            held = await self.listed(client)
        except Exception:
            self.stats.count(self.stats.failed, "list")
            return
        now = time.time()
        self.stats.count(self.stats.ops, "list")
        for dispatch_id in set(held) | set(self.alive):
            mine = self.alive.get(dispatch_id)
            theirs = held.get(dispatch_id)
            if mine != theirs:
                self.truth.mark_uncertain(dispatch_id, self.unsure_since, now)
                self._got(dispatch_id, theirs)
        self.unsure_since = None


# --- the run --------------------------------------------------------------------------------


class Chaos:
    """The driver's changes, the fault tasks and the audits of one run."""

    def __init__(self, args: argparse.Namespace, system: System, client: Any) -> None:
        self.args = args
        self.system = system
        self.client = client
        self.stats = Stats()
        self.driver = Driver(random.Random(args.seed), self.stats)
        self.plan = random.Random(args.seed * 7919 + 1)
        self.begin = time.time()
        self.deadline = self.begin + args.minutes * 60
        self.held: set[str] = set()
        """Resources (parts, links) held by a fault now."""
        self.faults_allowed = asyncio.Event()
        self.faults_allowed.set()
        self.last_audit = self.begin
        self.tree_problems: list[str] = []
        self.active = 0
        """Faults running now."""
        self.in_flight: dict[int, tuple[str, str, float]] = {}
        """Per fault task, the fault it runs now (kind, target, began)."""
        self.records = 0

    async def operations(self) -> None:
        """Changes at random until the deadline."""
        while time.time() < self.deadline:
            await self.driver.step(self.client)
            await asyncio.sleep(self.driver.rng.uniform(0.1, self.args.op_gap))

    async def faults(self, worker: int) -> None:
        """One fault task: pick a fault whose parts are free, run it, pause, again."""
        await asyncio.sleep(self.plan.uniform(1, self.args.fault_gap))
        while time.time() < self.deadline - 5:
            await self.faults_allowed.wait()
            free = [c for c in self.system.choices() if not c[2] & self.held]
            if not free:
                await asyncio.sleep(0.2)
                continue
            kind, target, resources = self.plan.choice(free)
            upper = self.args.partition_max if kind == "partition" else self.args.down_max
            down = self.plan.uniform(0.2, upper)
            self.held |= resources
            self.active += 1
            self.stats.most_at_once = max(self.stats.most_at_once, self.active)
            self.in_flight[worker] = (kind, target, time.time())
            try:
                fault = await self.system.fault(kind, target, down)
            finally:
                self.held -= resources
                self.active -= 1
                del self.in_flight[worker]
            self._survived(fault, worker)
            if not self.held:
                await self.audit()
            await asyncio.sleep(self.plan.uniform(1, self.args.fault_gap))

    def _survived(self, fault: Fault, worker: int) -> None:
        self.stats.faults.append(fault)
        kills = self.system.kills_in(fault.kind)
        if kills:
            label = fault.target if fault.kind == "kill" else fault.kind
            self.stats.count(self.stats.kills, label, kills)
        else:
            self.stats.count(self.stats.partitions, fault.target)
        print(
            f"  +{fault.began - self.begin:6.1f} s [{worker}] {fault.kind:13} {fault.target:13} "
            f"undone after {fault.healed - fault.began:4.1f} s, whole again after "
            f"{fault.recovered - fault.began:4.1f} s",
            flush=True,
        )

    async def audit(self, *, final: bool = False) -> None:
        """With no fault active: pause the changes and compare the tree with the API.

        The tree is read once the bridge vouches for it again (its retained status
        says `online`: synced and the broker's tree read back). A tree that differs is
        read again every half second for `--audit-settle` seconds: one that catches up
        meanwhile is reported with how long it took, one that does not is a violation.
        """
        if not final and time.time() - self.last_audit < self.args.audit_gap:
            return
        self.faults_allowed.clear()
        try:
            async with self.driver.paused:
                while self.driver.unsure_since is not None:
                    await self.driver.reconcile(self.client)
                    await asyncio.sleep(0.5)
                await asyncio.to_thread(self.system.wait_bridge_vouching)
                await asyncio.sleep(1.0)  # the last change reaches the broker
                first_read, problems = await self._compare_tree()
                read_at = first_read
                while problems and read_at - first_read < self.args.audit_settle:
                    await asyncio.sleep(0.5)
                    read_at, later = await self._compare_tree()
                    if not later:
                        self._caught_up(first_read, read_at, problems)
                    problems = later
        finally:
            self.faults_allowed.set()
        self.last_audit = time.time()
        self.stats.audits += 1
        at = f"audit at +{first_read - self.begin:.0f} s"
        self.tree_problems += [
            f"{at} (still after {read_at - first_read:.1f} s): {p}" for p in problems
        ]

    async def _compare_tree(self) -> tuple[float, list[str]]:
        """List the API, read the retained tree; (when read, how they differ)."""
        held = await self.driver.listed(self.client)
        read_at = time.time()
        retained = await asyncio.to_thread(
            retained_snapshot, self.system.broker, LAYOUT.everything, 2.0
        )
        read = (read_at, time.time())
        return read_at, check_retained(
            retained, held, read, self.args.tolerance, layout=LAYOUT, types=TYPES
        )

    def _caught_up(self, first_read: float, read_at: float, problems: list[str]) -> None:
        late = read_at - first_read
        self.stats.late_audits.append(late)
        print(
            f"  audit at +{first_read - self.begin:.0f} s: the tree caught up after "
            f"{late:.1f} s; it first differed: {'; '.join(problems)[:400]}",
            flush=True,
        )


async def run_chaos(args: argparse.Namespace, workdir: Path) -> int:
    """Run the chaos and the checks; print the figures; return the exit code."""
    print(f"chaos run: seed {args.seed}, {args.minutes:g} min, logs in {workdir}", flush=True)
    system = await asyncio.to_thread(
        System,
        workdir,
        quick=args.quick,
        slow_stop_s=args.sabotage_slow_stop,
        clock_offset=args.clock_offset,
    )
    chaos: Chaos | None = None
    aborted: str | None = None
    end = time.time()
    try:
        await system.open()
        async with system.api.client() as client:
            chaos = Chaos(args, system, client)
            workers = [chaos.faults(n + 1) for n in range(args.overlap)]
            await asyncio.gather(chaos.operations(), *workers)
            # Quiet: no changes, no faults; scheduled starts and stops still happen.
            await asyncio.sleep(args.quiet)
            system.ensure_all_up()
            await chaos.audit(final=True)
            end = time.time()
    except Exception as error:  # a part that never recovered: report it, keep the logs
        traceback.print_exc()
        aborted = f"the run stopped: {error!r}".splitlines()[0]
        end = time.time()
        if chaos is not None:  # faults under way then: disturbed to the end, not "all up"
            chaos.stats.faults += [
                Fault(kind, target, began, end, end)
                for kind, target, began in chaos.in_flight.values()
            ]
    finally:
        await system.close()
    if chaos is None:
        print(f"violations: 1\n{aborted}")
        return 1
    report = _check_actors(chaos, system, end)
    violations = chaos.tree_problems + report.violations + ([aborted] if aborted else [])
    _print_figures(chaos, report, violations)
    return 1 if violations else 0


def _check_actors(chaos: Chaos, system: System, end: float) -> Report:
    records = [json.loads(line) for line in system.records.read_text().splitlines() if line]
    chaos.records = len(records)
    host_modes = {h.name: h.merge for h in system.hosts}
    host_types = {h.name: h.types for h in system.hosts}
    runs = actor_runs(records, host_modes, system.host_deaths, end)
    return check(
        chaos.driver.truth,
        runs,
        chaos.stats.faults,
        host_types=host_types,
        host_modes=host_modes,
        begin=chaos.begin,
        end=end,
        tol=chaos.args.tolerance,
        grace=chaos.args.grace,
    )


def _print_figures(chaos: Chaos, report: Report, violations: list[str]) -> None:
    stats, args = chaos.stats, chaos.args
    starts, stops = report.start_lateness, report.stop_lateness
    print(
        f"operations: {sum(stats.ops.values())} ({_table(stats.ops)}); failed while parts "
        f"were down: {sum(stats.failed.values())} ({_table(stats.failed)})"
    )
    recovery = [f.recovered - f.began for f in stats.faults]
    print(
        f"faults: {len(stats.faults)}, up to {stats.most_at_once} at once ({args.overlap} "
        f"tasks); whole again after a "
        f"fault: max {max(recovery, default=0):.1f} s"
    )
    print(
        f"dispatches: {len(chaos.driver.truth.versions)}; windows checked: "
        f"{report.windows_checked} ({report.windows_up} with time while all parts were up "
        f"and live, {report.covered_s:.0f} window-s); actor runs: {report.actor_runs} "
        f"({report.actor_s:.0f} actor-s); records: {chaos.records}"
    )
    verdict = "DIFFERENT" if chaos.tree_problems else "equal to the truth"
    late = stats.late_audits
    caught_up = f" ({len(late)} caught up late, worst {max(late):.1f} s)" if late else ""
    print(f"retained tree: {stats.audits} audits, {verdict}{caught_up}")
    print(
        f"lateness (s): start p50 {percentile(starts, 0.5):.3f} p99 "
        f"{percentile(starts, 0.99):.3f} max {max(starts, default=math.nan):.3f}; "
        f"stop p50 {percentile(stops, 0.5):.3f} p99 {percentile(stops, 0.99):.3f} "
        f"max {max(stops, default=math.nan):.3f}"
    )
    for problem in violations[:50]:
        print(f"VIOLATION: {problem}")
    if len(violations) > 50:
        print(f"VIOLATION: ... and {len(violations) - 50} more")
    print(f"kills survived: {sum(stats.kills.values())} ({_table(stats.kills)})")
    print(f"partitions survived: {sum(stats.partitions.values())} ({_table(stats.partitions)})")
    print(f"violations: {len(violations)}")
    print(
        f"worst lateness: {report.worst_lateness:.3f} s (tolerance {args.tolerance:g} s); "
        f"ran on a stale view within its until + {args.grace:g} s grace: "
        f"{report.stale_allowed_s:.1f} actor-s"
    )


def _table(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def main() -> int:
    """Parse the flags, run, clean up; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="chaos duration")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--quick", action="store_true", help="two actor hosts, short quiet")
    parser.add_argument("--tolerance", type=float, default=0.5, help="seconds (default 0.5)")
    parser.add_argument("--grace", type=float, default=0.1, help="SDK fail-safe grace, s")
    parser.add_argument("--op-gap", type=float, default=1.0, help="max seconds between ops")
    parser.add_argument("--overlap", type=int, default=2, help="fault tasks at once")
    parser.add_argument("--fault-gap", type=float, default=10.0, help="max s between faults")
    parser.add_argument("--down-max", type=float, default=4.0, help="max s a part is down")
    parser.add_argument("--partition-max", type=float, default=8.0, help="max s of a partition")
    parser.add_argument("--audit-gap", type=float, default=30.0, help="min s between audits")
    parser.add_argument(
        "--audit-settle", type=float, default=5.0, help="s a differing tree may take to catch up"
    )
    parser.add_argument(
        "--clock-offset", type=float, default=0.2, help="seconds sdk-2's clock is off"
    )
    parser.add_argument("--quiet", type=float, default=None, help="quiet period, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the logs also on success")
    parser.add_argument(
        "--sabotage-slow-stop",
        type=float,
        default=0.0,
        metavar="S",
        help="checks the checker: every actor takes S seconds to stop (expect violations)",
    )
    args = parser.parse_args()
    if args.quiet is None:
        args.quiet = 8.0 if args.quick else 20.0
    if find_mosquitto() is None:
        print("chaos: needs the mosquitto binary (apt-get install mosquitto)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    code = asyncio.run(run_chaos(args, workdir))
    if code == 0 and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
