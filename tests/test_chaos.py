"""The chaos run (`bench/chaos.py`): its oracle and checker on made-up histories, real runs.

The checker tests show that each invariant catches what it is meant to catch (an
actor running too long, a missed window, two actors at once, a late start, a start
while the host must know it is blind, a run past its until on a stale view, a wrong
set of actors at the end) and allows what the design allows (running on a stale
view until the known `until` plus the grace while the broker or the bridge is
down). The oracle tests pin the client library's schedule on one-off and recurring
dispatches. The real runs start the whole system on loopback with a fixed seed for
half a minute of changes and overlapping faults: without sabotage they must end
with zero violations, with actors that stop one second late they must not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from frequenz.client.dispatch.types import Dispatch

from actor_sdk import wire
from bridge import convert
from testkit.broker import find_mosquitto
from testkit.chaos_check import ActorRun, Fault, Truth, actor_runs, check
from testkit.chaos_oracle import running_ids, windows

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0  # whole seconds: dispatch starts are whole seconds
TOL = 0.5


def one_off(
    dispatch_id: int,
    start: float,
    duration: int,
    dispatch_type: str = "A",
    recurrence: wire.Recurrence | None = None,
) -> Dispatch:
    moment = datetime.fromtimestamp(T0 + start, UTC)
    return wire.to_client(
        wire.Dispatch(
            id=dispatch_id,
            type=dispatch_type,
            start_time=moment,
            duration=duration,
            target=wire.Target(ids=(1,)),
            active=True,
            dry_run=False,
            payload={},
            recurrence=recurrence,
            create_time=moment - timedelta(seconds=5),
            update_time=moment - timedelta(seconds=5),
            end_time=None,
            running=False,
            until=None,
            next_run=None,
        )
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
    stopped_by = "end" if stop >= 60 else "stop"  # still running when the run ended
    return ActorRun(host, name, key, T0 + start, T0 + stop, [(T0 + start, known)], stopped_by)


def truth_with(*dispatches: Dispatch) -> Truth:
    truth = Truth()
    for dispatch in dispatches:
        truth.record(T0, int(dispatch.id), dispatch)
    return truth


def verdict(
    truth: Truth, runs: list[ActorRun], faults: Sequence[Fault] = (), mode: str = "none"
) -> list[str]:
    report = check(
        truth,
        runs,
        [
            Fault(f.kind, f.target, T0 + f.began, T0 + f.healed, T0 + f.recovered, f.dark_after)
            for f in faults
        ],
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
    assert problems and "outside its windows" in problems[0]


def test_actor_starting_early_is_a_violation() -> None:
    problems = verdict(truth_with(one_off(1, 10, 10)), [run(5, 20)])
    assert problems and "outside its windows" in problems[0]


def test_running_on_after_a_deletion_is_allowed_only_while_blind_and_before_until() -> None:
    truth = truth_with(one_off(1, 10, 10))
    truth.record(T0 + 14, 1, None)  # deleted at 14 s while the broker is down
    broker_down = [Fault("kill", "broker", 13, 19, 21)]
    # Runs on to its known until (20 s): the host could not know.
    assert verdict(truth, [run(10.1, 20.05, until=20)], broker_down) == []
    # Past its until: a violation even though blind.
    assert verdict(truth, [run(10.1, 24, until=20)], broker_down) != []
    # The same without a fault: a violation.
    assert verdict(truth, [run(10.1, 20.05, until=20)]) != []


def test_running_past_the_until_plus_the_grace_while_blind_is_a_violation() -> None:
    truth = truth_with(one_off(1, 10, 10))
    truth.record(T0 + 14, 1, None)
    problems = verdict(truth, [run(10.1, 20.5, until=20)], [Fault("kill", "broker", 13, 19, 21)])
    assert len(problems) == 1 and "past the last until it was told" in problems[0]


def test_a_start_or_stop_off_by_more_than_the_tolerance_is_a_violation() -> None:
    truth = truth_with(one_off(1, 10, 10))
    late_start = verdict(truth, [run(10.7, 20.1)])
    assert any("start of 1 due at 10.0 s came +0.700 s off" in p for p in late_start)
    late_stop = verdict(truth, [run(10.1, 20.7)])
    assert any("stop of 1 due at 20.0 s came +0.700 s off" in p for p in late_stop)


def test_a_start_while_the_host_must_know_it_is_blind_is_a_violation() -> None:
    truth = truth_with(one_off(1, 10, 10))
    # Broker down from 8 s to 15 s: the hosts notice within 0.5 s.
    broker_down = [Fault("kill", "broker", 8, 15, 16, dark_after=0.5)]
    problems = verdict(truth, [run(12, 20.1)], broker_down)
    assert len(problems) == 1 and "could not have a live view" in problems[0]
    assert verdict(truth, [run(15.2, 20.1)], broker_down) == []


def test_a_death_whose_news_a_partition_held_back_goes_by_the_partitions_rule() -> None:
    truth = truth_with(one_off(1, 10, 10))
    bridge_killed = Fault("kill", "bridge", 8, 15, 16, dark_after=0.5)
    # The host's link cut 0.3 s after the kill: the bridge's will may be held back.
    cut_off = Fault("partition", "h~broker", 8.3, 16, 17, dark_after=6.5)
    assert verdict(truth, [run(10.1, 20.1)], [bridge_killed, cut_off]) == []
    # ... but not past the partition's own deadline (its probe).
    problems = verdict(truth, [run(15.0, 20.1)], [bridge_killed, cut_off])
    assert problems != [] and "could not have a live view" in problems[0]
    # A partition that began after the host had to know excuses nothing.
    later = Fault("partition", "h~broker", 9, 16, 17, dark_after=6.5)
    problems = verdict(truth, [run(10.1, 20.1)], [bridge_killed, later])
    assert problems != [] and "could not have a live view" in problems[0]
    # Nor does a partition of another host's link.
    elsewhere = Fault("partition", "sdk-other~broker", 8.3, 16, 17, dark_after=6.5)
    problems = verdict(truth, [run(10.1, 20.1)], [bridge_killed, elsewhere])
    assert problems != [] and "could not have a live view" in problems[0]


def test_a_start_after_the_until_it_was_given_is_a_violation() -> None:
    # Started 0.8 s after its run had ended, stopped 8 ms later: too short for the
    # window check, still a start of something that no longer runs.
    runs = [run(10.1, 20.1, until=20), run(20.8, 20.808, until=20, name="a2")]
    problems = verdict(truth_with(one_off(1, 10, 10)), runs)
    assert problems == ["a2 (1) started at 20.80 s, 0.800 s after the until it was given"]


def test_the_actors_at_the_end_must_be_the_ones_that_run() -> None:
    left_running = verdict(truth_with(one_off(1, 10, 10)), [run(10.1, 60)])
    assert any("runs at the end" in p for p in left_running)
    stopped = verdict(truth_with(one_off(1, 50, 20)), [run(50.1, 55)])
    assert any("no actor for 1 at the end" in p for p in stopped)


def test_oracle_windows_come_from_the_client_library() -> None:
    assert windows(one_off(1, 10, 5), T0, T0 + 100) == [(T0 + 10, T0 + 15)]
    rule = wire.Recurrence(frequency="MINUTELY", interval=1, end=wire.EndCriteria(count=3))
    recurring = one_off(2, 10, 5, recurrence=rule)
    assert windows(recurring, T0, T0 + 200) == [
        (T0 + 10, T0 + 15),
        (T0 + 70, T0 + 75),
        (T0 + 130, T0 + 135),
    ]
    assert windows(recurring, T0 + 72, T0 + 131) == [(T0 + 72, T0 + 75), (T0 + 130, T0 + 131)]
    assert running_ids([one_off(1, 10, 5), recurring], T0 + 12) == [1, 2]
    assert running_ids([one_off(1, 10, 5), recurring], T0 + 16) == []
    inactive = wire.to_client(msgspec.structs.replace(convert.from_client(recurring), active=False))
    assert windows(inactive, T0, T0 + 200) == []


def test_missed_window_is_a_violation_unless_a_part_was_down() -> None:
    truth = truth_with(one_off(1, 10, 10))
    problems = verdict(truth, [])
    assert len(problems) == 1 and "missed" in problems[0]
    assert verdict(truth, [], [Fault("kill", "bridge", 8, 20, 22)]) == []
    # Another host's fault does not excuse this host.
    assert verdict(truth, [], [Fault("kill", "sdk-other", 8, 20, 22)]) != []


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


def chaos(*flags: str) -> tuple[int, str]:
    """Run `bench/chaos.py` with `flags`; return its exit code and output."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), *flags],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def summary(output: str, name: str) -> int:
    """The number of a summary line (`name: N` at the start of a line)."""
    found = re.search(rf"^{name}: (\d+)", output, re.MULTILINE)
    assert found is not None, output
    return int(found.group(1))


