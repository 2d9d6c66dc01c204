"""bench/fleet.py --quick runs and prints its figures, per broker (figures are not checked).

Run as a subprocess (tests never import bench/): a 3-node NATS cluster, Mosquitto, the
API server, a bridge serving 5 microgrids on each and SDK hosts. About a minute of a
3-node cluster: it runs with the NATS matrix (`pytest -m nats`), not in the default
run, which must stay well under 20 minutes on two cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.nats]

ROOT = Path(__file__).resolve().parent.parent
NATS = "NATS, 3 nodes"
MOSQUITTO = "Mosquitto"
BOTH = (
    "start-up: spawn → every tree seen and every status online",
    "start-up: spawn → every status online",
    "start-up: retained writes seen",
    "start-up: retained writes/s achieved (first → last write seen)",
    "retained writes/s ceiling (raw paho-mqtt clients, QoS 1)",
    "bridge CPU during start-up, per microgrid",
    "bridge CPU at steady state, per microgrid per second",
    "bridge RSS",
    "bridge RSS per microgrid ((RSS - idle bridge's) / microgrids)",
    "scheduled change → subscriber, p50",
    "scheduled change → subscriber, p99",
    "scheduled change → subscriber, max",
    "scheduled change → actor start()/stop() (SDK hosts), p50",
    "scheduled change → actor start()/stop() (SDK hosts), max",
)
KILL = "n2 killed (not the bridge's node)"


def run_quick_bench(timeout: float) -> tuple[int, str, str]:
    """Run `bench/fleet.py --quick`; on timeout SIGTERM it, so it stops what it started."""
    with subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as bench:
        try:
            stdout, stderr = bench.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            bench.terminate()
            stdout, stderr = bench.communicate(timeout=30)
            pytest.fail(f"bench/fleet.py --quick took over {timeout:.0f} s:\n{stderr[-6000:]}")
    return bench.returncode, stdout, stderr


# About 60 s on an idle 2-core machine; the NATS cluster's recovery from the node kill
# takes longer when other work runs beside it.
@pytest.mark.timeout(300)
def test_fleet_bench_quick_prints_every_figure_per_broker() -> None:
    code, stdout, stderr = run_quick_bench(240)
    assert code == 0, stdout + stderr[-6000:]
    rows = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["figure", NATS, MOSQUITTO]
    assert "bench/fleet.py --quick" in stdout
    table: dict[str, dict[str, str]] = {}
    for row in rows[2:]:
        figure, *cells = (cell.strip() for cell in row.strip("|").split("|"))
        table[figure] = dict(zip(header[1:], cells, strict=True))
    for figure in BOTH:
        for column in (NATS, MOSQUITTO):
            cell = table[figure][column]
            assert cell not in ("", "-") and "nan" not in cell, (figure, column, cell)
    # Every change of the plain burst was seen, on both.
    for column in (NATS, MOSQUITTO):
        seen, total = table["scheduled change → subscriber: changes seen"][column].split("/")
        assert seen == total, column
    # The node kill is NATS only, and measured there.
    assert table[f"{KILL}: change → subscriber, max"][NATS] != "-"
    assert table[f"{KILL}: change → subscriber, max"][MOSQUITTO] == "-"
