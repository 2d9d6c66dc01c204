"""Unit tests of the dispatcher's reading loop during a resync, with a fake client.

The link takes messages straight from the client's queue of received messages
(`ReceivedQueue`), which the tests fill. The sync timeout must never lose a
message, and must count silence from the last message, not from the subscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import aiomqtt
import pytest

from actor_sdk import Dispatcher, wire
from actor_sdk._bridge_clock import CONVERGED_AFTER
from actor_sdk.mqtt import ReceivedQueue
from tests.fixtures.sdk import utcnow, wire_dispatch

T = "SDK_RESYNC"
MICROGRID = 7


class _FakeClient:
    """What the link uses of a connected client, with the test's queue as its source."""

    def __init__(self, source: ReceivedQueue) -> None:
        self.source = source
        self._disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def subscribe(self, *args: object, **kwargs: object) -> None:
        """Accept any subscription."""

    async def unsubscribe(self, *args: object, **kwargs: object) -> None:
        """Answer the link's probe at once."""


LAYOUT = wire.TopicLayout.for_microgrid(MICROGRID, wire.DEFAULT_TOPIC_ROOT)


def _message(dispatch_id: int) -> aiomqtt.Message:
    payload = wire.encode(wire_dispatch(dispatch_id, T, running=False))
    return aiomqtt.Message(LAYOUT.dispatch(T, dispatch_id), payload, 1, True, 0, None)


def _live_snapshot(seq: int, as_of: datetime) -> aiomqtt.Message:
    snapshot = wire.RunningSnapshot(
        microgrid_id=MICROGRID,
        type=T,
        running=(wire_dispatch(seq, T),),
        next_change=None,
        as_of=as_of,
        session=1,
        seq=seq,
    )
    return aiomqtt.Message(LAYOUT.running(T), wire.encode(snapshot), 1, False, 0, None)


@contextlib.asynccontextmanager
async def _session(
    sync_timeout: float,
    *,
    clock: Callable[[], datetime] = utcnow,
    arrival_clock: Callable[[], datetime] = utcnow,
) -> AsyncIterator[tuple[Dispatcher, _FakeClient]]:
    dispatcher = Dispatcher(
        microgrid_id=MICROGRID,
        broker="mqtt://127.0.0.1:1",
        sync_timeout=timedelta(seconds=sync_timeout),
        clock=clock,
    )
    received = ReceivedQueue(clock=arrival_clock)
    client = _FakeClient(received)
    task = asyncio.create_task(
        dispatcher._link._session(client, received, dispatcher)  # type: ignore[arg-type]
    )
    try:
        yield dispatcher, client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _poll(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_message_arriving_as_the_sync_timeout_fires_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _session(sync_timeout=0.3) as (dispatcher, client):
        client.source.put_nowait(_message(1))
        await _poll(lambda: dispatcher._view.dispatch(T, 1) is not None)
        given_up = dispatcher.sync_given_up

        async def arrives_meanwhile(why: str) -> None:
            client.source.put_nowait(_message(2))  # while the link handles its timeout
            await given_up(why)

        monkeypatch.setattr(dispatcher, "sync_given_up", arrives_meanwhile)
        await asyncio.wait_for(dispatcher.wait_for_initialization(), 5)
        await _poll(lambda: dispatcher._view.dispatch(T, 2) is not None)
        client.source.put_nowait(_message(3))
        await _poll(lambda: dispatcher._view.dispatch(T, 3) is not None)
        assert set(dispatcher._view.dispatches(T)) == {1, 2, 3}


async def test_the_sync_timeout_counts_from_the_last_message_not_the_subscribe() -> None:
    sync_timeout = 1.0
    count = 15
    async with _session(sync_timeout=sync_timeout) as (dispatcher, client):
        loop = asyncio.get_running_loop()
        started = loop.time()
        # A burst that keeps flowing for 1.5 sync timeouts, never silent for long.
        for dispatch_id in range(1, count + 1):
            client.source.put_nowait(_message(dispatch_id))
            await asyncio.sleep(sync_timeout / 10)
            assert not dispatcher._view.in_sync, f"sync ended during the burst at {dispatch_id}"
        assert loop.time() - started > sync_timeout
        await asyncio.wait_for(dispatcher.wait_for_initialization(), 5)
        assert set(dispatcher._view.dispatches(T)) == set(range(1, count + 1))


async def test_live_snapshots_handled_late_are_sampled_at_their_arrival_not_as_skew(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = utcnow()
    handled_at = [base + timedelta(seconds=15)]  # handled 15 s after they arrived
    arrived = [base]
    async with _session(0.2, clock=lambda: handled_at[0], arrival_clock=lambda: arrived[0]) as (
        dispatcher,
        client,
    ):
        await asyncio.wait_for(dispatcher.wait_for_initialization(), 5)
        with caplog.at_level(logging.WARNING, logger="actor_sdk"):
            for seq in range(1, CONVERGED_AFTER + 1):  # one a second: the estimate converges
                arrived[0] = base + timedelta(seconds=seq)
                client.source.put_nowait(_live_snapshot(seq, as_of=arrived[0]))
                await _poll(lambda s=seq: [int(d.id) for d in dispatcher._view.running(T)] == [s])
        assert dispatcher._bridge_clock.converged
        assert dispatcher.clock_offset == timedelta(0)
        assert not [r for r in caplog.records if "clock" in r.getMessage()]


async def test_an_unexpected_error_handling_a_message_is_logged_with_its_topic(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _session(sync_timeout=0.2) as (dispatcher, client):
        real = dispatcher._view.apply_dispatch

        def failing_once(dispatch_type: str, dispatch_id: int, *args: Any, **kwargs: Any) -> Any:
            if dispatch_id == 1:
                raise RuntimeError("unexpected")
            return real(dispatch_type, dispatch_id, *args, **kwargs)

        monkeypatch.setattr(dispatcher._view, "apply_dispatch", failing_once)
        client.source.put_nowait(_message(1))
        client.source.put_nowait(_message(2))
        await _poll(lambda: dispatcher._view.dispatch(T, 2) is not None)
        assert f"handling the message on topic {LAYOUT.dispatch(T, 1)} failed" in caplog.text
