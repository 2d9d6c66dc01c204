"""The benchmarks run and print their tables (figures are not checked: they are not tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_schedule_bench_quick_prints_table() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "schedule.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["case", "ours", "reference", "ratio", "budget"]
    cases = {line.split("|")[1].strip() for line in lines[2:] if line.startswith("|")}
    expected = {"one-off"} | {
        f"{frequency}, started {age} ago"
        for frequency in ("minutely", "hourly", "daily")
        for age in ("1 day", "30 days", "1 year", "5 years")
    }
    assert expected <= cases
    assert sum(case.startswith("running_at, 20,000 varied dispatches") for case in cases) == 2
    assert "agree on the sample: yes" in result.stdout
