"""`dispatch-bridge watch`: the `--once` text (pure rendering, and against a real broker).

The interactive view: tests/test_watch_view.py (its pure parts) and
tests/test_watch_tmux.py (in a terminal).
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import wire
from actor_sdk.mqtt import parse_broker_url
from bridge import schedule
from bridge.api import create_dispatch
from bridge.cli import build_parser
from bridge.watch import load_settings
from bridge.watch_state import WatchState
from bridge.watch_text import bar, format_span, render, runs_within, union
from testkit.api_server import ApiServerHandle, dispatch_bridge_command
from testkit.bridge import BridgeFactory, retained_snapshot
from testkit.broker import Broker
from testkit.processes import free_port, wait_until

NOW = datetime(2026, 11, 28, 7, 3, 20, tzinfo=UTC)
LAYOUT = wire.TopicLayout.for_microgrid(1)


def make_dispatch(
    dispatch_id: int,
    start: datetime,
    duration: int | None,
    *,
    dispatch_type: str = "EXAMPLE_TYPE",
    recurrence: wire.Recurrence | None = None,
    active: bool = True,
    until: datetime | None = None,
) -> wire.Dispatch:
    return wire.Dispatch(
        id=dispatch_id,
        type=dispatch_type,
        start_time=start,
        duration=duration,
        target=wire.Target(ids=(7, 8)),
        active=active,
        dry_run=False,
        payload={"power_w": 5000},
        recurrence=recurrence,
        create_time=start - timedelta(hours=1),
        update_time=start - timedelta(hours=1),
        end_time=None,
        running=until is not None,
        until=until,
        next_run=None,
    )


MINUTELY = wire.Recurrence(frequency="MINUTELY", interval=1)


def sample_state() -> WatchState:
    """Two types: one running now with a minutely rule and a later one; two overlapping."""
    running = make_dispatch(1, NOW - timedelta(minutes=5), 900, until=NOW + timedelta(minutes=10))
    dispatches = [
        running,
        make_dispatch(2, NOW - timedelta(hours=1), 20, recurrence=MINUTELY),
        make_dispatch(3, NOW + timedelta(minutes=1), 600),
        make_dispatch(4, NOW + timedelta(minutes=30), 3600, dispatch_type="SET.POWER"),
        make_dispatch(5, NOW + timedelta(minutes=50), 1800, dispatch_type="SET.POWER"),
    ]
    state = WatchState(LAYOUT)
    for dispatch in dispatches:
        state.apply(LAYOUT.dispatch(dispatch.type, dispatch.id), wire.encode(dispatch), NOW)
    snapshot = wire.RunningSnapshot(
        microgrid_id=1,
        type="EXAMPLE_TYPE",
        running=(running,),
        next_change=NOW + timedelta(seconds=40),
        as_of=NOW,
        session=2,
        seq=7,
    )
    state.apply(LAYOUT.running("EXAMPLE_TYPE"), wire.encode(snapshot), NOW)
    status = wire.BridgeStatus(
        state="online",
        upstream="connected",
        synced_at=NOW - timedelta(seconds=12),
        session=2,
        bridge="edge-1",
        version="0.1.0",
        dispatches=5,
    )
    state.apply(LAYOUT.status, wire.encode(status), NOW)
    return state


# --- Pure parts ------------------------------------------------------------------


def test_render_shows_status_running_dispatch_time_left_and_next_change() -> None:
    text = "\n".join(render(sample_state(), now=NOW, width=80))

    assert "bridge ONLINE" in text
    assert "upstream connected" in text
    assert "synced 07:03:08Z (12s ago)" in text
    assert "session 2" in text
    assert "EXAMPLE_TYPE: 1 running, next change 07:04:00Z (in 40s)" in text
    assert "RUN #1 until 07:13:20Z, 10m00s left" in text
    assert "SET.POWER: no running snapshot" in text


@pytest.mark.parametrize("width", [80, 60, 40, 20])
def test_render_never_exceeds_the_width(width: int) -> None:
    state = sample_state()
    state.apply(LAYOUT.root + "/X/running", b"not json at all " * 20, NOW)

    lines = render(state, now=NOW, width=width)

    assert lines
    assert all(len(line) <= width for line in lines), [ln for ln in lines if len(ln) > width]


def test_timeline_bars_mark_when_each_dispatch_runs() -> None:
    # 3 h over 76 cells at width 80: cell = 142.1 s.
    lines = render(sample_state(), now=NOW, width=80)
    bars = {m[1]: m[2] for line in lines if (m := re.match(r"^\s*(#\d+|any) \|(.*)$", line))}

    cell = timedelta(hours=3) / 76
    # #1 runs until now + 10 min: 4 full cells (568 s), then part of the fifth.
    assert bars["#1"].startswith("####+.")
    assert set(bars["#1"][5:]) == {"."}
    # #2 runs 20 s of every minute: every cell partly.
    assert set(bars["#2"]) == {"+"}
    # #4 starts at +30 min: cell 12 partly (1800 / 142.1 = 12.7).
    assert bars["#4"].index("+") == int(timedelta(minutes=30) / cell)
    assert bars["#4"][:12] == "." * 12
    # Both SET.POWER dispatches overlap: one line shows their union.
    assert len([line for line in lines if line.startswith("any |")]) == 2


def test_timeline_steps_recurrences_through_the_schedule_core() -> None:
    dispatch = make_dispatch(2, NOW - timedelta(hours=1), 20, recurrence=MINUTELY)

    runs = runs_within(dispatch, NOW, NOW + timedelta(minutes=3))

    # Start second :20, 20 s each: the run at 07:03:20 ends 07:03:40, then 07:04:20, ...
    assert runs == [
        (NOW, NOW + timedelta(seconds=20)),
        (NOW + timedelta(seconds=60), NOW + timedelta(seconds=80)),
        (NOW + timedelta(seconds=120), NOW + timedelta(seconds=140)),
    ]


def dense_type(count: int, duration: int) -> dict[int, wire.Dispatch]:
    """`count` minutely dispatches of one type, starting at second 20 (even ids) or 50 (odd)."""
    return {
        i: make_dispatch(
            i, NOW - timedelta(hours=1, seconds=30 * (i % 2)), duration, recurrence=MINUTELY
        )
        for i in range(1, count + 1)
    }


def counted_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the schedule core's steps (`run_state` calls) from now on."""
    steps = [0]
    run_state = schedule.run_state

    def counting(dispatch: wire.Dispatch, now: datetime) -> Any:
        steps[0] += 1
        return run_state(dispatch, now)

    monkeypatch.setattr("bridge.schedule.run_state", counting)
    return steps


