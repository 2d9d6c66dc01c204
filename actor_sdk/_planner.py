"""The SDK's decisions, without I/O and without a clock: everything here is pure.

Four questions, four answers:

* `own_clock_running`: what runs by the bridge's latest snapshot, plus the starts due
  on the SDK's own clock at a `next_run` it was told (the broker hop is then off the
  critical path of a scheduled start; the bridge's snapshot confirms or corrects)?
* `confirmed_running`: of what the bridge reported as running, what may run now?
  (the fail-safe: nothing new without a live view, nothing past its `until`, no
  endless run for long without a live view)
* `ActorPlanner.reconcile`: given what runs, which actors to start, update, stop?
  (the merge: one actor per identity; its information follows a running dispatch)
* `running_state_changes`: which running state messages does a change produce?

The async shell (`_dispatcher.py`) reads the clock, feeds these, and carries out
the actions they return.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Set
from dataclasses import dataclass
from datetime import datetime, timedelta

from frequenz.client.dispatch.types import DispatchId

from actor_sdk._dispatch_model import Dispatch, runtime_state

__all__ = [
    "Action",
    "ActorPlanner",
    "Handoff",
    "SnapshotTerms",
    "StartActor",
    "StopActor",
    "UpdateActor",
    "confirmed_running",
    "end_of",
    "handoffs",
    "own_clock_running",
    "running_state_changes",
]

LIVE_GRACE = timedelta(milliseconds=50)
"""How long past its `until` a known run is kept while the view is live.

