"""`dispatch-bridge demo` as a user runs it: a subprocess, its printed commands pasted.

Once with Mosquitto, once forcing the embedded broker. Each run checks that
the sample dispatches are visible through the printed `mosquitto_sub`
command within seconds, that `watch --once` shows what the running snapshots
say, that the printed `dispatch-cli` command creates a dispatch that appears,
that the printed actor snippet starts an actor, and that SIGINT leaves no
process, no port and no temporary file behind.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from actor_sdk import wire
from bridge.demo import adapt_mosquitto_config, find_mosquitto
from bridge.web import SITE
from testkit.api_server import dispatch_bridge_command
from testkit.broker import Broker
from testkit.processes import ManagedProcess, ProcessFactory, port_accepts, wait_until
from tests.fixtures.browser import start_chromium

SAMPLE_TYPES = {"CHARGE_BATTERY", "HEARTBEAT", "LIMIT_PV", "PEAK_SHAVING"}
LAYOUT = wire.TopicLayout.for_microgrid(1)


def printed_line(output: str, pattern: str) -> str:
    match = re.search(rf"^  ({pattern}.*)$", output, re.MULTILINE)
    assert match, f"no line /{pattern}/ in:\n{output}"
    return match[1]


def script(name: str) -> str:
    """Resolve a console script name the demo printed (it may print a relative path)."""
    if os.sep in name:
        return str(Path(name).resolve())
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    return found


def read_retained(sub_command: list[str], until: Callable[[dict[str, bytes]], bool]) -> Any:
    """Run the printed mosquitto_sub until the retained topics satisfy `until`."""
    topics: dict[str, bytes] = {}

    def probe() -> bool:
        result = subprocess.run(
            [*sub_command, "-W", "2", "-F", "%t\t%p"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        topics.clear()
        for line in result.stdout.splitlines():
            topic, _, payload = line.partition(b"\t")
            topics[topic.decode()] = payload
        return until(topics)

    wait_until(probe, 30, "the retained topics through mosquitto_sub", interval=0.2)
    return topics


def dispatch_topics(topics: dict[str, bytes]) -> dict[int, wire.Dispatch]:
    found = {}
    for topic, payload in topics.items():
        if "/dispatches/" in topic and payload:
            dispatch = wire.decode_dispatch(payload)
            found[dispatch.id] = dispatch
    return found


def process_gone(pid: int) -> bool:
    """No such process, not even a zombie (the demo must have waited for its children)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_runs_everything_and_cleans_up(
    broker: str, process_factory: ProcessFactory, tmp_path: Path
) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (Debian: apt-get install mosquitto-clients)")
    args = [*dispatch_bridge_command(), "demo"]
    if broker == "embedded":
        args.append("--embedded-broker")
    elif find_mosquitto() is None:
        pytest.skip("no mosquitto binary (Debian: apt-get install mosquitto)")
    temp = tmp_path / "tmp"
    temp.mkdir()
    demo = process_factory(args, name=f"demo-{broker}", extra_env={"TMPDIR": str(temp)})

    demo.wait_for_output(r"dispatch-bridge demo is running", timeout=60)
    output = demo.output()
    assert ("embedded (amqtt" in output) == (broker == "embedded")

    # The printed mosquitto_sub shows every sample dispatch, and the snapshots say what runs.
    sub = shlex.split(printed_line(output, "mosquitto_sub "))
    topics = read_retained(
        sub,
        lambda t: (
            len(dispatch_topics(t)) == 5
            and all(LAYOUT.running(kind) in t for kind in SAMPLE_TYPES)
            and LAYOUT.status in t
        ),
    )
    assert {d.type for d in dispatch_topics(topics).values()} == SAMPLE_TYPES
    assert wire.decode_status(topics[LAYOUT.status]).state == "online"
    charge = wire.decode_running(topics[LAYOUT.running("CHARGE_BATTERY")])
    assert [d.id for d in charge.running] == [1]
    peak = wire.decode_running(topics[LAYOUT.running("PEAK_SHAVING")])
    assert [d.id for d in peak.running] == [4]

    check_watch_once(output, charge, peak)
    if broker == "mosquitto":
        check_web_page(output, tmp_path)
    check_dispatch_cli(output, sub)
    check_actor_snippet(output, process_factory, tmp_path)

    # SIGINT: everything stops, nothing is left behind.
    pids = [int(p) for p in re.findall(r"pid (\d+)", output)]
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)]
    demo.signal(signal.SIGINT)
    assert demo.wait(60) == 0, demo.tail()
    assert "demo stopped" in demo.output()
    assert pids, output
    for pid in pids:
        assert process_gone(pid), f"process {pid} is still there"
    for port in set(ports):
        assert not port_accepts("127.0.0.1", port, 0.5), f"port {port} still open"
    assert list(temp.iterdir()) == []


