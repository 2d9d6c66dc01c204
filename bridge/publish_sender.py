"""Sends what the publish queue hands out, on one connection at a time.

Two ways out, both QoS 1 with each acknowledgement awaited:

- a window of workers (`start`): each takes the next item (`PublishQueue.take`:
  urgent ones first), publishes it and waits for its acknowledgement, so that at
  most `window` of them are in flight; a worker is woken per item waiting (`wake`);
- a running snapshot is written to the socket in the call that set it
  (`send_ahead`): the scheduled starts and stops of an instant then reach the
  broker while the schedule loop is still in its step, instead of one worker's
  turn of the event loop each after it (30 snapshots at one instant went out
  over 1.4-16 ms, the first 1.3 ms after the instant; docs/benchmarks.md, "The
  running snapshots of an instant, written in the step"). They are few (one per
  type changed) and bypass the window.

A publish not acknowledged when the connection ends goes again first on the next
one (`PublishQueue.failed`), unless a newer state of its topic waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

from actor_sdk import mqtt, wire
from bridge.publish_queue import Outgoing, PublishQueue

__all__ = ["Sender"]

_logger = logging.getLogger("bridge.publisher")


class Sender:
    """The sending side of one microgrid's publisher."""

    def __init__(
        self,
        queue: PublishQueue,
        *,
        window: int,
        on_taken: Callable[[Outgoing], None],
        on_acknowledged: Callable[[Outgoing], None],
    ) -> None:
        """Create a sender with no connection yet.

        Args:
            queue: What to send.
            window: The most publishes the workers keep in flight at once.
            on_taken: Called with each item just before it is published.
            on_acknowledged: Called with each item the broker acknowledged.
        """
        self.queue = queue
        self._window = window
        self._on_taken = on_taken
        self._on_acknowledged = on_acknowledged
        self._sleepers: collections.deque[asyncio.Future[None]] = collections.deque()
        """The idle workers, each waiting for its future: woken one per publish waiting."""
        self._woken = 0
        """Workers woken that have not run yet: each will take a publish."""
        self._acks: mqtt.AckedPublishes | None = None
        """The live connection's publishes (None between connections)."""
        self._ahead: dict[asyncio.Future[None], Outgoing] = {}
        """Published ahead of the workers, awaiting the acknowledgement."""
        self.idle = asyncio.Event()
        """Set while nothing waits and nothing is in flight."""
        self.idle.set()

    def start(self, acks: mqtt.AckedPublishes) -> list[asyncio.Task[None]]:
        """Send on a connection that is up: start its workers.

        Args:
            acks: The connection's publishes.

        Returns:
            The workers (the caller cancels them when the connection ends, then `stop`s).
        """
        self._acks = acks
        return [asyncio.create_task(self._worker(acks)) for _ in range(self._window)]

    def stop(self) -> None:
        """The connection ended: what was published ahead and not acknowledged goes again."""
        self._acks = None
        written, self._ahead = self._ahead, {}
        for item in reversed(written.values()):  # each goes to the front: keep their order
            self.queue.failed(item)

    def wake(self) -> None:
        """The queue changed: wake a worker per publish waiting."""
        if self.queue.idle:  # e.g. a scan that found nothing stale: no worker to say so
            self.idle.set()
            return
        self.idle.clear()
        # One worker per publish waiting, not all 100: each wake-up is a task step, and
        # a change's first byte went out only after every worker had run (1-2 ms).
        while self._sleepers and self._woken < self.queue.waiting:
            bell = self._sleepers.popleft()
            if not bell.done():  # a cancelled worker's, not yet taken out
                bell.set_result(None)
                self._woken += 1

    def send_ahead(self, topic: str) -> None:
        """Write a waiting running snapshot to the socket now, ahead of the workers.

        Between connections it waits in the queue (urgent) for the workers.

        Args:
            topic: Its topic.
        """
        acks = self._acks
        if acks is None:
            return
        item = self.queue.take_waiting(topic)
        if item is None:
            return
        self._on_taken(item)
        try:
            future = acks.publish(item.topic, item.payload, retain=item.retain, at_once=True)
        except mqtt.MqttError as error:  # the connection is going: the next one sends it
            _logger.debug("running snapshot %s not written (%s): sent again", topic, error)
            self.queue.failed(item)
            return
        self._ahead[future] = item
        future.add_done_callback(self._acknowledged_ahead)

    def _acknowledged_ahead(self, future: asyncio.Future[None]) -> None:
        item = self._ahead.pop(future, None)
        if item is not None and not future.cancelled():  # None: its connection ended first
            self._acknowledged(item)

    def _acknowledged(self, item: Outgoing) -> None:
        self.queue.sent(item)
        self._on_acknowledged(item)
        if self.queue.idle:
            self.idle.set()

    async def _take(self) -> Outgoing:
        while (item := self.queue.take()) is None:
            if self.queue.idle:
                self.idle.set()
            bell = asyncio.get_running_loop().create_future()
            self._sleepers.append(bell)
            try:
                await bell
            except asyncio.CancelledError:
                if bell.cancelled():
                    with contextlib.suppress(ValueError):
                        self._sleepers.remove(bell)
                else:  # woken, then cancelled before it ran
                    self._woken -= 1
                raise
            self._woken -= 1
        return item

    async def _worker(self, acks: mqtt.AckedPublishes) -> None:
        while True:
            item = await self._take()
            self._on_taken(item)
            try:
                # A running snapshot (what starts and stops actors) is written at once,
                # not after the encoding of the other publishes of its turn.
                at_once = isinstance(item.value, wire.RunningSnapshot)
                await acks.publish(item.topic, item.payload, retain=item.retain, at_once=at_once)
            except BaseException:
                # Not sent (or not confirmed): send it again first, unless a newer
                # state of the same topic is already waiting.
                self.queue.failed(item)
                raise
            self._acknowledged(item)
