"""Carrying out the planner's decisions for one dispatch type: the actors themselves.

`ActorSet` owns the actors of one type: it asks its `ActorPlanner` what to do for a
running set, then creates actors, starts them, sends them updates, stops them, and
remembers when a failed start is due again. The `Dispatcher` and the
`ActorDispatcher` both drive one.

Every factory call and every `stop()` runs in a task of its own with a deadline of
its own, so `apply` never waits for an actor: a factory that hangs (a Modbus connect
that never returns) delays neither the other actors' starts nor any stop, and the
stops of several actors run at the same time. A factory that misses its deadline has
failed (it is cancelled) and is called again after the retry interval. One thing
waits: a new actor for a key whose previous actor is still stopping is created once
that stop has ended (or stopped being waited for), inside its own task: never two
actors for one key at once (a chaos run saw a restart overlap the stop by 10 ms).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from frequenz.channels import BroadcastChannel, Receiver, Sender, SenderError

from actor_sdk._actor_api import Actor, ActorFactory, DispatchInfo
from actor_sdk._dispatch_model import Dispatch
from actor_sdk._planner import (
    Action,
    ActorPlanner,
    Handoff,
    StartActor,
    StopActor,
    UpdateActor,
)
from actor_sdk._watchdog import measure_next_turn

__all__ = ["DEFAULT_FACTORY_TIMEOUT", "STOP_TIMEOUT_S", "ActorCounts", "ActorSet"]

_logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long an actor's `stop()` may take before the SDK stops waiting for it."""

DEFAULT_FACTORY_TIMEOUT = timedelta(seconds=30)
"""How long a factory may take to return an actor before the start counts as failed."""


@dataclass
class _Slot:
    """One actor: being created, running, or (once out of the set) stopping."""

    dispatch: Dispatch
    sender: Sender[DispatchInfo]
    actor: Actor | None = None
    creating: asyncio.Task[None] | None = None
    stopping: bool = False


