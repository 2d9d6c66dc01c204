"""Unit tests of the SDK's deadline timer (`actor_sdk._timer.ReconcileTimer`) and watchdog.

The event loop here keeps virtual time: when nothing is ready it jumps to its next
timer instead of sleeping, so the instant at which the timer reconciles is exact,
whatever the machine's load. The wall clock the timer is given is derived from the
loop's time, at a rate of our choosing (a wall clock slewed by NTP runs a little
slower or faster than the loop's monotonic clock).
"""

from __future__ import annotations

import asyncio
import logging
import selectors
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actor_sdk._timer import ReconcileTimer
from actor_sdk._watchdog import measure_next_turn, watch_event_loop

EPOCH = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


class _VirtualSelector(selectors.DefaultSelector):
    """Never sleeps: a wait for `timeout` seconds moves the loop's virtual time instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.wakeups = 0
        """Waits that moved the time: the times an idle process would have been woken."""

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        self.wakeups += bool(not events and timeout)
        if not events and timeout:
            self.now += timeout
        return events


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.virtual = _VirtualSelector()
        super().__init__(self.virtual)

    def time(self) -> float:
        return self.virtual.now

    def block(self, seconds: float) -> None:
        """A synchronous call: time passes, nothing else runs."""
        self.virtual.now += seconds


def _run_timer(
    rate: float, deadline_in: timedelta, *, blocked: tuple[float, float] | None = None
) -> tuple[datetime, list[datetime]]:
    """Run a timer with one deadline until its first due reconcile.

    Args:
        rate: Wall-clock seconds per second of the loop's clock.
        deadline_in: The deadline, from the start on the wall clock.
        blocked: When (loop time) a callback blocks the loop, and for how long.

    Returns:
        The deadline and the wall-clock times at which `reconcile_due` was called.
    """
    loop = _VirtualTimeLoop()

    def clock() -> datetime:
        return EPOCH + timedelta(seconds=loop.time() * rate)

    deadline = EPOCH + deadline_in
    calls: list[datetime] = []
    reached = asyncio.Event()

    async def reconcile_due() -> None:
        calls.append(clock())
        if clock() >= deadline:
            reached.set()

    async def never() -> None:
        raise AssertionError("nothing asked for a reconcile")

    async def main() -> None:
        timer = ReconcileTimer(lambda: deadline, never, reconcile_due, clock)
        task = asyncio.create_task(timer.run())
        if blocked is not None:
            loop.call_later(blocked[0], loop.block, blocked[1])
        await asyncio.wait_for(reached.wait(), timeout=10)
        task.cancel()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return deadline, calls


def test_reconciles_at_the_deadline_not_after() -> None:
    """An own-clock start or stop is due at its instant: no margin is added to it."""
    deadline, calls = _run_timer(1.0, timedelta(milliseconds=50))
    assert calls == [deadline]


@pytest.mark.parametrize("rate", [0.97, 0.999])
def test_a_wall_clock_behind_the_loop_never_reconciles_early(rate: float) -> None:
    """Woken before the deadline on its wall clock, the timer sleeps again for the rest."""
    deadline, calls = _run_timer(rate, timedelta(milliseconds=50))
    assert calls, "the deadline never came"
    assert all(call >= deadline for call in calls), calls
    assert calls[0] - deadline < timedelta(milliseconds=1)


def test_a_wall_clock_ahead_of_the_loop_reconciles_once_at_its_deadline() -> None:
    deadline, calls = _run_timer(1.03, timedelta(milliseconds=50))
    assert len(calls) == 1
    assert timedelta(0) <= calls[0] - deadline < timedelta(milliseconds=2)


def test_reconcile_on_request_comes_before_the_deadline() -> None:
    loop = _VirtualTimeLoop()
    order: list[str] = []

    def clock() -> datetime:
        return EPOCH + timedelta(seconds=loop.time())

    async def reconcile() -> None:
        order.append(f"requested at {loop.time():.3f}")

    async def reconcile_due() -> None:
        order.append(f"due at {loop.time():.3f}")

    deadline: Callable[[], datetime] = lambda: EPOCH + timedelta(seconds=1)  # noqa: E731

    async def main() -> None:
        timer = ReconcileTimer(deadline, reconcile, reconcile_due, clock)
        task = asyncio.create_task(timer.run())
        await asyncio.sleep(0.25)
        timer.request()
        await asyncio.sleep(1)
        task.cancel()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert order[:2] == ["requested at 0.250", "due at 1.000"]


def test_a_deadline_handled_late_because_the_loop_was_blocked_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="actor_sdk._timer")
    deadline, calls = _run_timer(1.0, timedelta(milliseconds=50), blocked=(0.02, 0.5))
    assert calls == [deadline + timedelta(seconds=0.47)]
    assert "handled 0.47 s late: the event loop was blocked" in caplog.text


def test_a_deadline_on_time_or_already_past_when_set_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="actor_sdk._timer")
    _run_timer(1.0, timedelta(milliseconds=50), blocked=(0.01, 0.03))  # over before it
    _run_timer(1.0, timedelta(seconds=-2))  # a told start that is due already
    assert caplog.text == ""


def _run_watchdog(
    seconds: float,
    blocked: tuple[float, float] | None = None,
    *,
    actors_present: bool = False,
) -> int:
    """Run the watchdog alone for `seconds` of loop time; return the loop's wake-ups."""
    loop = _VirtualTimeLoop()

    async def main() -> None:
        task = asyncio.create_task(watch_event_loop(lambda: actors_present))
        if blocked is not None:
            loop.call_later(blocked[0], loop.block, blocked[1])
        await asyncio.sleep(seconds)
        task.cancel()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return loop.virtual.wakeups


def test_the_watchdog_wakes_an_idle_process_once_a_second() -> None:
    assert _run_watchdog(60) <= 61


def test_the_watchdog_ticks_every_50_ms_while_actors_share_the_loop() -> None:
    assert _run_watchdog(10, actors_present=True) >= 199


@pytest.mark.parametrize(("actors_present", "stall"), [(False, 1.5), (True, 0.4)])
def test_the_watchdog_logs_a_stall_between_deadlines(
    caplog: pytest.LogCaptureFixture, actors_present: bool, stall: float
) -> None:
    caplog.set_level(logging.WARNING, logger="actor_sdk._watchdog")
    _run_watchdog(5, blocked=(2.5, stall), actors_present=actors_present)
    assert "the event loop was blocked for at least" in caplog.text
    caplog.clear()
    _run_watchdog(5, blocked=(2.5, 0.2), actors_present=actors_present)
    assert caplog.text == ""


def test_the_turn_after_measure_next_turn_is_logged_when_it_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A factory's first step, queued right after the call, runs in the measured turn."""
    caplog.set_level(logging.WARNING, logger="actor_sdk._watchdog")
    loop = _VirtualTimeLoop()

    async def blocking_factory() -> None:
        loop.virtual.now += 0.6  # time.sleep(0.6): nothing else runs meanwhile

    async def main() -> None:
        measure_next_turn()
        await asyncio.create_task(blocking_factory())
        await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert "the event loop was blocked for at least 0.60 s" in caplog.text
