"""The actor SDK's broker link (`actor_sdk._broker_link`) on a real Mosquitto."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime

import aiomqtt

from actor_sdk._broker_link import BrokerLink
from actor_sdk.mqtt import BrokerSettings
from testkit.broker import Broker

TOPIC = "microgrid/919/dispatch/LINK_TEST/running"


class _TurnCounter:
    """Counts turns of the event loop (one step of its task per turn)."""

    def __init__(self) -> None:
        self.turns = 0
        self._task = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        for self.turns in itertools.count(1):
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._task.cancel()


class _Handler:
    """Records the loop turn at which each live message arrived and was handled."""

    def __init__(self, counter: _TurnCounter) -> None:
        self._counter = counter
        self.handled: list[tuple[int, int]] = []
        self.done = asyncio.Event()

    @property
    def in_sync(self) -> bool:
        return True

    async def connected(self, client: aiomqtt.Client | None) -> None:
        pass

    async def message(self, message: aiomqtt.Message, arrived: datetime) -> None:
        # `arrived` is the link's clock as the message was queued: the turn then.
        self.handled.append((int(arrived.timestamp()), self._counter.turns))
        self.done.set()

    async def sync_given_up(self, why: str) -> None:
        pass

    async def lost(self) -> None:
        pass


async def test_a_live_message_is_handled_two_turns_after_its_arrival(
    mqtt_broker_session: Broker,
) -> None:
    # aiomqtt's message iterator takes a task per `get` and about five turns of the
    # loop from a message's arrival to its handler; the reader handled more packets
    # in those turns while a snapshot waited (bench/latency.py).
    counter = _TurnCounter()
    handler = _Handler(counter)
    link = BrokerLink(
        BrokerSettings.from_url(mqtt_broker_session.url("actor")),
        subscriptions=[[(TOPIC, 1)]],
        probe_topic="microgrid/919/dispatch/probe",
        reconnect_first=0.1,
        reconnect_cap=0.1,
        sync_timeout=1.0,
        clock=lambda: datetime.fromtimestamp(counter.turns, UTC),
    )
    running = asyncio.ensure_future(link.run(handler))
    try:
        async with aiomqtt.Client(**mqtt_broker_session.client_kwargs("admin")) as publisher:
            while not handler.done.is_set():  # until the subscription is in place
                await publisher.publish(TOPIC, b"warm-up", qos=1)
                await asyncio.wait({asyncio.ensure_future(handler.done.wait())}, timeout=0.2)
            for _ in range(10):  # the link is back to waiting for the next message
                await asyncio.sleep(0)
            handler.handled.clear()
            handler.done.clear()
            await publisher.publish(TOPIC, b"measured", qos=1)
            await asyncio.wait_for(handler.done.wait(), 5)
    finally:
        running.cancel()
        counter.stop()
        await asyncio.gather(running, return_exceptions=True)
    [(arrived, handled)] = handler.handled
    # Two turns (a callback of `asyncio.wait`, then the link's task), give or take the
    # one the counter's own place in a turn adds; the iterator took five.
    assert handled - arrived <= 3, f"handled {handled - arrived} turns after its arrival"
