"""The benchmarks' results: percentiles, units, the printed Markdown table, profiles.

* `Table`: the printed result, one row per figure: ours, the reference, the
  ratio and the budget.
* `markdown_table()`: the Markdown of any bench table; `fmt()` a number with its unit.
* `print_profile()`: the top of a cProfile file; `command_line()`: how a bench was run.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench._harness import REPO, progress


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `samples`."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


_FORMATS: dict[str, Callable[[float], str]] = {
    "ms": lambda v: f"{v * 1000:.2f} ms",
    "us": lambda v: f"{v * 1e6:.1f} µs",
    "s": lambda v: f"{v:.2f} s",
    "KB": lambda v: f"{v / 1000:.2f} KB",
    "MB": lambda v: f"{v / 1e6:.1f} MB",
    "/s": lambda v: f"{v:,.0f}/s",
}


def fmt(value: float | None, unit: str) -> str:
    """A number with its unit (ms, us, s, KB, MB, /s); '-' for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    format_ = _FORMATS.get(unit)
    return format_(value) if format_ else f"{value:g}{unit}"


@dataclass
class Table:
    """A result table: figure, ours, reference (same run), ratio, budget."""

    title: str
    command: str
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        figure: str,
        ours: float | None,
        reference: float | None,
        unit: str,
        budget: str = "",
    ) -> None:
        """Add a row; the ratio is ours / reference when both are known."""
        ratio = "-"
        if ours is not None and reference and not math.isnan(ours) and not math.isnan(reference):
            ratio = f"{ours / reference:.2f}"
        self.rows.append((figure, fmt(ours, unit), fmt(reference, unit), ratio, budget))

    def add_spread(
        self,
        figure: str,
        ours: Sequence[float],
        reference: Sequence[float],
        unit: str,
        budgets: dict[int, str] | None = None,
    ) -> None:
        """Add rows p50, p90, p99 and max of two samples, with a budget per percentile.

        Args:
            figure: What was measured; each row appends its percentile.
            ours: Our samples.
            reference: The reference's samples, from the same run.
            unit: The unit, as for `add`.
            budgets: The budget text of some percentiles, e.g. `{99: "≤ 1 ms"}`.
        """
        for q in (50, 90, 99):
            budget = (budgets or {}).get(q, "")
            self.add(f"{figure}, p{q}", percentile(ours, q), percentile(reference, q), unit, budget)
        self.add(f"{figure}, max", max(ours), max(reference), unit)

    def note(self, text: str) -> None:
        """A line printed below the table."""
        self.notes.append(text)

    def render(self) -> str:
        """The table as Markdown."""
        header = ("figure", "ours", "reference", "ratio", "budget")
        return markdown_table(self.title, self.command, header, self.rows, self.notes)

    def print(self) -> None:
        """Print the table to stdout."""
        print(self.render(), flush=True)


def markdown_table(
    title: str,
    command: str,
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    notes: Sequence[str],
) -> str:
    """A bench's table as Markdown: title, the command that made it, rows, notes below."""
    lines = [f"### {title}", "", f"`{command}`", ""]
    lines += ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows]]
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    return "\n".join(lines) + "\n"


def print_profile(path: Path, title: str, limit: int = 25) -> None:
    """Print the functions with the most own time of a cProfile file to stderr."""
    import pstats  # noqa: PLC0415

    if not path.exists():
        progress(f"no profile at {path}")
        return
    print(f"\n----- profile: {title} ({path})", file=sys.stderr)
    stats = pstats.Stats(str(path), stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(limit)


def command_line() -> str:
    """How this benchmark was run, for the table."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])
