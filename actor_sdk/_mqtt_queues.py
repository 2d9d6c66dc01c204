"""The client's queues of received messages (part of `actor_sdk.mqtt`, re-exported there)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from datetime import UTC, datetime

import aiomqtt

__all__ = ["ReceivedQueue", "handing_queue", "utc_now"]


def handing_queue(
    hand: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """Return a `queue_type` that hands each message to `hand` as it arrives, queueing none.

    Much cheaper than aiomqtt's message iterator (a task per message) when a
    tree of 100,000 retained topics arrives; the client's message iterator then
    only shows when the connection is lost.

    Args:
        hand: Takes each message (called from the client's read, must not block).

    Returns:
        The queue type.
    """

    class _Handing(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            hand(item)

    return _Handing


def utc_now() -> datetime:
    """Return now, in UTC."""
    return datetime.now(UTC)


class ReceivedQueue(asyncio.Queue[aiomqtt.Message]):
    """A queue of received messages noting when each one arrived.

    Under load a message can wait in the queue for seconds before it is handled:
    comparing its `as_of` with the clock at handling time would look like skew.
    """

    def __init__(self, maxsize: int = 0, *, clock: Callable[[], datetime] = utc_now) -> None:
        """Create an empty queue.

        Args:
            maxsize: The most messages held; 0 for no limit.
            clock: The wall clock that stamps each message as it is put.
        """
        super().__init__(maxsize)
        self._clock = clock
        self.last_arrival: float | None = None
        """The event loop's time when the latest message arrived; None before the first."""
        self._arrivals: weakref.WeakKeyDictionary[aiomqtt.Message, datetime] = (
            weakref.WeakKeyDictionary()
        )

    def _put(self, item: aiomqtt.Message) -> None:
        # The hook every put goes through (as in `asyncio.PriorityQueue`).
        self._arrivals[item] = self._clock()
        self.last_arrival = asyncio.get_running_loop().time()
        super()._put(item)

    def received_at(self, message: aiomqtt.Message) -> datetime | None:
        """Return when a message was put into this queue.

        Args:
            message: A message taken from this queue.

        Returns:
            The wall-clock time it arrived; None for a message this queue never held.
        """
        return self._arrivals.get(message)
