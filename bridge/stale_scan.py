"""The scan of the retained topics a broker holds under a microgrid's tree.

On every connection the publisher reads the tree's dispatch, running and
upcoming topics, then its own status topic, and clears what the broker holds
and it does not. It reads them on a second, short-lived connection (MQTT 3.1.1,
QoS 0: `bridge.publisher`), or on its publishing connection when the broker
refuses a second one (the tree filters are then unsubscribed at the end).

When has every retained topic been seen? Mosquitto sends the retained
messages of the first subscription before those of the second, so its own
(just published) status coming back retained would do; other brokers (NATS)
send a retained catch-up in an order of their own. So the tree is also
checked against itself: each running snapshot of an earlier session counts
its type's dispatch topics and carries their digest (`wire.TypeTally`); the
scan ends when its status came back and, in every type seen, the snapshot
came and the dispatch topics it counts all came. A snapshot of this session
(the broker already holds our republished one) or of a bridge older than the
counts is taken as it comes. Otherwise the scan ends after `quiet_timeout`
seconds without a retained message, and the log says which types were incomplete
(a broker restored from its autosave may hold a snapshot counting a topic it lost).
The limit: a type none of whose topics came before our status is not waited
for (nothing tells the scan it exists); the next connection's scan finds it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from actor_sdk import mqtt, wire

__all__ = ["RetainedScan", "finish_scan", "raise_first", "subscribe_tree", "tree_filters"]

_logger = logging.getLogger("bridge.publisher")


class _Version(msgspec.Struct):
    """What the scan reads of a retained dispatch topic."""

    update_time: datetime


class _Counts(msgspec.Struct):
    """What the scan reads of a retained running snapshot, or of the status."""

    session: int
    dispatches: int | None = None
    digest: str | None = None


_read_version = msgspec.json.Decoder(_Version)
_read_counts = msgspec.json.Decoder(_Counts)


class RetainedScan:
    """Collects the retained topics the broker holds, during the stale-topic scan."""

    def __init__(self, status_topic: str) -> None:
        self.status_topic = status_topic
        self._root = status_topic.rpartition("/")[0]
        self.topics: set[str] = set()
        self.done = asyncio.Event()
        self.received = 0
        """Retained messages received: the broker's catch-up (live ones are not part of it)."""
        self._session: int | None = None
        """Our session, from our status come back retained (the end marker on Mosquitto)."""
        self._tallies: dict[str, wire.TypeTally] = {}
        self._snapshots: dict[str, _Counts] = {}

    def feed(self, message: mqtt.Message) -> None:
        """Take one message of the scan's subscriptions.

        Args:
            message: The message.
        """
        if message.retain:
            self.received += 1
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if topic == self.status_topic:
            if message.retain and payload:
                with contextlib.suppress(msgspec.DecodeError):
                    self._session = _read_counts.decode(payload).session
        elif message.retain and payload:
            self.topics.add(topic)
            self._count(topic, payload)
        if self._session is not None and not self.missing():
            self.done.set()

    def _count(self, topic: str, payload: bytes) -> None:
        level, _, rest = topic.removeprefix(self._root + "/").partition("/")
        kind, _, dispatch_id = rest.partition("/")
        try:
            if kind == "running":
                self._snapshots[level] = _read_counts.decode(payload)
            elif kind == "dispatches" and dispatch_id.isdigit():
                version = _read_version.decode(payload)
                tally = self._tallies.setdefault(level, wire.TypeTally())
                tally.put(int(dispatch_id), version.update_time)
        except msgspec.DecodeError:
            pass  # garbage: cleared if stale, not counted

    def missing(self) -> list[str]:
        """Say what the scan still waits for.

        Returns:
            One line per gap; empty when every retained topic of the tree was seen.
        """
        if self._session is None:
            return ["our status, retained"]
        gaps = [
            f"the running snapshot of {level!r}"
            for level in sorted(set(self._tallies) - set(self._snapshots))
        ]
        for level, counts in sorted(self._snapshots.items()):
            if counts.dispatches is None or counts.session >= self._session:
                continue
            tally = self._tallies.get(level, wire.TypeTally())
            if len(tally) != counts.dispatches or tally.digest != counts.digest:
                gaps.append(f"{level!r}: {len(tally)} of {counts.dispatches} dispatch topics")
        return gaps


