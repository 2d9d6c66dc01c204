"""The wire payloads (`actor_sdk.wire`): codecs, conversions to and from the client types.

Round trips through every decoder and the client library's `Dispatch`, the
conversion straight from the API's protobuf, the JSON shape docs/contract.md
shows, and bad input, which gives a `WireError` and never another exception. The
topics are tested in `tests/test_wire_topics.py`.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch import recurrence as rec
from frequenz.client.dispatch import types as ct
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actor_sdk import wire
from bridge import convert
from tests.fixtures.wire_examples import T0, contract_example

# --- strategies -------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
UTC_TIMES = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
# Any fixed offset: conversion must keep the instant and the wire must say it in UTC.
AWARE_TIMES = st.datetimes(
    min_value=datetime(1971, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-7))]),
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
PAYLOADS = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5)

CATEGORY_INPUTS: list[ct.TargetCategoryInputType] = [
    *ElectricalComponentCategory,
    *ct.BatteryType,
    *ct.InverterType,
    *ct.EvChargerType,
]
TARGETS = st.builds(lambda ids: ct.TargetIds(*ids), st.frozensets(INT64.map(abs), max_size=6)) | (
    st.builds(
        lambda items: ct.TargetCategories(*items),
        st.lists(st.sampled_from(CATEGORY_INPUTS), max_size=6),
    )
)
END_CRITERIA = (
    st.none()
    | st.builds(rec.EndCriteria, count=st.integers(1, 10_000), until=st.none())
    | st.builds(rec.EndCriteria, count=st.none(), until=AWARE_TIMES)
)
SMALL_LISTS = {
    "byminutes": st.lists(st.integers(0, 59), max_size=4),
    "byhours": st.lists(st.integers(0, 23), max_size=4),
    "byweekdays": st.lists(st.sampled_from(list(rec.Weekday)), max_size=4),
    "bymonthdays": st.lists(st.integers(-31, 31).filter(bool), max_size=4),
    "bymonths": st.lists(st.integers(1, 12), max_size=4),
}
RULES = st.just(rec.RecurrenceRule()) | st.builds(
    rec.RecurrenceRule,
    frequency=st.sampled_from(list(rec.Frequency)),
    interval=st.integers(0, 1000),
    end_criteria=END_CRITERIA,
    **SMALL_LISTS,
)
CLIENT_DISPATCHES = st.builds(
    ct.Dispatch,
    id=st.integers(1, 2**63 - 1).map(ct.DispatchId),
    type=st.text(min_size=1, max_size=30),
    start_time=AWARE_TIMES,
    duration=st.none() | st.integers(0, 10**8).map(lambda s: timedelta(seconds=s)),
    target=TARGETS,
    active=st.booleans(),
    dry_run=st.booleans(),
    payload=PAYLOADS,
    recurrence=RULES,
    create_time=AWARE_TIMES,
    update_time=AWARE_TIMES,
    end_time=st.none() | AWARE_TIMES,
)
STATES = st.tuples(st.booleans(), st.none() | UTC_TIMES, st.none() | UTC_TIMES)
WIRE_DISPATCHES = st.builds(
    lambda d, s: convert.from_client(d, running=s[0], until=s[1], next_run=s[2]),
    CLIENT_DISPATCHES,
    STATES,
)
SNAPSHOTS = st.builds(
    wire.RunningSnapshot,
    microgrid_id=st.integers(0, 2**63 - 1),
    type=st.text(min_size=1),
    running=st.lists(WIRE_DISPATCHES, max_size=3).map(
        lambda ds: tuple(sorted(ds, key=lambda d: d.id))
    ),
    next_change=st.none() | UTC_TIMES,
    as_of=UTC_TIMES,
    session=st.integers(0, 2**63 - 1),
    seq=st.integers(0, 2**63 - 1),
)
EVENTS = st.builds(
    wire.DispatchEvent,
    event=st.sampled_from(["created", "updated", "deleted"]),
    dispatch=WIRE_DISPATCHES,
    as_of=UTC_TIMES,
)
STATUSES = st.builds(
    wire.BridgeStatus,
    state=st.sampled_from(["online", "offline"]),
    upstream=st.sampled_from(["connected", "disconnected"]),
    synced_at=st.none() | UTC_TIMES,
    session=st.integers(0, 2**63 - 1),
    bridge=st.text(),
    version=st.text(),
    dispatches=st.integers(0, 2**63 - 1),
)
DECODERS = {
    wire.Dispatch: wire.decode_dispatch,
    wire.RunningSnapshot: wire.decode_running,
    wire.DispatchEvent: wire.decode_event,
    wire.BridgeStatus: wire.decode_status,
}
ALL_DECODERS = list(DECODERS.values())

# --- payload round trips ------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(WIRE_DISPATCHES, SNAPSHOTS, EVENTS, STATUSES))
def test_every_struct_round_trips_through_its_decoder(message: Any) -> None:
    data = wire.encode(message)
    assert DECODERS[type(message)](data) == message
    assert isinstance(json.loads(data.decode("utf-8")), dict)


@settings(max_examples=300)
@given(CLIENT_DISPATCHES)
def test_client_dispatch_round_trips_through_wire_and_json(dispatch: ct.Dispatch) -> None:
    on_wire = wire.decode_dispatch(wire.encode(convert.from_client(dispatch)))
    back = wire.to_client(on_wire)
    assert back == dispatch
    assert back.target == dispatch.target and type(back.target) is type(dispatch.target)


@settings(max_examples=200)
@given(WIRE_DISPATCHES)
def test_wire_dispatch_round_trips_through_client_type(dispatch: wire.Dispatch) -> None:
    back = convert.from_client(
        wire.to_client(dispatch),
        running=dispatch.running,
        until=dispatch.until,
        next_run=dispatch.next_run,
    )
    assert back == dispatch


@pytest.mark.parametrize(
    "target",
    [
        ct.TargetIds(),
        ct.TargetIds(7, 8),
        ct.TargetCategories(),
        ct.TargetCategories(ElectricalComponentCategory.BATTERY),
        ct.TargetCategories(ct.BatteryType.LI_ION, ElectricalComponentCategory.INVERTER),
        ct.TargetCategories(ct.InverterType.PV, ct.InverterType.HYBRID),
        ct.TargetCategories(ct.EvChargerType.DC, ElectricalComponentCategory.EV_CHARGER),
        ct.TargetCategories(*ElectricalComponentCategory),
    ],
    ids=repr,
)
def test_every_target_kind_round_trips(target: ct.TargetComponents) -> None:
    dispatch = wire.to_client(contract_example())
    dispatch = ct.Dispatch(**{**dispatch.__dict__, "target": target})
    back = wire.to_client(wire.decode_dispatch(wire.encode(convert.from_client(dispatch))))
    assert back.target == target
    assert type(back.target) is type(target)


SAMPLE_RULES = {
    "minutely": rec.RecurrenceRule(frequency=rec.Frequency.MINUTELY, interval=5),
    "monthly-count-bymonthdays": rec.RecurrenceRule(
        frequency=rec.Frequency.MONTHLY,
        interval=2,
        end_criteria=rec.EndCriteria(count=10),
        bymonthdays=[-1, 15],
        bymonths=[2, 12],
    ),
    "weekly-until-every-list": rec.RecurrenceRule(
        frequency=rec.Frequency.WEEKLY,
        interval=1,
        end_criteria=rec.EndCriteria(until=T0 + timedelta(days=30, microseconds=123457)),
        byweekdays=list(rec.Weekday),
        byhours=[0, 23],
        byminutes=[0, 30],
    ),
    "daily": rec.RecurrenceRule(frequency=rec.Frequency.DAILY, interval=1, end_criteria=None),
    "yearly": rec.RecurrenceRule(frequency=rec.Frequency.YEARLY, interval=1),
}
"""Recurrence rules that together use every field of the client library's rule."""


