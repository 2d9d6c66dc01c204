"""The MQTT side of one microgrid: publish the retained topics, keep the broker in line.

The async shell around `bridge.publish_queue.PublishQueue` (what to send, in
which order, with which stamps) and `actor_sdk.mqtt` (the broker). The
schedule loop only calls the synchronous `set`, `clear`, `event` and
`set_status`: it never waits for the broker.

One connection per microgrid, in a loop that never gives up:

1. A new client per attempt (`actor_sdk.mqtt.new_client`), with a will: the
   offline status carrying this connection's session.
2. On connect: the session number grows by one (persisted in the state dir,
   so it grows across restarts too), the status is published, and again every
   `status_interval` seconds (`bridge.status`, `bridge.status_watch`).
3. The broker's retained tree is read back (`bridge.stale_scan`) on a second
   connection of its own, `<client id>-scan`, MQTT 3.1.1 at QoS 0, closed once
   read (the publishing connection when the broker refuses it): stale
   topics are cleared (`PublishQueue.clear_stale`; until the held state is
   authoritative, `mark_authoritative`, the clearing waits), and the dispatch
   topics the broker holds with the same payload are not sent again.
4. Meanwhile the running snapshots and the status are republished, and after
   the read-back every dispatch topic the broker lost, rolled back or never
   had (#13 item 5).

Publishes run with a bounded window of `window` in flight (QoS 1): about 2.5
times faster than awaiting each one; 100 in flight about 20 % faster than 20
(10k retained messages, local Mosquitto; 500 was slower again); a running
snapshot is written at once, outside the window (`bridge.publish_sender`).
A lost connection is retried with capped, jittered exponential backoff.
MQTT v5 is used when the broker speaks it; a broker that refuses it is
spoken to in 3.1.1 from then on.

The client library's errors never leave this module: they are logged where
they happen and turned into a reconnect.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from actor_sdk import mqtt, wire
from actor_sdk.wall_clock import utc_now
from bridge.publish_queue import Outgoing, PublishQueue, RetainedValue
from bridge.publish_sender import Sender
from bridge.stale_scan import (
    RetainedScan,
    finish_scan,
    raise_first,
    subscribe_tree,
    tree_filters,
)
from bridge.status import StatusBoard
from bridge.status_watch import StatusWatch
from bridge.store import SessionCounter

__all__ = ["Publisher", "RetainedValue"]

_logger = logging.getLogger("bridge.publisher")

_CLIENT_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Publisher:
    """Publishes the retained topics of one microgrid and keeps them right across reconnects."""

    def __init__(
        self,
        settings: mqtt.BrokerSettings,
        *,
        microgrid_id: int,
        layout: wire.TopicLayout,
        sessions: SessionCounter,
        bridge_name: str,
        window: int = 100,
        scan_timeout: float = 3.0,
        clock: Callable[[], datetime] = utc_now,
        backoff: mqtt.Backoff | None = None,
        board: StatusBoard | None = None,
    ) -> None:
        """Create the publisher; `run()` connects.

        Args:
            settings: The broker.
            microgrid_id: The microgrid whose topics this publisher owns.
            layout: Its topics.
            sessions: The persisted session counter of this microgrid.
            bridge_name: The `bridge` field of the status.
            window: The most publishes in flight at once.
            scan_timeout: How long the stale-topic scan waits for the next retained message
                before it gives up, in seconds.
            clock: Returns now (for the `as_of` of replacement snapshots).
            backoff: Reconnect delays (default: 0.5 s doubling to 30 s, jittered).
            board: The facts behind the status (default: a board with a 5 s
                status interval and a 24 h maximum age of knowledge).
        """
        self._settings = settings
        self.microgrid_id = microgrid_id
        self.layout = layout
        self._sessions = sessions
        self._bridge_name = bridge_name
        self._scan_timeout = scan_timeout
        self._clock = clock
        self.queue = PublishQueue(microgrid_id=microgrid_id, layout=layout, clock=clock)
        self.queue.session = sessions.last
        self._sender = Sender(
            self.queue,
            window=window,
            on_taken=self._taken,
            on_acknowledged=self._acknowledged,
        )
        self._stop = asyncio.Event()
        self._grace = 3.0
        self._protocol = mqtt.ProtocolChoice()
        self.board = board or StatusBoard(bridge=bridge_name)
        self._watch = StatusWatch(self.board, microgrid_id, clock)
        self._scan: RetainedScan | None = None
        self._scan_on_main = False  # the scan's reader could not connect
        self._authoritative = False
        self._deferred_stale: builtins.set[str] | None = None
        self.connected = asyncio.Event()
        self.connections = 0
        self.published = 0
        # Told each retained value the broker acknowledged (`bridge.metrics` lateness).
        self.on_handed: Callable[[RetainedValue | None], None] | None = None
        self._backoff = backoff or mqtt.Backoff()
        self.listeners: dict[str, Callable[[mqtt.Message], None]] = {}
        """Topics subscribed on every connection (QoS 1), each with who is handed its
        messages (`bridge.request_handler`: the requests to the bridge)."""

    # ---- the synchronous face (never blocks) ----------------------------------

    @property
    def session(self) -> int:
        """The session of the current (or last) connection."""
        return self.queue.session

    def set(self, topic: str, payload: RetainedValue) -> None:
        """Hold a retained topic and publish it.

        Args:
            topic: The topic.
            payload: Its payload; a struct is encoded when sent, a running
                snapshot or status gets the session and sequence number then.
        """
        self.queue.set(topic, payload)
        if isinstance(payload, wire.RunningSnapshot):
            self._sender.send_ahead(topic)
        self._sender.wake()

    def clear(self, topic: str) -> None:
        """Clear a retained topic (publish an empty retained payload).

        Args:
            topic: The topic.
        """
        self.queue.clear(topic)
        self._sender.wake()

    def event(self, topic: str, payload: bytes) -> None:
        """Send a non-retained event (kept in order, dropped oldest first beyond 10,000).

        Args:
            topic: The topic.
            payload: The payload.
        """
        if not self.queue.event(topic, payload):
            _logger.warning(
                "microgrid %d: more than 10000 events waiting for the broker: dropped the oldest",
                self.microgrid_id,
            )
        self._sender.wake()

    def set_status(
        self,
        *,
        upstream: Literal["connected", "disconnected"],
        synced_at: datetime | None,
        dispatches: int,
        knowledge_at: datetime | None,
    ) -> None:
        """Publish the bridge status (retained), made from the board when it is sent.

        Args:
            upstream: The Dispatch API connection.
            synced_at: When the dispatches were last listed in this run.
            dispatches: How many dispatches the bridge holds.
            knowledge_at: When the held dispatches were last confirmed by the API.
        """
        board = self.board
        board.upstream = upstream
        board.synced_at = synced_at
        board.dispatches = dispatches
        board.knowledge_at = knowledge_at
        self.publish_status()

    def update_status(self, change: Callable[[StatusBoard], object]) -> None:
        """Change the facts behind the status, and publish it.

        Args:
            change: Applied to the board, e.g. `lambda board: board.resolve("clock")`.
        """
        change(self.board)
        self.publish_status()

    def publish_status(self) -> None:
        """Send the status again (as of the moment it is sent)."""
        self.set(self.layout.status, self.board)

    def held(self) -> dict[str, RetainedValue]:
        """The retained topics currently held, topic to payload (a copy), e.g. for tests."""
        return self.queue.held()

    @property
    def pending(self) -> int:
        """How many topics and events wait to be sent."""
        return self.queue.pending

    def republish(self) -> None:
        """Send every retained topic held again, and the status (a rebirth)."""
        self.queue.requeue_all()
        self.publish_status()

    async def flushed(self) -> None:
        """Wait until the broker acknowledged everything handed over so far."""
        await self._sender.idle.wait()

    # ---- the connection loop --------------------------------------------------

    async def run(self) -> None:
        """Connect, publish, reconnect on failure, until `stop()`."""
        while not self._stop.is_set():
            session = self._sessions.peek_next()
            try:
                with mqtt.broker_errors():
                    async with self._new_client(session) as client:
                        self._sessions.commit(session)
                        self.queue.new_session(session)
                        self.connections += 1
                        await self._serve(client)
                        return
            except mqtt.BrokerError as error:
                reason = str(error)
                if not self._stop.is_set() and self._fall_back(error):
                    continue
            except Exception as error:  # never let the publisher die: log, reconnect
                _logger.exception("microgrid %d: unexpected MQTT failure", self.microgrid_id)
                reason = f"unexpected {type(error).__name__}: {error}"
            self.connected.clear()
            if self._stop.is_set():
                return
            delay = self._backoff.next()
            _logger.warning(
                "microgrid %d: MQTT broker %s: %s; reconnecting in %.1f s (changes are "
                "kept and published newest last once connected)",
                self.microgrid_id,
                self._settings.describe(),
                reason,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def stop(self, grace: float = 3.0) -> None:
        """Ask `run()` to flush what is pending, publish the offline status and disconnect.

        Args:
            grace: The most seconds to spend flushing, and then publishing.
        """
        self._grace = grace
        self._stop.set()

    def _fall_back(self, error: mqtt.BrokerError) -> bool:
        if not self._protocol.fall_back(error):
            return False
        _logger.warning(
            "microgrid %d: MQTT broker %s refused MQTT v5 (%s): using MQTT 3.1.1",
            self.microgrid_id,
            self._settings.describe(),
            error,
        )
        return True

    @property
    def _client_id(self) -> str:
        identifier = _CLIENT_ID_UNSAFE.sub("_", f"dispatch-bridge-{self._bridge_name}")
        return f"{identifier}-mg{self.microgrid_id}"[:64]

    def _new_client(self, session: int) -> mqtt.Client:
        # The will carries the session this connection is about to get.
        will_payload = self.queue.status_payload(self.board, offline=True, session=session)
        client = mqtt.new_client(
            self._settings,
            identifier=self._client_id,
            v5=self._protocol.v5,
            will=mqtt.Will(self.layout.status, will_payload, qos=1, retain=True),
            queue_type=mqtt.handing_queue(self._received),
            # The workers are the window (each awaits its acknowledgement): a limit in
            # paho too cost a scan of the 100 messages in flight at every PUBACK (2 of
            # the 35 s of a 100k start-up under cProfile).
            max_inflight=0,
            logger=logging.getLogger("bridge.publisher.mqtt"),
        )
        mqtt.on_refused_publish(client, self._watch.refused)
        return client

    def _new_reader(self) -> mqtt.Client:
        # MQTT 3.1.1 whatever the publishing connection speaks: paho decodes a v5
        # PUBLISH's properties, 1.4 s more for a tree of 100k. The session's republish
        # waits for it no longer than the scan waits for a retained message.
        return mqtt.new_client(
            self._settings,
            identifier=f"{self._client_id[:59]}-scan",
            timeout=self._scan_timeout,
            queue_type=mqtt.handing_queue(self._feed_scan),
            logger=logging.getLogger("bridge.publisher.mqtt"),
        )

    def _received(self, message: mqtt.Message) -> None:
        # Nothing is queued: the status watch and the scan see each message as it arrives.
        listener = self.listeners.get(message.topic.value)
        if listener is not None:
            listener(message)
            return
        if message.topic.value == self.layout.status:
            self._watch.feed(message)
        if self._scan_on_main:
            self._feed_scan(message)

    def _feed_scan(self, message: mqtt.Message) -> None:
        if self._scan is None:
            return
        self._scan.feed(message)
        if message.retain and isinstance(message.payload, bytes):
            self.queue.confirm(message.topic.value, message.payload)

    def _status_payload(self, *, offline: bool = False) -> bytes:
        if not offline:
            self._watch.status_sent(self._clock())
        return self.queue.status_payload(self.board, offline=offline)

    async def _heartbeat(self) -> None:
        # The status is republished every interval, as of the moment it is sent:
        # a reader counts the bridge online only while live statuses keep coming.
        interval = max(1, self.board.status_interval)
        while True:
            await asyncio.sleep(interval)
            self._watch.check_read_back(self._clock())
            self.publish_status()

    async def _serve(self, client: mqtt.Client) -> None:
        _logger.info(
            "microgrid %d: connected to MQTT broker %s (MQTT %s, session %d)",
            self.microgrid_id,
            self._settings.describe(),
            self._protocol.name,
            self.session,
        )
        self._watch.new_session(self.session, read_back=not self._protocol.v5)
        await client.publish(self.layout.status, self._status_payload(), qos=1, retain=True)
        # The status topic stays subscribed: another bridge's status, or (MQTT 3.1.1)
        # our own not coming back, shows there.
        await client.subscribe([(topic, 1) for topic in [self.layout.status, *self.listeners]])
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._monitor(client)),
            asyncio.create_task(self._heartbeat()),
        ]
        reader = contextlib.AsyncExitStack()
        try:
            # Dispatch topics wait for the scan: only those the broker does not hold as
            # held here are sent. Publishing starts once the broker queued the tree for
            # the scan: our publishes cannot replace what it reads.
            self.queue.requeue_all(compare_dispatches=True)
            scanned, lost = await self._subscribe_scan(client, reader)
            self._sender.wake()
            acks = mqtt.AckedPublishes(client)
            tasks += self._sender.start(acks)
            self._backoff.reset()
            self.connected.set()
            stopper = asyncio.create_task(self._stop.wait())
            scan_tasks = list(tasks)
            tasks.append(stopper)
            stale = await self._finish_scan(scanned, scan_tasks, stopper, lost)
            await self._close_reader(reader)
            if scanned is client:
                await client.unsubscribe(tree_filters(self.layout))
            self._release_unconfirmed()
            if stale is not None:
                self._apply_stale(stale)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                await self._close(client, tasks)
                return
            raise_first(done)
            raise mqtt.MqttError("publisher task ended unexpectedly")
        finally:
            self.connected.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._sender.stop()
            await self._close_reader(reader)
            self._scan, self._scan_on_main = None, False  # a scan cut short by the loss

    async def _close(self, client: mqtt.Client, tasks: list[asyncio.Task[Any]]) -> None:
        timeout = self._grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sender.idle.wait(), timeout)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        offline = self._status_payload(offline=True)
        try:
            await client.publish(self.layout.status, offline, qos=1, retain=True, timeout=timeout)
        except mqtt.MqttError as error:
            _logger.warning(
                "microgrid %d: could not publish the offline status (%s); the will says it",
                self.microgrid_id,
                mqtt.describe_error(error),
            )
            return
        _logger.info(
            "microgrid %d: published offline status (session %d), disconnecting",
            self.microgrid_id,
            self.session,
        )

    async def _monitor(self, client: mqtt.Client) -> None:
        # Nothing is ever queued (see `_received`): iterating only shows when the
        # connection is lost, also while idle.
        async for _ in client.messages:
            pass

    async def _subscribe_scan(
        self, client: mqtt.Client, reader: contextlib.AsyncExitStack
    ) -> tuple[mqtt.Client, asyncio.Future[Any] | None]:
        """Subscribe the stale-topic scan to the tree, on a connection of its own if it can.

        MQTT 3.1.1 at QoS 0 reads 100k retained topics in half the time of QoS 1 over
        v5 (no acknowledgement per message, which paced the broker at 20 in flight; no
        v5 properties). QoS 0 loses nothing on a connection that stays up; one lost
        ends the scan with what it saw, and a dispatch topic not seen is sent again.

        Returns:
            The client the scan reads on, and the future done when that reader's
            connection ends (None: it reads on `client`, the publishing connection).
        """
        self._scan = RetainedScan(self.layout.status)
        try:
            with mqtt.broker_errors():
                connection = await reader.enter_async_context(self._new_reader())
                await subscribe_tree(connection, self.layout, noLocal=False, qos=0)
                return connection, mqtt.connection_lost(connection)
        except mqtt.BrokerError as error:
            _logger.warning(
                "microgrid %d: could not read the retained tree on a connection of its own "
                "(%s); reading it on the publishing connection (slower: QoS 1)",
                self.microgrid_id,
                error,
            )
        await self._close_reader(reader)
        self._scan_on_main = True
        await subscribe_tree(client, self.layout, noLocal=self._protocol.v5, qos=1)
        return client, None

    async def _finish_scan(
        self,
        scanned: mqtt.Client,
        tasks: list[asyncio.Task[Any]],
        stopper: asyncio.Task[Any],
        lost: asyncio.Future[Any] | None,
    ) -> builtins.set[str] | None:
        assert self._scan is not None
        try:
            return await finish_scan(
                scanned,
                self._scan,
                self.layout,
                qos=1 if lost is None else 0,
                quiet_timeout=self._scan_timeout,
                watched=tasks,
                stopper=stopper,
                lost=lost,
                microgrid_id=self.microgrid_id,
            )
        finally:
            self._scan = None
            self._scan_on_main = False

    async def _close_reader(self, reader: contextlib.AsyncExitStack) -> None:
        try:
            with mqtt.broker_errors():
                await reader.aclose()
        except mqtt.BrokerError as error:
            closed = "microgrid %d: the connection that read the retained tree closed badly: %s"
            _logger.info(closed, self.microgrid_id, error)

    def _release_unconfirmed(self) -> None:
        released = self.queue.release_unconfirmed()
        self._sender.wake()
        _logger.info(
            "microgrid %d: the broker's retained tree read back: %d dispatch topics differ from "
            "or are missing on the broker and are republished (%d topics held)",
            self.microgrid_id,
            released,
            self.queue.held_count,
        )

    def mark_authoritative(self) -> None:
        """Declare that the held topics are the whole truth (a cache or a sync is loaded).

        Until then, stale topics found on the broker are left alone: a bridge
        that starts with no cache must not clear a valid tree before its
        first sync.
        """
        self._authoritative = True
        deferred, self._deferred_stale = self._deferred_stale, None
        if deferred:
            self._apply_stale(deferred)

    def _apply_stale(self, retained_on_broker: builtins.set[str]) -> None:
        if not self._authoritative:
            self._deferred_stale = retained_on_broker
            _logger.info(
                "microgrid %d: %d retained topics found on the broker; stale ones are cleared "
                "after the first sync with the Dispatch API",
                self.microgrid_id,
                len(retained_on_broker),
            )
            return
        cleared, replaced = self.queue.clear_stale(retained_on_broker)
        self._sender.wake()
        _logger.info(
            "microgrid %d: republishing %d retained topics; %d retained topics found on the "
            "broker; clearing %d stale dispatch and upcoming topics, emptying %d stale running "
            "topics",
            self.microgrid_id,
            self.queue.held_count,
            len(retained_on_broker),
            cleared,
            replaced,
        )

    def _taken(self, item: Outgoing) -> None:
        if isinstance(item.value, StatusBoard):
            self._watch.status_sent(self._clock())

    def _acknowledged(self, item: Outgoing) -> None:
        if item.retain and self.on_handed is not None:
            self.on_handed(item.value)
        self.published += 1
