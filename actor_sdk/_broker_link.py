"""The broker link: one connection at a time, its messages, and noticing when it is dead.

`BrokerLink.run` connects (a fresh aiomqtt client per connection, capped and jittered
backoff between attempts), subscribes, and hands every message to a `LinkHandler`
with the time it arrived. It tells the handler when it stopped waiting for an
incomplete retained tree (the retained messages went quiet, or only live ones kept
coming) and when the connection is gone.

A silent network fault (packets dropped, nothing closed) is noticed by a probe of
our own: paho's keepalive needs up to two keepalive intervals (one of silence, then
one waiting for the ping's answer). Whenever nothing arrived for half a keepalive,
the link sends an UNSUBSCRIBE of a topic it never subscribed (a no-op every broker
acknowledges) and gives the answer half a keepalive: a dead link is noticed within
1.5 keepalives at most. Any message arriving meanwhile also proves the link alive
(a large retained burst may hold the answer back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import aiomqtt

from actor_sdk._client_id_clash import ClientIdClash, reason_code
from actor_sdk.mqtt import (
    BrokerSettings,
    ReceivedQueue,
    connection_lost,
    receiving_client,
    reconnect_delay,
)

__all__ = ["BrokerLink", "LinkHandler"]

_logger = logging.getLogger(__name__)

CATCH_UP_LIMIT = 4
"""The retained catch-up ends this many sync timeouts after its last retained message,
even while live messages keep coming (a busy bridge never falls silent; its republish
after a broker lost its state comes live, snapshots first, and takes seconds)."""


class LinkHandler(Protocol):
    """What the link tells its user."""

    @property
    def in_sync(self) -> bool:
        """Whether the retained state of this connection was received completely."""

    async def connected(self, client: aiomqtt.Client | None) -> None:
        """A connection is up (its client; the subscriptions are about to be made) or gone.

        Args:
            client: The connected client, or None once it is gone.
        """

    async def message(self, message: aiomqtt.Message, arrived: datetime) -> None:
        """Handle one message (never raises: its errors are the handler's to log).

        Args:
            message: The message.
            arrived: When it arrived (the wall clock), before any queueing here.
        """

    async def sync_given_up(self, why: str) -> None:
        """The wait for the retained state ends while it is still incomplete.

        Args:
            why: What ended it, for the log ("... after the last message").
        """

    async def lost(self) -> None:
        """The connection is gone (or never came up)."""


class BrokerLink:
    """Keeps a broker connection and feeds its messages to a handler."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        subscriptions: list[list[tuple[str, int]]],
        probe_topic: str,
        reconnect_first: float,
        reconnect_cap: float,
        sync_timeout: float,
        clock: Callable[[], datetime],
        identifier: str | None = None,
        will: Callable[[], aiomqtt.Will] | None = None,
        farewell: Callable[[], tuple[str, bytes]] | None = None,
    ) -> None:
        """Create a link; nothing connects before `run`.

        Args:
            settings: Where and how to connect.
            subscriptions: The SUBSCRIBE requests to make, in order (topic, QoS).
            probe_topic: A topic never subscribed, whose UNSUBSCRIBE probes the link.
            reconnect_first: The first wait before reconnecting (seconds).
            reconnect_cap: The longest wait before reconnecting (seconds).
            sync_timeout: Seconds of silence that end the wait for the retained state.
            clock: The wall clock that stamps each message as it arrives.
            identifier: The MQTT client id (None: a random one).
            will: Makes the will of each new connection.
            farewell: Makes the retained message (topic, payload) a clean stop
                publishes before disconnecting (bounded by one second).
        """
        self._settings = settings
        self._subscriptions = subscriptions
        self._client: aiomqtt.Client | None = None
        self._subscribing: set[asyncio.Task[None]] = set()
        self._probe_topic = probe_topic
        self._reconnect_first = reconnect_first
        self._reconnect_cap = reconnect_cap
        self._sync_timeout = sync_timeout
        self._clock = clock
        self._identifier = identifier
        # A client thrown off without a word notices when a call to the broker times
        # out (10 s) or through its probe (1.5 keepalives): such connections count too.
        self._clash = ClientIdClash(identifier, short_s=12.0 + 1.5 * settings.keepalive)
        self._will = will
        self._farewell = farewell
        self.connected = False
        self.connections = 0
        """Connections made so far (for metrics: reconnects are those after the first)."""
        self.problem: str | None = None
        """The latest reason the link is down, for whoever waits for it."""

    @property
    def where(self) -> str:
        """The broker's address, without credentials."""
        return self._settings.describe()

    async def run(self, handler: LinkHandler) -> None:
        """Connect, read and reconnect until cancelled.

        Args:
            handler: Gets the messages and the link's changes.
        """
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            self.connected = False
            made_at: float | None = None
            client, received = receiving_client(
                self._settings,
                clock=self._clock,
                identifier=self._identifier,
                will=None if self._will is None else self._will(),
            )
            try:
                async with client:
                    self.connected = True
                    self.connections += 1
                    self.problem = None
                    failures = 0
                    made_at = loop.time()
                    _logger.info("connected to the broker at %s", self.where)
                    try:
                        await self._session(client, received, handler)
                    except asyncio.CancelledError:
                        await self._say_farewell(client)
                        raise
                    except aiomqtt.MqttError as error:
                        self.connected = False
                        self.problem = f"connection lost ({error})"
                        _logger.warning("lost the broker connection to %s: %s", self.where, error)
                        # Before the goodbye, which a dead link may hold up.
                        await handler.lost()
                        raise
            except aiomqtt.MqttError as error:
                if made_at is not None:
                    self._connection_ended(loop.time() - made_at, error)
                else:
                    self._clash.failed_to_connect()
                if made_at is None or self.problem is None:  # else: the session's loss, set above
                    self.problem = str(error) or type(error).__name__
            self.connected = False
            await handler.lost()
            delay = reconnect_delay(failures, first=self._reconnect_first, cap=self._reconnect_cap)
            failures += 1
            if made_at is None:
                _logger.warning(
                    "cannot connect to the broker at %s: %s; retrying in %.1f s",
                    self.where,
                    self.problem,
                    delay,
                )
            else:  # the loss itself was logged above
                _logger.info("reconnecting to the broker at %s in %.1f s", self.where, delay)
            await asyncio.sleep(delay)

    def _connection_ended(self, lasted_s: float, error: aiomqtt.MqttError) -> None:
        line = self._clash.ended(lasted_s, reason_code(error))
        if line is not None:
            _logger.error("%s", line)

    async def _session(
        self, client: aiomqtt.Client, received: ReceivedQueue, handler: LinkHandler
    ) -> None:
        await handler.connected(client)
        self._client = client
        for subscription in self._subscriptions:
            await client.subscribe(subscription)
        loop = asyncio.get_running_loop()
        lost = connection_lost(client)
        probe = asyncio.ensure_future(self._probe(client, received))
        # Silence ends the sync, not the length of a burst: counted from the last message.
        # Live messages alone (a busy bridge, its status) do not hold it open for long:
        # the retained catch-up is over CATCH_UP_LIMIT sync timeouts after its last message.
        sync_deadline = loop.time() + self._sync_timeout
        catch_up_deadline = loop.time() + CATCH_UP_LIMIT * self._sync_timeout
        try:
            while True:
                # The queue's own arrival future, not aiomqtt's message iterator: that
                # takes several turns of the loop per wake-up (a task per `get`), in which
                # the reader went on handling packets while a snapshot waited.
                ends = min(sync_deadline, catch_up_deadline)
                timeout = None if handler.in_sync else max(0.0, ends - loop.time())
                done, _ = await asyncio.wait(
                    {received.arrival(), probe, lost},
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if probe in done:
                    probe.result()  # raises: the link is dead
                if received.empty():
                    if lost.done():
                        raise aiomqtt.MqttError("the connection was lost") from lost.exception()
                    if sync_deadline <= catch_up_deadline:
                        await handler.sync_given_up(
                            f"{self._sync_timeout:.1f} s after the last message"
                        )
                    else:
                        await handler.sync_given_up(
                            f"{CATCH_UP_LIMIT * self._sync_timeout:.1f} s after the last "
                            "retained message, while live messages kept coming"
                        )
                    continue
                # Everything that has arrived, without a wake-up per message (a sync
                # brings thousands); a lost connection shows once the queue is empty.
                retained = False
                while not received.empty():
                    retained |= await self._handle(received.get_nowait(), received, handler)
                sync_deadline = loop.time() + self._sync_timeout
                if retained:
                    catch_up_deadline = loop.time() + CATCH_UP_LIMIT * self._sync_timeout
        finally:
            self._client = None
            for subscribing in list(self._subscribing):
                subscribing.cancel()  # on a connection that is gone: `subscribed` returns
            await handler.connected(None)
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await probe

    def subscribe(self, topic: str) -> None:
        """Subscribe to one more topic (QoS 1): now when connected, and at every connect.

        It joins the first SUBSCRIBE request (ahead of any later one, such as a
        barrier's). `subscribed` waits for the broker's answer.

        Args:
            topic: The topic filter.
        """
        self._subscriptions[0].append((topic, 1))
        if self._client is not None:
            task = asyncio.ensure_future(self._subscribe_now(self._client, topic))
            self._subscribing.add(task)
            task.add_done_callback(self._subscribing.discard)

    async def subscribed(self) -> None:
        """Wait until the broker acknowledged every `subscribe` made on this connection.

        Only then does a message published to such a topic reach us for sure: a broker
        may take a moment to set a subscription up (a NATS cluster node does). The wait
        also ends when a SUBSCRIBE fails (after the client's timeout at most) or the
        connection goes: the next connection makes it before its sync. Not connected,
        nothing to wait for. Never waits for a message to be handled (the SUBACK is
        read by the client, not by `run`'s loop), so a handler may call it too.
        """
        if self._subscribing:
            await asyncio.wait(set(self._subscribing))

    async def _subscribe_now(self, client: aiomqtt.Client, topic: str) -> None:
        try:
            await client.subscribe(topic, qos=1)
        except aiomqtt.MqttError as error:  # the next connection makes it
            _logger.info("subscribing to %s failed (%s); made at the next connect", topic, error)

    async def _say_farewell(self, client: aiomqtt.Client) -> None:
        if self._farewell is None:
            return
        topic, payload = self._farewell()
        # In a task of its own: aiomqtt's wait_for may swallow a cancellation (3.11).
        publishing = asyncio.ensure_future(client.publish(topic, payload, qos=1, retain=True))
        done, _ = await asyncio.wait({publishing}, timeout=1.0)
        publishing.cancel()
        if not done or publishing.cancelled() or publishing.exception() is not None:
            _logger.info("could not say goodbye on %s before disconnecting", topic)

    async def _handle(
        self, message: aiomqtt.Message, received: ReceivedQueue, handler: LinkHandler
    ) -> bool:
        """Hand one message on; return whether it was retained (part of a catch-up)."""
        await handler.message(message, received.received_at(message) or self._clock())
        return bool(message.retain)

    async def _probe(self, client: aiomqtt.Client, received: ReceivedQueue) -> None:
        loop = asyncio.get_running_loop()
        half = self._settings.keepalive / 2
        last_answer = loop.time()
        while True:
            await asyncio.sleep(half / 2)
            heard = max(last_answer, received.last_arrival or 0.0)
            if loop.time() - heard < half:
                continue
            asked = loop.time()
            try:
                await client.unsubscribe(self._probe_topic, timeout=half)
            except aiomqtt.MqttError:
                if (received.last_arrival or 0.0) > asked:
                    continue  # messages still flow: the answer is only queued behind them
                silent = loop.time() - heard
                _logger.warning(
                    "the broker at %s did not answer for %.1f s (a silent network fault?): "
                    "dropping the connection",
                    self.where,
                    silent,
                )
                raise aiomqtt.MqttError(f"no answer from the broker for {silent:.1f} s") from None
            last_answer = loop.time()
