"""Requests to the bridge without I/O: `bridge.requests`, the core's holds, the wire structs
and topics.

The async shell: `test_requests_handler.py`; end to end through the API server,
Mosquitto and the SDK: `test_requests_e2e.py`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from actor_sdk import wire
from bridge.core import ScheduleCore
from bridge.requests import (
    DEFAULT_REASON,
    OTHER_REASON,
    HoldBook,
    Parsed,
    answer,
    decode_hold_file,
    encode_hold_file,
    parse_request,
)
from bridge.watch_state import WatchState
from bridge.watch_text import render
from tests.fixtures.wire_examples import T0, contract_example

LAYOUT = wire.TopicLayout.for_microgrid(3)


def running_now(dispatch_id: int, dispatch_type: str) -> wire.Dispatch:
    """A one-off dispatch of an hour from T0 (not yet stamped with its state)."""
    return contract_example(
        id=dispatch_id,
        type=dispatch_type,
        recurrence=None,
        duration=3600,
        running=False,
        until=None,
        next_run=None,
    )


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "transaction", "error"),
    [
        (b"", None, "not JSON"),
        (b"\xff\xfe", None, "not JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'"resync"', None, "must be a JSON object"),
        (b"{" * 10_000, None, "not JSON"),
        (b" " * (wire.MAX_REQUEST_BYTES + 1), None, "exceeds"),
        (b'{"transaction": "a", "type": 5}', "a", "$.type"),
        (b'{"transaction": [1], "reason": {}}', [1], "$.reason"),
    ],
)
def test_garbage_gets_an_error_with_the_transaction_when_one_was_readable(
    payload: bytes, transaction: Any, error: str
) -> None:
    result = parse_request("hold", payload)
    assert not isinstance(result, Parsed)
    assert error in result[0] and result[1] == transaction


def test_requests_are_read_with_their_transaction_as_sent() -> None:
    parsed = parse_request("hold", b'{"transaction": {"id": 7, "by": "me"}, "type": "SET.POWER"}')
    assert parsed == Parsed("hold", {"id": 7, "by": "me"}, "SET.POWER", DEFAULT_REASON)
    assert parse_request("resync", b"{}") == Parsed("resync", None, None, OTHER_REASON)
    held = parse_request("hold", b'{"reason": "  maintenance  ", "extra": 1}')
    assert held == Parsed("hold", None, None, "maintenance")


@pytest.mark.parametrize(
    ("action", "payload", "error"),
    [
        ("resync", b'{"transaction": 1, "type": "X"}', "always of every type"),
        ("hold", b'{"transaction": 1, "type": ""}', "must not be empty"),
        ("hold", b'{"transaction": 1, "reason": " "}', "empty"),
        ("hold", b'{"transaction": 1, "reason": "' + b"x" * 501 + b'"}', "longer than 500"),
    ],
)
def test_requests_that_cannot_be_carried_out_are_refused(
    action: str, payload: bytes, error: str
) -> None:
    result = parse_request(action, payload)
    assert not isinstance(result, Parsed)
    assert error in result[0] and result[1] == 1


# --- holds --------------------------------------------------------------------------------


def test_holds_of_types_and_of_every_type() -> None:
    book = HoldBook()
    assert not book and book.of("A") is None
    book.hold("A", "first", T0)
    book.hold("A", "second", T0 + timedelta(hours=1))
    assert book.of("A") == wire.Hold(since=T0, reason="second")  # since kept, reason new
    assert book.of("B") is None
    book.hold(None, "all", T0 + timedelta(hours=2))
    assert book.of("B") == wire.Hold(since=T0 + timedelta(hours=2), reason="all")
    stays = book.release("A")
    assert stays is not None and "stays held: every type is held" in stays
    assert book.of("A") is not None
    assert book.release(None) is None
    assert not book and book.of("A") is None
    assert book.release("never-held") is None


def test_the_hold_file_round_trips_and_refuses_other_files() -> None:
    book = HoldBook()
    book.hold("SET.POWER", "why", T0)
    book.hold(None, "all", T0)
    data = encode_hold_file(3, book)
    assert HoldBook(decode_hold_file(3, data)).snapshot() == book.snapshot()
    for bad, reason in [
        (b"", "not a hold file"),
        (b"{}", "not a hold file"),
        (data.replace(b'"version":1', b'"version":9'), "format 9"),
        (data, "of microgrid 3, expected format 1 of microgrid 4"),
    ]:
        with pytest.raises(ValueError, match=reason):
            decode_hold_file(4 if bad is data else 3, bad)


def test_answers_always_carry_status_transaction_and_error() -> None:
    ok = wire.decode_answer(answer("resync", None, None, microgrid_id=3, now=T0, dispatches=2))
    assert (ok.status, ok.transaction, ok.error, ok.dispatches, ok.holds) == (
        "ok",
        None,
        None,
        2,
        None,
    )
    raw = answer("hold", [1], "no", microgrid_id=3, now=T0, holds=HoldBook())
    assert b'"transaction":[1]' in raw and b'"error":"no"' in raw and b'"status":"error"' in raw
    assert wire.decode_answer(raw).holds == wire.Holds()


# --- the core: held types run nothing ------------------------------------------------------


def test_a_held_type_publishes_an_empty_snapshot_that_says_why() -> None:
    core = ScheduleCore(3, LAYOUT)
    core.load([running_now(1, "A"), running_now(2, "B")], T0 + timedelta(minutes=1))
    core.holds.hold("A", "maintenance", T0)
    out = core.refresh(["A", "unknown"], T0 + timedelta(minutes=2))
    assert list(out.retained) == [LAYOUT.running("A")]  # types without dispatches: nothing
    held = out.retained[LAYOUT.running("A")]
    assert isinstance(held, wire.RunningSnapshot)
    assert held.held and held.hold_reason == "maintenance"
    assert held.running == () and held.next_change is None
    # The schedule goes on underneath; its changes keep the type held.
    later = core.advance(T0 + timedelta(hours=1))
    snapshots = {t: v for t, v in later.retained.items() if isinstance(v, wire.RunningSnapshot)}
    assert snapshots[LAYOUT.running("A")].held and not snapshots[LAYOUT.running("B")].held
    core.holds.release("A")
    released = core.refresh(None, T0 + timedelta(minutes=3))
    assert {t for t, v in released.retained.items() if not v.held} == {  # type: ignore[union-attr]
        LAYOUT.running("A"),
        LAYOUT.running("B"),
    }


def test_older_readers_decode_a_held_snapshot_and_newer_ones_an_old_one() -> None:
    held = wire.RunningSnapshot(
        microgrid_id=3,
        type="A",
        running=(),
        next_change=None,
        as_of=T0,
        session=1,
        seq=1,
        held=True,
        hold_reason="why",
    )
    plain = wire.encode(
        wire.RunningSnapshot(**{**_fields(held), "held": False, "hold_reason": None})
    )
    assert b"held" not in plain  # left out when not held: old payloads stay as they were
    assert wire.decode_running(plain).held is False
    assert wire.decode_running(wire.encode(held)) == held


def _fields(snapshot: wire.RunningSnapshot) -> dict[str, Any]:
    return {name: getattr(snapshot, name) for name in snapshot.__struct_fields__}


def test_request_topics_never_meet_the_topics_of_a_type_called_request() -> None:
    for side in ("request", "response"):
        for action in wire.REQUEST_ACTIONS:
            topic = f"{LAYOUT.root}/{side}/{action}"
            assert topic == getattr(LAYOUT, side)(action)
            assert LAYOUT.parse(topic) == wire.TopicRef(wire.TopicKind(side), action=action)
        for dispatch_type in ("request", "response"):
            assert LAYOUT.parse(LAYOUT.running(dispatch_type)).kind is wire.TopicKind.RUNNING
            assert LAYOUT.parse(LAYOUT.dispatch(dispatch_type, 5)).dispatch_type == dispatch_type
    with pytest.raises(wire.WireError):
        LAYOUT.parse(f"{LAYOUT.root}/request/other")


def test_watch_shows_a_held_type_and_why() -> None:
    state = WatchState(LAYOUT)
    core = ScheduleCore(3, LAYOUT)
    core.load([running_now(1, "A")], T0 + timedelta(minutes=1))
    core.holds.hold("A", "inverter maintenance", T0)
    for topic, value in core.refresh(["A"], T0 + timedelta(minutes=2)).retained.items():
        assert isinstance(value, wire.RunningSnapshot)
        state.apply(topic, wire.encode(value), T0)
    text = "\n".join(render(state, now=T0 + timedelta(minutes=2), width=100))
    assert "A: 0 running" in text
    assert "HELD by the site (inverter maintenance): nothing runs until released" in text
