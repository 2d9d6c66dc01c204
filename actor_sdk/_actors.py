"""Carrying out the planner's decisions for one dispatch type: the actors themselves.

`ActorSet` owns the actors of one type: it asks its `ActorPlanner` what to do for a
running set, then creates actors (calling the factory, awaiting it when it is a
coroutine), starts them, sends them updates, stops them, and remembers when a failed
start is due again. The `Dispatcher` and the `ActorDispatcher` both drive one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from frequenz.channels import BroadcastChannel, Sender

from actor_sdk._actor import Actor, ActorFactory, DispatchInfo
from actor_sdk._dispatch import Dispatch
from actor_sdk._planner import Action, ActorPlanner, StartActor, StopActor, UpdateActor

__all__ = ["STOP_TIMEOUT_S", "ActorSet"]

_logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long an actor's `stop()` may take before the SDK moves on without it."""


@dataclass
class _RunningActor:
    actor: Actor
    sender: Sender[DispatchInfo]
    dispatch: Dispatch


class ActorSet:
    """The actors serving the dispatches of one type."""

    def __init__(
        self,
        name: str,
        *,
        factory: ActorFactory,
        identity: Callable[[Dispatch], Hashable],
        retry_interval: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        """Create an empty set.

        Args:
            name: What the actors are for (the dispatch type), for logs.
            factory: Makes an actor from its first information and an update receiver.
            identity: Maps a dispatch to the key of the actor that serves it.
            retry_interval: How long after a failed start to try again.
            clock: The wall clock (UTC).
        """
        self.name = name
        self._factory = factory
        self._retry_interval = retry_interval
        self._clock = clock
        self._planner = ActorPlanner(identity)
        self._actors: dict[Hashable, _RunningActor] = {}
        self._retry_due: dict[Hashable, datetime] = {}
        self._stragglers: set[asyncio.Future[None]] = set()

    @property
    def next_retry(self) -> datetime | None:
        """When the next failed start is due again; None when none failed."""
        return min(self._retry_due.values(), default=None)

    def running_dispatch(self, key: Hashable) -> Dispatch | None:
        """Return the dispatch the actor of `key` last got, None when it has no actor.

        Args:
            key: The actor's key.

        Returns:
            The dispatch.
        """
        running = self._actors.get(key)
        return None if running is None else running.dispatch

    async def apply(self, running: Iterable[Dispatch], *, reason: str) -> None:
        """Bring the actors to match what runs.

        Args:
            running: Every dispatch of the type that runs now.
            reason: The stop message for actors no longer needed.
        """
        await self._execute(self._planner.reconcile(running, reason=reason))

    async def retry(self, now: datetime) -> None:
        """Call the factory again for every failed start that is due.

        Args:
            now: The current instant.
        """
        waiting = self._planner.waiting_keys
        for key in [key for key in self._retry_due if key not in waiting]:
            del self._retry_due[key]
        for key, due in list(self._retry_due.items()):
            if due <= now and (start := self._planner.retry(key)) is not None:
                await self._start(key, start.dispatch)

    async def stop_all(self, reason: str) -> None:
        """Stop every actor and forget every group.

        Args:
            reason: The stop message.
        """
        self._planner.stop_all(reason)
        self._retry_due.clear()
        for key in list(self._actors):
            await self._stop(self._actors.pop(key), reason)

    async def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case StopActor(key=key, reason=reason):
                    self._retry_due.pop(key, None)
                    if (running := self._actors.pop(key, None)) is not None:
                        await self._stop(running, reason)
                case UpdateActor(key=key, dispatch=dispatch):
                    if (running := self._actors.get(key)) is not None:
                        _logger.info(
                            "updating the actor of type %r to dispatch %s",
                            self.name,
                            int(dispatch.id),
                        )
                        running.dispatch = dispatch
                        await running.sender.send(DispatchInfo.from_dispatch(dispatch))
                case StartActor(key=key, dispatch=dispatch):
                    await self._start(key, dispatch)

    async def _start(self, key: Hashable, dispatch: Dispatch) -> None:
        # Limit 1: an actor that is slow to read gets the latest information only.
        sender, receiver = BroadcastChannel[DispatchInfo](
            name=f"dispatch-info-{self.name}-{key}",
            resend_latest=True,
            limit=1,
            warn_on_overflow=False,
        )
        try:
            created = self._factory(DispatchInfo.from_dispatch(dispatch), receiver)
            # Await coroutines only: a frequenz-sdk actor is awaitable itself.
            if inspect.iscoroutine(created) or isinstance(created, asyncio.Future):
                actor: Actor = await created
            else:
                actor = cast(Actor, created)
            actor.start()
        except Exception:
            retry_at = self._clock() + self._retry_interval
            _logger.exception(
                "creating or starting the actor for dispatch %s of type %r failed; "
                "retrying at %s while it runs",
                int(dispatch.id),
                self.name,
                retry_at.isoformat(),
            )
            self._planner.start_failed(key)
            self._retry_due[key] = retry_at
            await sender.aclose()
            return
        self._retry_due.pop(key, None)
        self._actors[key] = _RunningActor(actor, sender, dispatch)
        _logger.info(
            "started the actor of type %r for dispatch %s (until %s)",
            self.name,
            int(dispatch.id),
            dispatch.until.isoformat() if dispatch.until else "changed",
        )

    async def _stop(self, running: _RunningActor, reason: str) -> None:
        _logger.info(
            "stopping the actor of type %r (dispatch %s): %s",
            self.name,
            int(running.dispatch.id),
            reason,
        )
        # Shielded, and waited for a bounded time: one actor that never finishes
        # stopping must not hold up the starts and stops of all the others.
        try:
            stopping = asyncio.ensure_future(running.actor.stop(reason))
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.shield(stopping)
            except TimeoutError:
                _logger.error(
                    "the actor of type %r did not stop within %g s; moving on (it may "
                    "still be stopping)",
                    self.name,
                    STOP_TIMEOUT_S,
                )
                self._stragglers.add(stopping)
                stopping.add_done_callback(self._stragglers.discard)
        except Exception:
            _logger.exception("stopping the actor of type %r failed", self.name)
        finally:
            await running.sender.aclose()