NEEDS_OWN_MOSQUITTO = pytest.mark.skipif(
    find_mosquitto() is None or "MQTT_TEST_BROKER" in os.environ,
    reason="the chaos run kills and restarts its own mosquitto",
)


@pytest.mark.slow
@pytest.mark.timeout(300)
@NEEDS_OWN_MOSQUITTO
def test_short_chaos_run_with_a_fixed_seed_has_no_violations() -> None:
    code, output = chaos("--minutes", "0.5", "--seed", "7", "--quick")
    assert code == 0, output
    assert re.search(r"^violations: 0$", output, re.MULTILINE), output
    assert summary(output, "kills survived") + summary(output, "partitions survived") >= 3
    assert re.search(r"^worst lateness: [0-9.]+ s \(tolerance 0.5 s\)", output, re.MULTILINE)
    windows_checked = re.search(r"windows checked: (\d+)", output)
    assert windows_checked is not None and int(windows_checked.group(1)) >= 10, output
    assert "equal to the truth" in output


@pytest.mark.slow
@pytest.mark.timeout(300)
@NEEDS_OWN_MOSQUITTO
def test_a_chaos_run_whose_actors_stop_late_is_caught() -> None:
    # One second late is within the old 2 s tolerance: the 0.5 s one catches it.
    code, output = chaos("--minutes", "0.5", "--seed", "7", "--quick", "--sabotage-slow-stop", "1")
    assert code == 1, output
    assert summary(output, "violations") > 0
    assert "came +1." in output, output