def timeline_of(lines: list[str]) -> dict[str, str]:
    return {m[1]: m[2] for line in lines if (m := re.match(r"^\s*(#\d+|any) \|(.*)$", line))}


@pytest.mark.parametrize("duration", [40, 20])
def test_the_timeline_steps_only_the_dispatches_it_draws_and_the_union_needs(
    monkeypatch: pytest.MonkeyPatch, duration: int
) -> None:
    """200 dense rules: one bar each would be 200 x 360 steps; 12 are drawn.

    40-s runs from seconds 20 and 50 cover every instant: the union is full after
    the first two dispatches and the others are stepped only to order them. 20-s
    runs leave gaps: every dispatch is stepped for the union, which equals the
    oracle's either way.
    """
    dispatches = dense_type(200, duration)
    state = WatchState(LAYOUT)
    for dispatch in dispatches.values():
        state.apply(LAYOUT.dispatch(dispatch.type, dispatch.id), wire.encode(dispatch), NOW)
    horizon = timedelta(hours=3)
    steps = counted_steps(monkeypatch)
    every_run = {i: runs_within(d, NOW, NOW + horizon) for i, d in dispatches.items()}
    stepping_all = steps[0]
    steps[0] = 0

    bars = timeline_of(render(state, now=NOW, width=80, horizon=horizon))

    width = 80 - len("#200 |")  # the bars after the widest label
    cell = horizon / width
    drawn = sorted(every_run, key=lambda i: (every_run[i][0][0], i))[:12]  # soonest first
    assert set(bars) == {"any", *(f"#{i}" for i in drawn)}
    assert all(bars[f"#{i}"] == bar(every_run[i], NOW, cell, width) for i in drawn)
    merged = union(run for runs in every_run.values() for run in runs)
    assert bars["any"] == bar(merged, NOW, cell, width)
    if duration == 40:
        assert set(bars["any"]) == {"#"}
        assert steps[0] < stepping_all / 5, (steps[0], stepping_all)