The bridge publishes the change at the instant itself (a few ms); when a merged
actor's next run starts back-to-back, its snapshot arrives within this grace and the
actor goes on instead of stopping and starting again. Without a live view there is
no grace: nothing will come.
"""

STOPPED = "Dispatch stopped"
STOPPED_UNCONFIRMED = "Dispatch stopped at its end: no live view of the bridge"
STOPPED_BLIND = "Dispatch stopped: no live view of the bridge for longer than max_blind_time"


def confirmed_running(
    reported: Iterable[Dispatch],
    previous: Set[DispatchId],
    *,
    now: datetime,
    live: bool,
    blind_too_long: bool = False,
) -> tuple[Dispatch, ...]:
    """Return the reported running dispatches that may run now.

    Nothing runs past its `until` (plus `LIVE_GRACE` with a live view), live view or
    not: only a newer message with a later `until` extends a run (the bridge may be
    blind, or its stop lost). With a
    live view the bridge is trusted to start runs; without one nothing new starts,
    and an endless run (no `until`) stops once the view was not live for too long.

    Args:
        reported: The dispatches the latest accepted snapshot says run.
        previous: The ids that were running at the last decision.
        now: The current instant on the bridge's clock.
        live: Whether the view of the bridge is live (and the snapshot confirmed).
        blind_too_long: Whether the view has not been live for longer than the
            longest time an endless run may go on without one.

    Returns:
        The dispatches that run, in the order given.
    """
    confirmed = []
    for dispatch in reported:
        if not dispatch.started:
            continue
        new = dispatch.id not in previous
        endless = dispatch.until is None
        if not live and (new or (endless and blind_too_long)):
            continue
        if dispatch.until is not None and end_of(dispatch, live=live and not new) <= now:
            continue
        confirmed.append(dispatch)
    return tuple(confirmed)


@dataclass(frozen=True)
class _ToldRun:
    start: datetime
    dispatch: Dispatch
    """The dispatch as it runs from `start` (`started`, with its `until`)."""


@dataclass(frozen=True)
class SnapshotTerms:
    """What the latest accepted running snapshot of a type says of the starts told."""

    as_of: datetime | None
    """When the bridge made it; None: no snapshot of the type since the connect."""
    next_change: datetime | None
    """The next change it expects; None: none."""
    agrees: bool
    """Whether the held dispatch topics of the type are those it counts."""

    def told_run(self, dispatch: Dispatch) -> _ToldRun | None:
        """The run a held dispatch is told to begin, if this snapshot expects it."""
        start = dispatch.next_run
        if start is None or not dispatch.active or dispatch.deleted:
            return None
        if self.as_of is None or self.next_change is None or not self.agrees:
            return None
        if not (self.as_of < start and self.next_change <= start):
            return None
        until = None if dispatch.duration is None else start + dispatch.duration
        return _ToldRun(start, dispatch.with_state(running=True, until=until))


def own_clock_running(
    reported: Iterable[Dispatch],
    told: Iterable[Dispatch],
    snapshot: SnapshotTerms,
    *,
    now: datetime,
) -> tuple[Dispatch, ...]:
    """Return what the bridge's snapshot says runs, plus the runs due on the own clock.

    A dispatch `told` (its latest `dispatches/ID` message, which says `next_run: T`)
    runs from `T` to `T + duration` (endless without a duration), without waiting for
    the bridge's snapshot of that instant, while: it is active and not deleted;
    `T <= now`; the snapshot of its type is older than `T`
    (`as_of < T`: the one for `T` has not arrived; once it has, it alone decides, so
    a snapshot without the dispatch corrects the start); and that snapshot expects a
    change by `T` (`next_change <= T`: the bridge's newest knowledge agrees that
    something starts then; a snapshot made after a change that moved or cancelled
    the run says otherwise); and the held dispatch topics of the type are those the
    snapshot counts (`agrees`: the same count and digest of ids and update times,
    so no change the snapshot knows of is still on its way). A reported run that
    ended before `T` gives way to it.

    The following start is never computed here: it comes with a newer message.
    Whether a start may be made at all (a live view, a confirmed session), and when
    a run is over (its `until`, `duration: 0` at once), is `confirmed_running`'s
    rule: feed it the result.

    Args:
        reported: The dispatches the latest accepted snapshot says run.
        told: The held dispatches of the type whose `next_run` is at or before `now`,
            each the latest version received.
        snapshot: What the latest accepted snapshot of the type says (`as_of`,
            `next_change`, and whether the held dispatch topics agree with it).
        now: The current instant on the bridge's clock.

    Returns:
        The reported dispatches, then the own-clock runs (`started`, with their `until`).
    """
    running = {dispatch.id: dispatch for dispatch in reported}
    for dispatch in told:
        run = snapshot.told_run(dispatch)
        if run is None or run.start > now:
            continue
        known = running.get(dispatch.id)
        if known is not None and (known.until is None or known.until > run.start):
            continue  # the reported run goes on through `start`
        running[dispatch.id] = run.dispatch
    return tuple(running.values())


Handoff = tuple[Dispatch, Dispatch]
"""A run that ended on the clock here, and a told run of the type that begins by its end."""


def handoffs(
    reported: Iterable[Dispatch],
    told: Iterable[Dispatch],
    snapshot: SnapshotTerms,
    *,
    now: datetime,
) -> tuple[Handoff, ...]:
    """Return the told runs that begin back-to-back with a run that just ended.

    Before the estimate of the bridge's clock has converged, own-clock starts wait for
    the bridge's snapshot but stops do not: on a local clock ahead of the bridge's a
    run ends early, and a merged actor whose next run begins at that end would stop
    and start again one broker hop later (a chaos run's host, 0.2 s ahead, had its
    merged actor stopped for 0.15 s between two runs). `ActorPlanner.reconcile` lets
    an actor that runs go on into such a run when both share its identity; it never
    starts one. The told run must be one `own_clock_running` would start at its
    instant (same snapshot rules) and must begin at or before the ended run's `until`
    (by the bridge, the identity runs without a gap), and must not be over.

    Args:
        reported: The dispatches the latest accepted snapshot says run (with the
            own-clock runs); those whose `until` has passed are the ended ones.
        told: The held dispatches of the type told to start by `now` (the ended runs'
            ends are not later).
        snapshot: What the latest accepted snapshot of the type says.
        now: The current instant on the bridge's clock.

    Returns:
        (ended run, following run) pairs; the following run `started`, with its `until`.
    """
    ended = [d for d in reported if d.until is not None and d.until <= now]
    following = [
        run
        for dispatch in (told if ended else ())
        if (run := snapshot.told_run(dispatch)) is not None
        and (run.dispatch.until is None or run.dispatch.until > now)
    ]
    return tuple(
        (before, run.dispatch)
        for before in ended
        for run in following
        if run.dispatch.id != before.id and before.until is not None and run.start <= before.until
    )


def end_of(dispatch: Dispatch, *, live: bool) -> datetime:
    """Return when a run with an `until` stops: at it, or `LIVE_GRACE` later when live.

    Args:
        dispatch: A running dispatch with an `until`.
        live: Whether the view is live (and the run already known).

    Returns:
        The instant on the bridge's clock.
    """
    assert dispatch.until is not None
    return dispatch.until + LIVE_GRACE if live else dispatch.until


@dataclass(frozen=True)
class StartActor:
    """Create and start the actor of `key` for `dispatch`."""

    key: Hashable
    dispatch: Dispatch


@dataclass(frozen=True)
class UpdateActor:
    """Send the running actor of `key` the information of `dispatch`."""

    key: Hashable
    dispatch: Dispatch


@dataclass(frozen=True)
class StopActor:
    """Stop the actor of `key`; `dispatch` is the one it last ran for."""

    key: Hashable
    dispatch: Dispatch
    reason: str


Action = StartActor | UpdateActor | StopActor


def _run_start(dispatch: Dispatch) -> datetime:
    """When the current run of a dispatch began, as far as the dispatch tells."""
    if dispatch.until is not None and dispatch.duration is not None:
        return dispatch.until - dispatch.duration
    return dispatch.start_time


def _start_order(dispatch: Dispatch) -> tuple[datetime, int]:
    return _run_start(dispatch), int(dispatch.id)


@dataclass
class _Group:
    """The dispatches one actor serves, most recently started or changed last."""

    members: dict[DispatchId, Dispatch]
    shown: Dispatch
    """What the actor was started with or last updated to."""
    has_actor: bool = True

    @property
    def current(self) -> Dispatch:
        """The dispatch the actor should reflect: the newest member."""
        return next(reversed(self.members.values()))


class ActorPlanner:
    """Decides actor starts, updates and stops for one dispatch type.

    Dispatches with equal identities share an actor. The actor's information
    always comes from a running member of its group: the one that started or
    changed most recently; when that one stops while others still run, the actor
    is updated to the newest remaining one (never left with a finished dispatch's
    parameters). A group whose start failed waits for `retry()`.
    """

    def __init__(self, identity: Callable[[Dispatch], Hashable]) -> None:
        """Create a planner.

        Args:
            identity: Maps a dispatch to the key of the actor that serves it.
        """
        self._identity = identity
        self._groups: dict[Hashable, _Group] = {}

    @property
    def running_keys(self) -> frozenset[Hashable]:
        """The keys whose actor runs (or is being started)."""
        return frozenset(key for key, group in self._groups.items() if group.has_actor)

    def served(self) -> tuple[tuple[Hashable, int], ...]:
        """Return the key and id of every dispatch a group serves."""
        return tuple((key, int(i)) for key, group in self._groups.items() for i in group.members)

    def members(self, key: Hashable) -> tuple[DispatchId, ...]:
        """Return the ids of the dispatches a group serves, oldest first.

        Args:
            key: The group's key.

        Returns:
            The ids; empty for an unknown key.
        """
        group = self._groups.get(key)
        return () if group is None else tuple(group.members)

    def reconcile(
        self,
        running: Iterable[Dispatch],
        *,
        reason: str = STOPPED,
        going_on: Iterable[Handoff] = (),
    ) -> list[Action]:
        """Bring the groups to match the running dispatches.

        Args:
            running: Every dispatch of the type that runs now.
            reason: The stop message for actors whose group no longer runs.
            going_on: Runs that ended and the told runs that follow them
                back-to-back (`handoffs`): an actor of the identity of both that
                runs and serves nothing else goes on into the following run
                instead of stopping; no actor starts for one.

        Returns:
            The actions, stops first, then starts and updates.
        """
        wanted: dict[Hashable, list[Dispatch]] = {}
        for dispatch in sorted(running, key=_start_order):
            wanted.setdefault(self._identity(dispatch), []).append(dispatch)
        following: dict[Hashable, dict[DispatchId, Dispatch]] = {}
        for ended, run in going_on:
            key = self._identity(ended)
            group = self._groups.get(key)
            if key in wanted or group is None or not group.has_actor:
                continue
            if self._identity(run) == key:
                following.setdefault(key, {})[run.id] = run
        for key, runs in following.items():
            wanted[key] = sorted(runs.values(), key=_start_order)

        stops: list[Action] = []
        for key in [key for key in self._groups if key not in wanted]:
            group = self._groups.pop(key)
            if group.has_actor:
                stops.append(StopActor(key, group.shown, reason))

        others: list[Action] = []
        for key, dispatches in wanted.items():
            existing = self._groups.get(key)
            if existing is None:
                members = {d.id: d for d in dispatches}
                self._groups[key] = _Group(members=members, shown=dispatches[-1])
                others.append(StartActor(key, dispatches[-1]))
                continue
            group = existing
            by_id = {d.id: d for d in dispatches}
            kept = {
                i: by_id[i]
                for i, old in group.members.items()
                if i in by_id and runtime_state(old) == runtime_state(by_id[i])
            }
            # Changed members move to the end (newest), then new ones in start order.
            changed = [d for d in dispatches if d.id in group.members and d.id not in kept]
            added = [d for d in dispatches if d.id not in group.members]
            group.members = kept | {d.id: d for d in changed + added}
            current = group.current
            if runtime_state(current) == runtime_state(group.shown) and (
                current.id == group.shown.id
            ):
                continue
            group.shown = current
            if group.has_actor:
                others.append(UpdateActor(key, current))
            else:
                group.has_actor = True
                others.append(StartActor(key, current))
        return stops + others

    def start_failed(self, key: Hashable) -> None:
        """Record that the actor of `key` could not be created or started.

        Args:
            key: The group's key.
        """
        group = self._groups.get(key)
        if group is not None:
            group.has_actor = False

    def retry(self, key: Hashable) -> StartActor | None:
        """Return a start for a group that should run but has no actor (a failed start).

        Marks it as started; the caller reports a failure again with `start_failed`.

        Args:
            key: The group's key.

        Returns:
            The start, or None when the group has an actor or no longer runs.
        """
        group = self._groups.get(key)
        if group is None or group.has_actor:
            return None
        group.shown = group.current
        group.has_actor = True
        return StartActor(key, group.shown)

    @property
    def waiting_keys(self) -> frozenset[Hashable]:
        """The keys of groups that should run but have no actor."""
        return frozenset(key for key, group in self._groups.items() if not group.has_actor)

    def stop_all(self, reason: str) -> list[StopActor]:
        """Forget every group and return a stop for each running actor.

        Args:
            reason: The stop message.

        Returns:
            The stops.
        """
        stops = [
            StopActor(key, group.shown, reason)
            for key, group in self._groups.items()
            if group.has_actor
        ]
        self._groups.clear()
        return stops


def running_state_changes(
    previous: Mapping[DispatchId, Dispatch],
    current: Mapping[DispatchId, Dispatch],
    stopped: Callable[[Dispatch], Dispatch],
) -> list[Dispatch]:
    """Return the running state messages for a change of the running set.

    A message for every dispatch that started, and for every running one whose
    runtime parameters changed, then one for every dispatch that stopped.

    Args:
        previous: The running dispatches before, by id.
        current: The running dispatches now, by id.
        stopped: Makes the stop message of a dispatch that no longer runs.

    Returns:
        The messages, in that order.
    """
    messages = [
        dispatch
        for dispatch_id, dispatch in current.items()
        if dispatch_id not in previous
        or runtime_state(previous[dispatch_id]) != runtime_state(dispatch)
    ]
    messages += [stopped(d) for dispatch_id, d in previous.items() if dispatch_id not in current]
    return messages
