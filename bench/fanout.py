"""Benchmark: one bridge, N actor processes of one type; against N frequenz-dispatch processes.

Run alone: `.venv/bin/python bench/fanout.py` (N = 10, 50, 100, three rounds
each, about three minutes), or `--quick` (N = 3, one round, a few seconds).

By default the SDK processes are measured in steady state: each reports ready once it
knows the bridge's clock (about four status heartbeats), so it starts and stops runs on
its own clock, as a long-running actor process does. `--fresh` (and `--quick`) measure
them just started, when every start waits for the bridge's snapshot to reach them.

What runs: Mosquitto (the repo's config), `dispatch-bridge api`, `dispatch-bridge run`
(microgrid 1); then per N, 2N actor processes forked from this one: N run the actor
SDK's `Dispatcher` (microgrid 1, through the broker), N run `frequenz-dispatch`'s
`Dispatcher` (microgrid 2, each with its own gRPC stream to the API server). Each
manages the type `FANOUT` with `MergeByType` and a recording actor that reports
`start()` and `stop()` with its wall-clock time over a pipe.

Per round one dispatch per side, created ahead (by a helper process, so that this
process never touches gRPC before it forks), starting at a whole second and
running 2 s; ours on even seconds, the reference on odd ones. Figures: from the
scheduled start to the last of the N actors started (and the median), from the
scheduled stop to the last stopped. Before the rounds, what an idle actor process
costs: its CPU time and the times it was put on a CPU (its threads' wake-ups), per
second, over `IDLE_S` seconds with nothing scheduled (`/proc/PID/task/*/schedstat`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (
    API_KEY,
    API_SECRET,
    ApiServer,
    Stack,
    async_wait_until,
    next_second,
    progress,
)
from bench._table import Table, command_line, percentile

OURS_MG = 1
REF_MG = 2
TYPE = "FANOUT"
RUN_S = 2
IDLE_S = 10.0


# --- the creator helper (a separate process: the only one here that speaks gRPC) -----


async def _creator(url: str) -> None:
    from frequenz.client.dispatch import DispatchApiClient  # noqa: PLC0415
    from frequenz.client.dispatch.types import TargetIds  # noqa: PLC0415

    from bridge.api import create_dispatch  # noqa: PLC0415

    client = DispatchApiClient(server_url=url, auth_key=API_KEY, sign_secret=API_SECRET)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        microgrid_id, start, duration = line.split()
        created = await create_dispatch(
            client,
            microgrid_id=int(microgrid_id),
            type=TYPE,
            start_time=datetime.fromtimestamp(float(start), UTC),
            duration=timedelta(seconds=float(duration)),
            target=TargetIds(1),
        )
        print(int(created.id), flush=True)


class Creator:
    """Talks to the creator helper: one line per dispatch."""

    def __init__(self, api: ApiServer) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--creator", api.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def create(self, microgrid_id: int, start: datetime, duration: float) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{microgrid_id} {start.timestamp()} {duration}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the actor processes ----------------------------------------------------------------


class _Actor:
    def __init__(self, report: Callable[[str, int], None], dispatch_id: int) -> None:
        self._report = report
        self._id = dispatch_id

    def start(self) -> None:
        self._report("start", self._id)

    async def stop(self, msg: str | None = None) -> None:
        self._report("stop", self._id)


async def _actor_host(index: int, fd: int, ours: bool, target: str, *, fresh: bool) -> None:
    from frequenz.client.common.microgrid import MicrogridId  # noqa: PLC0415

    def report(kind: str, dispatch_id: int) -> None:
        os.write(fd, f"{index} {kind} {dispatch_id} {time.time():.6f}\n".encode())

    async def factory(info: Any, updates: Any) -> _Actor:
        return _Actor(report, int(info._src.id))

    dispatcher: Any
    if ours:
        from actor_sdk import Dispatcher, MergeByType  # noqa: PLC0415

        # Forked copies of one program on one host: each needs its own client id.
        dispatcher = Dispatcher(microgrid_id=OURS_MG, broker=target, actor_id=f"fanout-{index}")
        strategy: Any = MergeByType()
    else:
        from frequenz.dispatch import Dispatcher as RefDispatcher  # noqa: PLC0415
        from frequenz.dispatch import MergeByType as RefMergeByType  # noqa: PLC0415

        dispatcher = RefDispatcher(
            microgrid_id=MicrogridId(REF_MG),
            server_url=target,
            auth_key=API_KEY,
            sign_secret=API_SECRET,
        )
        strategy = RefMergeByType()
    dispatcher.start()
    await dispatcher.wait_for_initialization()
    await dispatcher.start_managing(TYPE, actor_factory=factory, merge_strategy=strategy)
    if not ours:
        # Its stream opens only after its first list (frequenz-dispatch 1.0.4): let it come up.
        await asyncio.sleep(1.0)
    elif not fresh:
        # Steady state, as in a long-running actor process: its estimate of the bridge's
        # clock is known (about four status heartbeats), so it starts and stops runs on
        # its own clock instead of waiting for the bridge's snapshot to reach it.
        await async_wait_until(lambda: dispatcher.knows_bridge_clock, 60, "the bridge's clock")
    os.write(fd, f"{index} ready 0 {time.time():.6f}\n".encode())
    await asyncio.Event().wait()


def fork_host(index: int, fd: int, ours: bool, target: str, *, fresh: bool) -> int:
    """Fork one actor process; it never returns into the caller's code."""
    pid = os.fork()
    if pid:
        return pid
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 0
    try:
        logging.getLogger().setLevel(logging.ERROR)
        asyncio.run(_actor_host(index, fd, ours, target, fresh=fresh))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def schedstat(pid: int) -> tuple[float, int]:
    """A process's CPU seconds and timeslices so far, all threads (`/proc/PID/task/*/schedstat`)."""
    cpu_ns = slices = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            on_cpu, _, runs = (task / "schedstat").read_text().split()
            cpu_ns, slices = cpu_ns + int(on_cpu), slices + int(runs)
    return cpu_ns / 1e9, slices


