"""systemd's service notification protocol, spoken directly (no libsystemd needed).

Under `Type=notify` systemd sets `NOTIFY_SOCKET`, a Unix datagram socket, and
waits for `READY=1` before it counts the service as started; with
`WatchdogSec=` it also sets `WATCHDOG_USEC` and restarts the service when no
`WATCHDOG=1` arrives within that time. Each message is one datagram of
`KEY=value` lines. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

The bridge sends `READY=1` once every microgrid published its status, and
`WATCHDOG=1` from the schedule loops (`Watchdog`): a loop that hangs stops the
pings, and systemd restarts the bridge.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

__all__ = ["ScheduleLoop", "SystemdNotifier", "Watchdog"]

_logger = logging.getLogger("bridge.notify")


class SystemdNotifier:
    """Sends notifications to the socket systemd named in `NOTIFY_SOCKET`."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """Create a notifier.

        Args:
            address: The socket path; `@name` is an abstract socket. None: do nothing.
            watchdog_usec: The watchdog timeout in microseconds, None when off.
        """
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.

        Args:
            environ: The environment (default: this process's).

        Returns:
            The notifier; a disabled one outside systemd.
        """
        env = os.environ if environ is None else environ
        usec: int | None = None
        pid = env.get("WATCHDOG_PID", "")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"]) or None
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self._address is not None

    @property
    def watchdog_timeout(self) -> float | None:
        """The watchdog timeout in seconds (`WatchdogSec=`), None when off."""
        if self._address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 1_000_000

    def send(self, *assignments: str) -> None:
        """Send one notification of `KEY=value` lines, e.g. `send("READY=1", "STATUS=up")`.

        A failure is logged once and otherwise ignored: the bridge's work does
        not depend on systemd hearing from it.

        Args:
            assignments: The lines.
        """
        if self._address is None:
            return
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._address)
        except OSError as error:
            if not self._failed:
                _logger.warning(
                    "cannot notify systemd at %s (%s): readiness and watchdog pings are lost; "
                    "under WatchdogSec= systemd will restart the bridge",
                    self._address.replace("\0", "@"),
                    error,
                )
                self._failed = True

    def ready(self, status: str) -> None:
        """Tell systemd the service is up.

        Args:
            status: A line for `systemctl status`.
        """
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Update the line `systemctl status` shows.

        Args:
            status: The line.
        """
        self.send(f"STATUS={status}")

    async def ready_when(self, published: Iterable[asyncio.Event], status: str) -> None:
        """Send `READY=1` once every event is set (each microgrid published its status).

        Args:
            published: The events, e.g. each publisher's `connected`.
            status: A line for `systemctl status`.
        """
        await asyncio.gather(*(event.wait() for event in published))
        self.ready(status)

    def stopping(self, status: str) -> None:
        """Tell systemd the service is stopping.

        Args:
            status: A line for `systemctl status`.
        """
        self.send("STOPPING=1", f"STATUS={status}")


class ScheduleLoop(Protocol):
    """What the watchdog needs of a schedule loop (`bridge.service.MicrogridService`)."""

    on_step: Callable[[], None] | None
    max_idle: float


class Watchdog:
    """Pings systemd's watchdog only while every schedule loop keeps stepping.

    Each loop calls `beat(loop)` after each step. A ping goes out once every
    loop beat since the last ping and half the timeout has passed, so one hung
    loop among several stops the pings.
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        loops: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a watchdog for `loops` schedule loops.

        Args:
            notifier: Where pings go; without a watchdog timeout `beat` does nothing.
            loops: How many loops must beat between two pings.
            clock: Monotonic seconds.
        """
        self._notifier = notifier
        self._loops = loops
        self._clock = clock
        timeout = notifier.watchdog_timeout
        self.interval = None if timeout is None else timeout / 2
        self._beaten: set[int] = set()
        self._last = clock()

    @property
    def max_idle(self) -> float | None:
        """How long a loop may sleep between steps so the pings keep coming (None: any)."""
        return None if self.interval is None else self.interval / 2

    def watch(self, loop: ScheduleLoop, index: int) -> None:
        """Hook a schedule loop: it beats after each step and sleeps at most `max_idle`.

        Args:
            loop: The loop, before it starts.
            index: Its index, from 0 to `loops - 1`.
        """
        if self.max_idle is None:
            return
        loop.on_step = functools.partial(self.beat, index)
        loop.max_idle = min(loop.max_idle, self.max_idle)

    def beat(self, loop: int) -> None:
        """Record that a loop stepped; ping when every loop did and a ping is due.

        Args:
            loop: The loop's index, from 0 to `loops - 1`.
        """
        if self.interval is None:
            return
        self._beaten.add(loop)
        now = self._clock()
        if len(self._beaten) >= self._loops and now - self._last >= self.interval:
            self._notifier.send("WATCHDOG=1")
            self._last = now
            self._beaten.clear()
