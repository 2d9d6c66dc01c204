"""The bridge's schedule core and loop (`bridge.service`), with a fake clock and a fake sink."""

from __future__ import annotations

import asyncio
import logging
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import pytest

from actor_sdk import wire
from bridge.service import (
    LinkChanged,
    Listed,
    MicrogridService,
    Outbox,
    ScheduleCore,
    StreamEvent,
    Synced,
    strip_state,
)
from testkit.processes import async_wait_until

T0 = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
LAYOUT = wire.TopicLayout.for_microgrid(5)
S = timedelta(seconds=1)


def dispatch(
    dispatch_id: int,
    *,
    kind: str = "T",
    start: datetime = T0,
    duration: int | None = 60,
    active: bool = True,
    payload: dict[str, Any] | None = None,
    recurrence: wire.Recurrence | None = None,
    updated: datetime = T0 - timedelta(hours=1),
) -> wire.Dispatch:
    return wire.Dispatch(
        id=dispatch_id,
        type=kind,
        start_time=start,
        duration=duration,
        target=wire.Target(ids=(1,)),
        active=active,
        dry_run=False,
        payload=payload or {},
        recurrence=recurrence,
        create_time=T0 - timedelta(hours=1),
        update_time=updated,
        end_time=None,
        running=False,
        until=None,
        next_run=None,
    )


def snapshot(out: Outbox, kind: str) -> wire.RunningSnapshot:
    value = out.retained[LAYOUT.running(kind)]
    assert isinstance(value, wire.RunningSnapshot)
    return value


def published(out: Outbox, kind: str, dispatch_id: int) -> wire.Dispatch | None:
    if LAYOUT.dispatch(kind, dispatch_id) in out.retained:
        assert out.retained[LAYOUT.dispatch(kind, dispatch_id)] is None
        return None
    value = out.dispatches[dispatch_id]
    assert value.type == kind
    return value


def topics(out: Outbox) -> list[str]:
    """Every topic the outbox sets or clears: the dispatch topics set, then the rest."""
    return [LAYOUT.dispatch(d.type, d.id) for d in out.dispatches.values()] + list(out.retained)


def events(out: Outbox) -> list[tuple[str, int]]:
    decoded = [wire.decode_event(payload) for _, payload in out.events]
    return [(e.event, e.dispatch.id) for e in decoded]


def test_load_sets_every_topic_without_events() -> None:
    core = ScheduleCore(5, LAYOUT)
    out = core.load([dispatch(1), dispatch(2, start=T0 + 10 * S), dispatch(3, kind="U")], T0)
    assert out.events == []
    assert set(topics(out)) == {
        LAYOUT.dispatch("T", 1),
        LAYOUT.dispatch("T", 2),
        LAYOUT.dispatch("U", 3),
        LAYOUT.running("T"),
        LAYOUT.running("U"),
    }
    running = snapshot(out, "T")
    assert [d.id for d in running.running] == [1]
    assert running.running[0].until == T0 + 60 * S
    assert running.next_change == T0 + 10 * S
    assert running.as_of == T0
    first = published(out, "T", 1)
    assert first is not None and first.running and first.until == T0 + 60 * S
    second = published(out, "T", 2)
    assert second is not None and not second.running and second.next_run == T0 + 10 * S
    assert core.next_change() == T0 + 10 * S


def test_a_change_is_due_at_its_instant_and_not_a_microsecond_before() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1, start=T0 + 10 * S, duration=5)], T0)
    assert not core.advance(T0 + 10 * S - timedelta(microseconds=1))
    out = core.advance(T0 + 10 * S)
    assert [(t.dispatch_id, t.started) for t in out.transitions] == [(1, True)]
    assert [d.id for d in snapshot(out, "T").running] == [1]
    assert snapshot(out, "T").next_change == T0 + 15 * S
    assert core.next_change() == T0 + 15 * S
    out = core.advance(T0 + 15 * S)
    assert [(t.dispatch_id, t.started) for t in out.transitions] == [(1, False)]
    assert snapshot(out, "T").running == ()
    assert snapshot(out, "T").next_change is None
    assert core.next_change() is None


