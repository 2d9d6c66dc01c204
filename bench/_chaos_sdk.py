"""An actor host for the chaos run and the tests: an SDK `Dispatcher` with recording actors.

Each actor appends one JSON line per start, update and stop to the record file
(`O_APPEND`, one `write` per line, so lines survive a SIGKILL of the process and
several hosts can share one file):

    {"t": 1764309600.123, "host": "sdk-a", "ev": "start", "type": "CHAOS_A",
     "actor": "sdk-a/17/3", "id": 42, "ids": [42], "until": "2026-...Z", "payload": {...}}

`t` is the wall clock (unix seconds), `actor` is unique per actor instance (host,
process id, counter), `id` the dispatch the actor's information comes from, `until`
the end of the current run as the bridge computed it (null: runs until changed).
Each change of the host's view (`Dispatcher.is_live`, polled every 20 ms) is a
record too: `{"t": ..., "host": "sdk-a", "ev": "live", "live": true}`.

One `Dispatcher` per host manages every `--type`. `--clock-offset S` gives the SDK
a clock S seconds off the machine's (the records keep the machine's clock).

The broker URL comes from `--broker` or `MQTT_URL` (without credentials); the SDK
reads `MQTT_USERNAME` and `MQTT_PASSWORD` / `MQTT_PASSWORD_FILE` itself.

Run: `python bench/_chaos_sdk.py --microgrid-id 1 --type CHAOS_A --record rec.jsonl`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from frequenz.channels import Receiver

from actor_sdk import Dispatcher, DispatchInfo, MergeByType, MergeByTypeTarget, MergeStrategy

_counter = itertools.count(1)
_SLOW_STOP_S = float(os.environ.get("CHAOS_SABOTAGE_SLOW_STOP_S", "0"))
"""Seconds every actor takes to stop: set by `chaos.py --sabotage` only."""


class Recorder:
    """Appends records to a file, one atomic write per line."""

    def __init__(self, path: str, host: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.host = host

    def write(self, event: str, dispatch_type: str, actor: str, info: DispatchInfo | None) -> None:
        """Append one record."""
        record: dict[str, Any] = {
            "t": time.time(),
            "host": self.host,
            "ev": event,
            "type": dispatch_type,
            "actor": actor,
        }
        if info is not None:
            src = info._src
            record["id"] = int(src.id)
            record["until"] = None if src.until is None else src.until.isoformat()
            record["payload"] = info.options
            record["dry_run"] = info.dry_run
        self._append(record)

    def write_live(self, live: bool) -> None:
        """Append a change of the host's view: live (True) or not (False)."""
        self._append({"t": time.time(), "host": self.host, "ev": "live", "live": live})

    def _append(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record, default=str) + "\n").encode())


class RecordingActor:
    """Records its start, every update it receives, and its stop."""

    def __init__(
        self,
        recorder: Recorder,
        dispatch_type: str,
        info: DispatchInfo,
        updates: Receiver[DispatchInfo],
    ) -> None:
        self.recorder = recorder
        self.dispatch_type = dispatch_type
        self.name = f"{recorder.host}/{os.getpid()}/{next(_counter)}"
        self.info = info
        self.updates = updates
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Record the start and follow updates."""
        self.recorder.write("start", self.dispatch_type, self.name, self.info)
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for info in self.updates:
            self.info = info
            self.recorder.write("update", self.dispatch_type, self.name, info)

    async def stop(self, msg: str | None = None) -> None:
        """Stop following and record the stop."""
        if _SLOW_STOP_S:
            # Sabotage for checking the checker: an actor that takes long to stop.
            await asyncio.sleep(_SLOW_STOP_S)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.recorder.write("stop", self.dispatch_type, self.name, self.info)


def _strategy(name: str) -> MergeStrategy | None:
    return {"none": None, "type": MergeByType(), "type-target": MergeByTypeTarget()}[name]


async def _follow_liveness(dispatcher: Dispatcher, recorder: Recorder) -> None:
    """Record every change of the dispatcher's `is_live`, polled every 20 ms."""
    live: bool | None = None
    while True:
        if dispatcher.is_live != live:
            live = dispatcher.is_live
            recorder.write_live(live)
        await asyncio.sleep(0.02)


async def _main(args: argparse.Namespace) -> int:
    recorder = Recorder(args.record, args.host)
    broker = args.broker or os.environ.get("MQTT_URL", "")
    offset = timedelta(seconds=args.clock_offset)

    def clock() -> datetime:
        return datetime.now(UTC) + offset

    def factory_for(dispatch_type: str) -> Any:
        async def factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> RecordingActor:
            return RecordingActor(recorder, dispatch_type, info, updates)

        return factory

    dispatcher = Dispatcher(
        microgrid_id=args.microgrid_id,
        broker=broker,
        # Every host runs this same program on one machine: the default id (host name,
        # program, microgrid) would be one MQTT client id for all of them, and the
        # broker would throw each off when the next connects.
        actor_id=args.host,
        keepalive=args.keepalive,
        max_reconnect_delay=timedelta(seconds=args.max_reconnect_delay),
        clock=clock,
    )
    dispatcher.start()
    liveness = asyncio.create_task(_follow_liveness(dispatcher, recorder))
    for dispatch_type in args.type:
        await dispatcher.start_managing(
            dispatch_type,
            actor_factory=factory_for(dispatch_type),
            merge_strategy=_strategy(args.merge),
            retry_interval=timedelta(seconds=1),
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waiter = asyncio.create_task(stop.wait())
    serving = asyncio.create_task(dispatcher.wait())
    print(
        f"actor host {args.host} managing {', '.join(args.type)} "
        f"(clock offset {args.clock_offset:+g} s)",
        flush=True,
    )
    done, _ = await asyncio.wait([waiter, serving], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if serving in done and serving.exception() is not None:
        logging.getLogger("chaos-sdk").error("the dispatcher failed: %r", serving.exception())
        code = 1
    liveness.cancel()
    waiter.cancel()
    await dispatcher.stop()
    return code


def main() -> int:
    """Run the actor host until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", help="mqtt://host:port (default: $MQTT_URL)")
    parser.add_argument("--microgrid-id", type=int, required=True)
    parser.add_argument("--type", action="append", required=True, help="repeatable")
    parser.add_argument("--merge", choices=["none", "type", "type-target"], default="none")
    parser.add_argument("--record", required=True, help="JSON-lines file to append to")
    parser.add_argument("--host", default=f"sdk-{os.getpid()}", help="name in the records")
    parser.add_argument("--keepalive", type=int, default=5, help="MQTT keepalive, seconds")
    parser.add_argument(
        "--max-reconnect-delay", type=float, default=30.0, help="reconnect backoff cap, s"
    )
    parser.add_argument(
        "--clock-offset", type=float, default=0.0, help="seconds added to the SDK's clock"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
