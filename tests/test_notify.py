"""systemd notification: a real AF_UNIX datagram socket stands in for systemd.

The unit tests drive `SystemdNotifier` and `Watchdog` against that socket and a
fake clock; the end-to-end test runs the real bridge with `NOTIFY_SOCKET` and
`WATCHDOG_USEC` set, as systemd would under `Type=notify` and `WatchdogSec=`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actor_sdk import wire
from bridge.notify import SystemdNotifier, Watchdog
from bridge.service import MicrogridService, ScheduleCore, Synced
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, retained_snapshot
from testkit.broker import Broker
from testkit.processes import async_wait_until, wait_until
from tests.test_bridge_service import FakeSink, dispatch


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket, as systemd's notify socket; (path, socket)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield path, sock
    finally:
        sock.close()


def receive(sock: socket.socket, timeout: float = 10.0) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def test_ready_sends_one_datagram_with_ready_and_status(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, sock = notify_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})

    notifier.ready("publishing microgrids 1")

    assert notifier.enabled
    assert receive(sock) == "READY=1\nSTATUS=publishing microgrids 1"


def test_an_abstract_socket_address_starts_with_at() -> None:
    name = f"dispatch-bridge-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})

        notifier.stopping("bye")

        assert receive(sock) == "STOPPING=1\nSTATUS=bye"


def test_without_notify_socket_nothing_is_sent_and_there_is_no_watchdog() -> None:
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "2000000"})

    notifier.ready("up")  # no socket: nothing to do, no error

    assert not notifier.enabled
    assert notifier.watchdog_timeout is None


def test_watchdog_usec_is_for_us_only_when_watchdog_pid_is_ours_or_unset(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, _ = notify_socket
    ours = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    other = {**ours, "WATCHDOG_PID": "1"}

    assert SystemdNotifier.from_environ(ours).watchdog_timeout == 2.0
    assert SystemdNotifier.from_environ(other).watchdog_timeout is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": path}).watchdog_timeout is None


def test_a_missing_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})

    with caplog.at_level(logging.WARNING, logger="bridge.notify"):
        notifier.ready("up")
        notifier.status("still up")

    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pings(sock: socket.socket) -> int:
    """Datagrams waiting on the socket, all of which must be watchdog pings."""
    sock.setblocking(False)
    count = 0
    try:
        while True:
            assert sock.recv(4096) == b"WATCHDOG=1"
            count += 1
    except BlockingIOError:
        return count
    finally:
        sock.setblocking(True)


def test_watchdog_pings_every_half_timeout_while_every_loop_beats(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, sock = notify_socket
    clock = FakeClock()
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    watchdog = Watchdog(notifier, loops=2, clock=clock)
    assert watchdog.interval == 2.0 and watchdog.max_idle == 1.0

    sent = []
    for _ in range(8):  # 8 s, both loops stepping every second
        clock.now += 1.0
        watchdog.beat(0)
        watchdog.beat(1)
        sent.append(pings(sock))

    assert sent == [0, 1, 0, 1, 0, 1, 0, 1]


def test_one_hung_loop_stops_the_pings(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    clock = FakeClock()
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    watchdog = Watchdog(notifier, loops=2, clock=clock)

    for _ in range(2):
        clock.now += 1.0
        watchdog.beat(1)
        watchdog.beat(0)
    assert pings(sock) == 1  # at 2 s, on loop 1's beat; loop 1 has not beaten since
    for _ in range(10):  # loop 1 hangs; loop 0 keeps stepping
        clock.now += 1.0
        watchdog.beat(0)

    assert pings(sock) == 0


async def test_an_idle_schedule_loop_still_steps_for_the_watchdog() -> None:
    """A loop with nothing due for an hour wakes every `max_idle` and calls `on_step`."""
    steps: list[float] = []
    service = MicrogridService(ScheduleCore(5, wire.TopicLayout.for_microgrid(5)), FakeSink())
    service.max_idle = 0.05
    service.on_step = lambda: steps.append(time.monotonic())
    service.put(Synced([dispatch(1, start=datetime.now(UTC) + timedelta(hours=1))]))
    task = asyncio.create_task(service.run())
    try:
        await async_wait_until(lambda: len(steps) >= 5, 10, "five steps of an idle loop")
    finally:
        task.cancel()

    assert service.steps >= 5


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def test_the_real_bridge_notifies_ready_after_its_status_and_pings_the_watchdog(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, sock = notify_socket
    bridge = bridge_factory(
        api_server,
        mqtt_broker,
        extra_env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"},
        start=False,
    )
    bridge.start(wait_online=False)
    layout = bridge.layout()

    ready = receive(sock, 30)

    assert ready.startswith("READY=1\nSTATUS=publishing microgrids 1 to mqtt://"), ready
    # Ready means published: the status is on the broker already.
    assert layout.status in retained_snapshot(mqtt_broker, layout.status)
    # Then pings, at least every half second (WatchdogSec=1), from the schedule loop.
    started = time.monotonic()
    gaps = []
    for _ in range(4):
        assert receive(sock, 5) == "WATCHDOG=1"
        gaps.append(time.monotonic() - started)
        started = time.monotonic()
    assert max(gaps) < 1.0, gaps

    # A hung process sends nothing: systemd would restart it after WatchdogSec.
    bridge.process.signal(signal.SIGSTOP)
    wait_until(lambda: stopped(bridge.process.pid), 10, "the bridge to be stopped")
    pings(sock)  # what was sent before the stop
    try:
        with pytest.raises(TimeoutError):
            receive(sock, 1.5)
    finally:
        bridge.process.signal(signal.SIGCONT)
    assert receive(sock, 5) == "WATCHDOG=1"

    assert bridge.stop() == 0
    messages = []
    while not any(m.startswith("STOPPING=1") for m in messages):
        messages.append(receive(sock, 5))
