"""Noticing a stalled event loop: a synchronous call that blocks every deadline.

An actor or factory that calls something blocking (a synchronous Modbus read, a
`time.sleep`) holds up the whole event loop: no stop, no start, no message is handled
until it returns, and nothing can interrupt it. Nothing here can prevent that; it is
made visible in two ways:

- the `Dispatcher`'s timer (`_timer.py`) logs each start or stop it ran later than
  `STALL_WORTH_LOGGING_S` after its instant: the harm itself, measured where it is done;
- `watch_event_loop`, a task that sleeps `STALL_TICK_S` and logs how late it woke up,
  catches the stalls between deadlines (a stop message from the bridge handled late).
  It wakes once a second: a stall longer than 1.25 s is always logged, a shorter one
  when it overlaps the wake-up by more than `STALL_WORTH_LOGGING_S`. A tick of 50 ms
  was 85 % of an idle SDK process's CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["BLOCKING_ADVICE", "STALL_TICK_S", "STALL_WORTH_LOGGING_S", "watch_event_loop"]

_logger = logging.getLogger(__name__)

STALL_TICK_S = 1.0
"""How often the watchdog wakes up."""

STALL_WORTH_LOGGING_S = 0.25
"""Lateness of a wake-up (the watchdog's, a start's or a stop's) that is logged."""

BLOCKING_ADVICE = (
    "a synchronous call in an actor, a factory or a callback, or a starved CPU? "
    "make blocking calls in a thread (asyncio.to_thread)"
)
"""What a stall log line advises."""


async def watch_event_loop(
    tick: float = STALL_TICK_S, worth_logging: float = STALL_WORTH_LOGGING_S
) -> None:
    """Log every late wake-up of its own by more than `worth_logging`, forever.

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
                "the event loop was blocked for at least %.2f s: actor starts, stops and "
                "messages from the bridge were held up (%s)",
                late,
                BLOCKING_ADVICE,
            )