def test_a_late_step_catches_up_with_every_due_change() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1, start=T0 + S, duration=2), dispatch(2, start=T0 + 2 * S)], T0)
    out = core.advance(T0 + 5 * S)
    # 1 started and stopped (its run is over): nothing runs but 2.
    assert [d.id for d in snapshot(out, "T").running] == [2]
    assert core.running_ids("T") == [2]


def test_recurring_dispatch_keeps_switching_and_the_heap_stays_small() -> None:
    rule = wire.Recurrence(frequency="MINUTELY", interval=1)
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1, duration=3, recurrence=rule)], T0 - S)
    flips = []
    now = T0 - S
    for _ in range(200):
        when = core.next_change()
        assert when is not None and when > now
        now = when
        out = core.advance(now)
        flips += [(now, t.started) for t in out.transitions]
    assert flips[:4] == [(T0, True), (T0 + 3 * S, False), (T0 + 60 * S, True), (T0 + 63 * S, False)]
    assert len(flips) == 200
    assert len(core._heaps["T"]) <= 2


def test_update_takes_effect_at_once_with_an_updated_event() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1, payload={"p": 1})], T0)
    out = core.apply("updated", dispatch(1, payload={"p": 2}, updated=T0), T0 + S)
    assert events(out) == [("updated", 1)]
    assert wire.payload_of(snapshot(out, "T").running[0]) == {"p": 2}
    assert snapshot(out, "T").as_of == T0 + S
    out = core.apply("updated", dispatch(1, active=False, updated=T0 + S), T0 + 2 * S)
    assert snapshot(out, "T").running == ()
    again = published(out, "T", 1)
    assert again is not None and not again.running and not again.active
    assert core.next_change() is None


def test_an_identical_update_publishes_nothing() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1)], T0)
    assert not core.apply("updated", dispatch(1), T0 + S)


def test_an_outbox_makes_no_topic_string_per_dispatch_it_sets() -> None:
    # A first sync of 100k dispatches made every dispatch topic's string at once; freed
    # once sent, their memory stayed resident (110 B per dispatch). The service builds
    # each topic as it hands the dispatch on.
    core = ScheduleCore(5, LAYOUT)
    out = core.load([dispatch(n, kind=f"K{n % 2}") for n in range(1000)], T0)
    assert list(out.retained) == [LAYOUT.running("K0"), LAYOUT.running("K1")]
    assert list(out.dispatches) == list(range(1000))


def test_the_outbox_says_what_the_cache_must_store_and_a_new_run_state_is_none_of_it() -> None:
    core = ScheduleCore(5, LAYOUT)
    assert set(core.load([dispatch(1, start=T0 + S), dispatch(2)], T0).stored) == {1, 2}
    started = core.advance(T0 + S)
    assert started.transitions and published(started, "T", 1) and not started.stored
    assert not core.all_topics(T0 + S).stored
    listed = [dispatch(1, start=T0 + S), dispatch(2)]
    assert not core.sync(listed, T0 + 2 * S, events=True).stored
    out = core.apply("updated", dispatch(1, kind="U", updated=T0), T0 + 2 * S)
    assert out.stored == {1: published(out, "U", 1)}
    assert core.apply("deleted", dispatch(2), T0 + 2 * S).stored == {2: None}


def test_delete_clears_the_dispatch_topic_and_empties_the_running_snapshot() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1), dispatch(2, kind="U", start=T0 + 5 * S)], T0)
    # Same update_time as held: a delete still applies.
    out = core.apply("deleted", dispatch(1), T0 + S)
    assert published(out, "T", 1) is None
    assert snapshot(out, "T").running == ()
    assert events(out) == [("deleted", 1)]
    assert core.get(1) is None and len(core) == 1
    # A stale heap entry of the deleted dispatch never fires.
    assert core.next_change() == T0 + 5 * S
    assert not core.apply("deleted", dispatch(1), T0 + 2 * S)


