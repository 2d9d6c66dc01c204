"""Reconciling: actors and receivers brought to match the view, at one reading of the clock.

`Reconciler.run` reads the clock once, tells whether the view is live, works out
for each type what may run (`own_clock_running` then `confirmed_running`, on the
bridge's clock as far as it is known), sends the running state messages, lets each
managed type's `ActorSet` start, update and stop actors (without waiting for them),
and keeps the earliest local deadline at which it must run again: a run's `until`, a
told `next_run` (an own-clock start), the end of the view's liveness, the end of an
endless run's blind time, a factory retry.

Own-clock starts wait until the estimate of the bridge's clock has converged: before
it, the local clock stands in for the bridge's, and a skew would move the start (a
chaos run's host, 0.2 s ahead and 3 s after its start, began a run 0.2 s early for a
dispatch deleted 0.07 s before its instant). Until then starts come with the
bridge's snapshot, the broker hop included. Stops do not wait, so an actor that
serves an identity (a merge strategy's) whose next run begins where the last ended
goes on into it (`handoffs`) instead of stopping early on a clock ahead of the
bridge's and starting again one broker hop later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from frequenz.client.dispatch.types import DispatchId

from actor_sdk._actor_set import ActorCounts, ActorSet
from actor_sdk._bridge_clock import BridgeClock
from actor_sdk._dispatch_model import Dispatch
from actor_sdk._planner import (
    STOPPED,
    STOPPED_BLIND,
    STOPPED_UNCONFIRMED,
    SnapshotTerms,
    confirmed_running,
    end_of,
    handoffs,
    own_clock_running,
)
from actor_sdk._subscribers import Subscribers
from actor_sdk._view import BridgeView

__all__ = ["Reconciler"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Moment:
    """One reading of the clock, for one reconcile."""

    bridge_now: datetime
    """Now on the bridge's clock (as estimated): what `until` is compared with."""
    local_now: datetime
    """Now on the local clock."""
    blind_until: datetime | None
    """When endless runs stop without a live view (local clock); None while live."""