@pytest.mark.parametrize("rule", SAMPLE_RULES.values(), ids=SAMPLE_RULES.keys())
def test_every_recurrence_field_round_trips(rule: rec.RecurrenceRule) -> None:
    dispatch = ct.Dispatch(**{**wire.to_client(contract_example()).__dict__, "recurrence": rule})
    back = wire.to_client(wire.decode_dispatch(wire.encode(convert.from_client(dispatch))))
    assert back.recurrence == rule


# --- Straight from the API's protobuf -----------------------------------------


def assert_same_as_client_path(pb: Any, converter: convert.ListingConverter | None = None) -> None:
    one = convert.from_protobuf if converter is None else converter.convert
    try:
        via_client = convert.from_client(ct.Dispatch.from_protobuf(pb))
    except ValueError:  # e.g. an empty category list has no target on the wire
        with pytest.raises(ValueError):
            one(pb)
        return
    direct = one(pb)
    assert direct == wire.encode_payload(via_client)  # the payload held encoded, keys sorted
    assert wire.payload_of(direct) == via_client.payload
    assert wire.encode(direct) == wire.encode(wire.encode_payload(via_client))  # 1.0 stays 1.0


@pytest.mark.filterwarnings("ignore:.*ElectricalComponentCategory.*:DeprecationWarning")
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(CLIENT_DISPATCHES)
def test_from_protobuf_equals_the_client_library_path(dispatch: ct.Dispatch) -> None:
    assert_same_as_client_path(dispatch.to_protobuf())