def test_type_change_clears_the_old_topic_and_updates_both_snapshots() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1, kind="OLD")], T0)
    out = core.apply("updated", dispatch(1, kind="NEW", updated=T0), T0 + S)
    assert published(out, "OLD", 1) is None
    moved = published(out, "NEW", 1)
    assert moved is not None and moved.running
    assert snapshot(out, "OLD").running == ()
    assert [d.id for d in snapshot(out, "NEW").running] == [1]
    assert core.running_ids("OLD") == []
    # The old type's heap entries no longer fire for it.
    out = core.advance(T0 + 60 * S)
    assert topics(out) == [LAYOUT.dispatch("NEW", 1), LAYOUT.running("NEW")]


def test_sync_diffs_created_updated_deleted_and_leaves_the_rest_alone() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1), dispatch(2), dispatch(3)], T0)
    out = core.sync(
        [dispatch(1, payload={"x": 1}, updated=T0), dispatch(3), dispatch(4)], T0 + S, events=True
    )
    assert sorted(events(out)) == [("created", 4), ("deleted", 2), ("updated", 1)]
    assert published(out, "T", 2) is None
    assert LAYOUT.dispatch("T", 3) not in topics(out)
    assert [d.id for d in snapshot(out, "T").running] == [1, 3, 4]
    assert out.counts == {"created": 1, "updated": 1, "deleted": 1}


def test_a_listing_in_parts_publishes_each_part_at_once_and_deletes_only_at_its_end() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1), dispatch(2), dispatch(3)], T0)
    part = core.put_listed(
        [dispatch(1, payload={"x": 1}, updated=T0), dispatch(4)], T0 + S, events=True
    )
    assert sorted(events(part)) == [("created", 4), ("updated", 1)]
    assert [d.id for d in snapshot(part, "T").running] == [1, 2, 3, 4]  # 2 not deleted yet
    assert sorted(part.dispatches) == [1, 4] and not part.retained.keys() - {LAYOUT.running("T")}
    last = core.sync([dispatch(3)], T0 + S, events=True, listed_before={1, 4})
    assert events(last) == [("deleted", 2)]
    assert [d.id for d in snapshot(last, "T").running] == [1, 3, 4]
    assert sorted(d.id for d in core.dispatches()) == [1, 3, 4]


def test_a_part_of_a_listing_removes_a_held_dispatch_listed_as_nothing_the_core_can_hold() -> None:
    # As a whole listing does: the held version is not what the API lists any more.
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1)], T0)
    out = core.put_listed([dispatch(1, kind="", updated=T0)], T0 + S, events=True)
    assert out.rejected == [(1, "dispatch type must not be empty")]
    assert events(out) == [("deleted", 1)] and core.get(1) is None


def _peak_of_a_sync(kept_elsewhere: bool) -> tuple[int, int]:
    """Traced memory at the peak of loading 20k running dispatches, and one struct's size."""
    core = ScheduleCore(5, LAYOUT)
    template = dispatch(0)
    tracemalloc.start()
    try:
        listed = [msgspec.structs.replace(template, id=n) for n in range(20_000)]
        kept = list(listed) if kept_elsewhere else []
        tracemalloc.reset_peak()
        core.load(listed, T0 + S)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not listed and len(core) == 20_000 and len(kept) in (0, 20_000)
    return peak, sys.getsizeof(template)


def test_a_sync_lets_each_listed_struct_go_once_the_core_holds_its_own() -> None:
    # Each struct gets its run state (a new struct): the listed one goes at once and
    # its memory is taken by the next, unless someone else still holds the listing.
    # Kept to the end, the listed structs of a 100k start-up left their memory resident.
    handed_over, struct_size = _peak_of_a_sync(kept_elsewhere=False)
    kept, _ = _peak_of_a_sync(kept_elsewhere=True)
    assert kept - handed_over > 0.8 * 20_000 * struct_size


