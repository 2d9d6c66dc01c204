"""Fan-out of dispatch changes to the open streams of each microgrid.

Every change is offered to every subscription of its microgrid without
waiting: each subscription has its own bounded queue, so a slow client holds
up no one. A subscription whose queue overflows is dropped (its stream is
ended with an error telling the client to reconnect and list again), because
a stream that silently missed a change would be worse than no stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from frequenz.api.dispatch.v1 import dispatch_pb2 as pb

__all__ = ["DEFAULT_QUEUE_SIZE", "Closing", "Overflowed", "StreamHub", "Subscription"]

DEFAULT_QUEUE_SIZE = 1000
"""How many changes a stream may lag behind before it is dropped."""


class Overflowed:
    """Marker put into a queue that overflowed: the stream must end."""


class Closing:
    """Marker put into every queue when the server shuts down."""


_OVERFLOWED = Overflowed()
_CLOSING = Closing()


@dataclass(eq=False)
class Subscription:
    """One open stream's queue of changes."""

    microgrid_id: int
    queue: asyncio.Queue[pb.StreamMicrogridDispatchesResponse | Overflowed | Closing]
    dropped: bool = False


@dataclass
class StreamHub:
    """The open streams, by microgrid."""

    queue_size: int = DEFAULT_QUEUE_SIZE
    _subscriptions: dict[int, set[Subscription]] = field(default_factory=dict)

    def subscribe(self, microgrid_id: int) -> Subscription:
        """Open a subscription to the changes of one microgrid.

        Args:
            microgrid_id: The microgrid.

        Returns:
            The subscription; call `unsubscribe` when the stream ends.
        """
        # One extra slot, so the overflow marker always fits.
        subscription = Subscription(microgrid_id, asyncio.Queue(self.queue_size + 1))
        self._subscriptions.setdefault(microgrid_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Close a subscription (idempotent).

        Args:
            subscription: The subscription.
        """
        subscriptions = self._subscriptions.get(subscription.microgrid_id)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._subscriptions[subscription.microgrid_id]

    def publish(self, microgrid_id: int, event: int, dispatch: pb.Dispatch) -> int:
        """Offer one change to every subscription of its microgrid, without waiting.

        Args:
            microgrid_id: The microgrid.
            event: The `Event` value (created, updated, deleted).
            dispatch: The dispatch after the change (before it, for a deletion).

        Returns:
            How many subscriptions were dropped because they fell behind.
        """
        subscriptions = self._subscriptions.get(microgrid_id)
        if not subscriptions:
            return 0
        response = pb.StreamMicrogridDispatchesResponse(dispatch=dispatch, event=event)  # type: ignore[arg-type]
        dropped = 0
        for subscription in list(subscriptions):
            if subscription.queue.qsize() >= self.queue_size:
                subscription.dropped = True
                subscription.queue.put_nowait(_OVERFLOWED)
                self.unsubscribe(subscription)
                dropped += 1
            else:
                subscription.queue.put_nowait(response)
        return dropped

    def close(self) -> None:
        """End every open subscription: the server is shutting down."""
        for subscription in list(self):
            self.unsubscribe(subscription)
            # A full queue is dropped anyway when the server stops.
            with contextlib.suppress(asyncio.QueueFull):
                subscription.queue.put_nowait(_CLOSING)

    def __iter__(self) -> Iterator[Subscription]:
        """Iterate over all open subscriptions.

        Yields:
            Each subscription.
        """
        for subscriptions in self._subscriptions.values():
            yield from subscriptions

    def count(self, microgrid_id: int | None = None) -> int:
        """Count open subscriptions.

        Args:
            microgrid_id: Only this microgrid's, or all.

        Returns:
            The number.
        """
        if microgrid_id is None:
            return sum(len(s) for s in self._subscriptions.values())
        return len(self._subscriptions.get(microgrid_id, ()))