@pytest.mark.filterwarnings("ignore:.*ElectricalComponentCategory.*:DeprecationWarning")
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CLIENT_DISPATCHES, max_size=4))
def test_one_listing_converter_equals_the_client_library_path_for_each(
    dispatches: list[ct.Dispatch],
) -> None:
    # Twice through one converter: the second pass finds every part converted already.
    converter = convert.ListingConverter()
    for pb in [d.to_protobuf() for d in dispatches] * 2:
        assert_same_as_client_path(pb, converter)


@pytest.mark.filterwarnings("ignore:.*ElectricalComponentCategory.*:DeprecationWarning")
@pytest.mark.parametrize(
    "target",
    [
        ct.TargetIds(),
        ct.TargetIds(9, 7, 8),
        ct.TargetCategories(),
        ct.TargetCategories(ElectricalComponentCategory.BATTERY),
        ct.TargetCategories(ct.BatteryType.LI_ION, ElectricalComponentCategory.INVERTER),
        ct.TargetCategories(ct.InverterType.PV, ct.InverterType.HYBRID),
        ct.TargetCategories(ct.EvChargerType.DC, ElectricalComponentCategory.EV_CHARGER),
        ct.TargetCategories(*ElectricalComponentCategory),
    ],
    ids=repr,
)
@pytest.mark.parametrize(
    "rule",
    [rec.RecurrenceRule(), *SAMPLE_RULES.values()],
    ids=["none", *SAMPLE_RULES.keys()],
)
def test_from_protobuf_every_target_kind_and_recurrence_field(
    target: ct.TargetComponents, rule: rec.RecurrenceRule
) -> None:
    base = wire.to_client(contract_example())
    dispatch = ct.Dispatch(
        **{
            **base.__dict__,
            "target": target,
            "recurrence": rule,
            "payload": {"n": 1, "f": 2.5, "s": "x", "b": True, "z": None, "l": [1, {"k": []}]},
            "start_time": T0 + timedelta(microseconds=999999),
        }
    )
    pb = dispatch.to_protobuf()
    assert_same_as_client_path(pb)
    pb.metadata.ClearField("end_time")
    pb.data.ClearField("duration")
    assert_same_as_client_path(pb)


def test_from_protobuf_keeps_duplicate_target_ids_once() -> None:
    pb = wire.to_client(contract_example()).to_protobuf()
    pb.data.target.component_ids.ids[:] = [5, 3, 5]
    assert convert.from_protobuf(pb).target == wire.Target(ids=(3, 5))
    assert_same_as_client_path(pb)


