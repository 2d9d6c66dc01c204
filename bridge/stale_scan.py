"""The scan of the retained topics a broker holds under a microgrid's tree.

On every connection the publisher subscribes to the tree's dispatch,
running and upcoming topics, then to its own status topic; the broker sends
the retained messages of the first subscription before those of the second,
so once its own (just published) status comes back retained, every retained
topic of the tree has been seen. The publisher then clears what it does not
hold. The tree filters are unsubscribed at the end; the status topic stays
subscribed (`bridge.status_watch` reads it).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from typing import Any

from actor_sdk import mqtt, wire

__all__ = ["RetainedScan", "raise_first", "scan_retained"]

_logger = logging.getLogger("bridge.publisher")


class RetainedScan:
    """Collects the retained topics the broker holds, during the stale-topic scan."""

    def __init__(self, status_topic: str) -> None:
        self.status_topic = status_topic
        self.topics: set[str] = set()
        self.done = asyncio.Event()
        self.received = 0

    def feed(self, message: mqtt.Message) -> None:
        """Take one message of the scan's subscriptions.

        Args:
            message: The message.
        """
        self.received += 1
        topic = message.topic.value
        if topic == self.status_topic:
            # Subscribed after the tree: its retained message (ours, or a newer
            # status of ours already) comes after every retained message of the tree.
            if message.retain:
                self.done.set()
            return
        if message.retain and message.payload:
            self.topics.add(topic)


async def scan_retained(
    client: mqtt.Client,
    scan: RetainedScan,
    layout: wire.TopicLayout,
    *,
    noLocal: bool,
    quiet_timeout: float,
    watched: list[asyncio.Task[Any]],
    stopper: asyncio.Task[Any],
    microgrid_id: int,
) -> builtins.set[str] | None:
    """Collect the retained topics of the tree; the caller feeds `scan` the messages.

    Args:
        client: The connected client.
        scan: Collects what arrives.
        layout: The microgrid's topics.
        noLocal: Subscribe with MQTT v5's no-local option (own publishes are not read back).
        quiet_timeout: Give up when nothing arrived for this many seconds.
        watched: Tasks whose failure ends the scan with their error.
        stopper: Done when the publisher stops (the scan returns None).
        microgrid_id: The microgrid (for the log).

    Returns:
        The retained topics seen, or None when stopped.
    """
    root = layout.root
    filters = [f"{root}/+/dispatches/+", f"{root}/+/running", f"{root}/+/upcoming"]
    if noLocal:
        # Our own republishing runs meanwhile: no need to read it back.
        await mqtt.subscribe_no_local(client, filters, qos=1)
    else:
        await client.subscribe([(topic, 1) for topic in filters])
    # Subscribed second: its retained message comes after all of the first's.
    await client.subscribe(layout.status, qos=1)
    waiter = asyncio.create_task(scan.done.wait())
    try:
        # Give up only when the broker stops sending for `quiet_timeout` s: a large
        # tree takes a while to arrive.
        seen = -1
        while not scan.done.is_set() and scan.received != seen:
            seen = scan.received
            done, _ = await asyncio.wait(
                [waiter, stopper, *watched],
                timeout=quiet_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            raise_first(done - {waiter, stopper})
            if stopper in done:
                return None
    finally:
        waiter.cancel()
    if not scan.done.is_set():
        _logger.warning(
            "microgrid %d: the stale-topic scan got nothing for %.0f s and no end marker; "
            "clearing only the %d stale topics seen",
            microgrid_id,
            quiet_timeout,
            len(scan.topics),
        )
    # The status topic stays subscribed: another bridge's status, or (MQTT
    # 3.1.1) our own not coming back, shows there.
    await client.unsubscribe(filters)
    return scan.topics


def raise_first(done: builtins.set[asyncio.Task[Any]]) -> None:
    """Raise the error of the first failed task among `done`, if any.

    Args:
        done: Finished tasks.
    """
    for task in done:
        error = task.exception()
        if error is not None:
            raise error
