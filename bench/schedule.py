"""Benchmark: the schedule core against frequenz-client-dispatch, on the same machine.

Run alone: `.venv/bin/python bench/schedule.py` (a few minutes: the reference
walks every past occurrence), or `--quick` (a few seconds: fewer loops, the
reference timed only where it is cheap and extrapolated elsewhere, marked as
such, and `running_at` over 20,000 dispatches instead of 100,000).

A query of ours is one `run_state(dispatch, now)`: running, until, next_run
and changes_at. A query of the reference is `started_at(now)` (which calls
`_until(now)`) plus `next_run_after(now)`: running and next_run.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from actor_sdk import wire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import schedule
from testkit.dispatches import dispatch

NOW = datetime(2026, 11, 28, 6, 34, 25, 500_000, tzinfo=UTC)
QUERY_BUDGET_US = 10.0
RUNNING_BUDGET_S = 0.3
AGES = {"1 day": 1, "30 days": 30, "1 year": 365, "5 years": 5 * 365}
PERIODS = {"MINUTELY": 60, "HOURLY": 3600, "DAILY": 86400}


def per_call(call: Callable[[], object], least_seconds: float, most_calls: int) -> float:
    """Seconds per call: repeat until `least_seconds` passed or `most_calls` were made."""
    calls = 0
    started = time.perf_counter()
    elapsed = 0.0
    while calls < most_calls and (calls == 0 or elapsed < least_seconds):
        call()
        calls += 1
        elapsed = time.perf_counter() - started
    return elapsed / calls


def ours_per_query(d: wire.Dispatch, quick: bool) -> float:
    loops = 500 if quick else 20_000
    started = time.perf_counter()
    for _ in range(loops):
        schedule.run_state(d, NOW)
    return (time.perf_counter() - started) / loops


def reference_per_query(d: wire.Dispatch, quick: bool) -> float:
    ref = wire.to_client(d)

    def query() -> None:
        ref.started_at(NOW)
        ref.next_run_after(NOW)

    return per_call(query, 0.02 if quick else 0.5, 100 if quick else 2_000)


@dataclass
class Row:
    case: str
    ours: str
    reference: str
    ratio: str
    budget: str


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} µs"


def query_rows(quick: bool) -> list[Row]:
    rows = []
    # The reference's cost per past occurrence, measured on a cheap case, for
    # extrapolating the expensive ones in quick mode.
    per_occurrence: float | None = None
    one_off = dispatch(start=NOW - timedelta(minutes=5), duration=600)
    ours = ours_per_query(one_off, quick)
    reference = reference_per_query(one_off, quick)
    rows.append(
        Row(
            "one-off",
            fmt_time(ours),
            fmt_time(reference),
            fmt_ratio(reference / ours),
            f"≤ {QUERY_BUDGET_US:.0f} µs",
        )
    )
    for frequency, period in PERIODS.items():
        for age_name, days in AGES.items():
            start = (NOW - timedelta(days=days)).replace(second=0, microsecond=0)
            d = dispatch(
                start=start,
                duration=30,
                recurrence=wire.Recurrence(frequency=frequency, interval=1),  # type: ignore[arg-type]
            )
            occurrences = (NOW - start).total_seconds() / period
            ours = ours_per_query(d, quick)
            if quick and occurrences > 3_000 and per_occurrence is not None:
                reference = per_occurrence * occurrences
                shown = f"~{fmt_time(reference)} (extrapolated)"
            else:
                reference = reference_per_query(d, quick)
                shown = fmt_time(reference)
                if occurrences > 100:
                    per_occurrence = reference / occurrences
            rows.append(
                Row(
                    f"{frequency.lower()}, started {age_name} ago",
                    fmt_time(ours),
                    shown,
                    fmt_ratio(reference / ours),
                    f"≤ {QUERY_BUDGET_US:.0f} µs",
                )
            )
    return rows


WEEKDAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")


def varied(count: int, seed: int = 42) -> list[wire.Dispatch]:
    """Dispatches like a busy site's: 70% one-offs around now, 30% recurring rules.

    Recurring rules started up to 30 days ago (so that the reference stays
    measurable), a tenth of them with `by...` lists, 30% with an end.
    """
    rng = random.Random(seed)
    dispatches = []
    frequencies = ["MINUTELY"] * 15 + ["HOURLY"] * 25 + ["DAILY"] * 35 + ["WEEKLY"] * 15
    frequencies += ["MONTHLY"] * 7 + ["YEARLY"] * 3
    for index in range(count):
        active = rng.random() < 0.9
        if rng.random() < 0.7:
            start = NOW + timedelta(seconds=rng.randint(-30 * 86400, 30 * 86400))
            pick = rng.random()
            duration = None if pick < 0.05 else 0 if pick < 0.1 else rng.randint(60, 4 * 3600)
            dispatches.append(
                dispatch(dispatch_id=index, start=start, duration=duration, active=active)
            )
            continue
        frequency = rng.choice(frequencies)
        start = NOW - timedelta(seconds=rng.randint(0, 30 * 86400))
        start = start.replace(microsecond=0)
        period = {"MINUTELY": 60, "HOURLY": 3600}.get(frequency, 86400)
        fields: dict[str, object] = {}
        if rng.random() < 0.1:
            if frequency in ("MINUTELY", "HOURLY"):
                fields["byhours"] = tuple(sorted(rng.sample(range(24), rng.randint(1, 8))))
            if frequency in ("DAILY", "WEEKLY", "HOURLY"):
                fields["byweekdays"] = tuple(rng.sample(WEEKDAYS, rng.randint(1, 5)))
            if frequency in ("DAILY", "WEEKLY"):
                fields["byhours"] = tuple(sorted(rng.sample(range(24), rng.randint(1, 3))))
            if frequency == "MONTHLY":
                fields["bymonthdays"] = tuple(rng.sample([1, 10, 15, 20, -1], rng.randint(1, 3)))
            if frequency == "YEARLY":
                fields["bymonths"] = tuple(sorted(rng.sample(range(1, 13), rng.randint(1, 4))))
        end = None
        pick = rng.random()
        if pick < 0.15:
            end = wire.EndCriteria(count=rng.randint(1, 100))
        elif pick < 0.3:
            end = wire.EndCriteria(until=NOW + timedelta(seconds=rng.randint(-86400, 86400 * 60)))
        rule = wire.Recurrence(
            frequency=frequency,  # type: ignore[arg-type]
            interval=rng.choice([1, 1, 1, 2, 3, 4]),
            end=end,
            **fields,  # type: ignore[arg-type]
        )
        duration = None if rng.random() < 0.05 else rng.randint(1, 2 * period)
        dispatches.append(
            dispatch(
                dispatch_id=index,
                start=start,
                duration=duration,
                recurrence=rule,
                active=active,
            )
        )
    return dispatches


def running_rows(quick: bool, count: int = 100_000) -> tuple[list[Row], str]:
    dispatches = varied(count)
    recurring = sum(
        1 for d in dispatches if d.recurrence is not None and d.duration is not None
    ) / len(dispatches)
    times = []
    for _ in range(2 if quick else 4):
        started = time.perf_counter()
        running, change = schedule.running_at(dispatches, NOW)
        times.append(time.perf_counter() - started)
    cold, ours = times[0], min(times[1:])
    sample_size = 40 if quick else 1_000
    sample = random.Random(7).sample(dispatches, sample_size)
    clients = [wire.to_client(d) for d in sample]
    raised = 0

    def reference_runs(ref: object) -> bool:
        nonlocal raised
        try:
            return bool(ref.started_at(NOW))  # type: ignore[attr-defined]
        except (ValueError, KeyError):
            # Invalid rules (e.g. unreachable byhours): ours say "never runs".
            raised += 1
            return False

    started = time.perf_counter()
    reference_running = [d for d, c in zip(sample, clients, strict=True) if reference_runs(c)]
    sample_seconds = time.perf_counter() - started
    ours_running, _ = schedule.running_at(sample, NOW)
    agree = sorted(d.id for d in reference_running) == [d.id for d in ours_running]
    reference = sample_seconds * len(dispatches) / sample_size
    shown = f"~{fmt_time(reference)} (extrapolated from {sample_size:,})"
    budget = RUNNING_BUDGET_S * count / 100_000
    budget_text = f"≤ {budget:g} s" + ("" if count == 100_000 else " (0.3 s per 100k)")
    what = f"running_at, {count:,} varied dispatches ({recurring:.0%} recurring)"
    rows = [
        Row(
            f"{what}, first call",
            fmt_time(cold),
            shown,
            fmt_ratio(reference / cold),
            budget_text,
        ),
        Row(
            f"{what}, rules cached",
            fmt_time(ours),
            shown,
            fmt_ratio(reference / ours),
            budget_text,
        ),
    ]
    note = (
        f"running now: {len(running):,}, next change at {change}; "
        f"ours and the reference agree on the sample: {'yes' if agree else 'NO'} "
        f"(the reference raised for {raised} invalid rule(s) of the sample, counted as not running)"
    )
    return rows, note


def print_table(rows: list[Row]) -> None:
    header = Row("case", "ours", "reference", "ratio", "budget")
    cells = [header, *rows]
    widths = [max(len(getattr(r, f)) for r in cells) for f in ("case", "ours", "reference")]
    widths += [max(len(r.ratio) for r in cells), max(len(r.budget) for r in cells)]

    def line(r: Row) -> str:
        values = (r.case, r.ours, r.reference, r.ratio, r.budget)
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a second or two; expensive references extrapolated"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    rows = query_rows(args.quick)
    more, note = running_rows(args.quick, 20_000 if args.quick else 100_000)
    print_table(rows + more)
    print()
    print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
