"""A receiver that hands out some messages it was given before those of another."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TypeVar

from frequenz.channels import Receiver

__all__ = ["PrimedReceiver"]

_T = TypeVar("_T")


class PrimedReceiver(Receiver[_T]):
    """Yields `initial` first, then whatever `inner` receives."""

    def __init__(self, initial: Iterable[_T], inner: Receiver[_T]) -> None:
        """Wrap a receiver.

        Args:
            initial: The messages to hand out first.
            inner: The receiver to continue with.
        """
        self._initial = deque(initial)
        self._inner = inner

    async def ready(self) -> bool:
        """Wait until a message is ready.

        Returns:
            False once the inner receiver stopped and the initial messages are gone.
        """
        if self._initial:
            return True
        return await self._inner.ready()

    def consume(self) -> _T:
        """Return the next message (after `ready`).

        Returns:
            The message.
        """
        if self._initial:
            return self._initial.popleft()
        return self._inner.consume()

    def close(self) -> None:
        """Close the receiver: no more messages."""
        self._initial.clear()
        self._inner.close()