def test_buffered_events_older_than_the_list_are_skipped_but_deletes_apply() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1, payload={"v": 2}, updated=T0)], T0)
    stale = dispatch(1, payload={"v": 1}, updated=T0 - S)
    assert not core.apply("updated", stale, T0 + S, only_newer=True)
    assert not core.apply("created", dispatch(1, updated=T0), T0 + S, only_newer=True)
    out = core.apply("deleted", dispatch(1, updated=T0), T0 + S, only_newer=True)
    assert events(out) == [("deleted", 1)]


def test_payloads_are_held_encoded_and_equal_whatever_their_key_order() -> None:
    # The API gives a payload's keys in no fixed order: a listing that only reorders
    # them changes nothing, and the topic carries the keys sorted.
    core = ScheduleCore(5, LAYOUT)
    out = core.load([dispatch(1, payload={"z": 1, "a": {"y": 2, "b": 3}})], T0)
    held = published(out, "T", 1)
    assert held is not None and isinstance(held.payload, msgspec.Raw)
    assert b'"payload":{"a":{"b":3,"y":2},"z":1}' in wire.encode(held)
    reordered = dispatch(1, payload={"a": {"b": 3, "y": 2}, "z": 1})
    assert not core.sync([reordered], T0 + S, events=True)
    assert not core.apply("updated", reordered, T0 + S)
    assert wire.payload_of(core.table[1]) == {"a": {"b": 3, "y": 2}, "z": 1}


def test_computed_state_in_the_input_is_ignored() -> None:
    core = ScheduleCore(5, LAYOUT)
    lying = msgspec.structs.replace(
        dispatch(1, start=T0 + 100 * S), running=True, until=T0, next_run=T0
    )
    out = core.load([lying], T0)
    assert snapshot(out, "T").running == ()
    assert core.get(1) == wire.encode_payload(strip_state(lying))


def test_a_step_costs_the_changes_not_all_dispatches() -> None:
    core = ScheduleCore(5, LAYOUT)
    many = [dispatch(i, kind=f"K{i % 10}", start=T0 + timedelta(days=1)) for i in range(1, 5001)]
    core.load([*many, dispatch(9999, kind="SOON", start=T0 + S, duration=1)], T0)
    out = core.advance(T0 + S)
    assert topics(out) == [LAYOUT.dispatch("SOON", 9999), LAYOUT.running("SOON")]


def test_all_topics_republishes_every_dispatch_and_type() -> None:
    core = ScheduleCore(5, LAYOUT)
    core.load([dispatch(1), dispatch(2, kind="U")], T0)
    core.apply("deleted", dispatch(2, kind="U"), T0)
    out = core.all_topics(T0 + S)
    assert set(topics(out)) == {LAYOUT.dispatch("T", 1), LAYOUT.running("T"), LAYOUT.running("U")}
    assert snapshot(out, "U").running == ()


# --- the async shell --------------------------------------------------------------


class FakeSink:
    def __init__(self) -> None:
        self.retained: dict[str, Any] = {}
        self.log: list[tuple[datetime, str, Any]] = []
        self.events: list[tuple[str, bytes]] = []
        self.status: dict[str, Any] = {}
        self.authoritative = False

    def set(self, topic: str, payload: Any) -> None:
        self.retained[topic] = payload
        self.log.append((datetime.now(UTC), topic, payload))

    def clear(self, topic: str) -> None:
        self.retained.pop(topic, None)
        self.log.append((datetime.now(UTC), topic, None))

    def event(self, topic: str, payload: bytes) -> None:
        self.events.append((topic, payload))

    def mark_authoritative(self) -> None:
        self.authoritative = True

    def set_status(
        self,
        *,
        upstream: Literal["connected", "disconnected"],
        synced_at: datetime | None,
        dispatches: int,
        knowledge_at: datetime | None,
    ) -> None:
        self.status = {"upstream": upstream, "synced_at": synced_at, "dispatches": dispatches}