@pytest.mark.filterwarnings("ignore:.*ElectricalComponentCategory.*:DeprecationWarning")
def test_from_protobuf_reads_the_older_plain_categories_target() -> None:
    pb = wire.to_client(contract_example()).to_protobuf()
    pb.data.target.component_categories.categories[:] = [3, 2, 3, 999]  # 999: unknown
    assert_same_as_client_path(pb)
    assert convert.from_protobuf(pb).target.categories is not None


@pytest.mark.filterwarnings("ignore:.*ElectricalComponentCategory.*:DeprecationWarning")
def test_from_protobuf_category_with_type_takes_the_types_category() -> None:
    dispatch = wire.to_client(contract_example())
    dispatch = ct.Dispatch(
        **{**dispatch.__dict__, "target": ct.TargetCategories(ct.BatteryType.LI_ION)}
    )
    pb = dispatch.to_protobuf()
    extra = pb.data.target.component_categories_types.categories.add()
    extra.CopyFrom(pb.data.target.component_categories_types.categories[0])  # a duplicate
    extra = pb.data.target.component_categories_types.categories.add()
    extra.category = 5  # no type: the category alone
    assert_same_as_client_path(pb)


def test_from_protobuf_refuses_what_the_client_refuses() -> None:
    pb = wire.to_client(contract_example()).to_protobuf()
    pb.data.payload["bad"] = float("nan")
    with pytest.raises(ValueError):
        convert.from_protobuf(pb)
    pb = wire.to_client(contract_example()).to_protobuf()
    pb.data.ClearField("target")
    with pytest.raises(ValueError):
        convert.from_protobuf(pb)


# --- JSON shape (docs/contract.md) ---------------------------------------------


def test_dispatch_json_has_the_field_names_and_formats_of_the_contract() -> None:
    data = json.loads(wire.encode(contract_example()))
    assert data == {
        "id": 42,
        "type": "EXAMPLE_TYPE",
        "start_time": "2026-11-28T06:00:00Z",
        "duration": 900,
        "target": {"ids": [7, 8]},
        "active": True,
        "dry_run": False,
        "payload": {"power_w": 5000},
        "recurrence": {"frequency": "DAILY", "interval": 1},
        "create_time": "2026-11-27T06:00:00Z",
        "update_time": "2026-11-28T05:00:00Z",
        "end_time": None,
        "running": True,
        "until": "2026-11-28T06:15:00Z",
        "next_run": "2026-11-29T06:00:00Z",
    }


def test_one_off_dispatch_omits_recurrence_and_endless_has_null_duration() -> None:
    client = ct.Dispatch(
        **{
            **wire.to_client(contract_example()).__dict__,
            "recurrence": rec.RecurrenceRule(),
            "duration": None,
        }
    )
    data = json.loads(wire.encode(convert.from_client(client)))
    assert "recurrence" not in data
    assert data["duration"] is None


def test_categories_target_and_full_recurrence_json_shape() -> None:
    client = ct.Dispatch(
        **{
            **wire.to_client(contract_example()).__dict__,
            "target": ct.TargetCategories(
                ct.BatteryType.LI_ION, ElectricalComponentCategory.INVERTER
            ),
            "recurrence": rec.RecurrenceRule(
                frequency=rec.Frequency.WEEKLY,
                interval=2,
                end_criteria=rec.EndCriteria(until=datetime(2027, 1, 1, 1, tzinfo=UTC)),
                byweekdays=[rec.Weekday.FRIDAY],
            ),
        }
    )
    data = json.loads(wire.encode(convert.from_client(client)))
    assert data["target"] == {
        "categories": [{"category": "BATTERY", "type": "LI_ION"}, {"category": "INVERTER"}]
    }
    assert data["recurrence"] == {
        "frequency": "WEEKLY",
        "interval": 2,
        "end": {"until": "2027-01-01T01:00:00Z"},
        "byweekdays": ["FRIDAY"],
    }