def idle_cost(pids: list[int], seconds: float) -> tuple[float, float]:
    """Mean CPU seconds and wake-ups per second of idle processes over `seconds`."""
    before = [schedstat(pid) for pid in pids]
    time.sleep(seconds)
    after = [schedstat(pid) for pid in pids]
    cpu = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    slices = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return cpu / seconds / len(pids), slices / seconds / len(pids)


class Reports:
    """Reads `index kind id time` lines from the actor processes' pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[tuple[int, str, int, float]] = []
        self._buffer = b""

    def pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        self._buffer += os.read(self.fd, 1 << 16)
        *complete, self._buffer = self._buffer.split(b"\n")
        for line in complete:
            index, kind, dispatch_id, at = line.decode().split()
            self.lines.append((int(index), kind, int(dispatch_id), float(at)))

    def times(self, kind: str, dispatch_id: int) -> dict[int, float]:
        return {i: t for i, k, d, t in self.lines if k == kind and d == dispatch_id}

    def wait(self, what: Callable[[], bool], timeout: float, label: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {label}")
            self.pump(0.05)


def run_n(
    creator: Creator,
    api: ApiServer,
    broker_url: str,
    n: int,
    rounds: int,
    *,
    fresh: bool,
    idle_s: float,
) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pids: list[int] = []
    reports = Reports(read_fd)
    try:
        for index in range(n):
            pids.append(fork_host(index, write_fd, True, broker_url, fresh=fresh))
            pids.append(fork_host(n + index, write_fd, False, api.url, fresh=fresh))
        reports.wait(
            lambda: sum(1 for _, k, _, _ in reports.lines if k == "ready") >= 2 * n,
            (60 if fresh else 90) + n,
            f"{2 * n} actor processes to be ready",
        )
        progress(f"N={n}: {2 * n} actor processes ready")
        results: dict[str, list[float]] = {
            key: [] for key in ("o_start", "o_stop", "r_start", "r_stop", "o_p50", "r_p50")
        }
        for side, side_pids in (("o", pids[0::2]), ("r", pids[1::2])):
            cpu, wakeups = idle_cost(side_pids, idle_s)
            results[f"{side}_idle_cpu"], results[f"{side}_idle_wakeups"] = [cpu], [wakeups]
        for _ in range(rounds):
            base = next_second(1.5)
            ids = {}
            for side, microgrid_id, offset in (("o", OURS_MG, 0), ("r", REF_MG, 1)):
                ids[side] = creator.create(microgrid_id, base + timedelta(seconds=offset), RUN_S)
            for side, offset, first in (("o", 0, 0), ("r", 1, n)):
                start = base.timestamp() + offset
                members = set(range(first, first + n))
                for kind, instant in (("start", start), ("stop", start + RUN_S)):
                    reports.wait(
                        lambda kind=kind, dispatch_id=ids[side], members=members: (  # type: ignore[misc]
                            members <= reports.times(kind, dispatch_id).keys()
                        ),
                        RUN_S + 20,
                        f"{n} actors to {kind} ({side})",
                    )
                    late = [t - instant for i, t in reports.times(kind, ids[side]).items()]
                    results[f"{side}_{kind}"].append(max(late))
                    if kind == "start":
                        results[f"{side}_p50"].append(percentile(late, 50))
        return results
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os.close(read_fd)
        os.close(write_fd)


def measure(sizes: list[int], rounds: int, *, fresh: bool, idle_s: float) -> Table:
    # Imported before forking: every actor process shares them.
    import frequenz.dispatch  # noqa: F401, PLC0415

    import actor_sdk  # noqa: F401, PLC0415

    state = "just started" if fresh else "bridge clock known"
    table = Table(
        f"Fan-out: one bridge, N actor processes ({rounds} round(s) per N, SDKs {state})",
        command_line(),
    )
    with Stack() as stack:
        broker, api, _ = stack.start_pipeline((OURS_MG,))
        creator = Creator(api)
        stack.procs.append(creator)
        for n in sizes:
            results = run_n(
                creator, api, broker.url("actor"), n, rounds, fresh=fresh, idle_s=idle_s
            )
            table.add(
                f"N={n}: scheduled start → median actor started",
                percentile(results["o_p50"], 50),
                percentile(results["r_p50"], 50),
                "ms",
            )
            table.add(
                f"N={n}: scheduled start → last actor started (worst round)",
                max(results["o_start"]),
                max(results["r_start"]),
                "ms",
            )
            table.add(
                f"N={n}: scheduled stop → last actor stopped (worst round)",
                max(results["o_stop"]),
                max(results["r_stop"]),
                "ms",
            )
            for key, figure, unit in (
                ("idle_cpu", "CPU time per second", "ms"),
                ("idle_wakeups", "wake-ups", "/s"),
            ):
                table.add(
                    f"N={n}: idle actor process, {figure} ({idle_s:g} s)",
                    results[f"o_{key}"][0],
                    results[f"r_{key}"][0],
                    unit,
                )
    table.note(
        "ours: one bridge publishes one running snapshot; Mosquitto fans it out to N "
        "actor SDK processes. Reference: N frequenz-dispatch processes, each with its "
        "own gRPC stream to the API server and its own timer."
    )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="N = 3, one round, SDKs just started (--fresh)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="values of N")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per N")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="measure SDK processes that do not know the bridge's clock yet (just started: "
        "every start waits for the bridge's snapshot); default: wait until they know it",
    )
    parser.add_argument("--creator", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.creator:
        asyncio.run(_creator(args.creator))
        return 0
    sizes = args.sizes or ([3] if args.quick else [10, 50, 100])
    rounds = args.rounds or (1 if args.quick else 3)
    # --quick stays a few seconds: its SDKs are measured as just started.
    idle_s = 1.0 if args.quick else IDLE_S
    measure(sizes, rounds, fresh=args.fresh or args.quick, idle_s=idle_s).print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
