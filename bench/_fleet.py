"""The parts of bench/fleet.py: the fleet's subscriber, bursts of scheduled changes,
the SDK hosts, the write ceiling, and the side-by-side table.

Nothing here starts a broker or a bridge: bench/fleet.py does, through `testkit/`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from actor_sdk import wire
from bench._harness import MOSQUITTO_PUB, MOSQUITTO_SUB, TapLog, next_second
from bench._table import fmt, markdown_table, percentile
from testkit.api_server import ApiServerHandle
from testkit.broker import Broker
from testkit.processes import ManagedProcess, ProcessFactory, wait_until

TREE_FILTER = "microgrid/+/dispatch/#"
PROBE_TOPIC = "bench/probe"
BURST_TYPE = "FLEET_BURST"
SDK_HOST = Path(__file__).resolve().parent / "_chaos_sdk.py"
CREATES_IN_FLIGHT = 16
"""Create calls the bench keeps open at once against the API server."""
EARLY_S = 0.25
"""A snapshot this long before an instant may already show its change (clock rounding)."""


# --- the subscriber ------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """What one microgrid's retained tree holds once published."""

    dispatches: int
    types: int


def _microgrid_of(topic: str) -> int:
    return int(topic.split("/", 2)[1])


class FleetTap:
    """A live `mosquitto_sub` (C, its own clock stamps) of every microgrid's tree.

    Its log is read incrementally; every running snapshot is decoded and kept per
    topic, the first `online` status of each microgrid noted, and each new dispatch
    or running topic counted per microgrid.
    """

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process
        self._log = TapLog(process.log_path)
        self.probes = 0
        self.arrivals: list[float] = []
        """Receive time of every message of the tree, in order."""
        self.payload_bytes = 0
        self.first_seen: dict[str, float] = {}
        self.online_at: dict[int, float] = {}
        self.running: dict[str, list[tuple[float, frozenset[int]]]] = {}
        self._counts: dict[int, list[int]] = {}
        self._last_new: dict[int, float] = {}

    @classmethod
    def start(cls, factory: ProcessFactory, broker: Broker, name: str) -> FleetTap:
        """Subscribe to every microgrid's tree on `broker` (as `admin`, QoS 1)."""
        process = factory(
            [
                MOSQUITTO_SUB,
                *broker.cli_args("admin"),
                "-i",
                f"{name}-{secrets.token_hex(3)}",
                "-t",
                TREE_FILTER,
                "-t",
                PROBE_TOPIC,
                "-q",
                "1",
                "-F",
                "%U %r %t %p",
            ],
            name=name,
        )
        return cls(process)

    def wait_subscribed(self, via: Broker, timeout: float = 30.0) -> None:
        """Publish probes onto `via` until one arrives: the subscription reaches that node."""
        publish = [MOSQUITTO_PUB, *via.cli_args("admin"), "-t", PROBE_TOPIC, "-m", "probe"]

        def probed() -> bool:
            subprocess.run(publish, check=True, timeout=10, capture_output=True)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                self.poll()
                if self.probes:
                    return True
                time.sleep(0.02)
            return False

        wait_until(probed, timeout, f"{self.process.name} to receive a probe")

    def poll(self) -> None:
        """Take in every message logged since the last poll."""
        self.process.check_alive()
        for at, _, topic, payload in self._log.new_messages():
            self._take(at, topic, payload)

    def _take(self, at: float, topic: str, payload: bytes) -> None:
        if topic == PROBE_TOPIC:
            self.probes += 1
            return
        self.arrivals.append(at)
        self.payload_bytes += len(payload)
        microgrid_id = _microgrid_of(topic)
        if topic not in self.first_seen:
            self.first_seen[topic] = at
            if "/dispatches/" in topic or topic.endswith("/running"):
                counts = self._counts.setdefault(microgrid_id, [0, 0])
                counts[0 if "/dispatches/" in topic else 1] += 1
                self._last_new[microgrid_id] = at
        if topic.endswith("/running"):
            running = wire.decode_running(payload).running if payload else ()
            self.running.setdefault(topic, []).append((at, frozenset(d.id for d in running)))
        elif (
            topic.endswith("/status")
            and payload
            and microgrid_id not in self.online_at
            and wire.decode_status(payload).state == "online"
        ):
            self.online_at[microgrid_id] = at

    def tree_seen_at(self, expected: dict[int, Tree]) -> float | None:
        """When every microgrid's tree was seen whole and its status online (None: not yet)."""
        done: list[float] = []
        for microgrid_id, tree in expected.items():
            counts = self._counts.get(microgrid_id, [0, 0])
            online = self.online_at.get(microgrid_id)
            if online is None or counts[0] < tree.dispatches or counts[1] < tree.types:
                return None
            done += [online, self._last_new[microgrid_id]]
        return max(done)

    def writes_between(self, since: float, until: float) -> list[float]:
        """Receive times of the tree's messages in [since, until]."""
        return [at for at in self.arrivals if since <= at <= until]

    def mean_payload(self) -> int:
        """The mean payload size seen so far, bytes."""
        return self.payload_bytes // max(1, len(self.arrivals))


