"""`bridge.request_handler`: the async shell of the requests, with fakes around a real service.

The pure parts are tested in `test_requests.py`; end to end in `test_requests_e2e.py`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest

from actor_sdk import mqtt, wire
from bridge.core import ScheduleCore
from bridge.request_handler import HOLD_FILE, RequestHandler, load_holds
from bridge.service import LinkChanged, MicrogridService, Synced
from testkit.processes import async_wait_until
from tests.fixtures.wire_examples import T0
from tests.test_requests import running_now

LAYOUT = wire.TopicLayout.for_microgrid(3)


# --- the handler, with a real service and core -------------------------------------------


class FakePublisher:
    """The publisher's faces the service and the handler use; answers kept decoded."""

    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}
        self.retained: dict[str, Any] = {}
        self.answers: list[tuple[str, wire.RequestAnswer]] = []
        self.republished = 0
        self.acked = asyncio.Event()
        self.acked.set()

    def set(self, topic: str, payload: Any) -> None:
        self.retained[topic] = payload

    def clear(self, topic: str) -> None:
        self.retained.pop(topic, None)

    def event(self, topic: str, payload: bytes) -> None:
        if "/response/" in topic:
            self.answers.append((topic, wire.decode_answer(payload)))

    def mark_authoritative(self) -> None:
        pass

    def set_status(
        self,
        *,
        upstream: Literal["connected", "disconnected"],
        synced_at: datetime | None,
        dispatches: int,
        knowledge_at: datetime | None,
    ) -> None:
        pass

    def republish(self) -> None:
        self.republished += 1

    async def flushed(self) -> None:
        await self.acked.wait()


class FakeUpstream:
    def __init__(self) -> None:
        self.resyncs = 0

    def resync(self) -> None:
        self.resyncs += 1


def make_handler(
    directory: Path,
) -> tuple[RequestHandler, MicrogridService, FakePublisher, FakeUpstream]:
    publisher, upstream = FakePublisher(), FakeUpstream()
    service = MicrogridService(ScheduleCore(3, LAYOUT), publisher, clock=lambda: T0)
    handler = RequestHandler(LAYOUT, directory, service, publisher, upstream, clock=lambda: T0)
    return handler, service, publisher, upstream


def message(topic: str, payload: bytes, *, retain: bool = False) -> mqtt.Message:
    return mqtt.Message(topic, payload, qos=1, retain=retain, mid=1, properties=None)


async def test_a_resync_answers_once_the_listing_is_applied_and_the_broker_acked(
    tmp_path: Path,
) -> None:
    _, service, publisher, upstream = make_handler(tmp_path)
    assert set(publisher.listeners) == {LAYOUT.request(a) for a in wire.REQUEST_ACTIONS}
    publisher.acked.clear()
    listener = publisher.listeners[LAYOUT.request("resync")]
    listener(message(LAYOUT.request("resync"), b'{"transaction": "a"}'))
    listener(message(LAYOUT.request("resync"), b'{"transaction": "b"}'))
    await asyncio.sleep(0)
    assert upstream.resyncs == 2 and not publisher.answers
    service.put(Synced([running_now(1, "A")]))
    service.step(T0)
    await async_wait_until(lambda: publisher.republished == 2, 5, "the republish")
    assert not publisher.answers  # not yet acknowledged by the broker
    publisher.acked.set()
    await async_wait_until(lambda: len(publisher.answers) == 2, 5, "two answers")
    assert [(a.transaction, a.status, a.dispatches) for _, a in publisher.answers] == [
        ("a", "ok", 1),
        ("b", "ok", 1),
    ]
    # A failed listing answers at once with its reason (both requests share it).
    listener(message(LAYOUT.request("resync"), b'{"transaction": "c"}'))
    await asyncio.sleep(0)
    service.put(LinkChanged(False, "UNAVAILABLE: connection refused"))
    service.step(T0)
    await async_wait_until(lambda: len(publisher.answers) == 3, 5, "the error answer")
    last = publisher.answers[-1][1]
    assert last.transaction == "c" and last.status == "error"
    assert last.error is not None and "UNAVAILABLE: connection refused" in last.error
    # A retained request (a replay) is not acted on.
    listener(message(LAYOUT.request("resync"), b'{"transaction": "d"}', retain=True))
    await asyncio.sleep(0)
    assert upstream.resyncs == 3