@settings(max_examples=100)
@given(CLIENT_DISPATCHES, STATES)
def test_every_time_on_the_wire_is_utc_with_z(dispatch: ct.Dispatch, state: Any) -> None:
    text = wire.encode(convert.from_client(dispatch, running=state[0], until=state[1])).decode()
    stamps = re.findall(r'"(\d{4}-\d\d-\d\dT[^"]*)"', text)
    assert stamps
    for stamp in stamps:
        assert stamp.endswith("Z"), stamp


def test_snapshot_and_status_json_field_names() -> None:
    snapshot = wire.RunningSnapshot(
        microgrid_id=1,
        type="T",
        running=(contract_example(),),
        next_change=None,
        as_of=T0,
        session=3,
        seq=9,
    )
    assert set(json.loads(wire.encode(snapshot))) == {
        "microgrid_id",
        "type",
        "running",
        "next_change",
        "as_of",
        "session",
        "seq",
    }
    status = wire.BridgeStatus(
        state="online",
        upstream="connected",
        synced_at=T0,
        session=3,
        bridge="edge-1",
        version="0.1.0",
        dispatches=5,
    )
    assert json.loads(wire.encode(status)) == {
        "state": "online",
        "upstream": "connected",
        "synced_at": "2026-11-28T06:00:00Z",
        "session": 3,
        "bridge": "edge-1",
        "version": "0.1.0",
        "dispatches": 5,
    }


# --- decoding bad input -------------------------------------------------------


def decode_outcome(decoder: Any, data: bytes) -> None:
    """Decode and accept success or WireError; anything else fails the test."""
    try:
        decoder(data)
    except wire.WireError as error:
        assert len(str(error)) < 1000, "error messages stay short"


@settings(max_examples=500)
@given(st.binary(max_size=300), st.sampled_from(ALL_DECODERS))
@example(b"", wire.decode_dispatch)
@example(b"\xff\xfe\x00", wire.decode_status)
@example(b"null", wire.decode_running)
@example(b"[]", wire.decode_event)
def test_random_bytes_give_wire_error_or_a_struct(data: bytes, decoder: Any) -> None:
    decode_outcome(decoder, data)


@settings(max_examples=300)
@given(JSON_VALUES, st.sampled_from(ALL_DECODERS))
def test_random_json_gives_wire_error_or_a_struct(value: Any, decoder: Any) -> None:
    decode_outcome(decoder, json.dumps(value).encode())


def test_every_truncation_of_a_valid_payload_is_a_wire_error() -> None:
    data = wire.encode(contract_example())
    for cut in range(len(data)):
        with pytest.raises(wire.WireError):
            wire.decode_dispatch(data[:cut])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "42"),
        ("id", 1.5),
        ("id", None),
        ("type", 7),
        ("start_time", 1764309600),
        ("start_time", "2026-11-28T06:00:00"),  # no time zone
        ("start_time", "yesterday"),
        ("duration", "900"),
        ("target", [7, 8]),
        ("target", {"ids": ["7"]}),
        ("active", "true"),
        ("payload", [1, 2]),
        ("recurrence", {"frequency": "SOMETIMES", "interval": 1}),
        ("recurrence", {"frequency": "DAILY", "interval": 1, "byweekdays": ["FUNDAY"]}),
        ("recurrence", {"frequency": "DAILY"}),
        ("running", 1),
    ],
)
def test_wrong_field_types_are_wire_errors(field: str, value: Any) -> None:
    data = json.loads(wire.encode(contract_example()))
    data[field] = value
    with pytest.raises(wire.WireError):
        wire.decode_dispatch(json.dumps(data).encode())


