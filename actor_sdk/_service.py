"""`BackgroundService`: one background task with the start/stop shape of the SDK.

`Dispatcher` and `ActorDispatcher` share it: `start()` creates the task that runs
`_run()`, `cancel()`/`stop()`/`wait()` end it and re-raise what made it fail, and the
object is awaitable and an async context manager (start on entry, stop on exit).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Generator
from typing import Any, Self

__all__ = ["BackgroundService"]


class BackgroundService(abc.ABC):
    """A service that does its work in one background task, running `_run()`."""

    def __init__(self, *, name: str) -> None:
        """Create the service; nothing runs before `start()`.

        Args:
            name: The name of its task.
        """
        self._name = name
        self._task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def _run(self) -> None:
        """Do the work until cancelled or done; cleaning up on the way out."""

    @property
    def is_running(self) -> bool:
        """Whether it runs (started and not stopped)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start it in the background (no-op when running)."""
        if not self.is_running:
            self._task = asyncio.create_task(self._run(), name=self._name)

    def cancel(self, msg: str | None = None) -> None:
        """Ask it to stop; `wait()` for it to finish.

        Args:
            msg: The cancellation message.
        """
        if self._task is not None:
            self._task.cancel(msg)

    async def stop(self, msg: str | None = None) -> None:
        """Stop it and wait until it finished (see the class for what stopping releases).

        Args:
            msg: The cancellation message.
        """
        self.cancel(msg)
        await self.wait()

    async def wait(self) -> None:
        """Wait until it stopped (returns at once when never started).

        Raises:
            BaseException: Whatever made it fail.
        """
        if self._task is None:
            return
        await asyncio.wait({self._task})
        if not self._task.cancelled() and (error := self._task.exception()) is not None:
            raise error

    def __await__(self) -> Generator[Any, None, None]:
        """Wait until it stopped, as `await service`.

        Returns:
            An iterator for `await`.
        """
        return self.wait().__await__()

    async def __aenter__(self) -> Self:
        """Start it.

        Returns:
            This service.
        """
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        """Stop it."""
        await self.stop()
