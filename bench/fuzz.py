"""Fuzz the wire decoders and the SDK's message handling with a seeded generator.

    python bench/fuzz.py --count 1000000 --seed 1          # the figure in docs/security.md
    python bench/fuzz.py --count 20000 --seed 2            # a quick look

Every generated input is a (topic, payload) pair. The payload goes through each
decoder of `actor_sdk.wire` (`decode_dispatch`, `decode_running`, `decode_event`,
`decode_status`, `decode_upcoming`), and the pair goes through the SDK's message
handling the way `Dispatcher._on_message` does it: the topic parsed by the
microgrid's `TopicLayout`, the payload applied to a long-lived `BridgeView`
(`apply_status` / `apply_running` / `apply_dispatch`), then the view read back as
a reconcile reads it (`running` and `dispatches` of the type).

Payloads come from three generators, in turn:

* mutations of valid payloads (bit flips, byte inserts, deletions, truncations,
  splices of two payloads, repeated slices);
* structural JSON fuzz: a valid payload decoded to JSON, one to four nodes replaced
  (a value of another type, a huge or negative number, a long or odd string, a
  deleted or added key, deep nesting), encoded again;
* random bytes (empty to 4 KB, sometimes printable).

Topics are mostly valid (status, running, dispatch of a known type and id), some
mutated. Outcomes per decoder call and per handled message:

* accepted;
* rejected: `WireError` from a decoder; for the message handling also any
  `ValueError` / `OverflowError`, which `Dispatcher._on_message` logs as a drop;
* crash: any other exception (printed with the input, the run goes on);
* hang: an input that took more than `--hang` CPU seconds (default 1).

The exit code is 1 when there was a crash or a hang, else 0. The figures end with
`payloads: N`, `crashes: N`, `hangs: N` lines.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actor_sdk import _view, wire

MG = 3
LAYOUT = wire.TopicLayout.for_microgrid(MG)
TYPES = ("FUZZ", "fuzz/with space", "ü+#")
DECODERS: dict[str, Callable[[bytes], object]] = {
    "dispatch": wire.decode_dispatch,
    "running": wire.decode_running,
    "event": wire.decode_event,
    "status": wire.decode_status,
    "upcoming": wire.decode_upcoming,
}
T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


# --- valid seeds ------------------------------------------------------------------------


def _dispatch(rng: random.Random, dispatch_id: int, dispatch_type: str) -> wire.Dispatch:
    start = T0 + timedelta(seconds=rng.randint(-7200, 7200))
    recurrence = None
    if rng.random() < 0.5:
        recurrence = wire.Recurrence(
            frequency=rng.choice(["MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY"]),
            interval=rng.randint(1, 5),
            end=rng.choice(
                [None, wire.EndCriteria(count=rng.randint(1, 9)), wire.EndCriteria(until=start)]
            ),
            byweekdays=tuple(rng.sample(["MONDAY", "FRIDAY", "SUNDAY"], rng.randint(0, 2))),
            byhours=tuple(rng.sample(range(24), rng.randint(0, 2))),
        )
    if rng.random() < 0.5:
        target = wire.Target(ids=tuple(rng.sample(range(1, 50), rng.randint(1, 3))))
    else:
        target = wire.Target(
            categories=(wire.TargetCategory(category="BATTERY", type=rng.choice([None, "LI_ION"])),)
        )
    running = rng.random() < 0.5
    return wire.Dispatch(
        id=dispatch_id,
        type=dispatch_type,
        start_time=start,
        duration=rng.choice([None, 60, 900, rng.randint(0, 10**6)]),
        target=target,
        active=rng.random() < 0.8,
        dry_run=rng.random() < 0.2,
        payload={"n": rng.randint(0, 9), "s": "x" * rng.randint(0, 20), "l": [1, 2.5, None]},
        recurrence=recurrence,
        create_time=T0,
        update_time=T0,
        end_time=rng.choice([None, start + timedelta(hours=1)]),
        running=running,
        until=start + timedelta(minutes=15) if running else None,
        next_run=rng.choice([None, start]),
    )


def valid_messages(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """`count` valid (topic, payload) pairs of every kind the SDK reads or decodes."""
    found: list[tuple[str, bytes]] = []
    for index in range(count):
        dispatch_type = TYPES[index % len(TYPES)]
        dispatch = _dispatch(rng, rng.randint(1, 40), dispatch_type)
        kind = index % 5
        if kind == 0:
            message: wire._Wire = dispatch
            topic = LAYOUT.dispatch(dispatch_type, dispatch.id)
        elif kind == 1:
            message = wire.RunningSnapshot(
                microgrid_id=MG,
                type=dispatch_type,
                running=tuple(_dispatch(rng, i, dispatch_type) for i in range(rng.randint(0, 3))),
                next_change=rng.choice([None, T0]),
                as_of=T0,
                session=rng.randint(1, 3),
                seq=rng.randint(0, 100),
            )
            topic = LAYOUT.running(dispatch_type)
        elif kind == 2:
            message = wire.BridgeStatus(
                state=rng.choice(["online", "offline"]),
                upstream=rng.choice(["connected", "disconnected"]),
                synced_at=rng.choice([None, T0]),
                session=rng.randint(1, 3),
                bridge="fuzz",
                version="1.0.0",
                dispatches=rng.randint(0, 100),
            )
            topic = LAYOUT.status
        elif kind == 3:
            message = wire.DispatchEvent(event="updated", dispatch=dispatch, as_of=T0)
            topic = LAYOUT.events(dispatch_type)
        else:
            message = wire.UpcomingRuns(
                microgrid_id=MG,
                type=dispatch_type,
                runs=(wire.UpcomingRun(id=dispatch.id, start=T0, end=None),),
                as_of=T0,
                until=T0 + timedelta(days=1),
            )
            topic = LAYOUT.upcoming(dispatch_type)
        found.append((topic, wire.encode(message)))
    return found


# --- generators -------------------------------------------------------------------------

_ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    -(2**63) - 1,
    10**400,
    1e308,
    -0.0,
    "",
    "x" * 5000,
    "\u0000\ud7ff\uffff",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z",
    "2026-13-40T25:61:61Z",
    "2026-12-02T12:00:00+99:00",
    [],
    {},
    [[[[[]]]]],
    {"": {"": None}},
]


def mutate_bytes(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One to three byte-level mutations of `data`."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(6)
        position = rng.randint(0, len(buffer))
        if choice == 0 and buffer:
            index = rng.randrange(len(buffer))
            buffer[index] ^= 1 << rng.randrange(8)
        elif choice == 1:
            buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 2:
            del buffer[position : position + rng.randint(1, 16)]
        elif choice == 3:
            del buffer[position:]
        elif choice == 4:
            cut = rng.randint(0, len(other))
            buffer[position:] = other[cut:]
        else:
            chunk = buffer[position : position + rng.randint(1, 32)]
            buffer[position:position] = chunk * rng.randint(2, 50)
    return bytes(buffer)


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return copy.deepcopy(rng.choice(_ODD_VALUES))  # a fresh one: mutations follow
    if roll < 0.75:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["id", "type", "x", ""]): _random_json(rng, depth + 1) for _ in range(3)}


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _nodes(item, (*path, index))
    return found


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    """Replace, delete or add one to four nodes of a JSON payload."""
    document = json.loads(data)
    for _ in range(rng.randint(1, 4)):
        paths = [p for p in _nodes(document) if p]
        if not paths:
            document = _random_json(rng)
            break
        path = rng.choice(paths)
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        roll = rng.random()
        if roll < 0.6:
            parent[path[-1]] = _random_json(rng)
        elif roll < 0.8 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "running", "state", "id", "seq"])] = _random_json(rng)
        else:
            parent.append(_random_json(rng))
    text = json.dumps(document, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.05:  # deep nesting, written out (json.dumps would recurse)
        depth = rng.randint(100, 3000)
        text = "[" * depth + text + "]" * depth
    return text.encode()


def random_bytes(rng: random.Random) -> bytes:
    """Random bytes, sometimes printable, empty to 4 KB."""
    size = rng.choice([0, 1, 2, 8, 64, 512, 4096])
    if rng.random() < 0.5:
        return bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, size)))
    return rng.randbytes(rng.randint(0, size))


def mutate_topic(rng: random.Random, topic: str) -> str:
    """A topic with one level replaced, added or removed."""
    levels = topic.split("/")
    index = rng.randrange(len(levels))
    roll = rng.random()
    if roll < 0.4:
        levels[index] = rng.choice(["", "+", "#", "running", "dispatches", "-1", "9" * 30, "%zz"])
    elif roll < 0.7:
        levels.insert(index, rng.choice(["x", "running", "7"]))
    elif len(levels) > 1:
        del levels[index]
    return "/".join(levels)


# --- the targets ------------------------------------------------------------------------


class Tally:
    """Outcomes of the run."""

    def __init__(self, hang_s: float) -> None:
        self.hang_s = hang_s
        self.outcomes: Counter[str] = Counter()
        self.crashes: list[str] = []
        self.hangs: list[str] = []
        self.slowest = 0.0

    def crash(self, what: str, topic: str, payload: bytes, error: BaseException) -> None:
        """Record an exception that is neither a rejection nor a logged drop."""
        self.outcomes[f"{what}: crash"] += 1
        if len(self.crashes) < 20:
            self.crashes.append(f"{what} {topic!r} {payload[:200]!r}: {error!r}")

    def timed(self, started: float, topic: str, payload: bytes) -> None:
        """Count the input as a hang when it took longer than allowed."""
        spent = time.thread_time() - started
        self.slowest = max(self.slowest, spent)
        if spent > self.hang_s and len(self.hangs) < 20:
            self.hangs.append(f"{spent:.2f} s: {topic!r} {payload[:200]!r}")
        if spent > self.hang_s:
            self.outcomes["hang"] += 1


def decode_all(tally: Tally, topic: str, payload: bytes) -> None:
    """Every wire decoder on the payload."""
    for name, decoder in DECODERS.items():
        try:
            decoder(payload)
            tally.outcomes[f"decode_{name}: accepted"] += 1
        except wire.WireError:
            tally.outcomes[f"decode_{name}: WireError"] += 1
        except Exception as error:
            tally.crash(f"decode_{name}", topic, payload, error)


_STATUS_PARAMETERS = set(inspect.signature(_view.BridgeView.apply_status).parameters)


def _status_flags(*, retained: bool) -> dict[str, Any]:
    """The MQTT facts `apply_status` takes in this version of the SDK (retain flag, arrival)."""
    flags: dict[str, Any] = {"retained": retained, "arrived": datetime.now(UTC)}
    return {name: value for name, value in flags.items() if name in _STATUS_PARAMETERS}


def handle(view: _view.BridgeView, tally: Tally, topic: str, payload: bytes) -> None:
    """The message as `Dispatcher._on_message` handles it, then the view read back."""
    try:
        ref = LAYOUT.parse(topic)
        if ref.kind is wire.TopicKind.STATUS:
            view.apply_status(payload, **_status_flags(retained=len(payload) % 2 == 0))
        elif ref.kind is wire.TopicKind.RUNNING:
            assert ref.dispatch_type is not None
            view.apply_running(ref.dispatch_type, payload)
        elif ref.kind is wire.TopicKind.DISPATCH:
            assert ref.dispatch_type is not None and ref.dispatch_id is not None
            view.apply_dispatch(ref.dispatch_type, ref.dispatch_id, payload)
        tally.outcomes["handle: accepted"] += 1
    except wire.WireError:
        tally.outcomes["handle: WireError"] += 1
    except (ValueError, OverflowError):  # what _on_message logs as a dropped message
        tally.outcomes["handle: logged drop"] += 1
    except Exception as error:
        tally.crash("handle", topic, payload, error)
        return
    try:
        for dispatch_type in view.types():
            view.running(dispatch_type)
            view.dispatches(dispatch_type)
    except Exception as error:
        tally.crash("view read-back", topic, payload, error)


def generate(rng: random.Random, seeds: list[tuple[str, bytes]], index: int) -> tuple[str, bytes]:
    """The index-th input: the generators take turns, 45 % / 45 % / 10 %."""
    topic, payload = rng.choice(seeds)
    roll = index % 20
    if roll < 9:
        payload = mutate_bytes(rng, payload, rng.choice(seeds)[1])
    elif roll < 18:
        payload = mutate_json(rng, payload)
    else:
        payload = random_bytes(rng)
    if rng.random() < 0.1:
        topic = mutate_topic(rng, topic)
    return topic, payload


def main() -> int:
    """Run the fuzzer; print the figures; exit 1 on a crash or a hang."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="generated payloads")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--hang", type=float, default=1.0, help="CPU seconds that make a hang")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the view's warnings about dropped items
    rng = random.Random(args.seed)
    seeds = valid_messages(rng, 200)
    tally = Tally(args.hang)
    view = _view.BridgeView(MG)
    view.begin_sync()
    began = time.monotonic()
    print(f"fuzz: seed {args.seed}, {args.count} payloads", flush=True)
    for index in range(args.count):
        topic, payload = generate(rng, seeds, index)
        started = time.thread_time()
        decode_all(tally, topic, payload)
        handle(view, tally, topic, payload)
        tally.timed(started, topic, payload)
        if index % 50_000 == 0 and index:
            if index % 200_000 == 0:
                view = _view.BridgeView(MG)  # a fresh view now and then, as on a reconnect
                view.begin_sync()
            elif index % 100_000 == 0:
                view.end_sync()
            print(f"  {index} payloads, {time.monotonic() - began:.0f} s", flush=True)
    elapsed = time.monotonic() - began
    for line in tally.crashes:
        print(f"CRASH: {line}")
    for line in tally.hangs:
        print(f"HANG: {line}")
    for outcome, count in sorted(tally.outcomes.items()):
        print(f"  {outcome}: {count}")
    crashes = sum(c for k, c in tally.outcomes.items() if k.endswith(": crash"))
    print(f"payloads: {args.count} in {elapsed:.0f} s ({args.count / elapsed:.0f}/s)")
    print(f"slowest input: {tally.slowest * 1000:.1f} ms CPU")
    print(f"crashes: {crashes}")
    print(f"hangs: {tally.outcomes['hang']}")
    return 1 if crashes or tally.outcomes["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
