"""Recording actors for the benchmarks: start, update and stop times per dispatch.

* `Recorder`: one actor factory usable by both the actor SDK and
  `frequenz-dispatch`, recording start, update and stop times.
* `retry_until_seen()`: warm-up dispatches until a subscriber sees one.
* `stop_reference()`: stop a `frequenz.dispatch.Dispatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench._harness import async_wait_until


class _Actor:
    def __init__(self, recorder: Recorder, dispatch_id: int, updates: Any) -> None:
        self._recorder = recorder
        self._id = dispatch_id
        self._updates = updates
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._recorder.record("start", self._id)
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        async for info in self._updates:
            self._recorder.record("update", int(info._src.id), info)

    async def stop(self, msg: str | None = None) -> None:
        self._recorder.record("stop", self._id)
        if self._task is not None:
            self._task.cancel()


class Recorder:
    """An actor factory for both libraries; records `time.time()` per event and id.

    `times[(kind, dispatch_id)]` is a list: the n-th start, update or stop.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.times: dict[tuple[str, int], list[float]] = {}
        self.payloads: dict[int, Any] = {}
        self._changed = asyncio.Event()

    async def factory(self, info: Any, updates: Any) -> _Actor:
        """The actor factory (both libraries accept a coroutine function)."""
        return _Actor(self, int(info._src.id), updates)

    def record(self, kind: str, dispatch_id: int, info: Any = None) -> None:
        """Note one event now."""
        self.times.setdefault((kind, dispatch_id), []).append(self.clock())
        if info is not None:
            self.payloads[dispatch_id] = info.options
        self._changed.set()

    def count(self, kind: str, dispatch_id: int) -> int:
        """How many events of a kind a dispatch had."""
        return len(self.times.get((kind, dispatch_id), ()))

    async def wait(
        self,
        kind: str,
        dispatch_id: int,
        count: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109 - a deadline
    ) -> float:
        """Wait for the `count`-th event of a kind; return its time."""
        deadline = time.monotonic() + timeout
        while self.count(kind, dispatch_id) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind} #{count} of dispatch {dispatch_id}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.times[(kind, dispatch_id)][count - 1]


async def retry_until_seen(
    create: Callable[[], Awaitable[int]],
    seen: Callable[[int], bool],
    timeout: float = 20.0,  # noqa: ASYNC109 - a deadline
) -> None:
    """Create warm-up dispatches until one is seen (a subscriber may not be up yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dispatch_id = await create()
        with contextlib.suppress(TimeoutError):
            await async_wait_until(lambda i=dispatch_id: seen(i), 1.5, "warm-up")  # type: ignore[misc]
            return
    raise TimeoutError("the warm-up dispatch was never seen")


async def stop_reference(dispatcher: Any) -> None:
    """Stop a `frequenz.dispatch.Dispatcher` (its stop reports the cancellation)."""
    dispatcher.cancel()
    with contextlib.suppress(BaseExceptionGroup, asyncio.CancelledError):
        await dispatcher.wait()
