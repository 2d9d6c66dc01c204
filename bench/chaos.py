"""Chaos run: the whole system on loopback, random changes, random kill -9, then the invariants.

    python bench/chaos.py --minutes 10 --seed 1
    python bench/chaos.py --minutes 1 --seed 7 --quick     # what tests/test_chaos.py runs

Parts (all started here, on free loopback ports, in a temp dir): Mosquitto with the
repo's `mosquitto.conf`, the local Dispatch API server (`dispatch-bridge api`), the
bridge (`dispatch-bridge run`), and actor hosts (`bench/_chaos_sdk.py`, the actor
SDK's `manage` with actors that record every start, update and stop):

* `sdk-1` manages CHAOS_A and CHAOS_B, one actor per dispatch;
* `sdk-2` manages CHAOS_A merged by type (one actor while any CHAOS_A runs);
* `sdk-3` manages CHAOS_B, one actor per dispatch (not with --quick).

A driver creates, updates and deletes dispatches at random through the Dispatch API
client (short windows of 2-12 s starting 1-8 s ahead, minutely recurrences, overlaps
that merge), while a fault task kills a random part with SIGKILL (broker, bridge,
API server, an actor host), restarts it after a random pause, and waits until the
system is whole again (restarted part ready, bridge reconnected and re-synced, hosts
in sync). After the last fault and a quiet period it checks (see `_chaos_check`):

* every retained topic equals the truth computed from the API server's database
  (dispatches listed through the API, `bridge.schedule.running_at` for `running`);
* no actor ran outside its dispatch windows by more than the tolerance, except while
  its host could not know (broker or bridge down) and then not past its `until`;
* no window was missed while all parts were up; no duplicate actors.

It prints the figures (operations, kills survived, windows, lateness, violations)
and exits 1 on any violation (keeping the logs), 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule
from frequenz.client.dispatch.types import DispatchId, TargetIds

from actor_sdk import wire
from bench._chaos_check import (
    Fault,
    Report,
    Truth,
    actor_runs,
    check,
    percentile,
)
from bridge import schedule
from bridge.service import strip_state
from tests.fixtures.api_server import ApiServerHandle
from tests.fixtures.bridge import BridgeHandle, retained_snapshot
from tests.fixtures.broker import Broker, find_mosquitto, start_broker
from tests.fixtures.processes import ManagedProcess, ProcessFactory, wait_until

MG = 1
LAYOUT = wire.TopicLayout.for_microgrid(MG)
TYPES = ("CHAOS_A", "CHAOS_B")
SDK_HOST = Path(__file__).resolve().parent / "_chaos_sdk.py"
RECOVERY_TIMEOUT = 60.0
_SYNCED = re.compile(r"\bsynced \d+ dispatches from the Dispatch API")


@dataclass
class Host:
    """One actor host process."""

    name: str
    types: list[str]
    merge: str
    process: ManagedProcess


@dataclass
class Stats:
    """Counters of the run."""

    ops: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    kills: dict[str, int] = field(default_factory=dict)
    recovery_s: list[float] = field(default_factory=list)

    def count(self, table: dict[str, int], key: str) -> None:
        """Add one to `table[key]`."""
        table[key] = table.get(key, 0) + 1


class System:
    """Broker, API server, bridge and actor hosts, with kill and restart of each."""

    def __init__(self, workdir: Path, *, quick: bool, slow_stop_s: float = 0.0) -> None:
        self.workdir = workdir
        self.slow_stop_s = slow_stop_s
        self.factory = ProcessFactory(workdir / "logs")
        self.hosts: list[Host] = []
        self.records = workdir / "actors.jsonl"
        self.records.touch()
        self.broker: Broker = start_broker(workdir / "broker")
        self.api = ApiServerHandle(workdir, name="api")
        try:
            self._start(quick)
        except BaseException:
            self.close()
            raise

    def _start(self, quick: bool) -> None:
        if self.broker.kind != "mosquitto":
            raise SystemExit("the chaos run needs the mosquitto binary (it kills and restarts it)")
        self.api.start()
        self.bridge = BridgeHandle(
            self.factory,
            api=self.api,
            broker=self.broker,
            state_dir=self.workdir / "bridge-state",
            microgrid_ids=(MG,),
        )
        self.bridge.start()
        self._wait_bridge_synced(1)
        specs = [("sdk-1", list(TYPES), "none"), ("sdk-2", ["CHAOS_A"], "type")]
        if not quick:
            specs.append(("sdk-3", ["CHAOS_B"], "none"))
        self.hosts = [self._host(*spec) for spec in specs]
        for host in self.hosts:
            host.process.start()
        for host in self.hosts:
            wait_until(
                lambda h=host: h.process.check_alive() or self._synced(h) >= 1,
                30,
                f"{host.name} in sync",
            )

    def _host(self, name: str, types: list[str], merge: str) -> Host:
        args: list[str] = [sys.executable, str(SDK_HOST), "--microgrid-id", str(MG)]
        for dispatch_type in types:
            args += ["--type", dispatch_type]
        args += ["--merge", merge, "--record", str(self.records), "--host", name]
        args += ["--keepalive", "3", "--max-reconnect-delay", "2"]
        process = self.factory(
            args,
            name=name,
            start=False,
            extra_env={
                "CHAOS_SABOTAGE_SLOW_STOP_S": str(self.slow_stop_s),
                "MQTT_URL": f"mqtt://{self.broker.host}:{self.broker.port}",
                "MQTT_USERNAME": "actor",
                "MQTT_PASSWORD": self.broker.passwords["actor"] or "",
            },
        )
        return Host(name, types, merge, process)

    # ---- progress markers in the logs --------------------------------------------------

    @staticmethod
    def _synced(host: Host) -> int:
        return host.process.output().count("in sync with the retained state")

    def _bridge_connected(self) -> int:
        return self.bridge.output().count("connected to MQTT broker")

    def _bridge_synced(self) -> int:
        # "synced N dispatches from the Dispatch API": one per completed sync.
        return len(_SYNCED.findall(self.bridge.output()))

    def _wait_bridge_synced(self, count: int) -> None:
        wait_until(
            lambda: self.bridge.process.check_alive() or self._bridge_synced() >= count,
            RECOVERY_TIMEOUT,
            f"the bridge's sync #{count} with the Dispatch API",
        )

    def _hosts_see_online(self, host: Host) -> int:
        return host.process.output().count("is online (session")

    # ---- faults --------------------------------------------------------------------------

    def victims(self) -> list[str]:
        """What a fault may kill."""
        return ["broker", "bridge", "api", *(h.name for h in self.hosts)]

    def kill(self, victim: str) -> Callable[[], None]:
        """Kill `victim` with SIGKILL now; return the function that restarts it and waits."""
        if victim == "broker":
            connected = self._bridge_connected()
            synced = {h.name: self._synced(h) for h in self.hosts}
            self.broker.kill9()

            def back() -> None:
                self.broker.start()
                wait_until(lambda: self._bridge_connected() > connected, RECOVERY_TIMEOUT, "bridge")
                for host in self.hosts:
                    wait_until(
                        lambda h=host: self._synced(h) > synced[h.name],
                        RECOVERY_TIMEOUT,
                        f"{host.name} to re-sync",
                    )

            return back
        if victim == "bridge":
            online = {h.name: self._hosts_see_online(h) for h in self.hosts}
            synced_before = self._bridge_synced()
            self.bridge.kill9()

            def back() -> None:
                self.bridge.start(timeout=RECOVERY_TIMEOUT)
                self._wait_bridge_synced(synced_before + 1)
                for host in self.hosts:
                    wait_until(
                        lambda h=host: self._hosts_see_online(h) > online[h.name],
                        RECOVERY_TIMEOUT,
                        f"{host.name} to see the bridge online",
                    )

            return back
        if victim == "api":
            synced_before = self._bridge_synced()
            self.api.kill9()

            def back() -> None:
                self.api.start(timeout=RECOVERY_TIMEOUT)
                self._wait_bridge_synced(synced_before + 1)

            return back
        host = next(h for h in self.hosts if h.name == victim)
        host.process.kill9()

        def back() -> None:
            before = self._synced(host)
            host.process.start()
            wait_until(
                lambda: host.process.check_alive() or self._synced(host) > before,
                RECOVERY_TIMEOUT,
                f"{host.name} in sync",
            )

        return back

    def ensure_all_up(self) -> None:
        """Check that every part runs (raises when one died on its own)."""
        assert self.broker.running, "the broker is down"
        for process in (self.api.process, self.bridge.process, *(h.process for h in self.hosts)):
            assert process is not None
            process.check_alive()

    def close(self) -> None:
        """Stop everything (also a partly started system); never raises."""
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.process.stop(10)
        self.factory.stop_all()
        with contextlib.suppress(Exception):
            self.api.stop()
        with contextlib.suppress(Exception):
            self.broker.close()


# --- the driver -----------------------------------------------------------------------------


class Driver:
    """Creates, updates and deletes dispatches at random; keeps the truth."""

    def __init__(self, system: System, rng: random.Random, stats: Stats) -> None:
        self.system = system
        self.rng = rng
        self.stats = stats
        self.truth = Truth()
        self.alive: dict[int, wire.Dispatch] = {}
        self.unsure_since: float | None = None

    def _recurrence(self) -> RecurrenceRule | None:
        if self.rng.random() < 0.3:
            return RecurrenceRule(
                frequency=Frequency.MINUTELY,
                interval=1,
                end_criteria=EndCriteria(count=self.rng.randint(2, 4)),
            )
        return None

    async def step(self, client: Any) -> None:
        """One random operation."""
        if self.unsure_since is not None:
            await self.reconcile(client)
            return
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
                self._got(int(created.id), wire.from_client(created))
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
                self._got(dispatch_id, wire.from_client(updated))
            else:
                dispatch_id = self.rng.choice(sorted(self.alive))
                await client.delete(
                    microgrid_id=MicrogridId(MG), dispatch_id=DispatchId(dispatch_id)
                )
                self._got(dispatch_id, None)
            self.stats.count(self.stats.ops, kind)
        except Exception:  # the API server may be down: the outcome is unknown
            self.stats.count(self.stats.failed, kind)
            self.unsure_since = sent if self.unsure_since is None else self.unsure_since

    def _got(self, dispatch_id: int, dispatch: wire.Dispatch | None) -> None:
        self.truth.record(time.time(), dispatch_id, dispatch)
        if dispatch is None:
            self.alive.pop(dispatch_id, None)
        else:
            self.alive[dispatch_id] = dispatch

    async def listed(self, client: Any) -> dict[int, wire.Dispatch]:
        """Every dispatch the API holds now."""
        found: dict[int, wire.Dispatch] = {}
        async for page in client.list(MicrogridId(MG)):
            for dispatch in page:
                found[int(dispatch.id)] = wire.from_client(dispatch)
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


# --- the final check of the retained tree ---------------------------------------------------


def _parse_tree(
    retained: dict[str, bytes], problems: list[str]
) -> tuple[dict[int, wire.Dispatch], dict[str, wire.RunningSnapshot]]:
    published: dict[int, wire.Dispatch] = {}
    snapshots: dict[str, wire.RunningSnapshot] = {}
    for topic, payload in retained.items():
        try:
            ref = LAYOUT.parse(topic)
            if ref.kind is wire.TopicKind.DISPATCH and payload:
                assert ref.dispatch_id is not None
                published[ref.dispatch_id] = wire.decode_dispatch(payload)
                if topic != LAYOUT.dispatch(published[ref.dispatch_id].type, ref.dispatch_id):
                    problems.append(f"{topic}: dispatch on the wrong topic")
            elif ref.kind is wire.TopicKind.RUNNING and payload:
                assert ref.dispatch_type is not None
                snapshots[ref.dispatch_type] = wire.decode_running(payload)
        except wire.WireError as error:
            problems.append(f"{topic}: {error}")
    return published, snapshots


def check_retained(
    retained: dict[str, bytes], held: dict[int, wire.Dispatch], now: datetime
) -> list[str]:
    """Compare the retained tree with the truth; return the differences."""
    problems: list[str] = []
    status_payload = retained.pop(LAYOUT.status, b"")
    try:
        status = wire.decode_status(status_payload)
        if status.state != "online" or status.dispatches != len(held):
            problems.append(
                f"status {status.state}, {status.dispatches} dispatches (want {len(held)})"
            )
    except wire.WireError as error:
        problems.append(f"status: {error}")
    published, snapshots = _parse_tree(retained, problems)
    if set(published) != set(held):
        extra, missing = set(published) - set(held), set(held) - set(published)
        problems.append(f"dispatch topics: stale {sorted(extra)}, missing {sorted(missing)}")
    for dispatch_id in set(published) & set(held):
        if strip_state(published[dispatch_id]) != strip_state(held[dispatch_id]):
            problems.append(f"dispatch {dispatch_id}: published definition differs from the API")
    for dispatch_type in TYPES:
        of_type = [d for d in held.values() if d.type == dispatch_type]
        expected_now, _ = schedule.running_at(of_type, now)
        snapshot = snapshots.get(dispatch_type)
        got = [] if snapshot is None else [d.id for d in snapshot.running]
        if got != [d.id for d in expected_now]:
            problems.append(
                f"{dispatch_type}/running lists {got}, the truth at the end is "
                f"{[d.id for d in expected_now]}"
            )
        if snapshot is not None:
            at_as_of, _ = schedule.running_at(of_type, snapshot.as_of)
            if got != [d.id for d in at_as_of]:
                problems.append(f"{dispatch_type}/running differs from the truth at its as_of")
    return problems


# --- main -----------------------------------------------------------------------------------


async def run_chaos(args: argparse.Namespace, workdir: Path) -> int:  # noqa: PLR0915
    """Run the chaos and the checks; return the exit code."""
    rng = random.Random(args.seed)
    stats = Stats()
    print(f"chaos run: seed {args.seed}, {args.minutes:g} min, logs in {workdir}", flush=True)
    system = await asyncio.to_thread(
        System, workdir, quick=args.quick, slow_stop_s=args.sabotage_slow_stop
    )
    driver = Driver(system, rng, stats)
    faults: list[Fault] = []
    host_deaths: dict[str, list[float]] = {}
    begin = time.time()
    deadline = begin + args.minutes * 60
    fault_rng = random.Random(args.seed * 7919 + 1)
    try:
        async with system.api.client() as client:

            async def operations() -> None:
                while time.time() < deadline:
                    await driver.step(client)
                    await asyncio.sleep(rng.uniform(0.1, args.op_gap))

            async def chaos() -> None:
                await asyncio.sleep(fault_rng.uniform(2, args.fault_gap))
                while time.time() < deadline - 5:
                    victim = fault_rng.choice(system.victims())
                    killed_at = time.time()
                    restart = system.kill(victim)
                    if victim.startswith("sdk"):
                        host_deaths.setdefault(victim, []).append(killed_at)
                    await asyncio.sleep(fault_rng.uniform(0.2, args.down_max))
                    await asyncio.to_thread(restart)
                    recovered_at = time.time()
                    faults.append(Fault(victim, killed_at, recovered_at))
                    stats.count(stats.kills, victim)
                    stats.recovery_s.append(recovered_at - killed_at)
                    print(
                        f"  +{killed_at - begin:6.1f} s kill -9 {victim:7} "
                        f"whole again after {recovered_at - killed_at:4.1f} s",
                        flush=True,
                    )
                    await asyncio.sleep(fault_rng.uniform(1, args.fault_gap))

            await asyncio.gather(operations(), chaos())
            while driver.unsure_since is not None:
                await driver.reconcile(client)
                await asyncio.sleep(0.5)
            # Quiet: no changes, no faults; scheduled starts and stops still happen.
            await asyncio.sleep(args.quiet)
            system.ensure_all_up()
            held = await driver.listed(client)
        now = datetime.now(UTC)
        retained = await asyncio.to_thread(retained_snapshot, system.broker, LAYOUT.everything, 2.0)
        tree_problems = check_retained(retained, held, now)
        end = time.time()
    finally:
        await asyncio.to_thread(system.close)

    records = [json.loads(line) for line in system.records.read_text().splitlines() if line]
    host_modes = {h.name: h.merge for h in system.hosts}
    host_types = {h.name: h.types for h in system.hosts}
    runs = actor_runs(records, host_modes, host_deaths, end)
    report = check(
        driver.truth,
        runs,
        faults,
        host_types=host_types,
        host_modes=host_modes,
        begin=begin,
        end=end,
        tol=args.tolerance,
    )
    violations = tree_problems + report.violations

    _print_figures(
        stats,
        driver,
        report,
        records=len(records),
        topics=len(retained),
        tree_problems=tree_problems,
        args=args,
    )
    for problem in violations:
        print(f"VIOLATION: {problem}")
    print(f"violations: {len(violations)}")
    return 1 if violations else 0


def _print_figures(
    stats: Stats,
    driver: Driver,
    report: Report,
    *,
    records: int,
    topics: int,
    tree_problems: list[str],
    args: argparse.Namespace,
) -> None:
    starts, stops = report.start_lateness, report.stop_lateness
    print(
        f"operations: {sum(stats.ops.values())} ({_table(stats.ops)}); failed while parts "
        f"were down: {sum(stats.failed.values())} ({_table(stats.failed)})"
    )
    print(
        f"kills survived: {sum(stats.kills.values())} ({_table(stats.kills)}); "
        f"whole again after a kill: max {max(stats.recovery_s, default=0):.1f} s"
    )
    print(
        f"dispatches: {len(driver.truth.versions)}; windows checked: {report.windows_checked} "
        f"({report.windows_up} with time while all parts were up, {report.covered_s:.0f} "
        f"window-s); actor runs: {report.actor_runs} ({report.actor_s:.0f} actor-s); "
        f"records: {records}"
    )
    verdict = "DIFFERENT" if tree_problems else "equal to the truth"
    print(f"retained tree: {topics} topics, {verdict}")
    print(
        f"lateness (s): start p50 {percentile(starts, 0.5):.3f} p99 "
        f"{percentile(starts, 0.99):.3f} max {max(starts, default=math.nan):.3f}; "
        f"stop p50 {percentile(stops, 0.5):.3f} p99 {percentile(stops, 0.99):.3f} "
        f"max {max(stops, default=math.nan):.3f}"
    )
    print(
        f"worst lateness: {max([*starts, *stops], default=0):.3f} s (tolerance "
        f"{args.tolerance:g} s); ran on a stale view within its until: "
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
    parser.add_argument("--tolerance", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--op-gap", type=float, default=1.0, help="max seconds between ops")
    parser.add_argument("--fault-gap", type=float, default=10.0, help="max seconds between kills")
    parser.add_argument("--down-max", type=float, default=4.0, help="max seconds a part is down")
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
