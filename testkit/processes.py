"""Subprocesses and loopback ports for tests and benchmarks: start, wait, stop, always clean up.

Every process a test or bench starts goes through `ManagedProcess` (in tests usually
via the `process_factory` fixture): it runs in its own process group, its stdout and
stderr go to one log file (greppable while it runs, printed when a test fails), and
stopping it sends SIGTERM to the group, then SIGKILL when it does not exit in time.
Nothing here imports pytest: `bench/` runs with the `bench` extra alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

_TAIL_CHARS = 6000
"""How much of each process's log a failing test prints."""

_HEADER = re.compile(r"(?m)^===== start #\d+: .*\n")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return whether a TCP connection to `host:port` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ProcessExitedError(RuntimeError):
    """A managed process exited while a test was waiting for it."""


class _Polling:
    """What both wait loops share: the deadline, the last answer, and how a try ends."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self.deadline = time.monotonic() + timeout
        self.last: object = None

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """One call of the predicate: an exception counts as "not yet" and is kept.

        `ProcessExitedError` (a process the predicate watches has died) propagates,
        because waiting longer cannot help.
        """
        try:
            yield
        except ProcessExitedError:
            raise
        except Exception as exc:
            self.last = exc

    def give_up_if_late(self) -> None:
        """Raise `TimeoutError` naming what was awaited once the deadline has passed."""
        if time.monotonic() >= self.deadline:
            raise TimeoutError(
                f"timed out after {self.timeout:.1f} s waiting for {self.what} "
                f"(last: {self.last!r})"
            )


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> T:
    """Poll `predicate` until it returns a truthy value, and return that value.

    Exceptions the predicate raises count as "not yet", except `ProcessExitedError`
    (a process the predicate watches has died), which propagates at once.

    Raises:
        TimeoutError: when `timeout` seconds pass first; the message names `what` and
            the last value (or exception) the predicate gave.
    """
    polling = _Polling(timeout, what)
    while True:
        with polling.attempt():
            value = predicate()
            if value:
                return value
            polling.last = value
        polling.give_up_if_late()
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T | None] | None],
    timeout: float = 10.0,  # noqa: ASYNC109 - mirrors wait_until
    what: str = "condition",
    interval: float = 0.02,
) -> T:
    """Async variant of `wait_until`: the predicate may be sync or async.

    Raises:
        TimeoutError: when `timeout` seconds pass first.
    """
    polling = _Polling(timeout, what)
    while True:
        with polling.attempt():
            result = predicate()
            value = await result if isinstance(result, Awaitable) else result
            if value:
                return value
            polling.last = value
        polling.give_up_if_late()
        await asyncio.sleep(interval)


class ManagedProcess:
    """A subprocess in its own process group, with its output captured to a file."""

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        name: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.name = name
        self.log_path = log_path
        self.cwd = cwd
        base = dict(os.environ if env is None else env)
        base.update(extra_env or {})
        # Unbuffered Python children, so their log is current while the test reads it.
        base.setdefault("PYTHONUNBUFFERED", "1")
        self.env = base
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.starts = 0
        self.started_at: float | None = None
        """The wall-clock time (`time.time()`) of the latest start."""

    def start(self) -> ManagedProcess:
        """Start the process (again, after a stop); its output is appended to the log."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.starts += 1
        self.started_at = time.time()
        self._log_file.write(f"===== start #{self.starts}: {' '.join(self.args)}\n".encode())
        self._log_file.flush()
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code, None while running (negative: killed by that signal)."""
        return None if self.popen is None else self.popen.poll()

    def output(self) -> str:
        """Everything the process wrote so far (all starts), decoded leniently."""
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def program_output(self) -> str:
        """The output without this helper's `===== start #N: command` header lines."""
        return _HEADER.sub("", self.output())

    def tail(self, chars: int = _TAIL_CHARS) -> str:
        """The last `chars` characters of the output."""
        text = self.output()
        return text if len(text) <= chars else "...\n" + text[-chars:]

    def check_alive(self) -> None:
        """Raise `ProcessExitedError` with the output when the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise ProcessExitedError(
                f"{self.name} exited with code {self.popen.returncode}; output:\n{self.tail()}"
            )

    def alive_and(self, condition: Callable[[], T]) -> Callable[[], T]:
        """Return `condition` as a wait predicate that first calls `check_alive`.

        A wait on the process's doings then ends at once with its output when it
        exits, instead of at the timeout.
        """

        def checked() -> T:
            self.check_alive()
            return condition()

        return checked

    def wait_for_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the program's output matches the regular expression `pattern`.

        The header lines this helper writes (they hold the command line) are not
        searched, so a pattern that also appears in the arguments cannot match early.

        Raises:
            ProcessExitedError: the process exited before the output matched.
            TimeoutError: the output did not match in time.
        """
        regex = re.compile(pattern)

        def probe() -> re.Match[str] | None:
            match = regex.search(self.program_output())
            if match is None:
                self.check_alive()
            return match

        try:
            return wait_until(probe, timeout, f"{self.name} to print /{pattern}/")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.name} output:\n{self.tail()}") from None

    def signal(self, signum: int) -> None:
        """Send `signum` to the whole process group (no-op when it already exited)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code.

        Raises:
            subprocess.TimeoutExpired: it did not exit in time.
        """
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process: SIGTERM to its group, SIGKILL after `timeout` seconds.

        Returns:
            The exit code (negative for a signal), None when it was never started.
        """
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        # Children that outlived their parent but kept the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._close_log()
        return self.popen.returncode

    def kill9(self) -> int | None:
        """Kill the process group with SIGKILL (a crash, for fault tests)."""
        if self.popen is None:
            return None
        self.signal(signal.SIGKILL)
        self.popen.wait(5)
        self._close_log()
        return self.popen.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<ManagedProcess {self.name} pid={self.popen and self.popen.pid} {state}>"


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    process: ManagedProcess | None = None,
) -> None:
    """Wait until `host:port` accepts TCP connections.

    Raises:
        ProcessExitedError: `process` exited first (its output is in the message).
        TimeoutError: the port did not open in time.
    """

    def probe() -> bool:
        if process is not None:
            process.check_alive()
        return port_accepts(host, port)

    try:
        wait_until(probe, timeout, f"{host}:{port} to accept connections", interval=0.02)
    except TimeoutError as exc:
        extra = f"\n{process.name} output:\n{process.tail()}" if process else ""
        raise TimeoutError(f"{exc}{extra}") from None


class ProcessFactory:
    """Starts managed processes for one test and stops all of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []

    def __call__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        start: bool = True,
    ) -> ManagedProcess:
        """Create (and by default start) a process whose log goes to `log_dir/<name>.log`."""
        base = name or Path(str(args[0])).name
        unique = base
        taken = {p.name for p in self.processes}
        n = 1
        while unique in taken:
            n += 1
            unique = f"{base}-{n}"
        proc = ManagedProcess(
            args,
            name=unique,
            log_path=self.log_dir / f"{unique}.log",
            env=env,
            extra_env=extra_env,
            cwd=cwd,
        )
        self.processes.append(proc)
        if start:
            proc.start()
        return proc

    def stop_all(self) -> None:
        """Stop every process (in reverse start order); never raises."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop(timeout=5)

    def report(self) -> str:
        """The tail of every process's log, for a failing test."""
        parts = [f"----- {p!r} log {p.log_path}\n{p.tail()}" for p in self.processes]
        return "\n".join(parts)
