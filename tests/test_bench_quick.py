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


def run_quick(script: str, *options: str, timeout: float = 100) -> dict[str, list[str]]:
    """Run `bench/<script> --quick`; return its table rows by figure (cells after it)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["figure", "ours", "reference", "ratio", "budget"]
    assert " ".join([f"bench/{script} --quick", *options]) in result.stdout  # what made it
    table: dict[str, list[str]] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        table[cells[0]] = cells[1:]
    return table


def measured(cell: str) -> bool:
    return cell not in ("", "-")


def test_latency_bench_quick_prints_both_paths() -> None:
    table = run_quick("latency.py")
    for step in (
        "create → actor started",
        "update → actor updated",
        "set inactive → actor stopped",
    ):
        for stat in ("p50", "p90", "p99", "max"):
            ours, reference, ratio, _ = table[f"{step}, {stat}"]
            assert measured(ours) and measured(reference) and measured(ratio)
    assert table["create → actor started, p99"][3].startswith("≤ ref + 1 ms")
    for stat in ("p50", "p90", "p99"):
        floor = table[f"the broker hop alone (paho → Mosquitto → paho, 1 KB), {stat}"][0]
        assert measured(floor)


def test_lateness_bench_quick_prints_bridge_and_actor_rows() -> None:
    table = run_quick("lateness.py")
    assert measured(table["bridge: published (subscriber receives), p99"][0])
    assert measured(table["bridge: computed (snapshot as_of), p99"][0])
    for kind in ("start", "stop"):
        for stat in ("p50", "p90", "p99", "max"):
            ours, reference, _, _ = table[f"actor {kind}() late, {stat}"]
            assert measured(ours) and measured(reference)


def test_lateness_bench_bridge_only_prints_the_bridge_next_to_a_plain_client() -> None:
    table = run_quick("lateness.py", "--bridge-only")
    for figure in (
        "bridge: published (subscriber receives), p50",
        "bridge: published (subscriber receives), p99",
        "bridge: published, max",
    ):
        ours, reference, ratio, _ = table[figure]
        assert measured(ours) and measured(reference) and measured(ratio)
    assert not any(figure.startswith("actor ") for figure in table)


def test_scale_bench_quick_prints_every_figure() -> None:
    table = run_quick("scale.py", timeout=110)
    figures = "\n".join(table)
    for figure in (
        "bridge start-up → every retained topic published",
        "bridge peak RSS during start-up",
        "bridge RSS - idle bridge RSS, per dispatch",
        "full republish after broker restart",
        "new raw MQTT subscriber: every retained topic",
        "new actor SDK Dispatcher: every dispatch",
        "`dispatch-bridge watch --once`",
        "memory held per dispatch (tracemalloc, from the API's protobuf)",
        "`running` over all 1,000 dispatches",
    ):
        assert figure in figures, figure
    assert measured(table["memory held per dispatch (tracemalloc, from the API's protobuf)"][1])
    assert measured(table["`running` over all 1,000 dispatches"][1])


def test_fanout_bench_quick_prints_start_and_stop_rows() -> None:
    table = run_quick("fanout.py")
    for figure in (
        "N=3: scheduled start → median actor started",
        "N=3: scheduled start → last actor started (worst round)",
        "N=3: scheduled stop → last actor stopped (worst round)",
        "N=3: idle actor process, CPU time per second (1 s)",
        "N=3: idle actor process, wake-ups (1 s)",
    ):
        ours, reference, _, _ = table[figure]
        assert measured(ours) and measured(reference)


def test_cache_writes_bench_quick_prints_bytes_per_change() -> None:
    table = run_quick("cache_writes.py")
    ours, reference, _, _ = table["bytes written per change"]
    assert measured(ours) and measured(reference)
    assert float(ours.split()[0]) < 64  # KB: a change writes a few pages, not the whole cache
    assert measured(table["commit on the event loop, p50"][0])


def test_mqtt_io_bench_quick_prints_every_client() -> None:
    table = run_quick("mqtt_io.py")
    for client in ("aiomqtt, awaiting each publish", "paho-mqtt's own loop", "gmqtt"):
        assert any(f.startswith(f"publish rate, {client}") for f in table), client
    for figure, cells in table.items():
        assert measured(cells[0]), figure
    project = [f for f in table if f.startswith("retained catch-up, actor_sdk.mqtt")]
    assert len(project) == 1 and table[project[0]][3].startswith("≤ 2 × mosquitto_sub")  # noqa: RUF001
    assert measured(table["retained catch-up, mosquitto_sub (C, the floor)"][0])