def check_watch_once(output: str, charge: wire.RunningSnapshot, peak: wire.RunningSnapshot) -> None:
    """The printed watch command, with --once: it shows what the snapshots say."""
    watch = shlex.split(printed_line(output, r"\S*dispatch-bridge watch "))
    watch[0] = script(watch[0])
    result = subprocess.run(
        [*watch, "--once", "--width", "100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    now = datetime.now(UTC)
    assert charge.running[0].until is not None
    assert f"RUN #1 until {charge.running[0].until:%H:%M:%S}Z" in result.stdout
    assert f"RUN #4 until {peak.running[0].until:%H:%M:%S}Z" in result.stdout
    assert peak.next_change is not None and peak.next_change > now
    assert f"next change {peak.next_change:%H:%M:%S}Z" in result.stdout
    assert "bridge ONLINE" in result.stdout


def check_web_page(output: str, tmp_path: Path) -> None:
    """The printed page URL, opened in Chromium: the samples show without typing anything."""
    url = printed_line(output, "http://127.0.0.1:")
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        driver.get(url)

        def shown() -> bool:
            running = driver.find_elements(By.CSS_SELECTOR, "#running [data-running-id]")
            state = driver.find_element(By.ID, "bridge-state").get_attribute("data-state")
            ids = {element.get_attribute("data-running-id") for element in running}
            return state == "online" and {"1", "4"} <= ids

        wait_until(shown, 30, "the page to show the bridge online and samples #1 and #4 running")
        assert not driver.find_element(By.ID, "login").is_displayed()
    finally:
        driver.quit()


def check_dispatch_cli(output: str, sub: list[str]) -> None:
    """The printed export and dispatch-cli lines, pasted: the new dispatch is published."""
    exports = printed_line(output, "export ").removeprefix("export ")
    env = dict(os.environ)
    for assignment in shlex.split(exports):
        key, _, value = assignment.partition("=")
        env[key] = value
    create = shlex.split(printed_line(output, r"\S*dispatch-cli create "))
    create[0] = script(create[0])
    result = subprocess.run(
        create, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

    topics = read_retained(sub, lambda t: LAYOUT.dispatch("EXAMPLE_TYPE", 6) in t)
    created = wire.decode_dispatch(topics[LAYOUT.dispatch("EXAMPLE_TYPE", 6)])
    assert created.payload == {"power_w": 3000}
    # dispatch-cli turns "5 minutes" into a time from now and back: 299 or 300 s.
    assert created.duration in (299, 300)
    assert created.target.ids == (7, 8)


def check_actor_snippet(output: str, process_factory: ProcessFactory, tmp_path: Path) -> None:
    """The printed actor, saved and run: PEAK_SHAVING #4 runs now, so the actor starts."""
    lines = output.split("An actor managed from the topics", 1)[1].splitlines()[1:]
    code = "\n".join(
        line.removeprefix("    ") for line in lines if line.startswith("    ") or not line
    )
    (tmp_path / "actor.py").write_text(code)
    actor: ManagedProcess = process_factory(
        [sys.executable, str(tmp_path / "actor.py")], name="actor"
    )
    # Payload numbers cross protobuf's Struct: they come back as floats.
    actor.wait_for_output(r"started with \{'limit_w': 20000(\.0)?\}", timeout=30)
    actor.stop()


def test_mosquitto_config_keeps_the_shipped_settings_and_moves_files(tmp_path: Path) -> None:
    shipped = (Path(__file__).resolve().parents[1] / "mosquitto.conf").read_text()

    text = adapt_mosquitto_config(shipped, port=12345, directory=tmp_path, run_as_root=True)

    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "listener 12345 127.0.0.1" in lines
    assert f"password_file {tmp_path / 'passwd'}" in lines
    assert f"acl_file {tmp_path / 'acl'}" in lines
    assert "user root" in lines
    for kept in ("persistence true", "set_tcp_nodelay true", "max_queued_messages 0"):
        assert kept in lines
    assert "allow_anonymous false" in lines
    assert not any(line.startswith("log_dest syslog") for line in lines)
    assert sum(line.startswith("listener") for line in lines) == 1
    assert not any(line.startswith(("protocol", "http_dir")) for line in lines)


def test_mosquitto_config_gets_the_field_views_websockets_listener(tmp_path: Path) -> None:
    shipped = (Path(__file__).resolve().parents[1] / "mosquitto.conf").read_text()

    text = adapt_mosquitto_config(
        shipped, port=12345, directory=tmp_path, run_as_root=False, web_port=12346
    )

    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    listener = lines.index("listener 12346 127.0.0.1")
    assert lines[listener + 1 : listener + 3] == ["protocol websockets", f"http_dir {SITE}"]
    assert (SITE / "index.html").is_file()
    assert sum(line.startswith("listener") for line in lines) == 2


def test_demo_usage_errors_exit_2() -> None:
    result = subprocess.run(
        [*dispatch_bridge_command(), "demo", "--broker", "http://x", "--embedded-broker"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "exclude each other" in result.stderr


def test_demo_with_an_unusable_broker_exits_1_and_cleans_up(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [
            *dispatch_bridge_command(),
            "demo",
            "--broker",
            "mqtt://bridge:pw@127.0.0.1:1",
            "--startup-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TMPDIR": str(temp)},
    )

    assert result.returncode == 1
    assert "the bridge did not come online" in result.stderr
    assert time.monotonic() - started < 60
    assert list(temp.iterdir()) == []


def test_sigint_while_starting_stops_what_started_and_cleans_up(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    demo = process_factory(
        [*dispatch_bridge_command(), "demo"], name="demo", extra_env={"TMPDIR": str(temp)}
    )
    demo.wait_for_output(r"starting the demo in", timeout=60)

    demo.signal(signal.SIGINT)

    assert demo.wait(60) == 0, demo.tail()
    assert "demo stopped" in demo.output()
    assert list(temp.iterdir()) == []
    # No broker or bridge of this demo is left (their config lived in the temp dir).
    leftovers = subprocess.run(
        ["pgrep", "-f", str(temp)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == []


@pytest.mark.slow
def test_demo_with_an_existing_broker_starts_none_and_publishes_there(
    mqtt_broker: Broker, process_factory: ProcessFactory, tmp_path: Path
) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (Debian: apt-get install mosquitto-clients)")
    demo = process_factory(
        [*dispatch_bridge_command(), "demo", "--broker", mqtt_broker.url("bridge")],
        name="demo-external",
        extra_env={"TMPDIR": str(tmp_path)},
    )
    demo.wait_for_output(r"dispatch-bridge demo is running", timeout=60)
    output = demo.output()
    assert "given by --broker" in output

    sub = shlex.split(printed_line(output, "mosquitto_sub "))
    assert str(mqtt_broker.port) in sub
    topics = read_retained(sub, lambda t: len(dispatch_topics(t)) == 5)
    assert {d.type for d in dispatch_topics(topics).values()} == SAMPLE_TYPES

    demo.signal(signal.SIGINT)
    assert demo.wait(60) == 0, demo.tail()
    # The broker is not the demo's: it still runs, with the bridge's will/offline status.
    assert mqtt_broker.running
    status = read_retained(sub, lambda t: LAYOUT.status in t)[LAYOUT.status]
    assert wire.decode_status(status).state == "offline"
