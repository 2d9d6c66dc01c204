"""`bridge.publish_queue`: order, coalescing, stamping and stale clearing, without a broker."""

from __future__ import annotations

import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest

from actor_sdk import wire
from bridge.cli import build_parser
from bridge.core import Outbox, ScheduleCore
from bridge.publish_queue import Outgoing, PublishQueue
from bridge.run_command import _Pipeline, load_settings
from bridge.status import StatusBoard
from tests.fixtures.wire_examples import contract_example

MG = 3
LAYOUT = wire.TopicLayout.for_microgrid(MG)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def queue() -> PublishQueue:
    return PublishQueue(microgrid_id=MG, layout=LAYOUT, clock=lambda: NOW, max_events=3)


def snapshot(type_: str = "T") -> wire.RunningSnapshot:
    return wire.RunningSnapshot(
        microgrid_id=MG,
        type=type_,
        running=(),
        next_change=None,
        as_of=NOW,
        session=0,
        seq=0,
    )


def drain(q: PublishQueue) -> list[Outgoing]:
    items = []
    while (item := q.take()) is not None:
        q.sent(item)
        items.append(item)
    return items


def test_urgent_topics_go_first_and_a_topic_set_again_goes_once_with_its_newest_value() -> None:
    q = queue()
    q.set(LAYOUT.dispatch("T", 1), b"old")
    q.set(LAYOUT.dispatch("T", 2), b"two")
    q.event("events", b"e1")
    q.set(LAYOUT.running("T"), snapshot())
    q.set(LAYOUT.dispatch("T", 1), b"new")
    items = drain(q)
    assert [item.topic for item in items] == [
        "events",
        LAYOUT.running("T"),
        LAYOUT.dispatch("T", 2),
        LAYOUT.dispatch("T", 1),
    ]
    assert items[-1].payload == b"new" and items[-1].retain
    assert not items[0].retain and q.idle


def test_snapshots_and_the_status_are_stamped_with_the_session_when_taken() -> None:
    q = queue()
    q.set(LAYOUT.running("T"), snapshot())
    q.new_session(7)
    first = wire.decode_running(drain(q)[0].payload)
    q.set(LAYOUT.running("T"), snapshot())
    second = wire.decode_running(drain(q)[0].payload)
    assert (first.session, first.seq, second.seq) == (7, 1, 2)
    q.new_session(8)
    q.set(LAYOUT.status, StatusBoard(bridge="b"))
    q.requeue_all()
    items = drain(q)
    statuses = [wire.decode_status(i.payload) for i in items if i.topic == LAYOUT.status]
    snapshots = [wire.decode_running(i.payload) for i in items if i.topic == LAYOUT.running("T")]
    assert statuses[0].session == 8 and (snapshots[0].session, snapshots[0].seq) == (8, 1)


def test_a_failed_publish_goes_again_first_unless_a_newer_value_waits() -> None:
    q = queue()
    for index in range(3):
        q.set(LAYOUT.dispatch("T", index), b"x")
    first = q.take()
    assert first is not None
    q.failed(first)
    assert q.take() == first
    q.set(first.topic, b"newer")
    q.failed(first)
    assert [item.topic for item in drain(q)] == [
        LAYOUT.dispatch("T", 1),
        LAYOUT.dispatch("T", 2),
        first.topic,
    ]


def test_clear_sends_an_empty_payload_and_the_oldest_event_is_dropped_when_full() -> None:
    q = queue()
    q.set(LAYOUT.dispatch("T", 1), b"x")
    q.clear(LAYOUT.dispatch("T", 1))
    assert [(i.payload, i.value) for i in drain(q)] == [(b"", None)]
    assert [q.event("e", bytes([n])) for n in range(4)] == [True, True, True, False]
    assert [item.payload for item in drain(q)] == [b"\x01", b"\x02", b"\x03"]