async def subscribe_tree(
    client: mqtt.Client, layout: wire.TopicLayout, *, noLocal: bool, qos: int
) -> None:
    """Subscribe to the tree's filters: the broker queues their retained messages at once.

    Publishes made after this returns (on any connection) cannot replace what
    the scan reads: the broker queued it when it acknowledged the subscription.

    Args:
        client: The connected client.
        layout: The microgrid's topics.
        noLocal: Subscribe with MQTT v5's no-local option (own publishes are not read back).
        qos: The subscriptions' QoS.
    """
    filters = tree_filters(layout)
    if noLocal:
        # Our own republishing runs meanwhile: no need to read it back.
        await mqtt.subscribe_no_local(client, filters, qos=qos)
    else:
        await client.subscribe([(topic, qos) for topic in filters])


async def finish_scan(
    client: mqtt.Client,
    scan: RetainedScan,
    layout: wire.TopicLayout,
    *,
    qos: int,
    quiet_timeout: float,
    watched: Sequence[asyncio.Future[Any]],
    stopper: asyncio.Task[Any],
    lost: asyncio.Future[Any] | None,
    microgrid_id: int,
) -> builtins.set[str] | None:
    """Collect the retained topics of the tree (`subscribe_tree` first); the caller feeds `scan`.

    Args:
        client: The client subscribed to the tree.
        scan: Collects what arrives.
        layout: The microgrid's topics.
        qos: The status subscription's QoS.
        quiet_timeout: Give up when no retained message arrived for this many seconds.
        watched: Tasks whose failure ends the scan with their error.
        stopper: Done when the publisher stops (the scan returns None).
        lost: Done when `client`'s connection ends, if it is a reader of its own:
            the scan ends there, with what it saw.
        microgrid_id: The microgrid (for the log).

    Returns:
        The retained topics seen, or None when stopped.
    """
    # Subscribed second: on Mosquitto its retained message comes after all of the
    # first's, and so does its acknowledgement: waited for beside the scan, with no
    # time limit of its own (100k topics take seconds; the quiet timeout is the limit).
    subscribing = asyncio.create_task(client.subscribe(layout.status, qos=qos, timeout=math.inf))
    waiter = asyncio.create_task(scan.done.wait())
    ends = [waiter, stopper, *([lost] if lost is not None else [])]
    ended = f"got no retained message for {quiet_timeout:.0f} s"
    try:
        # Give up only when the broker stops sending retained messages for
        # `quiet_timeout` s: a large tree takes a while to arrive. Live messages (our
        # own status, read back on its topic at every change) say nothing of the
        # catch-up: counting them kept a busy bridge's scan open for good.
        seen = -1
        while not scan.done.is_set() and scan.received != seen:
            seen = scan.received
            checks = [*watched] if subscribing.done() else [*watched, subscribing]
            done, _ = await asyncio.wait(
                [*ends, *checks], timeout=quiet_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            raise_first(done - set(ends))
            if stopper in done:
                return None
            if lost is not None and lost in done:
                ended = "lost the connection reading the tree"
                break
            if subscribing in done:  # acknowledged: the next turn waits for the rest
                seen = -1
    finally:
        waiter.cancel()
        subscribing.cancel()
    if not scan.done.is_set():
        _logger.warning(
            "microgrid %d: the stale-topic scan %s and the retained tree is incomplete "
            "(missing: %s); clearing only the stale topics among the %d seen (the next "
            "connection scans again)",
            microgrid_id,
            ended,
            "; ".join(scan.missing()),
            len(scan.topics),
        )
    return scan.topics


def tree_filters(layout: wire.TopicLayout) -> list[str]:
    """The filters of the retained tree the scan reads (the status topic aside).

    Args:
        layout: The microgrid's topics.

    Returns:
        The topic filters.
    """
    root = layout.root
    return [f"{root}/+/dispatches/+", f"{root}/+/running", f"{root}/+/upcoming"]


def raise_first(done: Iterable[asyncio.Future[Any]]) -> None:
    """Raise the error of the first failed task or future among `done`, if any.

    Args:
        done: Finished tasks or futures.
    """
    for task in done:
        error = task.exception()
        if error is not None:
            raise error
