"""The `Dispatcher`'s timer: sleeps until the reconciler's next deadline, then reconciles.

At a deadline it reconciles the types that are due (`Reconciler.run_due`); when asked
(`request`), every type.

A deadline is a run's `until`, the end of the view's liveness, an endless run's
blind time or a factory retry. Messages wake the timer when they move the
deadline (`wake`); a failed start asks for a reconcile from outside the
reconcile path (`request`).

A deadline slept towards and reached more than `STALL_WORTH_LOGGING_S` late is
logged: a start or stop that late means the event loop was blocked (`_watchdog.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from actor_sdk._watchdog import BLOCKING_ADVICE, STALL_WORTH_LOGGING_S

__all__ = ["ReconcileTimer"]

_logger = logging.getLogger(__name__)

_NO_SPIN_PAUSE_S = 0.05
"""How long a deadline that a reconcile did not move waits before the next try."""


class ReconcileTimer:
    """Calls `reconcile` at each deadline, and when asked to."""

    def __init__(
        self,
        deadline: Callable[[], datetime | None],
        reconcile: Callable[[], Awaitable[None]],
        reconcile_due: Callable[[], Awaitable[None]],
        clock: Callable[[], datetime],
    ) -> None:
        """Create a timer.

        Args:
            deadline: The next deadline (None: none).
            reconcile: What to run when asked (`request`).
            reconcile_due: What to run at a deadline (it may move the deadline).
            clock: The wall clock (UTC).
        """
        self._deadline = deadline
        self._reconcile = reconcile
        self._reconcile_due = reconcile_due
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._requested = False

    def wake(self) -> None:
        """The deadline may have moved: look at it again."""
        self._wakeup.set()

    def request(self) -> None:
        """Reconcile soon, from the timer's task."""
        self._requested = True
        self._wakeup.set()

    async def run(self) -> None:
        """Run until cancelled."""
        loop = asyncio.get_running_loop()
        slept_towards: datetime | None = None
        wake_at = 0.0  # when the sleep towards `slept_towards` ended, on the loop's clock
        while True:
            self._wakeup.clear()
            if self._requested:
                self._requested = False
                await self._reconcile()
                continue
            deadline = self._deadline()
            if deadline is None:
                await self._wakeup.wait()
                continue
            now = self._clock()
            delay = (deadline - now).total_seconds()
            if delay > 0:
                # The event loop's clock is not the wall clock: a wake-up before the
                # deadline on the wall clock sleeps again for the rest.
                slept_towards, wake_at = deadline, loop.time() + delay
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                continue
            if (
                deadline == slept_towards
                and (late := loop.time() - wake_at) > STALL_WORTH_LOGGING_S
            ):
                _logger.warning(
                    "the timer's deadline at %s (a run's start or end, a check of the "
                    "bridge's liveness or a retry) was handled %.2f s late: the event loop "
                    "was blocked (%s)",
                    deadline.isoformat(),
                    late,
                    BLOCKING_ADVICE,
                )
            slept_towards = None
            await self._reconcile_due()
            deadline = self._deadline()
            if deadline is not None and deadline <= self._clock():
                _logger.debug("deadline %s did not move; pausing", deadline)
                await asyncio.sleep(_NO_SPIN_PAUSE_S)