@pytest.mark.parametrize("field", ["id", "type", "start_time", "target", "running"])
def test_missing_required_field_is_a_wire_error(field: str) -> None:
    data = json.loads(wire.encode(contract_example()))
    del data[field]
    with pytest.raises(wire.WireError, match=field):
        wire.decode_dispatch(json.dumps(data).encode())


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_oversized_payload_is_refused_unread(decoder: Any) -> None:
    valid = wire.encode(contract_example())
    oversized = valid[:-1] + b" " * (wire.MAX_PAYLOAD_BYTES - len(valid) + 1) + b"}"
    assert len(oversized) == wire.MAX_PAYLOAD_BYTES + 1
    with pytest.raises(wire.WireError, match="exceeds"):
        decoder(oversized)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_payload_is_a_wire_error_or_decodes(depth: int) -> None:
    data = json.loads(wire.encode(contract_example()))
    text = json.dumps({**data, "payload": {}})
    nested = '{"a":' * depth + "1" + "}" * depth
    text = text.replace('"payload": {}', f'"payload": {nested}')
    for decoder in ALL_DECODERS:
        decode_outcome(decoder, text.encode())
    # Pure nesting without a struct around it.
    for decoder in ALL_DECODERS:
        with pytest.raises(wire.WireError):
            decoder(b"[" * depth + b"]" * depth)


def test_unknown_fields_are_ignored_at_every_level() -> None:
    expected = contract_example(
        target=wire.Target(categories=(wire.TargetCategory(category="BATTERY", type="LI_ION"),)),
        recurrence=wire.Recurrence(frequency="DAILY", interval=1, end=wire.EndCriteria(count=3)),
    )
    data = json.loads(wire.encode(expected))
    data["from_the_future"] = {"nested": [1, 2, 3]}
    data["target"]["extra"] = True
    data["target"]["categories"][0]["power_class"] = "big"
    data["recurrence"]["bysetpos"] = [1]
    data["recurrence"]["end"]["timezone"] = "Europe/Berlin"
    assert wire.decode_dispatch(json.dumps(data).encode()) == expected

    status = json.loads(
        wire.encode(
            wire.BridgeStatus(
                state="offline",
                upstream="disconnected",
                synced_at=None,
                session=1,
                bridge="b",
                version="1",
                dispatches=0,
            )
        )
    )
    status["load"] = 0.5
    assert wire.decode_status(json.dumps(status).encode()).state == "offline"


def test_to_client_of_unknown_category_is_a_wire_error() -> None:
    for target in (
        wire.Target(categories=(wire.TargetCategory(category="TELEPORTER"),)),
        wire.Target(categories=(wire.TargetCategory(category="BATTERY", type="PLUTONIUM"),)),
        wire.Target(categories=(wire.TargetCategory(category="METER", type="LI_ION"),)),
    ):
        decoded = wire.decode_dispatch(wire.encode(contract_example(target=target)))
        with pytest.raises(wire.WireError):
            wire.to_client(decoded)


# --- the encoder --------------------------------------------------------------


def test_encoder_output_is_what_msgspec_would_produce() -> None:
    """`encode` is plain msgspec JSON: any MQTT client with a JSON parser can read it."""
    message = contract_example()
    assert wire.encode(message) == msgspec.json.encode(message)


def test_a_dispatch_and_its_parts_carry_no_gc_header() -> None:
    # A tracked struct spends 16 bytes on the garbage collector: for each of 100k
    # dispatches and most of their targets, for values that make no cycle.
    dispatch = contract_example(
        recurrence=wire.Recurrence(
            frequency="DAILY", interval=1, end=wire.EndCriteria(count=3), byhours=(1,)
        ),
        target=wire.Target(categories=(wire.TargetCategory(category="BATTERY"),)),
    )
    assert dispatch.recurrence is not None and dispatch.target.categories is not None
    parts = [dispatch.target, dispatch.target.categories[0], dispatch.recurrence]
    assert not any(gc.is_tracked(part) for part in [dispatch, *parts, dispatch.recurrence.end])
    # The object header and one pointer per field, nothing more.
    assert sys.getsizeof(dispatch) == 16 + 8 * len(wire.Dispatch.__struct_fields__)
