"""A listing or a cache holds equal parts of its dispatches once.

A listing through `convert.ListingConverter`, which also converts each distinct part
once; the cache through `convert.share_parts`.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import msgspec
import pytest
from frequenz.client.dispatch import recurrence as rec
from frequenz.client.dispatch import types as ct

from actor_sdk import wire
from bridge import convert
from bridge.store import DispatchCache
from tests.fixtures.wire_examples import contract_example


def listed(dispatch_id: int) -> Any:
    """The contract example as the API lists it, under another id (created, never updated)."""
    base = wire.to_client(contract_example())
    rule = rec.RecurrenceRule(frequency=rec.Frequency.DAILY, interval=1)
    dispatch = ct.Dispatch(
        **{
            **base.__dict__,
            "id": ct.DispatchId(dispatch_id),
            "recurrence": rule,
            "update_time": base.create_time,
        }
    )
    return dispatch.to_protobuf()


def parts(dispatch: wire.Dispatch) -> list[object]:
    return [
        dispatch.type,
        dispatch.start_time,
        dispatch.duration,  # 900: above the ints Python keeps one of each
        dispatch.target,
        dispatch.recurrence,
        dispatch.create_time,
        dispatch.end_time,
    ]


def test_equal_parts_of_one_listing_are_one_object_and_the_result_is_unchanged() -> None:
    converter = convert.ListingConverter()
    first, second = (converter.convert(listed(i)) for i in (1, 2))
    for mine, theirs in zip(parts(first), parts(second), strict=True):
        assert mine is theirs
    assert first.update_time is first.create_time
    assert second == convert.from_protobuf(listed(2))
    assert wire.encode(second) == wire.encode(convert.from_protobuf(listed(2)))


def test_a_listing_converts_each_distinct_rule_and_target_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bench's 100k listing spent 4 of 12.5 us per dispatch converting its rule,
    # 2 its target, 1.5 each instant; equal ones came again and again.
    calls: dict[str, int] = {}
    for name in ("_pb_recurrence", "_pb_target", "_pb_time"):
        real = getattr(convert, name)

        def counting(*args: Any, real: Any = real, name: str = name) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return real(*args)

        monkeypatch.setattr(convert, name, counting)
    converter = convert.ListingConverter()
    for dispatch_id in range(1, 11):
        converter.convert(listed(dispatch_id))
    # One rule, one target; instants are shared as themselves, the update time (equal
    # to the creation time) is not converted again.
    assert calls == {"_pb_recurrence": 1, "_pb_target": 1, "_pb_time": 20}


def test_without_a_listing_nothing_is_shared() -> None:
    first, second = (convert.from_protobuf(listed(i)) for i in (1, 2))
    assert first.start_time == second.start_time
    assert first.start_time is not second.start_time
    assert first.target is not second.target


def test_a_cache_loads_equal_parts_once(tmp_path: Path) -> None:
    stored = [convert.from_protobuf(listed(i)) for i in (1, 2)]
    cache = DispatchCache(tmp_path, 1)
    cache.load()
    cache.replace(stored, None)
    cache.close()
    loaded = DispatchCache(tmp_path, 1).load()
    assert loaded is not None
    first, second = sorted(loaded[0], key=lambda d: d.id)
    assert [first, second] == stored
    for mine, theirs in zip(parts(first), parts(second), strict=True):
        assert mine is theirs


def test_a_listed_payload_is_held_encoded_with_its_keys_sorted() -> None:
    pb = listed(1)
    pb.data.payload.update({"zeta": 1, "alpha": {"y": True, "b": "x"}})
    dispatch = convert.from_protobuf(pb)
    assert isinstance(dispatch.payload, msgspec.Raw)
    assert bytes(dispatch.payload) == b'{"alpha":{"b":"x","y":true},"power_w":5000.0,"zeta":1.0}'
    assert wire.payload_of(dispatch) == {"alpha": {"b": "x", "y": True}, "power_w": 5000, "zeta": 1}
    assert wire.decode_dispatch(wire.encode(dispatch)).payload == wire.payload_of(dispatch)


def test_a_listed_payload_costs_half_a_dict() -> None:
    # Held as a dict, a payload of two numbers cost 232 bytes: the dict, its key table
    # and a float per value; encoded, a bytes object and its `msgspec.Raw`.
    messages = []
    for n in range(5_000):
        pb = listed(n + 1)
        pb.data.payload.update({"power_w": -1234.0 - n, "n": float(n)})
        messages.append(pb)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        payloads = [convert.from_protobuf(pb).payload for pb in messages]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(payloads) == 5_000
    assert held / 5_000 < 130