def test_inactive_and_past_dispatches_have_no_bar_and_are_counted() -> None:
    state = WatchState(LAYOUT)
    for dispatch in (
        make_dispatch(8, NOW + timedelta(minutes=5), 60, active=False),
        make_dispatch(9, NOW - timedelta(hours=2), 60),
    ):
        state.apply(LAYOUT.dispatch(dispatch.type, dispatch.id), wire.encode(dispatch), NOW)

    text = "\n".join(render(state, now=NOW, width=80))

    assert "#8 |" not in text and "#9 |" not in text
    assert "2 other dispatch(es) not running in the next 3h00m" in text


def test_garbage_payloads_and_foreign_topics_become_warnings() -> None:
    state = sample_state()
    state.apply(LAYOUT.running("EXAMPLE_TYPE"), b'{"truncated": ', NOW)
    state.apply(LAYOUT.root + "/not%ZZtype/running", b"{}", NOW)
    state.apply(LAYOUT.status, b"\xff\xfe", NOW)

    lines = render(state, now=NOW, width=80)

    warnings = [line for line in lines if line.startswith("! ")]
    assert len(warnings) == 3
    # The last good snapshot is kept.
    assert any("RUN #1" in line for line in lines)


def test_hostile_type_names_cannot_reach_the_terminal() -> None:
    hostile = "EVIL\x1b[2J\x07TYPE"
    state = WatchState(LAYOUT)
    dispatch = make_dispatch(3, NOW + timedelta(minutes=1), 60, dispatch_type=hostile)
    state.apply(LAYOUT.dispatch(hostile, 3), wire.encode(dispatch), NOW)

    text = "\n".join(render(state, now=NOW, width=80))

    assert "\x1b" not in text and "\x07" not in text
    assert "EVIL?[2J?TYPE" in text


def test_empty_payloads_clear_dispatches_snapshots_and_status() -> None:
    state = sample_state()
    for topic in (
        LAYOUT.dispatch("SET.POWER", 4),
        LAYOUT.dispatch("SET.POWER", 5),
        LAYOUT.running("EXAMPLE_TYPE"),
        LAYOUT.status,
    ):
        state.apply(topic, b"", NOW)

    assert "SET.POWER" not in state.dispatches
    assert state.snapshots == {}
    assert state.status is None
    assert "bridge: no status published" in "\n".join(render(state, now=NOW))


def test_overdue_and_stale_snapshots_are_flagged() -> None:
    later = NOW + timedelta(minutes=15)

    text = "\n".join(render(sample_state(), now=later, width=80))

    assert "OVERDUE by 5m00s" in text
    assert "snapshot is stale" in text


def test_format_span_and_broker_url() -> None:
    assert format_span(timedelta(seconds=45)) == "45s"
    assert format_span(timedelta(hours=2, minutes=7)) == "2h07m"
    assert format_span(timedelta(days=3, hours=4)) == "3d04h"
    target = parse_broker_url("mqtts://actor:p%40ss@edge:8884")
    assert (target.host, target.port, target.username, target.password, target.tls) == (
        "edge",
        8884,
        "actor",
        "p@ss",
        True,
    )
    assert "p@ss" not in target.describe()
    with pytest.raises(ValueError, match="scheme"):
        parse_broker_url("http://edge")


# --- Against a real broker ----------------------------------------------------------


async def publish_retained(broker: Broker, messages: dict[str, bytes]) -> None:
    async with aiomqtt.Client(**broker.client_kwargs("bridge")) as client:
        for topic, payload in messages.items():
            await client.publish(topic, payload, qos=1, retain=True)