async def test_holds_are_saved_and_loaded_and_an_unwritable_state_dir_is_said(
    tmp_path: Path,
) -> None:
    handler, service, publisher, _ = make_handler(tmp_path)
    service.put(Synced([running_now(1, "A")]))
    service.step(T0 + timedelta(minutes=1))
    handler.handle("hold", b'{"transaction": 1, "type": "A", "reason": "works"}')
    snapshot = publisher.retained[LAYOUT.running("A")]
    assert snapshot.held and snapshot.running == ()  # at once; saved, then answered
    await async_wait_until(lambda: publisher.answers, 5, "the answer")
    topic, reply = publisher.answers[-1]
    assert topic == LAYOUT.response("hold") and reply.status == "ok"
    assert reply.holds == wire.Holds(types={"A": wire.Hold(since=T0, reason="works")})
    assert load_holds(tmp_path, 3, T0).snapshot() == reply.holds

    # The state dir goes away (a file where the directory was): the hold still acts.
    unwritable = tmp_path / "gone"
    unwritable.write_bytes(b"")
    handler, service, publisher, _ = make_handler(unwritable)
    service.put(Synced([running_now(1, "A")]))
    service.step(T0 + timedelta(minutes=1))
    handler.handle("hold", b'{"transaction": 2}')
    await async_wait_until(lambda: publisher.answers, 5, "the answer")
    reply = publisher.answers[-1][1]
    assert reply.status == "error" and reply.error is not None
    assert "could not be saved" in reply.error and "not after a restart" in reply.error
    assert publisher.retained[LAYOUT.running("A")].held


def test_a_damaged_hold_file_holds_every_type(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / HOLD_FILE).write_bytes(b"\x00garbage")
    with caplog.at_level(logging.ERROR):
        book = load_holds(tmp_path, 3, T0)
    hold = book.of("ANY")
    assert hold is not None and "cannot be read" in hold.reason
    assert "release --all" in caplog.text
    assert not load_holds(tmp_path / "none", 3, T0)


async def test_quick_holds_and_releases_act_in_order_and_the_file_keeps_the_last(
    tmp_path: Path,
) -> None:
    handler, service, publisher, _ = make_handler(tmp_path)
    service.put(Synced([running_now(1, "A"), running_now(2, "B")]))
    service.step(T0 + timedelta(minutes=1))
    handler.handle("hold", b'{"transaction": 1, "type": "A"}')
    handler.handle("hold", b'{"transaction": 2, "type": "B"}')
    handler.handle("release", b'{"transaction": 3, "type": "A"}')
    assert not publisher.retained[LAYOUT.running("A")].held
    assert publisher.retained[LAYOUT.running("B")].held
    await async_wait_until(lambda: len(publisher.answers) == 3, 5, "three answers")
    assert [a.transaction for _, a in publisher.answers] == [1, 2, 3]
    assert [sorted(a.holds.types) for _, a in publisher.answers if a.holds] == [
        ["A"],
        ["A", "B"],
        ["B"],
    ]
    assert sorted(load_holds(tmp_path, 3, T0).snapshot().types) == ["B"]


async def test_a_resync_without_a_listing_or_an_ack_in_time_says_which(tmp_path: Path) -> None:
    handler, service, publisher, upstream = make_handler(tmp_path)
    handler.listing_timeout = handler.ack_timeout = 0.05
    handler.handle("resync", b'{"transaction": "slow api"}')
    await async_wait_until(lambda: publisher.answers, 5, "the answer")
    slow = publisher.answers[-1][1]
    assert slow.status == "error" and slow.error is not None
    assert "no listing from the Dispatch API within 0.05 s" in slow.error
    assert publisher.republished == 1  # what is held goes out all the same
    # Listed in time, but the broker does not acknowledge the republish.
    publisher.acked.clear()
    handler.handle("resync", b'{"transaction": "slow broker"}')
    await async_wait_until(lambda: upstream.resyncs == 2, 5, "the resync asked")
    service.put(Synced([running_now(1, "A")]))
    service.step(T0)
    await async_wait_until(lambda: len(publisher.answers) == 2, 5, "the second answer")
    late = publisher.answers[-1][1]
    assert late.status == "error" and late.dispatches == 1
    assert late.error == "the broker did not acknowledge the republish within 0.05 s"


def test_the_log_says_when_a_scheduled_start_is_not_published_for_a_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler, service, publisher, _ = make_handler(tmp_path)
    handler.holds.hold("A", "works", T0)
    service.put(Synced([running_now(1, "A"), running_now(2, "B")]))
    service.step(T0 - timedelta(seconds=1))
    with caplog.at_level(logging.INFO, logger="bridge.service"):
        service.step(T0)
    assert (
        "dispatch 1 of type 'A' started, until 2026-11-28T07:00:00+00:00 (type held" in caplog.text
    )
    lines = [line for line in caplog.text.splitlines() if "type 'B' started" in line]
    assert len(lines) == 1 and "held" not in lines[0]
    assert publisher.retained[LAYOUT.running("A")].running == ()