def test_service_steps_apply_upstream_items_with_one_clock_read() -> None:
    reads: list[datetime] = []

    def clock() -> datetime:
        reads.append(T0)
        return T0

    sink = FakeSink()
    saved: list[int] = []
    service = MicrogridService(
        ScheduleCore(5, LAYOUT), sink, clock=clock, on_change=lambda stored: saved.append(1)
    )
    service.start()
    assert sink.status["upstream"] == "disconnected"
    assert not sink.authoritative  # no cache: nothing to vouch for before the first sync
    service.put(LinkChanged(True))
    service.put(Synced([dispatch(1), dispatch(2)]))
    service.put(StreamEvent("created", dispatch(3, kind="U")))
    reads.clear()
    service.step(service.now())
    assert len(reads) == 1
    assert sink.status == {"upstream": "connected", "synced_at": T0, "dispatches": 3}
    assert sink.authoritative
    # The first sync of a bridge without a cache sends no events; the stream's do.
    assert [wire.decode_event(p).event for _, p in sink.events] == ["created"]
    assert saved
    service.put(LinkChanged(False, "test"))
    service.step(T0)
    assert sink.status["upstream"] == "disconnected"
    service.put(Synced([dispatch(1)]))
    service.step(T0)
    assert sorted(wire.decode_event(p).event for _, p in sink.events) == [
        "created",
        "deleted",
        "deleted",
    ]
    assert LAYOUT.dispatch("T", 2) not in sink.retained


def test_a_listing_in_parts_is_published_part_by_part_and_vouched_for_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = FakeSink()
    service = MicrogridService(ScheduleCore(5, LAYOUT), sink, clock=lambda: T0)
    service.put(Synced([dispatch(1), dispatch(2), dispatch(3)]))
    service.step(T0)
    service.put(LinkChanged(False, "test"))
    service.put(Listed([dispatch(1, payload={"x": 1}, updated=T0), dispatch(4)]))
    sink.authoritative = False
    service.step(T0)
    # The part is published at once; the broker's stale topics wait for the whole listing.
    assert sink.retained[LAYOUT.dispatch("T", 4)].id == 4
    assert wire.payload_of(sink.retained[LAYOUT.dispatch("T", 1)]) == {"x": 1}
    assert LAYOUT.dispatch("T", 2) in sink.retained
    assert not sink.authoritative and sink.status["synced_at"] == T0
    service.put(Listed([dispatch(5)]))
    service.put(LinkChanged(True))
    caplog.set_level(logging.INFO, "bridge.service")
    service.put(Synced([dispatch(3)], listed_before={1, 4, 5}))
    service.step(T0 + S)
    assert sink.authoritative and sink.status["synced_at"] == T0 + S
    assert LAYOUT.dispatch("T", 2) not in sink.retained
    assert sorted(d.id for d in service.core.dispatches()) == [1, 3, 4, 5]
    # One line for the whole listing: held before its first part, and every part's changes.
    assert "held before: 3; created 2, updated 1, deleted 1 while disconnected" in caplog.text


def test_the_cache_is_told_of_a_change_before_the_sink_gets_any_topic_of_it() -> None:
    # The publisher writes a running snapshot to the socket as it is set: what a
    # restart would not find in the cache must not reach the network first.
    sink = FakeSink()
    order: list[str] = []
    service = MicrogridService(
        ScheduleCore(5, LAYOUT),
        sink,
        clock=lambda: T0,
        on_change=lambda stored: order.append(f"cache {sorted(stored)}"),
    )
    sink.set = lambda topic, payload: order.append(topic)  # type: ignore[method-assign]
    service.put(StreamEvent("created", dispatch(7)))
    service.step(T0)
    assert order[:3] == ["cache [7]", LAYOUT.running("T"), LAYOUT.dispatch("T", 7)]