@dataclass
class ActorCounts:
    """What the actors of one type went through, for metrics (read, never reset)."""

    started: int = 0
    stopped: int = 0
    failed: int = 0
    """Failed starts: the factory raised, timed out, or the actor's `start()` raised."""
    factory_timeouts: int = 0


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
        factory_timeout: timedelta = DEFAULT_FACTORY_TIMEOUT,
        on_failure: Callable[[], None] = lambda: None,
        on_started: Callable[[], None] = lambda: None,
        record: Callable[[str, Dispatch, str | None], None] | None = None,
        counts: ActorCounts | None = None,
    ) -> None:
        """Create an empty set.

        Args:
            name: What the actors are for (the dispatch type), for logs.
            factory: Makes an actor from its first information and an update receiver.
            identity: Maps a dispatch to the key of the actor that serves it.
            retry_interval: How long after a failed start to try again.
            clock: The wall clock (UTC).
            factory_timeout: How long the factory may take before the start fails.
            on_failure: Called when a start failed (`next_retry` changed).
            on_started: Called when an actor started.
            record: Told each start, update, stop and failure (`event`, the
                dispatch, the reason) for the journal (`actor_sdk.journal`).
            counts: Where to count starts, stops and failures (None: a new one).
        """
        self.name = name
        self._factory = factory
        self._retry_interval = retry_interval
        self._factory_timeout = factory_timeout.total_seconds()
        self._clock = clock
        self._on_failure = on_failure
        self._on_started = on_started
        self._failure: str | None = None
        self._record = record or (lambda event, dispatch, reason: None)
        self.counts = ActorCounts() if counts is None else counts
        self._planner = ActorPlanner(identity)
        self._slots: dict[Hashable, _Slot] = {}
        self._retry_due: dict[Hashable, datetime] = {}
        self._creating: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Future[None]] = set()
        self._stop_of: dict[Hashable, asyncio.Future[None]] = {}
        """The stop under way of each key's previous actor."""

    @property
    def next_retry(self) -> datetime | None:
        """When the next failed start is due again; None when none failed."""
        return min(self._retry_due.values(), default=None)

    @property
    def running_ids(self) -> tuple[int, ...]:
        """The ids of the running dispatches whose actor has started, sorted."""
        started = {key for key, slot in self._slots.items() if slot.actor is not None}
        served = self._planner.served()
        return tuple(sorted(dispatch_id for key, dispatch_id in served if key in started))

    @property
    def failure(self) -> str | None:
        """Why the latest start failed, while a failed start waits for its retry."""
        return self._failure if self._retry_due else None

    @property
    def occupied(self) -> bool:
        """Whether an actor runs, is being created or is being stopped."""
        return bool(self._slots or self._stopping)

    @property
    def started_actors(self) -> int:
        """How many actors have started and are not being stopped."""
        return sum(1 for slot in self._slots.values() if slot.actor is not None)

    async def apply(
        self, running: Iterable[Dispatch], *, reason: str, going_on: Iterable[Handoff] = ()
    ) -> None:
        """Bring the actors to match what runs (without waiting for any actor).

        Args:
            running: Every dispatch of the type that runs now.
            reason: The stop message for actors no longer needed.
            going_on: Ended runs and the told runs that follow them back-to-back
                (`ActorPlanner.reconcile`).
        """
        await self._execute(self._planner.reconcile(running, reason=reason, going_on=going_on))

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
                del self._retry_due[key]
                self._start(key, start.dispatch)

    async def stop_all(self, reason: str) -> None:
        """Stop every actor, forget every group, and wait for every stop (bounded).

        Args:
            reason: The stop message.
        """
        self._planner.stop_all(reason)
        self._retry_due.clear()
        for key in list(self._slots):
            self._stop(key, self._slots.pop(key), reason)
        await self.wait_idle()

    async def wait_idle(self) -> None:
        """Wait until no stop is under way (each is bounded by `STOP_TIMEOUT_S`)."""
        while self._stopping:
            await asyncio.wait(set(self._stopping))

    async def _execute(self, actions: list[Action]) -> None:
        await self._act(actions)
        if actions:
            # One turn of the event loop for the factories and stops just set going
            # (each a task of its own) before the caller handles the next message:
            # without it a new actor started only after every message that arrived
            # with its snapshot was handled (bench/latency.py: ~0.2 ms later).
            await asyncio.sleep(0)

    async def _act(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case StopActor(key=key, reason=reason):
                    self._retry_due.pop(key, None)
                    if (slot := self._slots.pop(key, None)) is not None:
                        self._stop(key, slot, reason)
                case UpdateActor(key=key, dispatch=dispatch):
                    if (slot := self._slots.get(key)) is not None:
                        _logger.info(
                            "updating the actor of type %r to dispatch %s",
                            self.name,
                            int(dispatch.id),
                        )
                        slot.dispatch = dispatch
                        self._record("updated", dispatch, None)
                        try:
                            await slot.sender.send(DispatchInfo.from_dispatch(dispatch))
                        except SenderError:  # the actor dropped its receiver of updates
                            _logger.warning(
                                "the actor of type %r (dispatch %s) does not keep its "
                                "receiver of updates: it runs on with its first parameters",
                                self.name,
                                int(dispatch.id),
                            )
                case StartActor(key=key, dispatch=dispatch):
                    self._start(key, dispatch)

    def _spawn_stop(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        return task

    def _start(self, key: Hashable, dispatch: Dispatch) -> None:
        measure_next_turn()  # the factory's first step runs in it: a blocking one is logged
        # Limit 1: an actor that is slow to read gets the latest information only.
        sender, receiver = BroadcastChannel[DispatchInfo](
            name=f"dispatch-info-{self.name}-{key}",
            resend_latest=True,
            limit=1,
            warn_on_overflow=False,
        )
        slot = self._slots[key] = _Slot(dispatch, sender)
        creating = slot.creating = asyncio.create_task(
            self._create(key, slot, receiver, after=self._stop_of.get(key)),
            name=f"actor-factory-{self.name}-{key}",
        )
        self._creating.add(creating)
        creating.add_done_callback(self._creating.discard)

    async def _create(
        self,
        key: Hashable,
        slot: _Slot,
        receiver: Receiver[DispatchInfo],
        *,
        after: asyncio.Future[None] | None,
    ) -> None:
        if after is not None:  # the key's previous actor first ends (bounded: see _stop_slot)
            await asyncio.wait({after})
        dispatch = slot.dispatch  # as updated meanwhile
        try:
            async with asyncio.timeout(self._factory_timeout) as deadline:
                created = self._factory(DispatchInfo.from_dispatch(dispatch), receiver)
                # Await coroutines only: a frequenz-sdk actor is awaitable itself.
                if inspect.iscoroutine(created) or isinstance(created, asyncio.Future):
                    actor: Actor = await created
                else:
                    actor = cast(Actor, created)
            if slot.stopping:
                return  # stopped while being created (its factory ignored the cancel)
            actor.start()
        except Exception as error:
            timed_out = isinstance(error, TimeoutError) and deadline.expired()
            self._start_failed(key, slot, error, timed_out=timed_out)
            return
        slot.actor = actor
        self.counts.started += 1
        self._on_started()
        self._record("started", dispatch, None)
        _logger.info(
            "started the actor of type %r for dispatch %s (until %s)",
            self.name,
            int(dispatch.id),
            dispatch.until.isoformat() if dispatch.until else "changed",
        )

    def _start_failed(
        self, key: Hashable, slot: _Slot, error: Exception, *, timed_out: bool
    ) -> None:
        if self._slots.get(key) is not slot:
            return  # stopped meanwhile: nothing to retry
        del self._slots[key]
        self.counts.failed += 1
        self.counts.factory_timeouts += timed_out
        retry_at = self._clock() + self._retry_interval
        what = (
            f"did not return an actor within {self._factory_timeout:g} s (cancelled)"
            if timed_out
            else "failed"
        )
        _logger.error(
            "creating or starting the actor for dispatch %s of type %r %s; retrying at %s "
            "while it runs",
            int(slot.dispatch.id),
            self.name,
            what,
            retry_at.isoformat(),
            exc_info=not timed_out,
        )
        self._planner.start_failed(key)
        self._record("failed", slot.dispatch, what)
        self._retry_due[key] = retry_at
        self._failure = f"the actor for dispatch {int(slot.dispatch.id)} {what}" + (
            "" if timed_out else f": {type(error).__name__}: {error}"
        )
        self._spawn_stop(slot.sender.aclose())
        self._on_failure()

    def _stop(self, key: Hashable, slot: _Slot, reason: str) -> None:
        slot.stopping = True
        # Ends only once the key's earlier stops ended too: a stop of a start that was
        # still waiting ends at once, and the next start must still wait for them.
        earlier = self._stop_of.get(key)
        stopping = self._spawn_stop(self._stop_slot(slot, reason, after=earlier))
        self._stop_of[key] = stopping
        stopping.add_done_callback(
            lambda done: self._stop_of.pop(key) if self._stop_of.get(key) is done else None
        )

    async def _stop_slot(
        self, slot: _Slot, reason: str, *, after: asyncio.Future[None] | None
    ) -> None:
        try:
            creating = slot.creating
            if creating is not None and not creating.done():
                _logger.info(
                    "cancelling the creation of the actor of type %r (dispatch %s): %s",
                    self.name,
                    int(slot.dispatch.id),
                    reason,
                )
                creating.cancel()
                await asyncio.wait({creating}, timeout=STOP_TIMEOUT_S)
            if slot.actor is not None:
                await self._stop_actor(slot.actor, slot.dispatch, reason)
        finally:
            await slot.sender.aclose()
            if after is not None:
                await asyncio.wait({after})

    async def _stop_actor(self, actor: Actor, dispatch: Dispatch, reason: str) -> None:
        self.counts.stopped += 1
        self._record("stopped", dispatch, reason)
        _logger.info(
            "stopping the actor of type %r (dispatch %s): %s",
            self.name,
            int(dispatch.id),
            reason,
        )
        try:
            stopping = asyncio.ensure_future(actor.stop(reason))
        except Exception:
            _logger.exception("stopping the actor of type %r failed", self.name)
            return
        # Not cancelled at the deadline: it may still finish; we only stop waiting.
        done, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_S)
        if not done:
            _logger.error(
                "the actor of type %r (dispatch %s) did not stop within %g s; no longer "
                "waiting for it (it may still be stopping)",
                self.name,
                int(dispatch.id),
                STOP_TIMEOUT_S,
            )
            stopping.add_done_callback(_log_late_failure)
        elif (error := stopping.exception()) is not None:
            _logger.error("stopping the actor of type %r failed", self.name, exc_info=error)


def _log_late_failure(stopping: asyncio.Future[None]) -> None:
    if not stopping.cancelled() and (error := stopping.exception()) is not None:
        _logger.error("an actor's late stop failed", exc_info=error)
