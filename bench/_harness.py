"""Shared start-up for the benchmarks: Mosquitto, the API server, bridges, taps.

Benchmarks run alone (`python bench/latency.py`), without pytest, so this module
carries its own small process helpers (the ideas of `tests/fixtures/processes.py`):
every process runs in its own process group with its output in a log file under a
temp dir, and `Stack.close()` (or leaving `with Stack() as stack:`) stops all of
them, SIGTERM then SIGKILL.

* `Stack.start_mosquitto()`: the repo's `mosquitto.conf` adapted to the temp dir
  (loopback listener on a free port, persistence, password file with the users
  `bridge`, `actor` and `admin`, the shipped ACL plus `admin` on `#`).
* `Stack.start_api()`: `dispatch-bridge api` with a key and signing secret and
  past start times allowed; `testkit.populate.populate()` fills its SQLite file in bulk first.
* `Stack.start_bridge(...)`: `dispatch-bridge run` against both;
  `Stack.start_pipeline(...)` starts all three and waits until the bridge synced.
* `Stack.start_tap(...)`: a `mosquitto_sub` recording what it receives, read back
  by `tap_messages()` or, as it grows, `TapLog`.
* Waiting (`wait_until`, `async_wait_until`), `progress()` lines and dispatch
  times (`utcnow`, `next_second`).

The printed results (`Table`, `percentile`, `fmt`, `markdown_table`,
`print_profile`, `command_line`) live in `bench/_table.py`; the recording actors
(`Recorder`, `retry_until_seen`, `stop_reference`) in `bench/_recorder.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

T = TypeVar("T")

API_KEY = "bench-key"
API_SECRET = "bench-secret"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
_REPLACED = re.compile(
    r"^\s*(listener|port|bind_address|persistence_location|persistence_file|password_file"
    r"|acl_file|log_dest|pid_file|user|certfile|keyfile|cafile|capath|tls_version"
    r"|require_certificate|protocol|http_dir)\b"
)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_T0 = time.monotonic()


def progress(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `predicate` every 10 ms until truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(
    predicate: Callable[[], T | None],
    timeout: float,  # noqa: ASYNC109 - a deadline, not a cancel scope
    what: str,
    interval: float = 0.005,
) -> T:
    """Async `wait_until`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def dispatch_bridge() -> list[str]:
    """The `dispatch-bridge` command of this virtual environment."""
    script = Path(sys.executable).parent / "dispatch-bridge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bridge.cli"]


