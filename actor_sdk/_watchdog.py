"""Noticing a stalled event loop: a synchronous call that blocks every deadline.

An actor or factory that calls something blocking (a synchronous Modbus read, a
`time.sleep`) holds up the whole event loop: no stop, no start, no message is handled
until it returns, and nothing can interrupt it. Nothing here can prevent that; it is
made visible, each time with how long the loop was held up:

- `watch_event_loop`, a task that sleeps a tick and logs how late it woke up: every
  `STALL_TICK_S` while actors run, are being created or stopped (their code shares the
  loop), every `IDLE_TICK_S` otherwise. A tick of 50 ms in an idle process was 85 % of
  its CPU (docs/benchmarks.md); at 1 s a stall longer than 1.25 s is always logged, a
  shorter one when it covers the wake-up by more than `STALL_WORTH_LOGGING_S`;
- `measure_next_turn`, called as a factory is set going: the turn of the loop in which
  it first runs is timed, so a blocking factory is logged at once, also in an idle
  process;
- the `Dispatcher`'s timer (`_timer.py`) logs a deadline (a start, a stop) it reached
  more than `STALL_WORTH_LOGGING_S` late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = [
    "BLOCKING_ADVICE",
    "IDLE_TICK_S",
    "STALL_TICK_S",
    "STALL_WORTH_LOGGING_S",
    "measure_next_turn",
    "watch_event_loop",
]

_logger = logging.getLogger(__name__)

STALL_TICK_S = 0.05
"""How often the watchdog wakes up while user code (an actor) shares the loop."""

IDLE_TICK_S = 1.0
"""How often the watchdog wakes up otherwise."""

STALL_WORTH_LOGGING_S = 0.25
"""Lateness of a wake-up (the watchdog's, a start's or a stop's) that is logged."""

BLOCKING_ADVICE = (
    "a synchronous call in an actor, a factory or a callback, or a starved CPU? "
    "make blocking calls in a thread (asyncio.to_thread)"
)
"""What a stall log line advises."""


def _log_stall(late: float) -> None:
    if late > STALL_WORTH_LOGGING_S:
        _logger.warning(
            "the event loop was blocked for at least %.2f s: actor starts, stops and "
            "messages from the bridge were held up (%s)",
            late,
            BLOCKING_ADVICE,
        )


async def watch_event_loop(actors_present: Callable[[], bool]) -> None:
    """Log every late wake-up of its own by more than `STALL_WORTH_LOGGING_S`, forever.

    Args:
        actors_present: Whether actors run, are being created or stopped now.
    """
    loop = asyncio.get_running_loop()
    while True:
        tick = STALL_TICK_S if actors_present() else IDLE_TICK_S
        due = loop.time() + tick
        await asyncio.sleep(tick)
        _log_stall(loop.time() - due)


def measure_next_turn() -> None:
    """Log the next turn of the running loop if it takes longer than `STALL_WORTH_LOGGING_S`.

    The turn is timed from its first callback to the first of the turn after it, so
    work queued now (a factory's task) runs inside it.
    """
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: loop.call_soon(_log_stall_since, loop, loop.time()))


def _log_stall_since(loop: asyncio.AbstractEventLoop, began: float) -> None:
    _log_stall(loop.time() - began)
