"""The `Dispatcher`: the thin async shell around the view and the planner.

One task keeps a broker connection (a fresh aiomqtt client per connection, capped and
jittered backoff between attempts), subscribes to the retained topics of the
microgrid, and feeds every message to the `BridgeView`. Another sleeps until the next
local deadline (a run's `until` while the view is not live, a factory retry). Both
call `_reconcile`, which reads the clock once, asks `confirmed_running` and each
type's `ActorPlanner` what to do, and does it: create, start, update and stop actors,
and send running state messages. Decisions live in `_planner.py` and `_view.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Self, SupportsInt

import aiomqtt
from frequenz.channels import BroadcastChannel, Receiver, Sender
from frequenz.client.dispatch.types import DispatchId

from actor_sdk import wire
from actor_sdk._actor import ActorFactory
from actor_sdk._actors import ActorSet
from actor_sdk._connection import BrokerSettings, ReceivedQueue, SkewMonitor, reconnect_delay
from actor_sdk._dispatch import Dispatch
from actor_sdk._event import Created, DispatchEvent
from actor_sdk._merge_strategies import MergeStrategy
from actor_sdk._planner import (
    STOPPED,
    STOPPED_UNCONFIRMED,
    confirmed_running,
    running_state_changes,
)
from actor_sdk._receivers import PrimedReceiver
from actor_sdk._service import BackgroundService
from actor_sdk._view import BridgeView

__all__ = ["Dispatcher"]

_logger = logging.getLogger(__name__)

_TOPIC_CACHE_SIZE = 1_000_000


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _StateSubscription:
    sender: Sender[Dispatch]
    strategy: MergeStrategy | None


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
        clock: Callable[[], datetime] = _utc_now,
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
            keepalive: MQTT keepalive in seconds (how soon a silent broker is noticed).
            reconnect_delay: The first wait before reconnecting; doubles per failure.
            max_reconnect_delay: The longest wait before reconnecting.
            sync_timeout: How long a silence (no message at all, counted from the
                last one) ends the wait for the retained bridge status after
                subscribing; the retained state is then taken as complete.
            clock: The wall clock (UTC); tests may pass another.

        Raises:
            BrokerUrlError: The broker URL or a TLS option is not usable.
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
        self._reconnect_first = reconnect_delay.total_seconds()
        self._reconnect_cap = max_reconnect_delay.total_seconds()
        self._sync_timeout = sync_timeout.total_seconds()
        self._clock = clock
        self._view = BridgeView(microgrid_id)
        self._skew = SkewMonitor()
        self._effective: dict[str, dict[DispatchId, Dispatch]] = {}
        self._managed: dict[str, ActorSet] = {}
        self._state_subscriptions: dict[str, list[_StateSubscription]] = {}
        self._lifecycle_senders: dict[str, list[Sender[DispatchEvent]]] = {}
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._deadline: datetime | None = None
        self._deadlines: dict[str, datetime] = {}
        self._topics: dict[str, wire.TopicRef] = {}
        self._initialized = asyncio.Event()
        self._was_live = False
        self._received: ReceivedQueue | None = None

    # --- service -----------------------------------------------------------------

    @property
    def microgrid_id(self) -> int:
        """The microgrid this dispatcher follows."""
        return self._microgrid_id

    @property
    def is_live(self) -> bool:
        """Whether the dispatcher has a live view: connected, in sync, bridge online."""
        return self._view.live

    async def __aenter__(self) -> Self:
        """Start and wait for the first sync with the broker.

        Returns:
            This dispatcher.
        """
        self.start()
        await self.wait_for_initialization()
        return self

    async def wait_for_initialization(self) -> None:
        """Wait until the retained state was received once after the first connect.

        Raises:
            BaseException: The dispatcher failed before that.
        """
        if self._task is None:
            await self._initialized.wait()
            return
        waiter = asyncio.ensure_future(self._initialized.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._initialized.is_set():
            await self.wait()

    # --- managing ----------------------------------------------------------------

    def is_managed(self, dispatch_type: str) -> bool:
        """Return whether actors of a type are managed.

        Args:
            dispatch_type: The type.

        Returns:
            True between `start_managing` and `stop_managing` of the type.
        """
        return dispatch_type in self._managed

    async def start_managing(
        self,
        dispatch_type: str,
        *,
        actor_factory: ActorFactory,
        merge_strategy: MergeStrategy | None = None,
        retry_interval: timedelta = timedelta(seconds=60),
    ) -> None:
        """Create, start, update and stop actors for the dispatches of a type.

        Args:
            dispatch_type: The type.
            actor_factory: Makes an actor from a `DispatchInfo` and a receiver of
                later updates; may be a coroutine function.
            merge_strategy: Which dispatches share an actor: `MergeByType`,
                `MergeByTypeTarget`, a subclass; None is one actor per dispatch.
            retry_interval: How long to wait before calling a failed factory again.
        """
        if dispatch_type in self._managed:
            _logger.debug("type %r is already managed; ignoring", dispatch_type)
            return
        identity: Callable[[Dispatch], Hashable] = (
            (lambda dispatch: dispatch.id) if merge_strategy is None else merge_strategy.identity
        )
        self._managed[dispatch_type] = ActorSet(
            dispatch_type,
            factory=actor_factory,
            identity=identity,
            retry_interval=retry_interval,
            clock=self._clock,
        )
        _logger.info("managing actors of type %r", dispatch_type)
        await self._reconcile(dispatch_type)

    async def stop_managing(self, dispatch_type: str) -> None:
        """Stop managing a type: its actors are stopped.

        Args:
            dispatch_type: The type.
        """
        async with self._lock:
            managed = self._managed.pop(dispatch_type, None)
            if managed is not None:
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
        known = sorted(self._view.dispatches(dispatch_type).values(), key=lambda d: d.id)
        sender, receiver = BroadcastChannel[DispatchEvent](
            name=f"lifecycle-{dispatch_type}", limit=16384
        )
        self._lifecycle_senders.setdefault(dispatch_type, []).append(sender)
        return PrimedReceiver([Created(dispatch) for dispatch in known], receiver)

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
        a stop passes only when no other dispatch of its group still runs).

        Args:
            dispatch_type: The type.
            merge_strategy: The merge strategy; None passes everything.

        Returns:
            The receiver.
        """
        async with self._lock:
            sender, receiver = BroadcastChannel[Dispatch](
                name=f"running-state-{dispatch_type}", limit=16384
            )
            subscription = _StateSubscription(sender, merge_strategy)
            current = self._effective.get(dispatch_type, {})
            for message in running_state_changes({}, current, lambda d: d):
                await subscription.sender.send(message)
            self._state_subscriptions.setdefault(dispatch_type, []).append(subscription)
        return receiver

    # --- the loops ---------------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._connection_loop(), name="dispatcher-connection")
                group.create_task(self._timer_loop(), name="dispatcher-timer")
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        async with self._lock:
            for managed in list(self._managed.values()):
                await managed.stop_all("Dispatcher stopped")
            self._managed.clear()
            for senders in self._lifecycle_senders.values():
                for sender in senders:
                    await sender.aclose()
            for subscriptions in self._state_subscriptions.values():
                for subscription in subscriptions:
                    await subscription.sender.aclose()
            self._lifecycle_senders.clear()
            self._state_subscriptions.clear()

    async def _connection_loop(self) -> None:
        where = self._settings.describe()
        failures = 0
        while True:
            connected = False
            client, received = self._settings.new_client(self._clock)
            try:
                async with client:
                    connected = True
                    failures = 0
                    _logger.info("connected to the broker at %s", where)
                    await self._session(client, received)
            except aiomqtt.MqttError as error:
                if connected:
                    _logger.warning("lost the broker connection to %s: %s", where, error)
                else:
                    _logger.warning("cannot connect to the broker at %s: %s", where, error)
            self._view.lost_connection()
            await self._reconcile()
            delay = reconnect_delay(failures, first=self._reconnect_first, cap=self._reconnect_cap)
            failures += 1
            _logger.info("reconnecting to %s in %.1f s", where, delay)
            await asyncio.sleep(delay)

    async def _session(self, client: aiomqtt.Client, received: ReceivedQueue) -> None:
        root = self._layout.root
        self._received = received
        self._view.begin_sync()
        # The status comes in a later SUBSCRIBE: the broker queues it behind the
        # retained messages of the first one, so it marks the end of the sync.
        await client.subscribe([(f"{root}/+/running", 1), (f"{root}/+/dispatches/+", 1)])
        await client.subscribe(self._layout.status, qos=1)
        loop = asyncio.get_running_loop()
        messages = client.messages
        # One read stays pending across sync timeouts: cancelling aiomqtt's `anext`
        # can drop a message it already took from the queue (seen once per timeout
        # under load), so a timeout only stops waiting for it, never cancels it.
        pending: asyncio.Future[aiomqtt.Message] | None = None
        # Silence ends the sync, not the length of a burst: counted from the last message.
        sync_deadline = loop.time() + self._sync_timeout
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(messages))
                timeout = None if self._view.in_sync else max(0.0, sync_deadline - loop.time())
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                if not done:
                    _logger.warning(
                        "no retained bridge status on %s within %.1f s of the last message: "
                        "taking the retained state received so far as complete; nothing "
                        "starts until the bridge is online",
                        self._layout.status,
                        self._sync_timeout,
                    )
                    await self._finish_sync()
                    continue
                message = pending.result()
                pending = None
                await self._on_message(message)
                # Take what else has arrived without a wake-up per message (a sync brings
                # thousands); a lost connection shows at the next `anext`.
                while not received.empty():
                    await self._on_message(received.get_nowait())
                sync_deadline = loop.time() + self._sync_timeout
        finally:
            if pending is not None:
                pending.cancel()

    async def _timer_loop(self) -> None:
        while True:
            self._wakeup.clear()
            deadline = self._deadline
            if deadline is None:
                await self._wakeup.wait()
                continue
            delay = (deadline - self._clock()).total_seconds()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    # A millisecond late, so that `until <= now` holds on wake-up.
                    async with asyncio.timeout(delay + 0.001):
                        await self._wakeup.wait()
                if self._wakeup.is_set():
                    continue
            await self._reconcile()
            if self._deadline is not None and self._deadline <= self._clock():
                # Never spin: a deadline that a reconcile did not move waits a little.
                _logger.debug("deadline %s did not move; pausing", self._deadline)
                await asyncio.sleep(0.05)

    # --- messages ----------------------------------------------------------------

    async def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        raw = message.payload
        payload = raw if isinstance(raw, bytes) else (b"" if raw is None else str(raw).encode())
        try:
            ref = self._parse(topic)
            match ref.kind:
                case wire.TopicKind.STATUS:
                    try:
                        changed = self._view.apply_status(payload)
                    except wire.WireError:
                        # Even a garbage status marks the end of the retained messages.
                        if not self._view.in_sync:
                            await self._finish_sync()
                        raise
                    if changed:
                        self._log_status()
                    if not self._view.in_sync:
                        await self._finish_sync()
                    elif changed:
                        await self._reconcile()
                case wire.TopicKind.RUNNING:
                    assert ref.dispatch_type is not None
                    snapshot = self._view.apply_running(ref.dispatch_type, payload)
                    if snapshot is not None and not message.retain:
                        self._check_skew(snapshot.as_of, message)
                    if self._view.in_sync and (snapshot is not None or not payload):
                        await self._reconcile(ref.dispatch_type)
                case wire.TopicKind.DISPATCH:
                    assert ref.dispatch_type is not None and ref.dispatch_id is not None
                    events = self._view.apply_dispatch(
                        ref.dispatch_type,
                        ref.dispatch_id,
                        payload,
                        events=ref.dispatch_type in self._lifecycle_senders,
                    )
                    await self._publish_lifecycle(events)
                case wire.TopicKind.EVENTS:
                    pass
        except (ValueError, OverflowError) as error:  # WireError is a ValueError
            _logger.warning("ignoring the message on topic %s: %s", topic, error)

    def _parse(self, topic: str) -> wire.TopicRef:
        # Parsed once per topic: decoding the type level is a good part of the work
        # per message during a sync of many retained dispatches.
        ref = self._topics.get(topic)
        if ref is None:
            ref = self._layout.parse(topic)
            if len(self._topics) >= _TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[topic] = ref
        return ref

    def _check_skew(self, bridge_time: datetime, message: aiomqtt.Message) -> None:
        # Against the time it arrived: a live message handled late under load (behind
        # a retained burst) is not skew.
        arrived = None if self._received is None else self._received.received_at(message)
        line = self._skew.observe(bridge_time, arrived or self._clock())
        if line is not None:
            _logger.warning("%s", line)

    def _log_status(self) -> None:
        status = self._view.status
        if status is None:
            _logger.warning("the retained bridge status was cleared: no live view")
        elif status.state == "online":
            _logger.info(
                "bridge %r is online (session %d, upstream %s)",
                status.bridge,
                status.session,
                status.upstream,
            )
        else:
            _logger.warning(
                "bridge %r is offline (session %d): nothing new starts, running actors "
                "stop at the end of their run",
                status.bridge,
                status.session,
            )

    async def _finish_sync(self) -> None:
        events = self._view.end_sync(lambda dispatch_type: dispatch_type in self._lifecycle_senders)
        await self._publish_lifecycle(events)
        _logger.info(
            "in sync with the retained state of microgrid %d (%s)",
            self._microgrid_id,
            "live" if self._view.live else "bridge not online",
        )
        self._initialized.set()
        await self._reconcile()

    async def _publish_lifecycle(self, events: list[DispatchEvent]) -> None:
        for event in events:
            for sender in self._lifecycle_senders.get(event.dispatch.type, ()):
                await sender.send(event)

    # --- reconciling -------------------------------------------------------------

    async def _reconcile(self, only: str | None = None) -> None:
        """Bring actors and receivers to match the view, at one reading of the clock.

        Args:
            only: The one type whose snapshot changed; None for every type (the
                liveness changed, a deadline passed, a resync ended).
        """
        async with self._lock:
            now = self._clock()
            live = self._view.live
            if live != self._was_live:
                self._was_live = live
                only = None
                _logger.info("view of the bridge is %s", "live" if live else "NOT live")
            if only is None:
                types = (
                    self._view.types()
                    | self._effective.keys()
                    | self._managed.keys()
                    | self._state_subscriptions.keys()
                )
            else:
                types = {only}
            for dispatch_type in sorted(types):
                deadline = await self._reconcile_type(dispatch_type, now=now, live=live)
                if deadline is None:
                    self._deadlines.pop(dispatch_type, None)
                else:
                    self._deadlines[dispatch_type] = deadline
            self._deadline = min(self._deadlines.values(), default=None)
            self._wakeup.set()

    async def _reconcile_type(
        self, dispatch_type: str, *, now: datetime, live: bool
    ) -> datetime | None:
        previous = self._effective.get(dispatch_type, {})
        confirmed = confirmed_running(
            self._view.running(dispatch_type), previous.keys(), now=now, live=live
        )
        current = {dispatch.id: dispatch for dispatch in confirmed}
        if current:
            self._effective[dispatch_type] = current
        else:
            self._effective.pop(dispatch_type, None)
        await self._notify_running_state(dispatch_type, previous, current)
        deadline = None
        managed = self._managed.get(dispatch_type)
        if managed is not None:
            await managed.apply(confirmed, reason=STOPPED if live else STOPPED_UNCONFIRMED)
            if live:  # retries wait for a live view: no deadline without one
                await managed.retry(now)
                deadline = managed.next_retry
        if not live:
            deadline = _earliest(deadline, *(d.until for d in confirmed))
        return deadline

    async def _notify_running_state(
        self,
        dispatch_type: str,
        previous: dict[DispatchId, Dispatch],
        current: dict[DispatchId, Dispatch],
    ) -> None:
        subscriptions = self._state_subscriptions.get(dispatch_type)
        if not subscriptions:
            return

        def stopped(dispatch: Dispatch) -> Dispatch:
            known = self._view.dispatch(dispatch_type, int(dispatch.id))
            if known is None:
                return dispatch.with_state(running=False, deleted=True)
            return known.with_state(running=False)

        messages = running_state_changes(previous, current, stopped)
        if not messages:
            return
        context: dict[DispatchId, Dispatch] = {
            dispatch.id: dispatch.with_state(running=False)
            for dispatch in self._view.dispatches(dispatch_type).values()
        }
        context.update(current)
        for subscription in subscriptions:
            for message in messages:
                strategy = subscription.strategy
                if strategy is None or strategy.filter(context, message):
                    await subscription.sender.send(message)


def _earliest(current: datetime | None, *candidates: datetime | None) -> datetime | None:
    for candidate in candidates:
        if candidate is not None and (current is None or candidate < current):
            current = candidate
    return current