# --- the write ceiling -----------------------------------------------------------------


def write_ceiling(broker: Broker, count: int, connections: int, payload_size: int) -> float:
    """Retained QoS 1 writes/s onto `broker`: `count` messages over `connections` paho clients.

    Each client keeps up to 100 publishes in flight (the bridge's window); the time
    runs from the first publish to the last acknowledgement.
    """
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    lock = threading.Lock()
    acked = [0]
    all_acked = threading.Event()

    def on_publish(*_: Any) -> None:
        with lock:
            acked[0] += 1
            if acked[0] >= count:
                all_acked.set()

    tag = secrets.token_hex(3)
    clients = []
    try:
        for index in range(connections):
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"ceiling-{tag}-{index}",
                protocol=paho.MQTTv311,
            )
            client.username_pw_set(broker.username("admin"), broker.admin_password)
            client.max_inflight_messages_set(100)
            client.on_publish = on_publish
            client.connect(broker.host, broker.port)
            client.loop_start()
            clients.append(client)
        wait_until(lambda: all(c.is_connected() for c in clients), 30, "the ceiling's clients")
        payload = b"x" * payload_size
        started = time.perf_counter()
        for n in range(count):
            clients[n % connections].publish(f"bench/ceiling/{tag}/{n}", payload, 1, True)
        if not all_acked.wait(120):
            raise TimeoutError(f"only {acked[0]} of {count} ceiling writes acknowledged")
        return count / (time.perf_counter() - started)
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()


# --- the SDK hosts ---------------------------------------------------------------------


@dataclass(frozen=True)
class SdkHost:
    """One `bench/_chaos_sdk.py` process: an SDK Dispatcher on one node, for one microgrid."""

    name: str
    node: str
    microgrid_id: int
    process: ManagedProcess


class SdkHosts:
    """Actor hosts managing `BURST_TYPE`, all recording into one JSON-lines file."""

    def __init__(self, factory: ProcessFactory, record: Path) -> None:
        self.factory = factory
        self.record = record
        self.hosts: list[SdkHost] = []

    def start(self, broker: Broker, node: str, microgrid_id: int) -> None:
        """Start a host on `broker` (the node called `node`) following `microgrid_id`."""
        name = f"sdk-{node}-mg{microgrid_id}-{len(self.hosts) + 1}"
        process = self.factory(
            [
                sys.executable,
                str(SDK_HOST),
                "--broker",
                f"mqtt://{broker.host}:{broker.port}",
                "--microgrid-id",
                str(microgrid_id),
                "--type",
                BURST_TYPE,
                "--record",
                str(self.record),
                "--host",
                name,
                "--max-reconnect-delay",
                "2",
                "--log-level",
                "WARNING",
            ],
            name=name,
            extra_env={
                "MQTT_USERNAME": broker.username("actor") or "",
                "MQTT_PASSWORD": broker.actor_password or "",
            },
        )
        self.hosts.append(SdkHost(name, node, microgrid_id, process))

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def wait_live(self, timeout: float = 60.0) -> None:
        """Wait until every host's view is live (its last liveness record says so)."""

        def all_live() -> bool:
            live: dict[str, bool] = {}
            for record in self.records():
                if record["ev"] == "live":
                    live[record["host"]] = record["live"]
            for host in self.hosts:
                host.process.check_alive()
            return all(live.get(host.name, False) for host in self.hosts)

        wait_until(all_live, timeout, "every SDK host to be live", interval=0.1)


# --- bursts of scheduled changes --------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """A scheduled start or stop of one dispatch."""

    microgrid_id: int
    dispatch_id: int
    instant: float
    start: bool


@dataclass
class Burst:
    """Dispatches across the fleet starting (and stopping) at a few shared instants."""

    changes: list[Change]
    base: float
    """The first instant."""
    dispatch_topics: list[str] = field(default_factory=list)


async def create_many(api: ApiServerHandle, requests: Sequence[dict[str, Any]]) -> list[int]:
    """Create dispatches through the API server, a few calls at once; return their ids.

    Each request holds the keyword arguments of `bridge.api.create_dispatch`.
    """
    from bridge.api import create_dispatch  # noqa: PLC0415

    gate = asyncio.Semaphore(CREATES_IN_FLIGHT)

    async def one(client: Any, request: dict[str, Any]) -> int:
        async with gate:
            return int((await create_dispatch(client, **request)).id)

    async with api.client() as client:
        return list(await asyncio.gather(*(one(client, request) for request in requests)))