def test_stale_topics_are_cleared_or_emptied_and_held_ones_kept() -> None:
    q = queue()
    q.set(LAYOUT.dispatch("T", 1), b"held")
    q.set(LAYOUT.running("T"), snapshot())
    drain(q)
    on_broker = {
        LAYOUT.dispatch("T", 1),
        LAYOUT.dispatch("T", 2),
        LAYOUT.running("GONE"),
        LAYOUT.upcoming("GONE"),
        LAYOUT.upcoming("T"),
        "not/of/the/tree",
    }
    assert q.clear_stale(on_broker) == (2, 1)
    items = {item.topic: item for item in drain(q)}
    assert items[LAYOUT.dispatch("T", 2)].payload == b""
    assert items[LAYOUT.upcoming("GONE")].payload == b""
    assert wire.decode_running(items[LAYOUT.running("GONE")].payload).running == ()
    assert LAYOUT.dispatch("T", 1) not in items and LAYOUT.upcoming("T") not in items


def test_after_a_connect_only_dispatch_topics_the_broker_lacks_or_holds_otherwise_go() -> None:
    q = queue()
    same, changed, missing = (LAYOUT.dispatch("EXAMPLE_TYPE", n) for n in (1, 2, 3))
    for number, topic in enumerate((same, changed, missing), start=1):
        q.set(topic, contract_example(id=number))
    q.set(LAYOUT.running("T"), snapshot())
    q.requeue_all(compare_dispatches=True)
    # The snapshot goes at once; the dispatch topics wait for the broker's copies.
    assert [item.topic for item in drain(q)] == [LAYOUT.running("T")]
    assert q.pending == 3 and not q.idle
    q.confirm(same, wire.encode(contract_example(id=1)))
    q.confirm(changed, wire.encode(contract_example(id=2, payload={"power_w": 1})))
    assert q.release_unconfirmed() == 2
    assert {item.topic for item in drain(q)} == {changed, missing} and q.idle


def test_a_change_while_comparing_is_sent_once_and_a_clear_is_not_held_back() -> None:
    q = queue()
    topic, gone = LAYOUT.dispatch("EXAMPLE_TYPE", 1), LAYOUT.dispatch("EXAMPLE_TYPE", 2)
    q.set(topic, contract_example(id=1))
    q.set(gone, contract_example(id=2))
    q.clear(gone)
    q.requeue_all(compare_dispatches=True)
    assert [item.topic for item in drain(q)] == [gone]  # the clear goes at once
    q.set(topic, contract_example(id=1, active=False))
    assert q.release_unconfirmed() == 0
    assert [item.topic for item in drain(q)] == [topic]


