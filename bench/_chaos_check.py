"""The invariants of the chaos run, checked on what it recorded; pure (no I/O, no clock).

Inputs, all times unix seconds (one clock: everything runs on one machine):

* the truth: per dispatch id, the versions the Dispatch API acknowledged, each from
  the instant its create/update/delete was acknowledged (None = deleted), plus
  windows where the version is uncertain (a request that failed mid-way, until the
  next successful list told what the API holds);
* the faults: per kill, the victim, the kill instant and the instant the system was
  whole again (restarted, reconnected, re-synced);
* the actor records of every host (start / update / stop, with the `until` the host
  knew), and the instants hosts were killed.

Checks (tolerance `tol` seconds):

1. no actor runs outside a window of its dispatch (or, for a merged actor, of any
   dispatch of its type) by more than `tol`, except while its host could not know
   (broker or bridge down, or not yet recovered) and then not past the `until` it knew;
2. no window is missed while all parts were up: from `tol` after a window opens (or
   after the system is whole again) to `tol` before it closes, the host's actor for
   it runs;
3. no duplicate actors: per host and actor identity, never two at once.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from actor_sdk import wire
from bridge import schedule

STEP = 0.05
"""Sampling step of the interval checks, seconds."""

Interval = tuple[float, float]


def to_dt(t: float) -> datetime:
    """Unix seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(t, UTC)


def to_ts(moment: datetime) -> float:
    """An aware datetime to unix seconds."""
    return moment.timestamp()


@dataclass
class Truth:
    """What the Dispatch API held over time."""

    versions: dict[int, list[tuple[float, wire.Dispatch | None]]] = field(default_factory=dict)
    uncertain: dict[int, list[Interval]] = field(default_factory=dict)

    def record(self, t: float, dispatch_id: int, dispatch: wire.Dispatch | None) -> None:
        """A version acknowledged at `t` (None: deleted)."""
        self.versions.setdefault(dispatch_id, []).append((t, dispatch))

    def mark_uncertain(self, dispatch_id: int, start: float, end: float) -> None:
        """Between `start` and `end` the API's version of this dispatch is not known."""
        self.uncertain.setdefault(dispatch_id, []).append((start, end))

    def type_of(self, dispatch_id: int) -> str | None:
        """The dispatch's type (types never change)."""
        for _, version in self.versions.get(dispatch_id, []):
            if version is not None:
                return version.type
        return None

    def windows(self, dispatch_id: int, begin: float, end: float) -> list[Interval]:
        """The intervals in [begin, end) in which the dispatch ran, by the schedule core."""
        found: list[Interval] = []
        history = self.versions.get(dispatch_id, [])
        for index, (acknowledged, version) in enumerate(history):
            upto = history[index + 1][0] if index + 1 < len(history) else end
            since, upto = max(acknowledged, begin), min(upto, end)
            if version is None or since >= upto:
                continue
            found += _runs(version, since, upto)
        return merge(found)


