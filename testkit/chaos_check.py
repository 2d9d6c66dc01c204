"""The invariants of the chaos run, checked on what it recorded; pure (no I/O, no clock).

Inputs, all times unix seconds (one clock: everything runs on one machine):

* the truth: per dispatch id, the versions the Dispatch API acknowledged (the
  client library's `Dispatch` as the API returned it), each from the instant its
  create/update/delete was acknowledged (None = deleted), plus windows where the
  version is uncertain (a request that failed mid-way, until the next successful
  list told what the API holds). Run windows come from the oracle
  (`testkit/chaos_oracle.py`, the client library's own schedule), not from the
  bridge's `bridge.schedule`;
* the faults: per fault, what it hit, when it began, when it was undone (process
  restarted, partition healed) and when the system was whole again (restarted part
  ready, re-synced, every host's view live again), and from when on the hosts must
  have noticed it (`dark_after`);
* the actor records of every host (start / update / stop, with the `until` the host
  knew), and the instants hosts were killed.

Checks (tolerance `tol` seconds, fail-safe grace `grace` seconds):

1. no actor runs outside a window of its dispatch (or, for a merged actor, of any
   dispatch of its type) by more than `tol`, except while its host could not know
   (a fault that concerns it, until the system was whole again) and then not past
   the `until` it was told plus `grace` (the SDK's fail-safe);
2. no window is missed while all parts were up: from `tol` after a window opens (or
   after the system is whole again) to `tol` before it closes, the host's actor for
   it runs; starts and stops in undisturbed time are within `tol` of the instant;
3. no duplicate actors: per host and actor identity, never two at once;
4. nothing starts that cannot be confirmed: no actor starts while its host must
   know that its view is not live (from `dark_after` of a fault until it is undone),
   and no actor of one dispatch starts later than `grace` after the `until` it is
   given;
5. at the end, the actors running are the ones that run by the truth.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from frequenz.client.dispatch.types import Dispatch

from testkit.chaos_oracle import Interval, running_ids
from testkit.chaos_oracle import windows as oracle_windows

STEP = 0.05
"""Sampling step of the interval checks, seconds."""


@dataclass
class Truth:
    """What the Dispatch API held over time."""

    versions: dict[int, list[tuple[float, Dispatch | None]]] = field(default_factory=dict)
    uncertain: dict[int, list[Interval]] = field(default_factory=dict)

    def record(self, t: float, dispatch_id: int, dispatch: Dispatch | None) -> None:
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

    def at(self, dispatch_id: int, t: float) -> Dispatch | None:
        """The version current at `t` (None: not created yet, or deleted)."""
        current: Dispatch | None = None
        for acknowledged, version in self.versions.get(dispatch_id, []):
            if acknowledged > t:
                break
            current = version
        return current

    def windows(self, dispatch_id: int, begin: float, end: float) -> list[Interval]:
        """The intervals in [begin, end) in which the dispatch ran, by the oracle."""
        found: list[Interval] = []
        history = self.versions.get(dispatch_id, [])
        for index, (acknowledged, version) in enumerate(history):
            upto = history[index + 1][0] if index + 1 < len(history) else end
            since, upto = max(acknowledged, begin), min(upto, end)
            if version is None or since >= upto:
                continue
            found += oracle_windows(version, since, upto)
        return merge(found)


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
    """One fault: what it hit, and when it began, was undone and was recovered from.

    `target` is a part (`broker`, `bridge`, `api`, an actor host `sdk-N`) or a link
    (`sdk-N~broker`, `bridge~broker`, `bridge~api`); a fault of another actor host
    or of its link does not concern a host, every other fault does. `dark_after`:
    seconds after `began` from which every host it concerns must know that its view
    is not live (until `healed`); None when the hosts need not notice it at all.
    """

    kind: str
    target: str
    began: float
    healed: float
    recovered: float
    dark_after: float | None = None

    def concerns(self, host: str) -> bool:
        """Whether the fault can change what `host` knows or does."""
        return not self.target.startswith("sdk") or self.target.split("~")[0] == host


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
    """Actor time outside the windows on a stale view, within the until and the grace."""
    dark_starts: int = 0
    """Starts while the host must have known that its view was not live."""

    @property
    def worst_lateness(self) -> float:
        """The largest start or stop lateness (absolute), 0 when none was measured."""
        return max((abs(v) for v in [*self.start_lateness, *self.stop_lateness]), default=0.0)

    def add(self, message: str) -> None:
        """Record a violation."""
        self.violations.append(message)


def actor_runs(
    records: Sequence[dict[str, object]],
    host_modes: dict[str, str],
    host_deaths: dict[str, list[float]],
    end: float,
) -> list[ActorRun]:
    """Turn the hosts' records up to `end` into actor runs (a killed host's actors end with it)."""
    runs: dict[str, ActorRun] = {}
    for record in sorted(records, key=lambda r: float(r["t"])):  # type: ignore[arg-type]
        if record["ev"] not in ("start", "update", "stop") or float(record["t"]) > end:  # type: ignore[arg-type]
            continue  # a liveness record, or the stops when the run shuts down
        t = float(record["t"])  # type: ignore[arg-type]
        name = str(record["actor"])
        host = str(record["host"])
        until_text = record.get("until")
        until = None if until_text is None else datetime.fromisoformat(str(until_text)).timestamp()
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
    """What the checks share."""

    truth: Truth
    begin: float
    end: float
    tol: float
    grace: float
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

    def running_keys(self, host_types: list[str], mode: str, t: float) -> set[object]:
        """The actor identities of a host that run at `t` by the truth."""
        keys: set[object] = set()
        for dispatch_type in host_types:
            versions = [self.truth.at(i, t) for i in self.ids_of.get(dispatch_type, [])]
            running = running_ids((v for v in versions if v is not None), t)
            if mode == "none":
                keys.update(running)
            elif running:
                keys.add(dispatch_type)
        return keys


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
    grace: float = 0.1,
) -> Report:
    """Check the actor invariants over [begin, end)."""
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
        grace,
        ids_of,
        {i: truth.windows(i, begin, end) for i in truth.versions},
        {i: expand(truth.uncertain.get(i, []), tol) for i in truth.versions},
    )
    for host, types in host_types.items():
        mine = [f for f in faults if f.concerns(host)]
        # The host could not know: from a fault until the system was whole again.
        blind = merge((f.began, f.recovered + tol) for f in mine)
        # Not "all parts up and live" for this host.
        disturbed = merge((f.began - tol, f.recovered + tol) for f in mine)
        dark = merge(
            (f.began + f.dark_after, f.healed)
            for f in mine
            if f.dark_after is not None
            and f.began + f.dark_after < f.healed
            and not _news_held_back(f, host, mine)
        )
        host_runs_all = [r for r in runs if r.host == host]
        for run in host_runs_all:
            _check_outside(context, run, blind, report)
            _check_dark_start(context, run, dark, report)
        keys: list[object]
        if host_modes[host] == "none":
            keys = [i for t in types for i in ids_of.get(t, [])]
        else:
            keys = list(types)
        for key in keys:
            host_runs = sorted((r for r in host_runs_all if r.key == key), key=lambda r: r.start)
            _check_missed(
                context, host, key, host_runs=host_runs, disturbed=disturbed, report=report
            )
        _check_final(
            context, host, host_runs_all, types=types, mode=host_modes[host], report=report
        )
    by_host_key: dict[tuple[str, object], list[ActorRun]] = {}
    for run in runs:
        by_host_key.setdefault((run.host, run.key), []).append(run)
    for (host, key), host_runs in by_host_key.items():
        _check_duplicates(host, key, host_runs, begin, report)
    return report


def _check_outside(context: _Context, run: ActorRun, blind: list[Interval], report: Report) -> None:
    """1. Never outside a window (beyond tol); while blind, not past the until + grace."""
    allowed = expand(context.key_windows(run.key), context.tol)
    unsure = context.key_uncertain(run.key)
    t = run.start
    outside = 0.0
    overrun = 0.0
    while t < run.stop:
        report.actor_s += STEP
        if not contains(allowed, t) and not contains(unsure, t):
            until = run.until_at(t)
            if not contains(blind, t):
                outside += STEP
            elif until is not None and t <= until + context.grace:
                report.stale_allowed_s += STEP
            else:
                overrun += STEP
        t += STEP
    if outside > STEP * 1.5:
        report.add(
            f"{run.name} ({run.key!r}) ran {outside:.2f} s outside its windows "
            f"between {run.start - context.begin:.1f} s and {run.stop - context.begin:.1f} s"
        )
    if overrun > STEP * 1.5:
        report.add(
            f"{run.name} ({run.key!r}) ran {overrun:.2f} s past the last until it was told "
            f"plus the {context.grace:g} s grace, outside its windows, while its host could "
            f"not know (run from {run.start - context.begin:.1f} s to "
            f"{run.stop - context.begin:.1f} s)"
        )


def _news_held_back(fault: Fault, host: str, faults: list[Fault]) -> bool:
    """Whether a partition on the way to `host` may have held back the news of `fault`.

    The news of a death (the connection's end, the bridge's will) travels through the
    broker to the host. A partition of the host's link, or of the bridge's for the
    bridge's death, that began before the host had to know holds it back: the host then
    goes by that partition's own rule (its probe, the missing status). Seen in a chaos
    run: the bridge killed, the host's link cut 10 ms after the will reached the others.
    """
    assert fault.dark_after is not None
    if fault.target not in ("bridge", "broker") or fault.kind == "partition":
        return False
    paths = {f"{host}~broker"} | ({"bridge~broker"} if fault.target == "bridge" else set())
    must_know = fault.began + fault.dark_after
    return any(
        other.kind == "partition"
        and other.target in paths
        and other.began < must_know
        and other.healed > fault.began
        for other in faults
    )


def _check_dark_start(
    context: _Context, run: ActorRun, dark: list[Interval], report: Report
) -> None:
    """4. No start while the host must know its view is not live, or past the run's end."""
    if contains(dark, run.start) and not contains(context.key_uncertain(run.key), run.start):
        report.dark_starts += 1
        report.add(
            f"{run.name} ({run.key!r}) started at {run.start - context.begin:.2f} s while its "
            f"host could not have a live view (a fault it must have noticed by then)"
        )
    until = run.until_at(run.start)
    if isinstance(run.key, int) and until is not None and run.start > until + context.grace:
        report.add(
            f"{run.name} ({run.key!r}) started at {run.start - context.begin:.2f} s, "
            f"{run.start - until:.3f} s after the until it was given"
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
            _lateness(
                report,
                report.start_lateness,
                first.start - a,
                tol=tol,
                what=f"{host}: start of {key!r}",
                at=a - begin,
            )
        ender = next((r for r in host_runs if r.start < b and r.stop >= b - tol), None)
        if (
            b < context.end - STEP  # a window cut off by the end of the run has no stop
            and not (contains(disturbed, b) or contains(unsure, b))
            and ender is not None
            and ender.stopped_by == "stop"
            and ender.stop < b + 10 * max(tol, 1.0)
        ):
            _lateness(
                report,
                report.stop_lateness,
                ender.stop - b,
                tol=tol,
                what=f"{host}: stop of {key!r}",
                at=b - begin,
            )


def _lateness(
    report: Report, values: list[float], late: float, *, tol: float, what: str, at: float
) -> None:
    values.append(late)
    if abs(late) > tol:
        report.add(f"{what} due at {at:.1f} s came {late:+.3f} s off (tolerance {tol:g} s)")


def _check_final(
    context: _Context,
    host: str,
    host_runs: list[ActorRun],
    *,
    types: list[str],
    mode: str,
    report: Report,
) -> None:
    """5. At the end, the actors running are the ones that run by the truth."""
    end, tol = context.end, context.tol
    running = {r.key for r in host_runs if r.stopped_by == "end"}
    truth_now = context.running_keys(types, mode, end)
    truth_before = context.running_keys(types, mode, end - tol)
    for key in running - truth_now - truth_before:
        report.add(f"{host}: an actor for {key!r} runs at the end, the truth says it does not")
    for key in (truth_now & truth_before) - running:
        report.add(f"{host}: no actor for {key!r} at the end, the truth says it runs")


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
