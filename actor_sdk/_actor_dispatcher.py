"""`ActorDispatcher`: manage actors from a receiver of running state messages.

The piece of `frequenz-dispatch` that its `Dispatcher.start_managing` builds on, for
code that wires it by hand: feed it `new_running_state_event_receiver(type,
merge_strategy=s)` and `s.identity`, and it keeps one actor per identity (same planner
and retries as `start_managing`, which does not need it). A start or update message
updates the actor of its identity; a stop message that reaches it stops that actor,
as in `frequenz-dispatch` (a merge filter lets a stop through only when no other
dispatch of the group runs). It follows the messages only: the fail-safe applies
because a `Dispatcher` sends the stop itself when it has no live view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable
from datetime import datetime, timedelta
from typing import Any

from frequenz.channels import Receiver, ReceiverStoppedError
from frequenz.client.dispatch.types import DispatchId

from actor_sdk._actor_api import ActorFactory
from actor_sdk._actor_set import DEFAULT_FACTORY_TIMEOUT, ActorSet
from actor_sdk._dispatch_model import Dispatch
from actor_sdk._planner import STOPPED
from actor_sdk._service import BackgroundService
from actor_sdk.wall_clock import utc_now

__all__ = ["ActorDispatcher"]

_logger = logging.getLogger(__name__)


class ActorDispatcher(BackgroundService):
    """Starts, updates and stops actors from running state messages.

    `start()` follows the messages in the background until `stop()` or until the
    receiver ends; stopping (or the receiver ending) stops every actor it started.
    Awaitable (until stopped) and an async context manager (starts on entry, stops on
    exit).
    """

    def __init__(
        self,
        actor_factory: ActorFactory,
        running_status_receiver: Receiver[Dispatch],
        dispatch_identity: Callable[[Dispatch], Hashable] | None = None,
        retry_interval: timedelta = timedelta(seconds=60),
        *,
        factory_timeout: timedelta = DEFAULT_FACTORY_TIMEOUT,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Create the manager; it does nothing before `start()`.

        Args:
            actor_factory: Makes an actor from a `DispatchInfo` and a receiver of updates.
            running_status_receiver: The running state messages of one type.
            dispatch_identity: Maps a dispatch to its actor (e.g. a merge strategy's
                `identity`); by default one actor per dispatch.
            retry_interval: How long to wait before calling a failed factory again.
            factory_timeout: How long the factory may take to return an actor.
            clock: The wall clock (UTC).
        """
        super().__init__(name="actor-dispatcher")
        self._receiver = running_status_receiver
        self._identity: Callable[[Dispatch], Hashable] = dispatch_identity or (
            lambda dispatch: dispatch.id
        )
        self._clock = clock
        self._start_failed = asyncio.Event()
        self._actors = ActorSet(
            "managed",
            factory=actor_factory,
            identity=self._identity,
            retry_interval=retry_interval,
            clock=clock,
            factory_timeout=factory_timeout,
            on_failure=self._start_failed.set,
        )

    async def _next_message(self, pending: asyncio.Future[Dispatch]) -> bool:
        """Wait for a message, a failed start, or a retry that is due.

        Returns:
            True when `pending` has the next message.
        """
        self._start_failed.clear()
        due = self._actors.next_retry
        timeout = None if due is None else max(0.0, (due - self._clock()).total_seconds())
        failed = asyncio.ensure_future(self._start_failed.wait())
        try:
            waited_for: set[asyncio.Future[Any]] = {pending, failed}
            await asyncio.wait(waited_for, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
        return pending.done()

    async def _run(self) -> None:
        running: dict[DispatchId, Dispatch] = {}
        pending: asyncio.Future[Dispatch] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(self._receiver.receive())
                if not await self._next_message(pending):
                    await self._actors.retry(self._clock())
                    continue
                message, pending = pending.result(), None
                if message.started:
                    running[message.id] = message
                else:
                    # As in frequenz-dispatch, a stop that reaches us stops the actor:
                    # a merge filter only lets it through when its group is done, and
                    # holds back the stops of the others.
                    key = self._identity(message)
                    running = {i: d for i, d in running.items() if self._identity(d) != key}
                await self._actors.apply(list(running.values()), reason=STOPPED)
        except ReceiverStoppedError:
            _logger.info("the running state receiver stopped; stopping the actors")
        finally:
            if pending is not None:
                pending.cancel()
            with contextlib.suppress(Exception):
                await self._actors.stop_all("ActorDispatcher stopped")