class Proc:
    """A subprocess in its own process group, output to a log file."""

    def __init__(
        self, args: Sequence[str], name: str, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.args = list(args)
        self.name = name
        self.log = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None
        self._file: IO[bytes] | None = None

    def start(self) -> Proc:
        """Start (again); output is appended to the log."""
        self._file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.popen is not None
        return self.popen.pid

    @property
    def running(self) -> bool:
        """Whether it runs."""
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        """Its log so far."""
        try:
            return self.log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def check(self) -> None:
        """Raise with the log tail when the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-3000:]}"
            )

    def wait_output(self, pattern: str, timeout: float = 20.0, count: int = 1) -> str:
        """Wait until `pattern` matched `count` times in the log; return the last match."""
        regex = re.compile(pattern)

        def probe() -> str | None:
            found = regex.findall(self.output())
            if len(found) >= count:
                last = found[-1]
                return str(last) if last else pattern
            self.check()
            return None

        return wait_until(probe, timeout, f"{self.name} to log /{pattern}/ x{count}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL after `timeout`."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self._file is not None:
            self._file.close()
            self._file = None

    def rss(self) -> int:
        """Resident set size in bytes (0 when not running)."""
        import psutil  # noqa: PLC0415 - only benches that measure memory need it

        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds so far."""
        import psutil  # noqa: PLC0415

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


@dataclass
class Mosquitto:
    """A Mosquitto on loopback with the repo's config."""

    proc: Proc
    port: int
    passwords: dict[str, str]

    def url(self, user: str | None = "admin") -> str:
        """`mqtt://user:pass@127.0.0.1:port`."""
        if user is None:
            return f"mqtt://127.0.0.1:{self.port}"
        return f"mqtt://{user}:{self.passwords[user]}@127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (again, same port and persistence) and wait until it listens."""
        before = self.proc.output().count(" running")
        self.proc.start()
        self.proc.wait_output(r" running", 15, before + 1)

    def stop(self) -> None:
        """Stop cleanly (it saves its persistence file)."""
        self.proc.stop()

    def restart(self) -> None:
        """Stop, then start."""
        self.stop()
        self.start()

    def sub_args(self, user: str = "admin") -> list[str]:
        """`mosquitto_sub` connection arguments."""
        return ["-h", "127.0.0.1", "-p", str(self.port), "-u", user, "-P", self.passwords[user]]


@dataclass
class ApiServer:
    """`dispatch-bridge api` on a free port."""

    proc: Proc
    db_path: Path
    port: int = 0

    @property
    def url(self) -> str:
        """The client URL."""
        return f"grpc://127.0.0.1:{self.port}?ssl=false"

    def client(self) -> Any:
        """A `DispatchApiClient` with the bench key and secret."""
        from frequenz.client.dispatch import DispatchApiClient  # noqa: PLC0415

        return DispatchApiClient(server_url=self.url, auth_key=API_KEY, sign_secret=API_SECRET)


@dataclass
class Bridge:
    """`dispatch-bridge run`."""

    proc: Proc
    microgrid_ids: tuple[int, ...]
    state_dir: Path

    def wait_connected(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until the bridge logged `count` broker connections per microgrid."""
        self.proc.wait_output(r"connected to MQTT broker", timeout, count * len(self.microgrid_ids))

    def wait_synced(self, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until the bridge logged `count` syncs with the API per microgrid."""
        self.proc.wait_output(r"synced \d+ dispatches", timeout, count * len(self.microgrid_ids))


class Stoppable(Protocol):
    """What `Stack.close()` stops: a `Proc`, or a bench's own helper process."""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it, killing it after `timeout` seconds."""


@dataclass
class Stack:
    """Everything a benchmark started; `close()` stops it all."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-")))
    procs: list[Stoppable] = field(default_factory=list)
    keep: bool = False
    profile_dir: Path | None = None
    """When set, bridges run under cProfile and write `<name>.prof` here on exit."""

    def __enter__(self) -> Stack:
        # A SIGTERM (e.g. a test's timeout) still runs close(): no process outlives us.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process (newest first) and delete the temp dir."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(5)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def proc(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> Proc:
        """A process (not started) whose log goes to the temp dir."""
        proc = Proc(args, name, self.workdir / f"{name}.log", env)
        self.procs.append(proc)
        return proc

    def start_mosquitto(self) -> Mosquitto:
        """Start Mosquitto with the repo's `mosquitto.conf` adapted to the temp dir."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        base = self.workdir / "mosquitto"
        (base / "data").mkdir(parents=True, exist_ok=True)
        passwords = {u: secrets.token_hex(8) for u in ("bridge", "actor", "admin")}
        passwd = base / "passwd"
        passwd.write_text("")
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        for user, password in passwords.items():
            subprocess.run([tool, "-b", str(passwd), user, password], check=True, timeout=10)
        acl = base / "acl"
        shipped = (REPO / "deploy" / "mosquitto" / "acl").read_text()
        acl.write_text(f"{shipped}\nuser admin\ntopic readwrite #\n")
        port = free_port()
        kept = [
            line
            for line in (REPO / "mosquitto.conf").read_text().splitlines()
            if not _REPLACED.match(line)
        ]
        kept += [
            f"persistence_location {base / 'data'}/",
            f"password_file {passwd}",
            f"acl_file {acl}",
            f"log_dest file {base / 'mosquitto.log'}",
            f"listener {port} 127.0.0.1",
        ]
        if os.geteuid() == 0:
            kept.append("user root")
        conf = base / "mosquitto.conf"
        conf.write_text("\n".join(kept) + "\n")
        proc = Proc([binary, "-c", str(conf)], "mosquitto", base / "mosquitto.log")
        self.procs.append(proc)
        broker = Mosquitto(proc, port, passwords)
        broker.start()
        return broker

    def start_tap(self, broker: Mosquitto, *topic_filters: str, name: str = "tap") -> Proc:
        """A live `mosquitto_sub` recording `%U %r %t %p` lines; wait until subscribed.

        A separate C process, so its receive times are not delayed by this
        process's event loop.
        """
        proc = self.proc(
            [
                MOSQUITTO_SUB,
                *broker.sub_args(),
                *(arg for topic_filter in topic_filters for arg in ("-t", topic_filter)),
                "-t",
                "bench/probe",
                "-q",
                "1",
                "-F",
                "%U %r %t %p",
            ],
            name,
        )
        proc.start()
        publish = [MOSQUITTO_PUB, *broker.sub_args(), "-t", "bench/probe", "-m", "probe"]

        def subscribed() -> bool:
            subprocess.run(publish, check=True, timeout=10, capture_output=True)
            time.sleep(0.05)
            proc.check()
            return " bench/probe " in proc.output()

        wait_until(subscribed, 10, f"{name} to subscribe")
        return proc

    def start_api(self, db_path: Path | None = None) -> ApiServer:
        """Start `dispatch-bridge api` (key, secret, past starts allowed)."""
        db = db_path or self.workdir / "api.sqlite3"
        proc = self.proc(
            [
                *dispatch_bridge(),
                "api",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                "--allow-past-start",
            ],
            "api",
            {"DISPATCH_API_AUTH_KEY": API_KEY, "DISPATCH_API_SIGN_SECRET": API_SECRET},
        )
        proc.start()
        port = proc.wait_output(r"listening on 127\.0\.0\.1:(\d+)", 30)
        return ApiServer(proc, db, int(port))

    def start_pipeline(
        self, microgrid_ids: Sequence[int] = (1,)
    ) -> tuple[Mosquitto, ApiServer, Bridge]:
        """Mosquitto, the API server and a bridge of `microgrid_ids`, connected and synced."""
        broker = self.start_mosquitto()
        api = self.start_api()
        bridge = self.start_bridge(api, broker, microgrid_ids)
        bridge.wait_connected()
        bridge.wait_synced()
        return broker, api, bridge

    def start_bridge(
        self,
        api: ApiServer,
        broker: Mosquitto,
        microgrid_ids: Sequence[int] = (1,),
        *,
        name: str = "bridge",
        profile: Path | None = None,
        log_level: str = "INFO",
    ) -> Bridge:
        """Start `dispatch-bridge run`; wait until it is connected to the broker.

        Args:
            api: The API server.
            broker: The broker.
            microgrid_ids: The microgrids served.
            name: The process and bridge name.
            profile: Run under cProfile, writing its stats here on exit.
            log_level: The bridge's log level (INFO logs every transition).
        """
        state = self.workdir / f"{name}-state"
        env = {
            "MICROGRID_ID": ",".join(map(str, microgrid_ids)),
            "DISPATCH_API_URL": api.url,
            "DISPATCH_API_AUTH_KEY": API_KEY,
            "DISPATCH_API_SIGN_SECRET": API_SECRET,
            "MQTT_URL": broker.url(None),
            "MQTT_USERNAME": "bridge",
            "MQTT_PASSWORD": broker.passwords["bridge"],
            "DISPATCH_BRIDGE_STATE_DIR": str(state),
            "DISPATCH_BRIDGE_NAME": name,
            "DISPATCH_BRIDGE_RETRY_MAX": "1",
        }
        command = [*dispatch_bridge(), "--log-level", log_level, "run"]
        if profile is None and self.profile_dir is not None:
            profile = self.profile_dir / f"{name}.prof"
        if profile is not None:
            command = [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(profile),
                "-m",
                "bridge.cli",
                "--log-level",
                log_level,
                "run",
            ]
        proc = self.proc(command, name, env)
        bridge = Bridge(proc, tuple(microgrid_ids), state)
        proc.start()
        return bridge


def tap_messages(proc: Proc) -> list[tuple[float, bool, str, bytes]]:
    """The messages a tap received: (unix time, retained, topic, payload)."""
    found = []
    for line in proc.log.read_bytes().splitlines():
        parts = line.split(b" ", 3)
        if len(parts) < 3 or parts[1] not in (b"0", b"1"):
            continue
        try:
            at = float(parts[0])
        except ValueError:
            continue
        payload = parts[3] if len(parts) == 4 else b""
        found.append((at, parts[1] == b"1", parts[2].decode(), payload))
    return found


class TapLog:
    """Reads a tap's log (`mosquitto_sub -F "%U %r %t %p"`) as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_messages(self) -> list[tuple[float, bool, str, bytes]]:
        """(received at, retained, topic, payload) of each whole line since the last call."""
        with open(self.path, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        messages = []
        for line in data[:end].splitlines():
            parts = line.split(b" ", 3)
            if len(parts) < 3 or parts[1] not in (b"0", b"1"):
                continue  # not a message: the log's header line
            payload = parts[3] if len(parts) == 4 else b""
            messages.append((float(parts[0]), parts[1] == b"1", parts[2].decode(), payload))
        return messages


# --- dispatches -----------------------------------------------------------------------


def utcnow() -> datetime:
    """Now, UTC."""
    return datetime.now(UTC)


def next_second(after: float) -> datetime:
    """The first whole second at least `after` seconds from now."""
    moment = utcnow() + timedelta(seconds=after)
    return moment.replace(microsecond=0) + timedelta(seconds=1)