def test_a_drained_burst_gives_its_memory_back() -> None:
    # After a start-up's 100k topics went out, the queue held the table of its
    # largest size: about 60 bytes per dispatch for nothing.
    topics = [LAYOUT.dispatch("T", n) for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reference = dict.fromkeys(topics, b"x")
        held_alone = tracemalloc.get_traced_memory()[0] - before
        del reference
        q = queue()
        before = tracemalloc.get_traced_memory()[0]
        for topic in topics:
            q.set(topic, b"x")
        while (item := q.take()) is not None:
            q.sent(item)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert q.idle and len(q.held()) == 20_000
    assert held < 1.3 * held_alone


def test_a_dispatch_that_changes_type_is_cleared_on_its_old_topic_and_sent_on_its_new() -> None:
    q = queue()
    before, after = contract_example(id=5, type="A"), contract_example(id=5, type="B")
    q.set(LAYOUT.dispatch("A", 5), before)
    drain(q)
    q.clear(LAYOUT.dispatch("A", 5))
    q.set(LAYOUT.dispatch("B", 5), after)
    sent = [(item.topic, item.payload) for item in drain(q)]
    assert sent == [(LAYOUT.dispatch("A", 5), b""), (LAYOUT.dispatch("B", 5), wire.encode(after))]
    assert q.held() == {LAYOUT.dispatch("B", 5): after}
    # The broker's copy under the old type is stale; the one under the new type is held.
    assert q.clear_stale({LAYOUT.dispatch("A", 5), LAYOUT.dispatch("B", 5)}) == (1, 0)
    assert [item.topic for item in drain(q)] == [LAYOUT.dispatch("A", 5)]


def traced_table_bytes(dispatches: list[wire.Dispatch]) -> int:
    """What a table of `dispatches` by id costs (tracemalloc must be tracing)."""
    before = tracemalloc.get_traced_memory()[0]
    table = {d.id: d for d in dispatches}
    cost = tracemalloc.get_traced_memory()[0] - before
    del table
    return cost


def test_the_queue_keeps_no_topic_string_per_dispatch() -> None:
    # Each dispatch topic (about 100 bytes) is built when it is sent: a held
    # dispatch costs the queue its table entry, not a string too.
    dispatches = [contract_example(id=n) for n in range(20_000)]
    tracemalloc.start()
    try:
        table_alone = traced_table_bytes(dispatches)
        q = queue()
        before = tracemalloc.get_traced_memory()[0]
        for dispatch in dispatches:
            q.set(LAYOUT.dispatch(dispatch.type, dispatch.id), dispatch)
        drain(q)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert q.held_count == 20_000
    assert held < 1.3 * table_alone


def on_core() -> tuple[ScheduleCore, PublishQueue]:
    core, q = ScheduleCore(MG, LAYOUT), queue()
    q.read_dispatches_from(core.table)
    return core, q


def hand(q: PublishQueue, out: Outbox) -> None:
    """What `MicrogridService` hands the publisher of a step."""
    for topic, value in out.retained.items():
        if value is None:
            q.clear(topic)
        else:
            q.set(topic, value)
    for dispatch in out.dispatches.values():
        q.set(LAYOUT.dispatch(dispatch.type, dispatch.id), dispatch)


def test_a_queue_on_the_cores_table_keeps_no_table_of_its_own() -> None:
    # Its own table cost 52 bytes per dispatch at 100k, beside the core's.
    dispatches = [contract_example(id=n) for n in range(1, 20_001)]
    tracemalloc.start()
    try:
        table_alone = traced_table_bytes(dispatches)
        core, q = on_core()
        out = core.load(dispatches, NOW)
        before = tracemalloc.get_traced_memory()[0]
        hand(q, out)
        sent = len(drain(q))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert q.held_count == 20_001 and sent == 20_001  # and the running snapshot
    assert held < 0.2 * table_alone


def test_on_the_cores_table_a_removed_dispatch_is_only_cleared_a_retyped_one_moves() -> None:
    core, q = on_core()
    hand(q, core.load([contract_example(id=1, type="A"), contract_example(id=2, type="A")], NOW))
    hand(q, core.apply("deleted", contract_example(id=1, type="A"), NOW))
    retyped = contract_example(id=2, type="B", update_time=NOW)
    hand(q, core.apply("updated", retyped, NOW))
    sent = {item.topic: item.payload for item in drain(q) if "/dispatches/" in item.topic}
    held = core.get(2)
    assert held is not None
    assert sent == {
        LAYOUT.dispatch("A", 1): b"",
        LAYOUT.dispatch("A", 2): b"",
        LAYOUT.dispatch("B", 2): wire.encode(core.table[2]),
    }
    assert [t for t in q.held() if "/dispatches/" in t] == [LAYOUT.dispatch("B", 2)]
    assert q.idle


def test_the_bridges_queue_reads_its_cores_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_API_AUTH_KEY", "key")
    flags = {
        "--microgrid-id": str(MG),
        "--dispatch-url": "grpc://127.0.0.1:1",
        "--broker": "mqtt://127.0.0.1:1",
        "--state-dir": str(tmp_path),
    }
    args = build_parser().parse_args(["run", *(part for item in flags.items() for part in item)])
    pipeline = _Pipeline(load_settings(args), MG)
    pipeline.service.core.load([contract_example(id=1)], NOW)
    assert pipeline.publisher.queue.held_count == 1  # nothing set: the core's struct
    with pytest.raises(ValueError, match="holds dispatch structs already"):
        pipeline.publisher.queue.read_dispatches_from({})
