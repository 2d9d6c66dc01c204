"""The `Dispatcher`: the thin async shell around the view, the planner and the actors.

Three tasks: the `BrokerLink` keeps a broker connection and hands each message to
`message`, which feeds the `BridgeView`; the `ReconcileTimer` (`_timer.py`) sleeps
until the next local deadline; a watchdog logs a stalled event loop. Messages and the
timer (for the types due) call `_reconcile`, which reads the clock once, asks
`confirmed_running` and each type's `ActorSet` what to do, and does it without waiting
for any actor (factories and stops run in tasks of their own). Decisions live in
`_planner.py` and `_view.py`; topic parsing and the bridge status' wording in `_routing.py`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Hashable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Self, SupportsInt

import aiomqtt
from frequenz.channels import Receiver

from actor_sdk import wire
from actor_sdk._actor_api import ActorFactory
from actor_sdk._actor_set import DEFAULT_FACTORY_TIMEOUT, ActorCounts, ActorSet
from actor_sdk._actor_status import StatusPublisher, choose_actor_id, release_actor_id
from actor_sdk._bridge_clock import BridgeClock
from actor_sdk._broker_link import BrokerLink
from actor_sdk._dispatch_model import Dispatch
from actor_sdk._event import DispatchEvent
from actor_sdk._merge_strategies import MergeStrategy
from actor_sdk._reconciler import Reconciler
from actor_sdk._routing import TopicParser, bridge_status_line
from actor_sdk._service import BackgroundService
from actor_sdk._subscribers import Subscribers
from actor_sdk._timer import ReconcileTimer
from actor_sdk._upcoming import UpcomingFeeds, UpcomingRun
from actor_sdk._view import BridgeView
from actor_sdk._watchdog import watch_event_loop
from actor_sdk.journal import ActorJournal
from actor_sdk.mqtt import BrokerSettings
from actor_sdk.wall_clock import utc_now

__all__ = ["Dispatcher"]

_logger = logging.getLogger(__name__)

DEFAULT_MAX_BLIND_TIME = timedelta(seconds=300)
"""How long an endless run (no `until`) goes on without a live view before it stops."""


class Dispatcher(BackgroundService):
    """Manages actors of a microgrid from the schedule a dispatch-bridge publishes.

    A drop-in for `frequenz.dispatch.Dispatcher`'s managing API: an async context
    manager (starts, waits for the first sync, stops on exit), awaitable (until
    stopped), with `start_managing`, `stop_managing`, `is_managed`,
    `new_lifecycle_events_receiver`, `new_running_state_event_receiver` and
    `wait_for_initialization`.

    `stop()` (or leaving the context) stops every managed actor, disconnects and
    closes every receiver. A broker outage never makes it fail: it reconnects.

    Example:
        ```python
        async with Dispatcher(microgrid_id=1, broker="mqtt://actor:pw@edge:1883") as d:
            await d.start_managing("EXAMPLE_TYPE", actor_factory=create_actor)
            await d
        ```
    """

    def __init__(
        self,
        *,
        microgrid_id: SupportsInt,
        broker: str,
        topic_root: str = wire.DEFAULT_TOPIC_ROOT,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive: int = 15,
        reconnect_delay: timedelta = timedelta(seconds=0.5),
        max_reconnect_delay: timedelta = timedelta(seconds=30),
        sync_timeout: timedelta = timedelta(seconds=3),
        max_blind_time: timedelta = DEFAULT_MAX_BLIND_TIME,
        journal: Path | str | None = None,
        actor_id: str | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Create a dispatcher; nothing connects before `start()`.

        Args:
            microgrid_id: The microgrid whose dispatches to follow (an `int`, or a
                `MicrogridId` as `frequenz-dispatch` takes it).
            broker: `mqtt://user:pass@host:port` or `mqtts://...`; credentials may
                also come from `username`/`password` or `MQTT_USERNAME`,
                `MQTT_PASSWORD` / `MQTT_PASSWORD_FILE`.
            topic_root: The topic root; `{microgrid_id}` is replaced.
            username: The broker user (overrides the URL's).
            password: The broker password (overrides the URL's).
            tls_context: TLS settings (implies TLS).
            ca_file: CA bundle for `mqtts://`.
            cert_file: Client certificate for `mqtts://`.
            key_file: Key of the client certificate.
            keepalive: MQTT keepalive in seconds: a silent broker or network is
                noticed within 1.5 times this.
            reconnect_delay: The first wait before reconnecting; doubles per failure.
            max_reconnect_delay: The longest wait before reconnecting.
            sync_timeout: How long a silence (no message at all, counted from the
                last one) ends the wait for a complete retained tree after
                subscribing; what is missing is logged, what arrived is used. Live
                messages alone hold the wait open for at most 4 sync timeouts after
                the last retained one.
            max_blind_time: How long an endless run (duration None, no `until`)
                goes on without a live view before its actor is stopped. Runs with
                an `until` always stop at it, live view or not.
            actor_id: The MQTT client id and the last level of the status topic
                `microgrid/<id>/actors/<actor_id>` (`[A-Za-z0-9_-]`, 1 to 128); None:
                `<host>-<program>-mg<microgrid_id>` (see docs/actor-sdk.md).
            clock: The wall clock (UTC); tests may pass another (a skewed one).
            journal: A file to journal each actor's start, update, stop and failure
                in (JSON lines, rotated: `actor_sdk.journal`); None keeps none.

        Raises:
            BrokerUrlError: The broker URL or a TLS option is not usable.
            ValueError: The actor id has a character outside `[A-Za-z0-9_-]`.
        """
        microgrid_id = self._microgrid_id = int(microgrid_id)
        super().__init__(name=f"dispatcher-{microgrid_id}")
        self._settings = BrokerSettings.from_url(
            broker,
            username=username,
            password=password,
            tls_context=tls_context,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            keepalive=keepalive,
        )
        try:
            self._layout = wire.TopicLayout.for_microgrid(microgrid_id, topic_root)
        except wire.WireError as error:
            from actor_sdk._errors import BrokerUrlError  # noqa: PLC0415

            raise BrokerUrlError(str(error)) from None
        self._journal = ActorJournal.open(journal, microgrid_id)
        # Claimed once nothing below can raise, so a claimed default is never lost.
        self.actor_id, self._claimed = choose_actor_id(actor_id, microgrid_id)
        self._status = StatusPublisher(
            wire.actor_status_topic(microgrid_id, self.actor_id),
            lambda: self._reconciler.managed,
            clock=clock,
            who=f"user {self._settings.username!r} with client id {self.actor_id!r}",
            in_sync=lambda: self._view.in_sync,
        )
        self._followed: set[str] = set()
        """The types whose dispatch topics are subscribed (`_follow`)."""
        self._link = BrokerLink(
            self._settings,
            subscriptions=[
                # The status in a later SUBSCRIBE: on Mosquitto it comes after the tree, so
                # the sync ends with it; elsewhere the tree's own counts end it (`_resync`).
                [
                    (f"{self._layout.root}/+/running", 1),
                    (self._status.topic, 1),  # to see that the broker stored ours
                ],
                [(self._layout.status, 1)],
            ],
            probe_topic=f"{self._layout.root}/sdk-probe",
            reconnect_first=reconnect_delay.total_seconds(),
            reconnect_cap=max_reconnect_delay.total_seconds(),
            sync_timeout=sync_timeout.total_seconds(),
            clock=clock,
            identifier=self.actor_id,
            will=self._status.will,
            farewell=self._status.farewell,
        )
        self._clock = clock
        self._view = BridgeView(microgrid_id)
        self._view.followed = self._followed.__contains__
        self._bridge_clock = BridgeClock()
        self._subscribers = Subscribers(self._view)
        self._upcoming = UpcomingFeeds(
            lambda: self._bridge_clock.to_bridge(self._clock()), self._view.dispatch
        )
        self._topics = TopicParser(self._layout)
        self._initialized = asyncio.Event()
        self._reconciler = Reconciler(
            self._view,
            self._bridge_clock,
            self._subscribers,
            max_blind_time=max_blind_time,
            clock=clock,
        )
        due = partial(self._reconcile, due=True)
        self._timer = ReconcileTimer(lambda: self._reconciler.deadline, self._reconcile, due, clock)

    # --- service -----------------------------------------------------------------

    @property
    def microgrid_id(self) -> int:
        """The microgrid this dispatcher follows."""
        return self._microgrid_id

    @property
    def is_live(self) -> bool:
        """Whether the view is live: in sync, and an `online` status arrived recently."""
        return self._view.is_live(self._clock())

    @property
    def knows_bridge_clock(self) -> bool:
        """Whether the bridge's clock is estimated yet (own-clock starts wait for it)."""
        return self._bridge_clock.converged

    @property
    def clock_offset(self) -> timedelta:
        """The local clock minus the bridge's, as deadlines use it (zero until known)."""
        return self._bridge_clock.offset

    async def __aenter__(self) -> Self:
        """Start and wait for the first sync with the broker.

        Returns:
            This dispatcher.
        """
        self.start()
        await self.wait_for_initialization()
        return self

    async def wait_for_initialization(
        self,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 (the issue's name)
    ) -> None:
        """Wait until the retained state was received once after the first connect.

        While waiting, the reasons are logged as they happen (broker unreachable,
        no bridge status yet).

        Args:
            timeout: The longest wait (a `timedelta` or seconds); None waits forever.

        Raises:
            TimeoutError: Not initialized within `timeout`; the message says what
                was missing.
            BaseException: The dispatcher failed before that.
        """
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        waiter = asyncio.ensure_future(self._initialized.wait())
        waited_for: set[asyncio.Future[Any]] = {waiter}
        if self._task is not None:
            waited_for.add(self._task)
        try:
            await asyncio.wait(waited_for, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._initialized.is_set():
            return
        if self._task is not None and self._task.done():
            await self.wait()
        raise TimeoutError(f"dispatcher not initialized within {seconds:g} s: {self._missing()}")

    def _missing(self) -> str:
        where = self._link.where
        if not self._link.connected:
            return f"cannot reach the broker at {where} ({self._link.problem or 'connecting'})"
        return (
            f"connected to {where}, but the retained state of microgrid "
            f"{self._microgrid_id} was not received yet"
        )

    # --- managing ----------------------------------------------------------------

    def is_managed(self, dispatch_type: str) -> bool:
        """Return whether actors of a type are managed.

        Args:
            dispatch_type: The type.

        Returns:
            True between `start_managing` and `stop_managing` of the type.
        """
        return dispatch_type in self._reconciler.managed

    async def start_managing(
        self,
        dispatch_type: str,
        *,
        actor_factory: ActorFactory,
        merge_strategy: MergeStrategy | None = None,
        retry_interval: timedelta = timedelta(seconds=60),
        factory_timeout: timedelta = DEFAULT_FACTORY_TIMEOUT,
    ) -> None:
        """Create, start, update and stop actors for the dispatches of a type.

        While connected, it returns once the broker acknowledged the subscription to
        the type's dispatch topics: what is published to them afterwards reaches it.

        Args:
            dispatch_type: The type.
            actor_factory: Makes an actor from a `DispatchInfo` and a receiver of
                later updates; may be a coroutine function.
            merge_strategy: Which dispatches share an actor: `MergeByType`,
                `MergeByTypeTarget`, a subclass; None is one actor per dispatch.
            retry_interval: How long to wait before calling a failed factory again.
            factory_timeout: How long the factory may take to return an actor; a
                factory still busy then is cancelled, and counts as failed.
        """
        if dispatch_type in self._reconciler.managed:
            _logger.debug("type %r is already managed; ignoring", dispatch_type)
            return
        identity: Callable[[Dispatch], Hashable] = (
            (lambda dispatch: dispatch.id) if merge_strategy is None else merge_strategy.identity
        )
        self._reconciler.managed[dispatch_type] = ActorSet(
            dispatch_type,
            factory=actor_factory,
            identity=identity,
            retry_interval=retry_interval,
            clock=self._clock,
            factory_timeout=factory_timeout,
            on_failure=self._timer.request,
            record=None if self._journal is None else partial(self._journal.record, dispatch_type),
            on_started=self._status.changed,
            counts=self._reconciler.counts.setdefault(dispatch_type, ActorCounts()),
        )
        _logger.info("managing actors of type %r", dispatch_type)
        self._follow(dispatch_type)
        await self._link.subscribed()
        await self._reconcile(dispatch_type)

    async def stop_managing(self, dispatch_type: str) -> None:
        """Stop managing a type: its actors are stopped.

        Args:
            dispatch_type: The type.
        """
        async with self._reconciler.lock:
            managed = self._reconciler.managed.pop(dispatch_type, None)
        self._status.changed()
        if managed is not None:  # outside the lock: a slow stop holds up nobody else
            await managed.stop_all("Stopped managing this dispatch type")

    # --- receivers ---------------------------------------------------------------

    def new_lifecycle_events_receiver(self, dispatch_type: str) -> Receiver[DispatchEvent]:
        """Return a receiver of `Created`, `Updated` and `Deleted` events of a type.

        It starts with a `Created` for every dispatch of the type known now.

        Args:
            dispatch_type: The type.

        Returns:
            The receiver.
        """
        self._follow(dispatch_type)
        return self._subscribers.lifecycle_receiver(dispatch_type)

    async def new_running_state_event_receiver(
        self,
        dispatch_type: str,
        *,
        merge_strategy: MergeStrategy | None = None,
    ) -> Receiver[Dispatch]:
        """Return a receiver of dispatches whose running state or parameters changed.

        It starts with every dispatch of the type that runs now; then a message comes
        when a dispatch starts, stops (`started` False), or changes a runtime
        parameter (target, payload, dry_run, duration, start or end) while running.
        With a merge strategy, its `filter` decides what passes (with `MergeByType`,
        a stop passes only when no other dispatch of its group still runs). Like
        `start_managing`, it returns once the type's dispatch topics are subscribed.

        Args:
            dispatch_type: The type.
            merge_strategy: The merge strategy; None passes everything.

        Returns:
            The receiver.
        """
        self._follow(dispatch_type)
        await self._link.subscribed()
        async with self._reconciler.lock:
            return await self._subscribers.running_state_receiver(
                dispatch_type, merge_strategy, self._reconciler.effective.get(dispatch_type, {})
            )

    def new_upcoming_receiver(
        self, dispatch_type: str, *, within: timedelta = timedelta(minutes=5)
    ) -> Receiver[UpcomingRun]:
        """Return a receiver of each run of a type once its start is `within` away.

        For an actor to prepare (pre-charge, ramp) before a start. The rules (once per
        run, again when its end changes, `cancelled` runs, reconnects) are in
        `actor_sdk._upcoming` and docs/actor-sdk.md; the bridge must publish its
        `upcoming` topics (`run --upcoming-hours`, on by default).

        Args:
            dispatch_type: The type.
            within: How long before its start a run is delivered (positive).

        Returns:
            The receiver; runs already within the window come at once.
        """
        self._follow(dispatch_type)  # each run comes with its dispatch
        if not self._upcoming.follows(dispatch_type):
            self._link.subscribe(self._layout.upcoming(dispatch_type))
        return self._upcoming.receiver(dispatch_type, within)

    # --- the loops ---------------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._link.run(self), name="dispatcher-connection")
                group.create_task(self._timer.run(), name="dispatcher-timer")
                watchdog = watch_event_loop(self._reconciler.actors_present)
                group.create_task(watchdog, name="dispatcher-watchdog")
                group.create_task(self._upcoming.run(), name="dispatcher-upcoming")
                group.create_task(self._status.run(), name="dispatcher-actor-status")
        finally:
            await self._shutdown()
            if self._claimed:
                self._claimed = False
                release_actor_id(self.actor_id)

    async def _shutdown(self) -> None:
        async with self._reconciler.lock:
            managed, self._reconciler.managed = list(self._reconciler.managed.values()), {}
            # Concurrently: one actor's slow stop does not delay the others'.
            await asyncio.gather(*(actors.stop_all("Dispatcher stopped") for actors in managed))
            await self._subscribers.close()
            await self._upcoming.close()
        if self._journal is not None:
            await asyncio.to_thread(self._journal.writer.close)

    async def _reconcile(self, only: str | None = None, *, due: bool = False) -> None:
        await (self._reconciler.run_due() if due else self._reconciler.run(only))
        self._timer.wake()  # the timer takes the new deadline
        self._status.changed()

    # --- the link's handler --------------------------------------------------------

    @property
    def in_sync(self) -> bool:
        """Whether the retained state of this connection was received completely."""
        return self._view.in_sync

    async def connected(self, client: aiomqtt.Client | None) -> None:
        """A connection is up (the retained state comes again), or gone (None).

        Args:
            client: The connected client, or None.
        """
        self._status.connected(client)
        if client is not None:
            self._view.begin_sync()

    def _follow(self, dispatch_type: str) -> None:
        # The dispatch topics of a type, once it is managed (own-clock starts) or has a
        # receiver (stop messages' context, lifecycle events); retained ones then
        # arrive like live ones (a lifecycle receiver gets a `Created` for each).
        if dispatch_type not in self._followed:
            self._followed.add(dispatch_type)
            self._link.subscribe(self._layout.dispatches(dispatch_type))

    async def sync_given_up(self, why: str) -> None:
        """The retained tree is still incomplete when the wait ends: go on with it.

        Args:
            why: What ended the wait ("... after the last message").
        """
        _logger.warning(
            "the retained state of microgrid %d is incomplete %s "
            "(missing: %s); going on with what arrived (deletions of dispatches are concluded "
            "only in the complete types)",
            self._microgrid_id,
            why,
            "; ".join(self._view.missing()),
        )
        await self._finish_sync()

    async def lost(self) -> None:
        """The connection is gone: no live view (known runs go on to their `until`)."""
        if self._view.in_sync or self._reconciler.was_live:
            self._view.lost_connection()
            await self._reconcile()
        else:
            self._view.lost_connection()

    async def message(self, message: aiomqtt.Message, arrived: datetime) -> None:
        """Handle one message; nothing it does can end the dispatcher (errors are logged).

        Args:
            message: The message.
            arrived: When it arrived (the wall clock).
        """
        topic = message.topic.value
        raw = message.payload
        payload = raw if isinstance(raw, bytes) else (b"" if raw is None else str(raw).encode())
        if topic == self._status.topic:
            self._status.echo(payload)
            return
        try:
            await self._route(
                self._topics.parse(topic), payload, retained=bool(message.retain), arrived=arrived
            )
        except (ValueError, OverflowError) as error:  # WireError is a ValueError
            _logger.warning("ignoring the message on topic %s: %s", topic, error)
        except Exception:
            _logger.exception("handling the message on topic %s failed; carrying on", topic)

    async def _route(
        self, ref: wire.TopicRef, payload: bytes, *, retained: bool, arrived: datetime
    ) -> None:
        match ref.kind:
            case wire.TopicKind.STATUS:
                await self._on_status(payload, retained=retained, arrived=arrived)
            case wire.TopicKind.RUNNING:
                assert ref.dispatch_type is not None
                snapshot = self._view.apply_running(ref.dispatch_type, payload)
                if snapshot is not None and not retained:
                    self._observe_bridge_time(snapshot.as_of, arrived)
                if not self._view.in_sync:
                    await self._maybe_finish_sync()
                elif snapshot is not None or not payload:
                    await self._reconcile(ref.dispatch_type)
            case wire.TopicKind.DISPATCH:
                assert ref.dispatch_type is not None and ref.dispatch_id is not None
                events = self._view.apply_dispatch(
                    ref.dispatch_type,
                    ref.dispatch_id,
                    payload,
                    events=self._subscribers.wants_lifecycle(ref.dispatch_type),
                )
                await self._subscribers.publish_lifecycle(events)
                if self._view.in_sync:  # its `next_run` is an own-clock start
                    deadline = self._reconciler.deadline
                    if self._reconciler.needs_run(ref.dispatch_type, ref.dispatch_id):
                        await self._reconcile(ref.dispatch_type)
                    elif self._reconciler.deadline != deadline:
                        self._timer.wake()
                if not self._view.in_sync:
                    await self._maybe_finish_sync()
            case wire.TopicKind.UPCOMING:
                assert ref.dispatch_type is not None
                await self._upcoming.apply(ref.dispatch_type, payload)
            case _:
                pass

    async def _on_status(self, payload: bytes, *, retained: bool, arrived: datetime) -> None:
        try:
            changed = self._view.apply_status(payload, retained=retained, arrived=arrived)
        except wire.WireError as error:
            _logger.warning(
                "the bridge status on %s cannot be read (%s): the view is not live; "
                "nothing starts, running actors stop at the end of their run (a bridge "
                "of a newer contract? upgrade the SDK)",
                self._layout.status,
                error,
            )
            changed = True
        status = self._view.status
        if status is not None and status.as_of is not None and not retained:
            self._observe_bridge_time(status.as_of, arrived)
        if changed:
            _logger.log(*bridge_status_line(self._view.status))
        if not self._view.in_sync:
            await self._maybe_finish_sync()
        elif changed or self._view.is_live(self._clock()) != self._reconciler.was_live:
            await self._reconcile()
        # Otherwise only the liveness was extended: the timer finds it at the old deadline.

    def _observe_bridge_time(self, as_of: datetime, arrived: datetime) -> None:
        deadline = self._reconciler.deadline
        if (line := self._reconciler.observe_bridge_time(as_of, arrived)) is not None:
            _logger.warning("%s", line)
        if self._reconciler.deadline != deadline:  # converged: the starts told are due
            self._timer.wake()

    async def _maybe_finish_sync(self) -> None:
        if not self._view.missing():
            await self._finish_sync()

    async def _finish_sync(self) -> None:
        events = self._view.end_sync(self._subscribers.wants_lifecycle)
        await self._subscribers.publish_lifecycle(events)
        _logger.info(
            "in sync with the retained state of microgrid %d (%s)",
            self._microgrid_id,
            "live" if self._view.is_live(self._clock()) else "waiting for a live bridge status",
        )
        self._initialized.set()
        await self._reconcile()