def watch_once(broker: Broker, *extra: str, user: str = "actor", **kwargs: Any) -> Any:
    return subprocess.run(
        [
            *dispatch_bridge_command(),
            "watch",
            "--broker",
            broker.url(user),
            "--microgrid-id",
            "1",
            "--once",
            "--width",
            "80",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


async def test_watch_once_prints_what_the_retained_topics_say(mqtt_broker: Broker) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    running = make_dispatch(11, now - timedelta(minutes=1), 600, until=now + timedelta(minutes=9))
    later = make_dispatch(12, now + timedelta(minutes=20), 300)
    snapshot = wire.RunningSnapshot(
        microgrid_id=1,
        type="EXAMPLE_TYPE",
        running=(running,),
        next_change=running.until,
        as_of=now,
        session=4,
        seq=1,
    )
    status = wire.BridgeStatus(
        state="online",
        upstream="connected",
        synced_at=now,
        session=4,
        bridge="edge-test",
        version="0.1.0",
        dispatches=2,
    )
    await publish_retained(
        mqtt_broker,
        {
            LAYOUT.status: wire.encode(status),
            LAYOUT.running("EXAMPLE_TYPE"): wire.encode(snapshot),
            LAYOUT.dispatch("EXAMPLE_TYPE", 11): wire.encode(running),
            LAYOUT.dispatch("EXAMPLE_TYPE", 12): wire.encode(later),
            LAYOUT.root + "/GARBAGE/running": b"\x00not json",
            # Another microgrid's tree is not shown.
            "microgrid/2/dispatch/status": wire.encode(status),
        },
    )

    result = watch_once(mqtt_broker)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "bridge ONLINE" in out and "session 4" in out
    assert f"next change {running.until:%H:%M:%S}Z" in out
    assert re.search(rf"RUN #11 until {running.until:%H:%M:%S}Z, (9m00s|8m5\ds) left", out)
    assert re.search(r"^ *#11 \|#", out, re.MULTILINE)
    assert re.search(r"^ *#12 \|\.{8}", out, re.MULTILINE)
    assert "! microgrid/1/dispatch/GARBAGE/running: invalid running snapshot" in out
    assert all(len(line) <= 80 for line in out.splitlines())
    # A status without `tree_counts` (an older bridge) cannot tell a whole tree.
    assert "retained tree: completeness unknown (the bridge's status does not count" in out


def test_watch_once_on_an_empty_tree_says_so(mqtt_broker: Broker, tmp_path: Path) -> None:
    # The credentials as the README's field-engineer section gives them: user in
    # MQTT_USERNAME, password in a file, nothing on the command line.
    mqtt_broker.require_acl()
    secret = tmp_path / "actor.password"
    secret.write_text(f"{mqtt_broker.actor_password}\n")
    env = {**os.environ, "MQTT_USERNAME": "actor", "MQTT_PASSWORD_FILE": str(secret)}
    env.pop("MQTT_PASSWORD", None)
    result = subprocess.run(
        [
            *dispatch_bridge_command(),
            "watch",
            "--broker",
            f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}",
            "--microgrid-id",
            "1",
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**env, "COLUMNS": "72"},
    )

    assert result.returncode == 0, result.stderr
    assert all(len(line) <= 72 for line in result.stdout.splitlines())
    assert "bridge: no status published" in result.stdout
    assert "no dispatches published" in result.stdout


def test_watch_once_exits_1_when_the_broker_is_unreachable() -> None:
    port = free_port()
    result = subprocess.run(
        [
            *dispatch_bridge_command(),
            "watch",
            "--broker",
            f"mqtt://actor:secret-pw@127.0.0.1:{port}",
            "--microgrid-id",
            "1",
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert f"cannot connect to the broker mqtt://actor@127.0.0.1:{port}" in result.stderr
    assert "secret-pw" not in result.stderr


def test_watch_once_exits_1_on_wrong_credentials(mqtt_broker: Broker) -> None:
    mqtt_broker.require_acl()
    url = f"mqtt://actor:wrong@{mqtt_broker.host}:{mqtt_broker.port}"
    result = subprocess.run(
        [*dispatch_bridge_command(), "watch", "--broker", url, "--microgrid-id", "1", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "cannot connect" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--microgrid-id", "1"], "no broker"),
        (["--broker", "mqtt://h:1883"], "no microgrid"),
        (["--broker", "http://h", "--microgrid-id", "1"], "invalid broker URL"),
        (["--broker", "mqtt://h", "--microgrid-id", "x"], "invalid microgrid-id"),
    ],
)
def test_watch_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*dispatch_bridge_command(), "watch", "--once", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )

    assert result.returncode == 2
    assert message in result.stderr


async def test_watch_once_against_a_running_bridge_shows_what_is_really_there(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    async with api_server.client() as client:
        running = await create_dispatch(
            client,
            microgrid_id=1,
            type="SET.POWER",
            start_time=now - timedelta(minutes=1),
            duration=timedelta(minutes=10),
            target=TargetIds(3),
        )
        later = await create_dispatch(
            client,
            microgrid_id=1,
            type="SET.POWER",
            start_time=now + timedelta(minutes=30),
            duration=timedelta(minutes=5),
            target=TargetIds(4),
        )
    bridge = bridge_factory(api_server, mqtt_broker)
    bridge.wait_synced()
    layout = bridge.layout()

    def published() -> wire.RunningSnapshot | None:
        retained = retained_snapshot(mqtt_broker, layout.everything)
        raw = retained.get(layout.running("SET.POWER"))
        have_both = all(
            layout.dispatch("SET.POWER", int(d.id)) in retained for d in (running, later)
        )
        return wire.decode_running(raw) if raw and have_both else None

    snapshot = wait_until(published, 20, "the bridge to publish both dispatches")

    result = watch_once(mqtt_broker)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert [d.id for d in snapshot.running] == [int(running.id)]
    until = snapshot.running[0].until
    assert until is not None and snapshot.next_change == until
    assert f"SET.POWER: 1 running, next change {until:%H:%M:%S}Z" in out
    assert f"RUN #{int(running.id)} until {until:%H:%M:%S}Z" in out
    # The later one has a bar that starts idle; the running one starts running.
    assert re.search(rf"^ *#{int(running.id)} \|#", out, re.MULTILINE)
    assert re.search(rf"^ *#{int(later.id)} \|\.+[+#]", out, re.MULTILINE)
    assert "bridge ONLINE, upstream connected" in out
    assert "retained tree: complete, the 2 dispatch topics the bridge counts" in out


def test_a_dispatch_the_schedule_cannot_place_is_flagged_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(dispatch: wire.Dispatch, now: datetime) -> Any:
        raise OverflowError("date value out of range")

    monkeypatch.setattr("bridge.schedule.run_state", broken)

    lines = render(sample_state(), now=NOW, width=80)

    assert "  ! #4: its schedule cannot be computed" in lines
    assert "RUN #1 until 07:13:20Z, 10m00s left, ids 7,8" in "\n".join(lines)


@pytest.mark.parametrize(
    ("url", "environ", "expected"),
    [
        ("mqtt://actor:pw@h:1", {}, ("actor", "pw")),
        ("mqtt://actor@h:1", {"MQTT_PASSWORD": "env-pw"}, ("actor", "env-pw")),
        ("mqtt://h:1", {"MQTT_USERNAME": "u", "MQTT_PASSWORD": "p"}, ("u", "p")),
        # The URL's credentials win over the environment's.
        ("mqtt://a:b@h:1", {"MQTT_USERNAME": "u", "MQTT_PASSWORD": "p"}, ("a", "b")),
    ],
)
def test_watch_credentials_from_url_or_environment(
    url: str, environ: dict[str, str], expected: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MQTT_URL", "MQTT_USERNAME", "MQTT_PASSWORD", "MQTT_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["watch", "--broker", url, "--microgrid-id", "1"])

    settings = load_settings(args)

    assert (settings.target.username, settings.target.password) == expected