async def create_burst(
    api: ApiServerHandle,
    microgrid_ids: Sequence[int],
    *,
    per_microgrid: int,
    instants: int,
    run_s: float,
) -> Burst:
    """Create a burst through the API server, its first instant after a lead time.

    The dispatches of the fleet are spread over `instants` whole seconds in turn,
    each running `run_s` seconds.
    """
    from frequenz.client.dispatch.types import TargetIds  # noqa: PLC0415

    count = len(microgrid_ids) * per_microgrid
    base = next_second(2.0 + 0.02 * count)
    planned = [
        (microgrid_id, base + timedelta(seconds=index % instants), index)
        for position, microgrid_id in enumerate(microgrid_ids)
        for index in range(position * per_microgrid, (position + 1) * per_microgrid)
    ]
    ids = await create_many(
        api,
        [
            {
                "microgrid_id": microgrid_id,
                "type": BURST_TYPE,
                "start_time": start,
                "duration": timedelta(seconds=run_s),
                "target": TargetIds(index + 1),
            }
            for microgrid_id, start, index in planned
        ],
    )
    burst = Burst([], base.timestamp())
    for (microgrid_id, start, _), dispatch_id in zip(planned, ids, strict=True):
        instant = start.timestamp()
        burst.changes.append(Change(microgrid_id, dispatch_id, instant, True))
        burst.changes.append(Change(microgrid_id, dispatch_id, instant + run_s, False))
        layout = wire.TopicLayout.for_microgrid(microgrid_id)
        burst.dispatch_topics.append(layout.dispatch(BURST_TYPE, dispatch_id))
    if time.time() >= burst.base:
        raise RuntimeError("creating the burst took longer than its lead time")
    return burst


def wait_published(tap: FleetTap, burst: Burst) -> None:
    """Wait until the subscriber has every dispatch of the burst, before its first instant."""

    def published() -> bool:
        tap.poll()
        return all(topic in tap.first_seen for topic in burst.dispatch_topics)

    wait_until(
        published,
        burst.base - time.time() - EARLY_S,
        "the burst's dispatches at the subscriber before the first instant",
        interval=0.05,
    )


def _seen_by_tap(tap: FleetTap, change: Change) -> float | None:
    topic = wire.TopicLayout.for_microgrid(change.microgrid_id).running(BURST_TYPE)
    for at, ids in tap.running.get(topic, ()):
        if at >= change.instant - EARLY_S and (change.dispatch_id in ids) == change.start:
            return at - change.instant
    return None


def tap_lateness(tap: FleetTap, changes: Sequence[Change], deadline: float) -> list[float | None]:
    """How late the subscriber saw each change (None: not by `deadline`, a wall time)."""
    while True:
        tap.poll()
        late = [_seen_by_tap(tap, change) for change in changes]
        if all(value is not None for value in late) or time.time() >= deadline:
            return late
        time.sleep(0.1)


def _actor_lateness(
    hosts: Iterable[SdkHost], records: list[dict[str, Any]], changes: Sequence[Change]
) -> dict[str, list[float | None]]:
    times: dict[tuple[str, str, int], float] = {}
    for record in records:
        if record["ev"] in ("start", "stop") and record.get("type") == BURST_TYPE:
            times.setdefault((record["host"], record["ev"], record["id"]), record["t"])
    result: dict[str, list[float | None]] = {}
    for host in hosts:
        late: list[float | None] = []
        for change in changes:
            if change.microgrid_id != host.microgrid_id:
                continue
            kind = "start" if change.start else "stop"
            at = times.get((host.name, kind, change.dispatch_id))
            late.append(None if at is None else at - change.instant)
        result[host.name] = late
    return result


def actor_lateness(
    hosts: SdkHosts, changes: Sequence[Change], deadline: float
) -> dict[str, list[float | None]]:
    """Per host: how late its actors started and stopped for its microgrid's changes.

    Waits until every change is recorded or `deadline` (a wall time) has passed;
    None: not recorded.
    """
    while True:
        late = _actor_lateness(hosts.hosts, hosts.records(), changes)
        if time.time() >= deadline or all(
            value is not None for values in late.values() for value in values
        ):
            return late
        time.sleep(0.1)


def spread(late: Sequence[float | None]) -> dict[str, str]:
    """p50, p99, max (formatted) of the values seen, and how many were seen."""
    seen = [value for value in late if value is not None]
    cells = {"seen": f"{len(seen)}/{len(late)}"}
    for label, q in (("p50", 50), ("p99", 99)):
        cells[label] = fmt(percentile(seen, q), "ms")
    cells["max"] = fmt(max(seen), "ms") if seen else "-"
    return cells


# --- the table ---------------------------------------------------------------------------


@dataclass
class SideTable:
    """Figures of several brokers side by side: one column each."""

    title: str
    command: str
    columns: list[str]
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, figure: str, column: str, cell: str) -> None:
        """Set one cell (the row is created at its first cell, in that order)."""
        self.rows.setdefault(figure, {})[column] = cell

    def note(self, text: str) -> None:
        """A line printed below the table."""
        self.notes.append(text)

    def render(self) -> str:
        """The table as Markdown."""
        rows = [
            [figure, *(cells.get(c, "-") for c in self.columns)]
            for figure, cells in self.rows.items()
        ]
        return markdown_table(self.title, self.command, ["figure", *self.columns], rows, self.notes)

    def print(self) -> None:
        """Print the table to stdout."""
        print(self.render(), flush=True)