def _runs(dispatch: wire.Dispatch, begin: float, end: float) -> list[Interval]:
    runs: list[Interval] = []
    t = begin
    while t < end:
        state = schedule.run_state(dispatch, to_dt(t))
        if state.running and dispatch.active:
            stop = end if state.until is None else min(to_ts(state.until), end)
            if stop <= t:  # guard against a zero-length step
                stop = t + STEP
            runs.append((t, stop))
            t = stop
            continue
        if state.changes_at is None:
            break
        t = max(to_ts(state.changes_at), t + 1e-6)
    return runs


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted union of intervals."""
    result: list[Interval] = []
    for start, stop in sorted(intervals):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], stop))
        else:
            result.append((start, stop))
    return result


def expand(intervals: Iterable[Interval], by: float) -> list[Interval]:
    """Each interval widened by `by` on both sides, merged."""
    return merge((a - by, b + by) for a, b in intervals)


def contains(intervals: Sequence[Interval], t: float) -> bool:
    """Whether `t` lies in one of the sorted, merged intervals."""
    index = bisect.bisect_right(intervals, (t, math.inf)) - 1
    return index >= 0 and intervals[index][0] <= t < intervals[index][1]


@dataclass(frozen=True)
class Fault:
    """One kill: victim, kill instant, instant the system was whole again."""

    victim: str
    killed_at: float
    recovered_at: float


@dataclass
class ActorRun:
    """One actor instance from its start to its stop (or its host's death)."""

    host: str
    name: str
    key: object
    start: float
    stop: float
    untils: list[tuple[float, float | None]]
    """(record time, `until` it knew then), for the fail-safe allowance."""
    stopped_by: str

    def until_at(self, t: float) -> float | None:
        """The `until` the host knew at `t` (None: endless or unknown)."""
        known: float | None = None
        for at, until in self.untils:
            if at > t:
                break
            known = until
        return known


@dataclass
class Report:
    """What the checks found."""

    violations: list[str] = field(default_factory=list)
    windows_checked: int = 0
    windows_up: int = 0
    """Windows with time in which all parts were up (where check 2 applies)."""
    covered_s: float = 0.0
    """Window time in which all parts were up and coverage was required."""
    actor_s: float = 0.0
    """Actor running time checked by check 1."""
    actor_runs: int = 0
    start_lateness: list[float] = field(default_factory=list)
    stop_lateness: list[float] = field(default_factory=list)
    stale_allowed_s: float = 0.0

    def add(self, message: str) -> None:
        """Record a violation (at most 50 are kept verbatim)."""
        if len(self.violations) < 50:
            self.violations.append(message)
        else:
            self.violations.append("...")


def actor_runs(
    records: Sequence[dict[str, object]],
    host_modes: dict[str, str],
    host_deaths: dict[str, list[float]],
    end: float,
) -> list[ActorRun]:
    """Turn the hosts' records into actor runs (a killed host's actors end with it)."""
    runs: dict[str, ActorRun] = {}
    for record in sorted(records, key=lambda r: float(r["t"])):  # type: ignore[arg-type]
        t = float(record["t"])  # type: ignore[arg-type]
        name = str(record["actor"])
        host = str(record["host"])
        until_text = record.get("until")
        until = None if until_text is None else to_ts(datetime.fromisoformat(str(until_text)))
        if record["ev"] == "start":
            key: object = (
                int(record["id"])  # type: ignore[call-overload]
                if host_modes[host] == "none"
                else str(record["type"])
            )
            deaths = [d for d in host_deaths.get(host, []) if d >= t]
            stop = min([*deaths, end])
            runs[name] = ActorRun(
                host, name, key, t, stop, [(t, until)], "killed" if deaths else "end"
            )
        elif name in runs:
            run = runs[name]
            run.untils.append((t, until))
            if record["ev"] == "stop":
                run.stop = min(run.stop, t)
                run.stopped_by = "stop"
    return list(runs.values())


@dataclass
class _Context:
    """What the three checks share."""

    truth: Truth
    begin: float
    end: float
    tol: float
    ids_of: dict[str, list[int]]
    windows: dict[int, list[Interval]]
    uncertain: dict[int, list[Interval]]

    def key_windows(self, key: object) -> list[Interval]:
        """Windows of a dispatch id, or of any dispatch of a type (merged actors)."""
        if isinstance(key, int):
            return self.windows.get(key, [])
        return merge(w for i in self.ids_of.get(str(key), []) for w in self.windows[i])

    def key_uncertain(self, key: object) -> list[Interval]:
        """Uncertain intervals of a dispatch id, or of any dispatch of a type."""
        if isinstance(key, int):
            return self.uncertain.get(key, [])
        return merge(u for i in self.ids_of.get(str(key), []) for u in self.uncertain[i])


def check(
    truth: Truth,
    runs: Sequence[ActorRun],
    faults: Sequence[Fault],
    *,
    host_types: dict[str, list[str]],
    host_modes: dict[str, str],
    begin: float,
    end: float,
    tol: float,
) -> Report:
    """Check the three actor invariants over [begin, end)."""
    report = Report(actor_runs=len(runs))
    ids_of: dict[str, list[int]] = {}
    for dispatch_id in truth.versions:
        dispatch_type = truth.type_of(dispatch_id)
        if dispatch_type is not None:
            ids_of.setdefault(dispatch_type, []).append(dispatch_id)
    context = _Context(
        truth,
        begin,
        end,
        tol,
        ids_of,
        {i: truth.windows(i, begin, end) for i in truth.versions},
        {i: expand(truth.uncertain.get(i, []), tol) for i in truth.versions},
    )
    # The host could not know: broker or bridge down, until the system was whole again.
    blind = merge(
        (f.killed_at, f.recovered_at + tol) for f in faults if f.victim in ("broker", "bridge")
    )
    for run in runs:
        _check_outside(context, run, blind, report)
    by_host_key: dict[tuple[str, object], list[ActorRun]] = {}
    for run in runs:
        by_host_key.setdefault((run.host, run.key), []).append(run)
    for host, types in host_types.items():
        # Not "all parts up" for this host: any fault but another host's.
        disturbed = merge(
            (f.killed_at - tol, f.recovered_at + tol)
            for f in faults
            if not f.victim.startswith("sdk") or f.victim == host
        )
        keys: list[object]
        if host_modes[host] == "none":
            keys = [i for t in types for i in ids_of.get(t, [])]
        else:
            keys = list(types)
        for key in keys:
            host_runs = sorted(by_host_key.get((host, key), []), key=lambda r: r.start)
            _check_missed(
                context, host, key, host_runs=host_runs, disturbed=disturbed, report=report
            )
    for (host, key), host_runs in by_host_key.items():
        _check_duplicates(host, key, host_runs, begin, report)
    return report


def _check_outside(context: _Context, run: ActorRun, blind: list[Interval], report: Report) -> None:
    """1. Never outside a window (beyond tol), except blind and before the known until."""
    allowed = expand(context.key_windows(run.key), context.tol)
    unsure = context.key_uncertain(run.key)
    t = run.start
    outside = 0.0
    while t < run.stop:
        report.actor_s += STEP
        if not contains(allowed, t) and not contains(unsure, t):
            until = run.until_at(t)
            if contains(blind, t) and until is not None and t <= until + context.tol:
                report.stale_allowed_s += STEP
            else:
                outside += STEP
        t += STEP
    if outside > STEP * 1.5:
        report.add(
            f"{run.name} ({run.key!r}) ran {outside:.2f} s outside its windows "
            f"between {run.start - context.begin:.1f} s and {run.stop - context.begin:.1f} s"
        )


def _check_missed(
    context: _Context,
    host: str,
    key: object,
    *,
    host_runs: list[ActorRun],
    disturbed: list[Interval],
    report: Report,
) -> None:
    """2. No window missed while all parts were up; lateness of starts and stops."""
    tol, begin = context.tol, context.begin
    covered = merge((r.start, r.stop) for r in host_runs)
    unsure = context.key_uncertain(key)
    for a, b in context.key_windows(key):
        report.windows_checked += 1
        missing = 0.0
        required = 0.0
        t = a + tol
        while t < b - tol:
            if not (contains(disturbed, t) or contains(unsure, t)):
                required += STEP
                if not contains(covered, t):
                    missing += STEP
            t += STEP
        report.covered_s += required
        report.windows_up += required > 0
        if missing > STEP * 1.5:
            report.add(
                f"{host}: window of {key!r} from {a - begin:.1f} s to {b - begin:.1f} s "
                f"missed for {missing:.2f} s while all parts were up"
            )
        quiet_start = not (contains(disturbed, a) or contains(unsure, a))
        first = next((r for r in host_runs if r.start >= a - tol), None)
        already = contains(covered, a - 2 * STEP)  # a merged actor already running
        if quiet_start and first is not None and first.start < b and not already:
            report.start_lateness.append(first.start - a)
        ender = next((r for r in host_runs if r.start < b and r.stop >= b - tol), None)
        if (
            b < context.end - STEP  # a window cut off by the end of the run has no stop
            and not (contains(disturbed, b) or contains(unsure, b))
            and ender is not None
            and ender.stopped_by == "stop"
            and ender.stop < b + 10 * tol
        ):
            report.stop_lateness.append(ender.stop - b)


def _check_duplicates(
    host: str, key: object, host_runs: list[ActorRun], begin: float, report: Report
) -> None:
    """3. Per host and actor identity, never two actors at once."""
    ordered = sorted(host_runs, key=lambda r: r.start)
    for before, after in itertools.pairwise(ordered):
        if after.start < before.stop - 1e-3:
            report.add(
                f"{host}: two actors for {key!r} at once ({before.name} until "
                f"{before.stop - begin:.2f} s, {after.name} from {after.start - begin:.2f} s)"
            )


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]
