"""The chaos run's system: broker, API server, bridge and actor hosts, linked through proxies.

Every connection the bridge and the actor hosts make goes through a TCP proxy the
driver owns, one per link (`sdk-N~broker`, `bridge~broker`, `bridge~api`), so that a
link can be partitioned silently and healed. The driver's own API client and its
reads of the retained tree go straight to the servers.

`System.fault(kind, target, ...)` runs one fault from its start to the moment the
system is whole again and returns it as a `Fault` for the checker:

* `kill`: SIGKILL of a part (`broker`, `bridge`, `api`, `sdk-N`), restart after a pause;
* `partition`: a link stops carrying bytes in both directions, nothing is closed,
  and new connections hang, until it heals;
* `blind-bridge` / `corrupt-cache`: SIGKILL of the API server and the bridge, the
  bridge's cache removed or overwritten with garbage, the bridge restarted while
  the API is still down, the API restarted after a pause;
* `broker-wipe`: SIGKILL of the broker, its persistence database removed, restart.

Whole again means: the restarted parts ready, the bridge reconnected and re-synced
with the API when the fault touched it, every actor host re-synced when the fault
cut it off, and every host's view live again (the hosts record `is_live` changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeHandle
from testkit.broker import Broker, start_broker
from testkit.chaos_check import Fault
from testkit.processes import ManagedProcess, ProcessFactory, wait_until
from testkit.proxy import TcpProxy

MG = 1
TYPES = ("CHAOS_A", "CHAOS_B")
SDK_HOST = Path(__file__).resolve().parent / "_chaos_sdk.py"
RECOVERY_TIMEOUT = 60.0
SDK_KEEPALIVE = 3
BRIDGE_KEEPALIVE = 15
NOTICE_SLACK = 0.5
"""Seconds a host may take to notice a fault that closes its connection or sends a will."""
STATUS_INTERVAL = 5
"""The bridge's status interval (its default): a host's view stays live 2 of them."""
_SYNCED = re.compile(r"\bsynced \d+ dispatches from the Dispatch API")
_UPSTREAM_LOST = ", then listing again"
"""The end of the line the bridge logs when it lost its Dispatch API stream (not its broker)."""
_FROM_CACHE = re.compile(r"loaded [1-9]\d* dispatches from the cache")


class HoldingProxy(TcpProxy):
    """A `TcpProxy` whose partition holds bytes instead of dropping them.

    An established TCP connection never loses bytes in its middle: across a real
    partition the sender retransmits, and the receiver gets everything in order
    once the network heals (or the connection times out). Dropping bytes at the
    proxy would instead corrupt the stream, or lose whole MQTT packets unnoticed,
    which no real network does. So a partitioned pipe waits for the heal before
    it forwards what it read (and reads no more meanwhile: the kernel buffers
    fill as on a real link).
    """

    @property
    def partitioned(self) -> bool:
        """Whether the link holds its bytes now."""
        return not self._healed.is_set()

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                await self._healed.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()
            self._writers.discard(sink)


@dataclass
class Host:
    """One actor host process."""

    name: str
    types: list[str]
    merge: str
    process: ManagedProcess


class Liveness:
    """Follows the hosts' `live` records (appended to the shared record file)."""

    def __init__(self, records: Path) -> None:
        self.records = records
        self.offset = 0
        self.live: dict[str, bool] = {}
        self._reading = threading.Lock()
        """Overlapping faults poll from two threads: unguarded, both advanced the
        offset past the same records and skipped the next ones (a run waited 60 s for
        a host that had been live for 53 s)."""

    def poll(self) -> None:
        """Read the records appended since the last poll."""
        with self._reading:
            with self.records.open("rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            for line in data[:end].splitlines():
                record = json.loads(line)
                if record.get("ev") == "live":
                    self.live[record["host"]] = bool(record["live"])


class System:
    """Broker, API server, bridge and actor hosts, with the faults of the chaos run."""

    def __init__(self, workdir: Path, *, quick: bool, slow_stop_s: float, clock_offset: float):
        """Start the broker and the API server (blocking); `open()` does the rest."""
        self.workdir = workdir
        self.quick = quick
        self.slow_stop_s = slow_stop_s
        self.clock_offset = clock_offset
        self.factory = ProcessFactory(workdir / "logs")
        self.hosts: list[Host] = []
        self.host_deaths: dict[str, list[float]] = {}
        """When each actor host was killed (its actors end there: SIGKILL leaves no stop)."""
        self.links: dict[str, HoldingProxy] = {}
        self.records = workdir / "actors.jsonl"
        self.records.touch()
        self.liveness = Liveness(self.records)
        self.broker: Broker = start_broker(workdir / "broker")
        self.api = ApiServerHandle(workdir, name="api")
        self.bridge: BridgeHandle | None = None
        try:
            if self.broker.kind != "mosquitto":
                raise SystemExit("the chaos run needs the mosquitto binary (it kills it)")
            self.api.start()
        except BaseException:
            self.close_now()
            raise

    async def open(self) -> None:
        """Open the links, then start the bridge and the hosts through them."""
        names = ["sdk-1", "sdk-2"] if self.quick else ["sdk-1", "sdk-2", "sdk-3"]
        for name in [*names, "bridge"]:
            self.links[f"{name}~broker"] = HoldingProxy(self.broker.host, self.broker.port)
        self.links["bridge~api"] = HoldingProxy("127.0.0.1", self.api.port)
        for link in self.links.values():
            await link.start()
        await asyncio.to_thread(self._start_processes)

    def _start_processes(self) -> None:
        self.bridge = BridgeHandle(
            self.factory,
            api=self.api,
            broker=self.broker,
            state_dir=self.workdir / "bridge-state",
            microgrid_ids=(MG,),
            extra_env={
                "MQTT_URL": f"mqtt://127.0.0.1:{self.links['bridge~broker'].port}",
                "DISPATCH_API_URL": f"grpc://127.0.0.1:{self.links['bridge~api'].port}?ssl=false",
            },
        )
        self.bridge.start()
        self._wait_bridge_synced(1)
        specs = [("sdk-1", list(TYPES), "none"), ("sdk-2", ["CHAOS_A"], "type")]
        if not self.quick:
            specs.append(("sdk-3", ["CHAOS_B"], "none"))
        self.hosts = [self._host(*spec) for spec in specs]
        for host in self.hosts:
            host.process.start()
        for host in self.hosts:
            wait_until(
                host.process.alive_and(functools.partial(self._synced_since, host, 0)),
                30,
                f"{host.name} in sync",
            )

    def _host(self, name: str, types: list[str], merge: str) -> Host:
        args: list[str] = [sys.executable, str(SDK_HOST), "--microgrid-id", str(MG)]
        for dispatch_type in types:
            args += ["--type", dispatch_type]
        args += ["--merge", merge, "--record", str(self.records), "--host", name]
        args += ["--keepalive", str(SDK_KEEPALIVE), "--max-reconnect-delay", "2"]
        if name == "sdk-2":
            args += ["--clock-offset", str(self.clock_offset)]
        process = self.factory(
            args,
            name=name,
            start=False,
            extra_env={
                "CHAOS_SABOTAGE_SLOW_STOP_S": str(self.slow_stop_s),
                "MQTT_URL": f"mqtt://127.0.0.1:{self.links[f'{name}~broker'].port}",
                "MQTT_USERNAME": "actor",
                "MQTT_PASSWORD": self.broker.passwords["actor"] or "",
            },
        )
        return Host(name, types, merge, process)

    # ---- progress markers in the logs ----------------------------------------------------

    @property
    def _bridge(self) -> BridgeHandle:
        assert self.bridge is not None
        return self.bridge

    @staticmethod
    def _synced(host: Host) -> int:
        return host.process.output().count("in sync with the retained state")

    def _synced_since(self, host: Host, before: int) -> bool:
        return self._synced(host) > before

    def _wait_each_host(self, done: Callable[[Host], bool], what: str) -> None:
        """Wait until `done(host)` holds for every SDK host, one after the other."""
        for host in self.hosts:
            wait_until(functools.partial(done, host), RECOVERY_TIMEOUT, f"{host.name} {what}")

    def _bridge_connected(self) -> int:
        return self._bridge.output().count("connected to MQTT broker")

    def _bridge_synced(self) -> int:
        return len(_SYNCED.findall(self._bridge.output()))

    def _wait_bridge_synced(self, count: int, *, bridge_held: bool = True) -> None:
        """Wait for the bridge's sync #count; its death ends the wait only when it is
        this fault's to restart (another fault task may kill and restart it meanwhile)."""

        def synced() -> bool:
            if bridge_held:
                self._bridge.process.check_alive()
            return self._bridge_synced() >= count

        wait_until(synced, RECOVERY_TIMEOUT, f"the bridge's sync #{count} with the Dispatch API")

    def wait_bridge_vouching(self) -> None:
        """Wait until the bridge's retained status says `online` (synced, tree read back)."""
        self._bridge.wait_vouching(RECOVERY_TIMEOUT)

    def _hosts_see_online(self, host: Host) -> int:
        return host.process.output().count("is online (session")

    def _wait_all_live(self) -> None:
        """Wait until every host's view is live."""

        def live() -> bool:
            self.liveness.poll()
            return all(self.liveness.live.get(h.name, False) for h in self.hosts)

        wait_until(live, RECOVERY_TIMEOUT, "every actor host's view to be live again")

    # ---- what the plan may choose ---------------------------------------------------------

    def choices(self) -> list[tuple[str, str, frozenset[str]]]:
        """Every fault the plan may choose: (kind, target, resources it holds)."""
        found: list[tuple[str, str, frozenset[str]]] = []
        for part in ["broker", "bridge", "api", *(h.name for h in self.hosts)]:
            found.append(("kill", part, frozenset({part})))
        for link in self.links:
            found.append(("partition", link, frozenset({link})))
        found.append(("blind-bridge", "bridge", frozenset({"bridge", "api"})))
        found.append(("corrupt-cache", "bridge", frozenset({"bridge", "api"})))
        found.append(("broker-wipe", "broker", frozenset({"broker"})))
        return found

    def kills_in(self, kind: str) -> int:
        """How many SIGKILLs a fault of this kind makes."""
        return {"kill": 1, "blind-bridge": 2, "corrupt-cache": 2, "broker-wipe": 1}.get(kind, 0)

    # ---- faults ----------------------------------------------------------------------------

    async def fault(self, kind: str, target: str, down: float) -> Fault:
        """Run one fault: begin it, undo it after `down` seconds, wait until whole again."""
        began = time.time()
        if kind == "partition":
            return await self._partition(target, began, down)
        if kind in ("blind-bridge", "corrupt-cache"):
            return await self._blind_bridge(kind, began, down)
        # How soon the hosts must notice depends on the links as they are at the kill
        # (a partition that heals before the recovery still held the news back).
        notice = self._notice_after(target) if target in ("broker", "bridge") else None
        heal, recover = await asyncio.to_thread(self._kill, target, wipe=kind == "broker-wipe")
        # The kill came after reading the logs it compares with later (seconds, late in
        # a run): the hosts must notice from the kill on, not from `began`.
        killed_after = time.time() - began
        await asyncio.sleep(down)
        await asyncio.to_thread(heal)
        healed = time.time()
        await asyncio.to_thread(recover)
        await asyncio.to_thread(self._wait_all_live)
        dark_after = None if notice is None else killed_after + notice
        return Fault(kind, target, began, healed, time.time(), dark_after)

    def _notice_after(self, dead: str) -> float:
        """How soon after the broker's or the bridge's death every host must know it.

        At once, as a rule: the connections close, or the bridge's will goes out. But
        a partition holds a closing connection's end behind the bytes it holds: the
        bridge's will waits for its link to heal (the hosts then go by the missing
        status: 2 status intervals), and a host cut off from the broker hears neither
        the broker's end nor the bridge's will: it notices by its own probe (2
        keepalives) or by the missing status (2 status intervals).
        """
        host_cut_off = any(self.links[f"{h.name}~broker"].partitioned for h in self.hosts)
        if dead == "bridge" and self.links["bridge~broker"].partitioned:
            return 2 * STATUS_INTERVAL + NOTICE_SLACK
        if host_cut_off:
            return min(2 * SDK_KEEPALIVE, 2 * STATUS_INTERVAL) + NOTICE_SLACK
        return NOTICE_SLACK

    async def _partition(self, target: str, began: float, down: float) -> Fault:
        link = self.links[target]
        bridge_lost = self._bridge.output().count(_UPSTREAM_LOST)
        link.partition()
        await asyncio.sleep(down)
        link.heal()
        healed = time.time()
        if target == "bridge~api":
            await asyncio.to_thread(self._after_api_link, bridge_lost)
        await asyncio.sleep(NOTICE_SLACK)  # what the link held flows on
        await asyncio.to_thread(self._wait_all_live)
        if target.startswith("sdk"):
            # Silent past 1.5 keepalives: the SDK's view is blind (a ping is due
            # within one keepalive, so allow two, plus the slack).
            dark_after: float | None = 2 * SDK_KEEPALIVE + NOTICE_SLACK
        elif target == "bridge~broker":
            # The broker sends the bridge's will after 1.5 of its keepalives.
            dark_after = 1.5 * BRIDGE_KEEPALIVE + 2 * NOTICE_SLACK
        else:
            dark_after = None  # the bridge still vouches for what it knows
        return Fault("partition", target, began, healed, time.time(), dark_after)

    def _after_api_link(self, lost_before: int) -> None:
        """After a bridge~API partition: when the bridge lost its stream, its relist."""
        if self._bridge.output().count(_UPSTREAM_LOST) > lost_before:
            synced = self._bridge_synced()
            wait_until(
                lambda: self._bridge_synced() > synced,
                RECOVERY_TIMEOUT,
                "the bridge's relist after the Dispatch API link healed",
            )

    async def _blind_bridge(self, kind: str, began: float, down: float) -> Fault:
        online = {h.name: self._hosts_see_online(h) for h in self.hosts}

        def restart_blind() -> tuple[int, int]:
            self.api.kill9()
            self._bridge.kill9()
            # Whatever the cache's format: its files go, or become garbage. The
            # session counter stays (losing it is another fault: a lost state dir).
            state = self.workdir / "bridge-state" / f"microgrid-{MG}"
            for path in state.glob("*"):
                if path.name == "session" or not path.is_file():
                    continue
                if kind == "blind-bridge":
                    path.unlink()
                else:
                    path.write_bytes(b'{"version": 1, "dispatches": [{"id": "garbage\x00')
            synced = self._bridge_synced()
            log_size = len(self._bridge.output())
            self._bridge.process.start()
            return synced, log_size

        dark_after = self._notice_after("bridge")  # before the kill: the link's state then
        synced, log_size = await asyncio.to_thread(restart_blind)
        dark_after += time.time() - began  # from the kill (after reading the logs) on
        await asyncio.sleep(down)
        await asyncio.to_thread(self.api.start, RECOVERY_TIMEOUT)
        healed = time.time()

        def recover() -> None:
            self._wait_bridge_synced(synced + 1)
            self._wait_each_host(
                lambda h: self._hosts_see_online(h) > online[h.name], "to see the bridge online"
            )
            self._wait_all_live()

        await asyncio.to_thread(recover)
        if _FROM_CACHE.search(self._bridge.output()[log_size:]):
            raise RuntimeError(f"{kind}: the bridge still loaded dispatches from its cache")
        return Fault(kind, "bridge", began, healed, time.time(), dark_after)

    def _kill(
        self, victim: str, *, wipe: bool = False
    ) -> tuple[Callable[[], object], Callable[[], None]]:
        """Kill `victim` now; return (restart it, wait until the system is whole)."""
        if victim == "broker":
            connected = self._bridge_connected()
            synced = {h.name: self._synced(h) for h in self.hosts}
            self.broker.kill9()
            if wipe:
                assert self.broker.workdir is not None
                shutil.rmtree(self.broker.workdir / "data", ignore_errors=True)
                (self.broker.workdir / "data").mkdir()

            def recover_broker() -> None:
                wait_until(lambda: self._bridge_connected() > connected, RECOVERY_TIMEOUT, "bridge")
                self._wait_each_host(lambda h: self._synced_since(h, synced[h.name]), "to re-sync")

            return self.broker.start, recover_broker
        if victim == "bridge":
            online = {h.name: self._hosts_see_online(h) for h in self.hosts}
            synced_before = self._bridge_synced()
            self._bridge.kill9()

            def recover_bridge() -> None:
                self._wait_bridge_synced(synced_before + 1)
                self._wait_each_host(
                    lambda h: self._hosts_see_online(h) > online[h.name], "to see the bridge online"
                )

            return self._bridge.process.start, recover_bridge
        if victim == "api":
            synced_before = self._bridge_synced()
            self.api.kill9()
            return (
                lambda: self.api.start(timeout=RECOVERY_TIMEOUT),
                lambda: self._wait_bridge_synced(synced_before + 1, bridge_held=False),
            )
        host = next(h for h in self.hosts if h.name == victim)
        host.process.kill9()
        # Stamped once the process is gone: stamped before the kill (a thread hop
        # earlier, under load), an actor it started meanwhile looked alive until the
        # host's next death (a false 'ran 15 s past its until').
        self.host_deaths.setdefault(victim, []).append(time.time())
        before = self._synced(host)

        def recover_host() -> None:
            wait_until(
                host.process.alive_and(functools.partial(self._synced_since, host, before)),
                RECOVERY_TIMEOUT,
                f"{host.name} in sync",
            )

        return host.process.start, recover_host

    def ensure_all_up(self) -> None:
        """Check that every part runs (raises when one died on its own)."""
        assert self.broker.running, "the broker is down"
        for process in (self.api.process, self._bridge.process, *(h.process for h in self.hosts)):
            assert process is not None
            process.check_alive()

    async def close(self) -> None:
        """Stop everything (also a partly started system); never raises."""
        for link in self.links.values():
            with contextlib.suppress(Exception):
                link.heal()
        await asyncio.to_thread(self._stop_processes)
        for link in self.links.values():
            with contextlib.suppress(Exception):
                await link.close()

    def _stop_processes(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.process.stop(10)
        self.factory.stop_all()
        with contextlib.suppress(Exception):
            self.api.stop()
        with contextlib.suppress(Exception):
            self.broker.close()

    def close_now(self) -> None:
        """Stop the processes of a system that failed to start (blocking)."""
        self._stop_processes()