async def test_service_publishes_a_scheduled_start_at_its_instant() -> None:
    sink = FakeSink()
    service = MicrogridService(ScheduleCore(5, LAYOUT), sink)
    start = datetime.now(UTC) + timedelta(milliseconds=150)
    service.put(Synced([dispatch(1, start=start, duration=1)]))
    task = asyncio.create_task(service.run())
    try:
        topic = LAYOUT.running("T")

        async def started() -> datetime:
            while True:
                for at, logged, value in sink.log:
                    if (
                        logged == topic
                        and isinstance(value, wire.RunningSnapshot)
                        and value.running
                    ):
                        return at
                await asyncio.sleep(0.005)

        at = await asyncio.wait_for(started(), 5)
    finally:
        task.cancel()
    late = (at - start).total_seconds()
    assert 0 <= late < 0.05, f"published {late * 1000:.1f} ms after its instant"
    value = sink.retained[topic]
    assert value.as_of >= start


async def test_service_wakes_for_an_upstream_item_while_sleeping() -> None:
    sink = FakeSink()
    service = MicrogridService(ScheduleCore(5, LAYOUT), sink)
    service.put(Synced([dispatch(1, start=datetime.now(UTC) + timedelta(hours=1))]))
    task = asyncio.create_task(service.run())
    try:
        await async_wait_until(lambda: service.steps > 0, 5, "the first step")
        service.put(StreamEvent("deleted", dispatch(1)))
        await async_wait_until(
            lambda: LAYOUT.dispatch("T", 1) not in sink.retained, 2, "the delete"
        )
    finally:
        task.cancel()


def test_a_dispatch_whose_type_cannot_be_a_topic_level_is_rejected_not_fatal() -> None:
    core = ScheduleCore(5, LAYOUT)
    out = core.sync([dispatch(1, kind=""), dispatch(2)], T0, events=True)
    assert out.rejected == [(1, "dispatch type must not be empty")]
    assert core.get(1) is None and core.get(2) is not None
    out = core.apply("created", dispatch(3, kind="\ud800"), T0)
    assert [i for i, _ in out.rejected] == [3] and core.get(3) is None


async def test_a_stream_event_is_logged_after_its_topics_were_handed_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One log line written inside the step held a created dispatch's snapshot back
    # (bench/latency.py): the line follows once the publisher had its turn.
    sink = FakeSink()
    service = MicrogridService(ScheduleCore(5, LAYOUT), sink)
    service.put(Synced([]))
    service.step(T0)
    line = "microgrid 5: dispatch 7 of type 'T' created"
    with caplog.at_level(logging.INFO, "bridge.service"):
        service.put(StreamEvent("created", dispatch(7, start=T0 - S)))
        service.step(T0)
        value = sink.retained[LAYOUT.running("T")]
        assert isinstance(value, wire.RunningSnapshot) and [d.id for d in value.running] == [7]
        assert line not in caplog.messages
        await async_wait_until(lambda: line in caplog.messages, 2, "the log line")


async def test_an_upstream_item_is_stepped_one_turn_after_it_was_put() -> None:
    # The service slept on an Event through `wait_for`: three turns of the event loop
    # from `put` to the step that applies the item.
    service = MicrogridService(ScheduleCore(5, LAYOUT), FakeSink())
    service.put(Synced([dispatch(1, start=datetime.now(UTC) + timedelta(hours=1))]))
    task = asyncio.create_task(service.run())
    try:
        await async_wait_until(lambda: service.steps > 0, 5, "the first step")
        for _ in range(3):  # the loop goes to sleep
            await asyncio.sleep(0)
        steps = service.steps
        service.put(StreamEvent("deleted", dispatch(1)))
        turns = 0
        while service.steps == steps:
            await asyncio.sleep(0)
            turns += 1
            assert turns < 10, "the item was not stepped"
    finally:
        task.cancel()
    assert turns == 1
