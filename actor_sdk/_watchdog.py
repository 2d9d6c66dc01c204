"""Noticing a stalled event loop: a synchronous call that blocks every deadline.

An actor or factory that calls something blocking (a synchronous Modbus read, a
`time.sleep`) holds up the whole event loop: no stop, no start, no message is handled
until it returns, and nothing can interrupt it. The watchdog cannot prevent that; it
makes it visible: a task that sleeps a short tick and measures how late it woke up.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["STALL_TICK_S", "STALL_WORTH_LOGGING_S", "watch_event_loop"]

_logger = logging.getLogger(__name__)

STALL_TICK_S = 0.05
"""How often the watchdog wakes up."""

STALL_WORTH_LOGGING_S = 0.25
"""Lateness of the watchdog's wake-up that is logged as a stall."""


async def watch_event_loop(
    tick: float = STALL_TICK_S, worth_logging: float = STALL_WORTH_LOGGING_S
) -> None:
    """Log every stall of the running event loop longer than `worth_logging`, forever.

    Args:
        tick: Seconds between wake-ups.
        worth_logging: Lateness (seconds) of a wake-up that is logged.
    """
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick
        await asyncio.sleep(tick)
        late = loop.time() - due
        if late > worth_logging:
            _logger.warning(
                "the event loop was blocked for %.2f s (a synchronous call in an actor, "
                "a factory or a callback?): actor starts and stops were late by as much; "
                "make blocking calls in a thread (asyncio.to_thread)",
                late,
            )