class Reconciler:
    """Keeps the actors and receivers of a `Dispatcher` matching its view."""

    def __init__(
        self,
        view: BridgeView,
        bridge_clock: BridgeClock,
        subscribers: Subscribers,
        *,
        max_blind_time: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        """Create a reconciler with nothing managed.

        Args:
            view: What is known of the bridge.
            bridge_clock: The bridge's clock, as estimated.
            subscribers: The receivers to send running state messages to.
            max_blind_time: How long an endless run goes on without a live view.
            clock: The local wall clock (UTC).
        """
        self._view = view
        self._bridge_clock = bridge_clock
        self._subscribers = subscribers
        self._max_blind_time = max_blind_time
        self._clock = clock
        self.lock = asyncio.Lock()
        """Held while reconciling; hold it to change `managed` consistently."""
        self.managed: dict[str, ActorSet] = {}
        """The actors of each managed type."""
        self.counts: dict[str, ActorCounts] = {}
        """Per type ever managed, its `ActorSet`'s counts (kept: metrics never go back)."""
        self.effective: dict[str, dict[DispatchId, Dispatch]] = {}
        """What runs now, per type and id, as the last run decided."""
        self.deadline: datetime | None = None
        """When to run again at the latest (local clock); None: only on a change."""
        self.was_live = False
        """Whether the view was live at the last run."""
        self._type_deadlines: dict[str, datetime] = {}
        self._blind_since = clock()

    async def run(self, only: str | None = None) -> None:
        """Bring actors and receivers to match the view, at one reading of the clock.

        Args:
            only: The one type whose snapshot changed; None for every type (the
                liveness changed, a resync ended, a start failed).
        """
        await self._run(only=only, due=False)

    async def run_due(self) -> None:
        """Like `run`, for the types whose deadline has come (the timer's wake-up).

        A type's deadline is its earliest `until`, told start, end of blind time or
        factory retry: nothing else of it changes with the clock alone, so the other
        types are left as they are (at an instant with many types, their reconcile
        only delayed the actors due). Every type when the liveness changed.
        """
        await self._run(only=None, due=True)

    async def _run(self, *, only: str | None, due: bool) -> None:
        async with self.lock:
            local_now = self._clock()
            live = self._view.is_live(local_now)
            if live != self.was_live:
                self.was_live = live
                only, due = None, False
                if not live:
                    self._blind_since = local_now
                _logger.info("view of the bridge is %s", "live" if live else "NOT live")
            blind_until = None if live else self._blind_since + self._max_blind_time
            moment = _Moment(
                bridge_now=self._bridge_clock.to_bridge(local_now),
                local_now=local_now,
                blind_until=blind_until,
            )
            if due:
                types = {t for t, at in self._type_deadlines.items() if at <= local_now}
            elif only is None:
                types = (
                    self._view.types()
                    | self.effective.keys()
                    | self.managed.keys()
                    | self._subscribers.running_state_types()
                )
            else:
                types = {only}
            for dispatch_type in sorted(types):
                type_live = live and self._view.confirmed(dispatch_type)
                try:
                    deadline = await self._type(dispatch_type, moment, live=type_live)
                except Exception:
                    _logger.exception(
                        "bringing the actors of type %r up to date failed", dispatch_type
                    )
                    continue
                if deadline is None:
                    self._type_deadlines.pop(dispatch_type, None)
                else:
                    self._type_deadlines[dispatch_type] = deadline
            self.deadline = _earliest(
                self._view.live_until if live else None, *self._type_deadlines.values()
            )

    def actors_present(self) -> bool:
        """Whether a managed actor runs, is being created or is being stopped."""
        return any(actors.occupied for actors in self.managed.values())

    def told_start(self, dispatch_type: str, after: datetime) -> datetime | None:
        """Return the next start told of a dispatch of a type after an instant.

        Args:
            dispatch_type: The type.
            after: The instant on the bridge's clock.

        Returns:
            The start on the local clock (as estimated); None when none is told,
            or while the estimate of the bridge's clock has not converged.
        """
        if not self._bridge_clock.converged:
            return None
        start = self._view.next_told_start(dispatch_type, after)
        return None if start is None else self._bridge_clock.to_local(start)

    def needs_run(self, dispatch_type: str, dispatch_id: int) -> bool:
        """Tell whether a new message of a dispatch needs a run of its type now.

        It does when the dispatch runs (an own-clock run ends when its dispatch
        changes), an actor went on into its run (`handoffs`), or it is told to start
        by now; a start told for later only moves the deadline. While a run is under
        way, always (it sets the deadlines).

        Args:
            dispatch_type: The dispatch's type.
            dispatch_id: Its id.

        Returns:
            True to call `run(dispatch_type)`.
        """
        running = self.effective.get(dispatch_type, {})
        if self.lock.locked() or DispatchId(dispatch_id) in running:
            return True
        managed = self.managed.get(dispatch_type)
        if managed is not None and dispatch_id in managed.running_ids:
            return True
        start = self._view.told_start_of(dispatch_type, dispatch_id)
        if start is None or not self._bridge_clock.converged:
            return False
        local = self._bridge_clock.to_local(start)
        if local <= self._clock():
            return True
        self._wake_at(dispatch_type, local)
        return False

    def observe_bridge_time(self, as_of: datetime, arrived: datetime) -> str | None:
        """Take a sample of the bridge's clock (`BridgeClock.observe`).

        When it makes the estimate converge, the starts told by then become own-clock
        starts: the deadline moves to the earliest (a run's starts no longer wait for
        a message of its type to come after the convergence).

        Args:
            as_of: When the bridge made a live message (its clock).
            arrived: When it arrived here (the local clock).

        Returns:
            A line worth logging, as `BridgeClock.observe` returns it.
        """
        converged = self._bridge_clock.converged
        line = self._bridge_clock.observe(as_of, arrived)
        if not converged and self._bridge_clock.converged and self.was_live:
            bridge_now = self._bridge_clock.to_bridge(self._clock())
            for dispatch_type in self._view.types():
                start = self.told_start(dispatch_type, bridge_now)
                if start is not None:
                    self._wake_at(dispatch_type, start)
        return line

    def _wake_at(self, dispatch_type: str, local: datetime) -> None:
        """Add a deadline of a type (the local clock) to those of its last run."""
        earlier = self._type_deadlines.get(dispatch_type)
        self._type_deadlines[dispatch_type] = local if earlier is None else min(earlier, local)
        self.deadline = _earliest(self.deadline, local)

    async def _type(self, dispatch_type: str, moment: _Moment, *, live: bool) -> datetime | None:
        """Reconcile one type; return its next deadline on the local clock."""
        previous = self.effective.get(dispatch_type, {})
        blind_too_long = moment.blind_until is not None and moment.blind_until <= moment.local_now
        snapshot = SnapshotTerms(
            *self._view.snapshot_times(dispatch_type), agrees=self._view.agrees(dispatch_type)
        )
        converged = self._bridge_clock.converged
        told = self._view.told_starts(dispatch_type, moment.bridge_now) if converged or live else []
        reported = own_clock_running(
            self._view.running(dispatch_type),
            told if converged else (),
            snapshot,
            now=moment.bridge_now,
        )
        confirmed = confirmed_running(
            reported,
            previous.keys(),
            now=moment.bridge_now,
            live=live,
            blind_too_long=blind_too_long,
        )
        # Back-to-back runs of one actor (before the clock estimate converged): live only.
        going_on = handoffs(reported, told, snapshot, now=moment.bridge_now) if live else ()
        current = {dispatch.id: dispatch for dispatch in confirmed}
        if current:
            self.effective[dispatch_type] = current
        else:
            self.effective.pop(dispatch_type, None)
        try:
            await self._subscribers.notify_running_state(dispatch_type, previous, current)
        except Exception:  # a receiver's merge strategy: never holds up the actors' stops
            _logger.exception("sending the running state of type %r failed", dispatch_type)
        deadline = _earliest(
            None,
            *(
                self._bridge_clock.to_local(end_of(d, live=live))
                for d in confirmed
                if d.until is not None
            ),
        )
        if not live and any(d.until is None for d in confirmed):
            deadline = _earliest(deadline, moment.blind_until)
        if live:  # an own-clock start needs a live view: wake up at the next one told
            deadline = _earliest(deadline, self.told_start(dispatch_type, moment.bridge_now))
        managed = self.managed.get(dispatch_type)
        if managed is not None:
            reason = STOPPED if live else STOPPED_BLIND if blind_too_long else STOPPED_UNCONFIRMED
            await managed.apply(confirmed, reason=reason, going_on=going_on)
            deadline = _earliest(
                deadline,
                *(
                    self._bridge_clock.to_local(end_of(run, live=True))
                    for _, run in going_on
                    if run.until is not None
                ),
            )
            if live:  # retries wait for a live view: no deadline without one
                await managed.retry(moment.local_now)
                deadline = _earliest(deadline, managed.next_retry)
        return deadline


def _earliest(current: datetime | None, *candidates: datetime | None) -> datetime | None:
    for candidate in candidates:
        if candidate is not None and (current is None or candidate < current):
            current = candidate
    return current
