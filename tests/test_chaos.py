"""The chaos run (`bench/chaos.py`): its checker on made-up histories, and a short real run.

The checker tests show that each invariant catches what it is meant to catch (an
actor running too long, a missed window, two actors at once) and allows what the
design allows (running on a stale view until the known `until` while the broker or
the bridge is down). The real run starts the whole system on loopback with a fixed
seed for one minute of changes and kills, and must end with zero violations.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actor_sdk import wire
from bench._chaos_check import ActorRun, Fault, Truth, actor_runs, check
from tests.fixtures.broker import find_mosquitto

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0  # whole seconds: dispatch starts are whole seconds
TOL = 2.0


def one_off(
    dispatch_id: int, start: float, duration: int, dispatch_type: str = "A"
) -> wire.Dispatch:
    moment = datetime.fromtimestamp(T0 + start, UTC)
    return wire.Dispatch(
        id=dispatch_id,
        type=dispatch_type,
        start_time=moment,
        duration=duration,
        target=wire.Target(ids=(1,)),
        active=True,
        dry_run=False,
        payload={},
        create_time=moment - timedelta(seconds=5),
        update_time=moment - timedelta(seconds=5),
        end_time=None,
        running=False,
        until=None,
        next_run=None,
    )


def run(
    start: float,
    stop: float,
    key: object = 1,
    *,
    until: float | None = None,
    host: str = "h",
    name: str = "a1",
) -> ActorRun:
    known = None if until is None else T0 + until
    return ActorRun(host, name, key, T0 + start, T0 + stop, [(T0 + start, known)], "stop")


def truth_with(*dispatches: wire.Dispatch) -> Truth:
    truth = Truth()
    for dispatch in dispatches:
        truth.record(T0, dispatch.id, dispatch)
    return truth


def verdict(
    truth: Truth, runs: list[ActorRun], faults: Sequence[Fault] = (), mode: str = "none"
) -> list[str]:
    report = check(
        truth,
        runs,
        [Fault(f.victim, T0 + f.killed_at, T0 + f.recovered_at) for f in faults],
        host_types={"h": ["A"]},
        host_modes={"h": mode},
        begin=T0,
        end=T0 + 60,
        tol=TOL,
    )
    return report.violations


def test_actor_following_its_window_within_tolerance_is_no_violation() -> None:
    assert verdict(truth_with(one_off(1, 10, 10)), [run(10.1, 20.3)]) == []


def test_actor_running_past_its_window_is_a_violation() -> None:
    problems = verdict(truth_with(one_off(1, 10, 10)), [run(10.1, 25)])
    assert len(problems) == 1 and "outside its windows" in problems[0]


def test_actor_starting_early_is_a_violation() -> None:
    problems = verdict(truth_with(one_off(1, 10, 10)), [run(5, 20)])
    assert len(problems) == 1 and "outside its windows" in problems[0]


def test_running_on_after_a_deletion_is_allowed_only_while_blind_and_before_until() -> None:
    truth = truth_with(one_off(1, 10, 10))
    truth.record(T0 + 14, 1, None)  # deleted at 14 s while the broker is down
    broker_down = [Fault("broker", 13, 19)]
    # Runs on to its known until (20 s): the host could not know.
    assert verdict(truth, [run(10.1, 20.2, until=20)], broker_down) == []
    # Past its until: a violation even though blind.
    assert verdict(truth, [run(10.1, 24, until=20)], broker_down) != []
    # The same without a fault: a violation.
    assert verdict(truth, [run(10.1, 20.2, until=20)]) != []


def test_missed_window_is_a_violation_unless_a_part_was_down() -> None:
    truth = truth_with(one_off(1, 10, 10))
    problems = verdict(truth, [])
    assert len(problems) == 1 and "missed" in problems[0]
    assert verdict(truth, [], [Fault("bridge", 8, 22)]) == []
    # Another host's fault does not excuse this host.
    assert verdict(truth, [], [Fault("sdk-other", 8, 22)]) != []


def test_two_actors_at_once_is_a_violation() -> None:
    runs = [run(10.1, 20.1, name="a1"), run(12, 20.1, name="a2")]
    problems = verdict(truth_with(one_off(1, 10, 10)), runs)
    assert any("two actors" in problem for problem in problems)


def test_merged_actor_covers_overlapping_windows_of_its_type() -> None:
    truth = truth_with(one_off(1, 10, 10), one_off(2, 15, 15))
    assert verdict(truth, [run(10.1, 30.2, key="A")], mode="type") == []
    assert verdict(truth, [run(10.1, 20.2, key="A")], mode="type") != []  # stopped early


def test_actor_starting_in_a_window_that_opens_just_before_the_end_is_no_violation() -> None:
    # A window opening 0.5 s before the end of the run: the actor running then is right.
    assert verdict(truth_with(one_off(1, 59, 10)), [run(59.1, 60)]) == []


def test_records_of_a_killed_host_end_at_its_death() -> None:
    records = [
        {"t": T0 + 10, "host": "h", "ev": "start", "type": "A", "actor": "x", "id": 1},
        {"t": T0 + 11, "host": "h", "ev": "update", "type": "A", "actor": "x", "id": 1},
    ]
    (found,) = actor_runs(records, {"h": "none"}, {"h": [T0 + 12]}, T0 + 60)
    assert (found.key, found.start, found.stop, found.stopped_by) == (1, T0 + 10, T0 + 12, "killed")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(
    find_mosquitto() is None or "MQTT_TEST_BROKER" in os.environ,
    reason="the chaos run kills and restarts its own mosquitto",
)
def test_short_chaos_run_with_a_fixed_seed_has_no_violations() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "chaos.py"),
            "--minutes",
            "1",
            "--seed",
            "7",
            "--quick",
        ],
        capture_output=True,
        text=True,
        timeout=380,
        cwd=REPO,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "violations: 0" in output, output
    kills = re.search(r"kills survived: (\d+)", output)
    assert kills is not None and int(kills.group(1)) >= 3, output
    windows = re.search(r"windows checked: (\d+)", output)
    assert windows is not None and int(windows.group(1)) >= 20, output
    assert "equal to the truth" in output
