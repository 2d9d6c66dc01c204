"""The publisher's sending side (`bridge.publish_sender`), unit tests with stand-in publishes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from actor_sdk import wire
from bridge.publish_queue import Outgoing, PublishQueue
from bridge.publish_sender import Sender
from testkit.processes import async_wait_until
from tests.fixtures.wire_examples import contract_example, nothing_running

LAYOUT = wire.TopicLayout.for_microgrid(3)


class _Acks:
    """Stands in for `mqtt.AckedPublishes`: records each publish; acknowledges when told."""

    def __init__(self, *, acknowledge: bool) -> None:
        self.acknowledge = acknowledge
        self.calls: list[tuple[str, bool]] = []
        self.pending: list[asyncio.Future[None]] = []

    def publish(
        self, topic: str, payload: bytes, *, retain: bool, at_once: bool = False
    ) -> asyncio.Future[None]:
        self.calls.append((topic, at_once))
        future = asyncio.get_running_loop().create_future()
        if self.acknowledge:
            future.set_result(None)
        else:
            self.pending.append(future)
        return future


def snapshot(dispatch_type: str) -> wire.RunningSnapshot:
    return nothing_running(3, dispatch_type)


def sender_of(
    queue: PublishQueue, acknowledged: list[Outgoing] | None = None, *, window: int = 4
) -> Sender:
    done = acknowledged if acknowledged is not None else []
    return Sender(queue, window=window, on_taken=lambda item: None, on_acknowledged=done.append)


def connected_without_workers(sender: Sender, acks: _Acks) -> None:
    assert sender.start(acks) == []  # type: ignore[arg-type]


def queue() -> PublishQueue:
    return PublishQueue(microgrid_id=3, layout=LAYOUT, clock=lambda: datetime.now(UTC))


async def test_workers_write_a_running_snapshot_at_once_the_rest_with_the_next_turn() -> None:
    # The snapshot starts and stops actors: its packet must not wait while the
    # worker's other publishes of that turn are encoded (bench/latency.py, ~0.15 ms).
    held = queue()
    held.set(LAYOUT.running("T"), snapshot("T"))
    held.set(LAYOUT.dispatch("T", 1), contract_example(id=1, type="T"))
    acks = _Acks(acknowledge=True)
    workers = sender_of(held).start(acks)  # type: ignore[arg-type]
    try:
        await async_wait_until(lambda: held.idle, 5, "both publishes")
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    assert sorted(acks.calls) == [(LAYOUT.dispatch("T", 1), False), (LAYOUT.running("T"), True)]


async def test_snapshots_sent_ahead_are_published_in_the_call_only_while_connected() -> None:
    held = queue()
    acknowledged: list[Outgoing] = []
    sender = sender_of(held, acknowledged, window=0)
    held.set(LAYOUT.running("A"), snapshot("A"))
    sender.send_ahead(LAYOUT.running("A"))  # no connection: it waits for the workers
    assert held.waiting == 1

    acks = _Acks(acknowledge=False)
    connected_without_workers(sender, acks)
    held.set(LAYOUT.dispatch("A", 1), contract_example(id=1, type="A"))
    held.set(LAYOUT.running("B"), snapshot("B"))
    sender.send_ahead(LAYOUT.running("A"))
    sender.send_ahead(LAYOUT.running("B"))
    sender.send_ahead(LAYOUT.dispatch("B", 9))  # not waiting: nothing to send
    assert acks.calls == [(LAYOUT.running("A"), True), (LAYOUT.running("B"), True)]
    assert held.waiting == 1  # the dispatch topic waits for a worker

    acks.pending[0].set_result(None)
    await async_wait_until(lambda: acknowledged, 5, "the acknowledgement")
    assert [item.topic for item in acknowledged] == [LAYOUT.running("A")]
    sender.stop()  # B goes again on the next connection, first
    remaining = [held.take(), held.take(), held.take()]
    assert [item.topic for item in remaining if item is not None] == [
        LAYOUT.running("B"),
        LAYOUT.dispatch("A", 1),
    ]


async def test_snapshots_written_at_once_and_not_acknowledged_go_again_first_in_order() -> None:
    held = queue()
    acknowledged: list[Outgoing] = []
    sender = sender_of(held, acknowledged, window=0)
    acks = _Acks(acknowledge=False)
    connected_without_workers(sender, acks)
    for dispatch_type in ("A", "B"):
        held.set(LAYOUT.running(dispatch_type), snapshot(dispatch_type))
        sender.send_ahead(LAYOUT.running(dispatch_type))
    held.set(LAYOUT.dispatch("A", 1), contract_example(id=1, type="A"))
    assert held.waiting == 1

    sender.stop()  # the connection ended before either acknowledgement
    for future in acks.pending:  # a late resolution of a dead connection's futures
        future.set_result(None)
    await asyncio.sleep(0)
    assert acknowledged == []
    taken = [held.take(), held.take(), held.take()]
    assert [item.topic for item in taken if item is not None] == [
        LAYOUT.running("A"),
        LAYOUT.running("B"),
        LAYOUT.dispatch("A", 1),
    ]


@pytest.mark.parametrize("newer", [True, False])
async def test_a_snapshot_not_acknowledged_goes_again_as_its_newest_state(newer: bool) -> None:
    held = queue()
    sender = sender_of(held, window=0)
    acks = _Acks(acknowledge=False)
    connected_without_workers(sender, acks)
    topic = LAYOUT.running("A")
    held.set(topic, snapshot("A"))
    sender.send_ahead(topic)
    sender.stop()
    if newer:  # set again between connections: it waits, once
        held.set(topic, snapshot("A"))
        sender.send_ahead(topic)
    assert held.waiting == 1
    item = held.take()
    assert item is not None and item.topic == topic
    assert wire.decode_running(item.payload).seq == 2
