"""The test helpers themselves: processes always stop, waits fail clearly."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from testkit import broker as broker_module
from testkit.broker import HOW_TO_GET_A_BROKER, Broker
from testkit.processes import (
    ManagedProcess,
    ProcessExitedError,
    ProcessFactory,
    free_port,
    port_accepts,
    wait_for_port,
    wait_until,
)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_free_port_is_bindable_and_closed() -> None:
    port = free_port()
    assert not port_accepts("127.0.0.1", port, 0.2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_output_is_captured_to_a_file_and_greppable(tmp_path: Path) -> None:
    proc = ManagedProcess(
        [sys.executable, "-c", "print('ready on', 1234); import time; time.sleep(30)"],
        name="talker",
        log_path=tmp_path / "talker.log",
    ).start()
    try:
        match = proc.wait_for_output(r"ready on (\d+)", timeout=10)
        assert match.group(1) == "1234"
        assert "ready on 1234" in (tmp_path / "talker.log").read_text()
    finally:
        proc.stop()
    assert not proc.running


def test_stop_kills_a_process_group_that_ignores_sigterm(tmp_path: Path) -> None:
    # The parent ignores SIGTERM and has a child that ignores it too.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = ManagedProcess(
        [sys.executable, "-c", script], name="stubborn", log_path=tmp_path / "s.log"
    ).start()
    child_pid = int(proc.wait_for_output(r"child (\d+)").group(1))

    started = time.monotonic()
    code = proc.stop(timeout=1)

    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 5
    wait_until(lambda: not pid_alive(child_pid), 5, "the grandchild to die")


def test_kill9_then_start_appends_to_the_same_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        # The marker is built at run time: the log's header line holds the command.
        [sys.executable, "-c", "print('U' + 'P', flush=True); import time; time.sleep(30)"],
        name="again",
        log_path=tmp_path / "a.log",
    )
    proc.start()
    proc.wait_for_output("(?m)^UP$")
    assert proc.kill9() == -signal.SIGKILL
    proc.start()
    wait_until(lambda: proc.output().count("\nUP\n") == 2, 10, "the second start's output")
    proc.stop()
    assert proc.starts == 2


def test_wait_for_port_reports_a_dead_process_at_once(tmp_path: Path) -> None:
    proc = ManagedProcess(
        [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"],
        name="dies",
        log_path=tmp_path / "d.log",
    ).start()
    started = time.monotonic()
    with pytest.raises(ProcessExitedError, match=r"(?s)dies exited with code 3.*bad config"):
        wait_for_port("127.0.0.1", free_port(), timeout=30, process=proc)
    assert time.monotonic() - started < 10


def test_a_wait_on_what_a_process_does_ends_when_it_exits(tmp_path: Path) -> None:
    proc = ManagedProcess(
        [sys.executable, "-c", "import sys; print('half done'); sys.exit(4)"],
        name="quitter",
        log_path=tmp_path / "q.log",
    ).start()
    done = proc.alive_and(lambda: "all done" in proc.output())
    with pytest.raises(ProcessExitedError, match=r"(?s)quitter exited with code 4.*half done"):
        wait_until(done, timeout=30, what="all done")
    alive = ManagedProcess(
        [sys.executable, "-c", "print('all done', flush=True); import time; time.sleep(60)"],
        name="worker",
        log_path=tmp_path / "w.log",
    ).start()
    try:
        assert wait_until(alive.alive_and(lambda: "all done" in alive.output()), 30, "all done")
    finally:
        alive.stop()


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match=r"the moon.*last: 0"):
        wait_until(lambda: 0, timeout=0.1, what="the moon")
    assert wait_until(lambda: "value", 1, "a value") == "value"


def test_process_factory_stops_everything_and_names_uniquely(tmp_path: Path) -> None:
    factory = ProcessFactory(tmp_path)
    sleepers = [factory([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    assert len({p.name for p in sleepers}) == 3
    factory.stop_all()
    assert not any(p.running for p in sleepers)


def test_no_broker_fails_with_instructions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MQTT_TEST_BROKER", raising=False)
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    monkeypatch.setattr(broker_module, "_docker_available", lambda: False)
    with pytest.raises(broker_module.BrokerUnavailable) as failure:
        broker_module.start_broker(tmp_path)
    assert str(failure.value) == HOW_TO_GET_A_BROKER
    assert "apt-get install mosquitto mosquitto-clients" in HOW_TO_GET_A_BROKER
    assert "MQTT_TEST_BROKER" in HOW_TO_GET_A_BROKER


def test_external_broker_url_gives_its_credentials_to_every_role(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("MQTT_TEST_BROKER", f"mqtt://us%40er:p%3Ass@127.0.0.1:{port}")
        broker = broker_module.start_broker(tmp_path)
    assert broker.kind == "external"
    assert not broker.acl_enforced
    for role in ("bridge", "actor", "admin"):
        assert broker.client_kwargs(role) == {
            "hostname": "127.0.0.1",
            "port": port,
            "username": "us@er",
            "password": "p:ss",
        }
    assert broker.url("bridge") == f"mqtt://us%40er:p%3Ass@127.0.0.1:{port}"
    with pytest.raises(broker_module.BrokerNotControlled):
        broker.kill9()


async def test_password_hashed_in_python_is_accepted_by_mosquitto(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The container path hashes passwords without mosquitto_passwd."""
    binary = broker_module.find_mosquitto()
    if binary is None:
        pytest.skip("needs the mosquitto binary")

    def python_hashes(path: Path, users: dict[str, str]) -> None:
        path.write_text(
            "".join(f"{u}:{broker_module.hash_password(p)}\n" for u, p in users.items())
        )

    monkeypatch.setattr(broker_module, "write_password_file", python_hashes)
    broker = broker_module._start_mosquitto(binary, tmp_path)
    try:
        assert "$7$101$" in (tmp_path / "passwd").read_text()
        async with aiomqtt.Client(**broker.client_kwargs("bridge")) as client:
            await client.publish("microgrid/1/dispatch/status", b"ok", qos=1)
    finally:
        broker.close()


def test_session_broker_serves_many_tests(mqtt_broker_session: Broker) -> None:
    assert port_accepts(mqtt_broker_session.host, mqtt_broker_session.port)
    assert mqtt_broker_session.url("actor").startswith("mqtt://actor:")


def test_wait_for_output_does_not_match_the_command_line_itself(tmp_path: Path) -> None:
    proc = ManagedProcess(
        [sys.executable, "-c", "import time; time.sleep(30)  # LISTENING"],
        name="quiet",
        log_path=tmp_path / "q.log",
    ).start()
    try:
        with pytest.raises(TimeoutError):
            proc.wait_for_output("LISTENING", timeout=0.3)
    finally:
        proc.stop()
