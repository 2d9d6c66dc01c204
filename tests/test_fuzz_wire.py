"""Fuzzing the wire contract the way a subscriber meets it: bytes off the broker.

Every payload goes through what the SDK does with it: decode with the struct of its
topic, then convert each dispatch with `to_client`. The only error allowed is
`WireError` (one short message); anything else (OverflowError, KeyError,
RecursionError, a crash) is a bug, because the SDK treats only `WireError` as "ignore
this message".

Inputs: random bytes, structure-aware mutations of valid payloads of every kind (a
field anywhere replaced by a value of another type, removed, or blown up into a huge
array or a deep nest), every truncation, and random topics under the root. Budgets
are fixed per run (`max_examples`), `deadline=None` for the slow CI machine.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actor_sdk import wire
from tests.fixtures.wire_examples import T0, every_optional_part

BUDGET = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID: dict[str, bytes] = {
    "dispatch": wire.encode(every_optional_part()),
    "running": wire.encode(
        wire.RunningSnapshot(
            microgrid_id=1,
            type="SET.POWER",
            running=(
                every_optional_part(),
                every_optional_part(id=43, target=wire.Target(ids=(7, 8))),
            ),
            next_change=T0,
            as_of=T0,
            session=3,
            seq=17,
        )
    ),
    "event": wire.encode(
        wire.DispatchEvent(event="created", dispatch=every_optional_part(), as_of=T0)
    ),
    "status": wire.encode(
        wire.BridgeStatus(
            state="online",
            upstream="connected",
            synced_at=T0,
            session=3,
            bridge="edge-1",
            version="0.1.0",
            dispatches=2,
        )
    ),
}


def dispatches_in(message: object) -> list[wire.Dispatch]:
    """The dispatches a decoded message carries."""
    if isinstance(message, wire.Dispatch):
        return [message]
    if isinstance(message, wire.RunningSnapshot):
        return list(message.running)
    if isinstance(message, wire.DispatchEvent):
        return [message.dispatch]
    return []


DECODERS = {
    "dispatch": wire.decode_dispatch,
    "running": wire.decode_running,
    "event": wire.decode_event,
    "status": wire.decode_status,
}


def consume(kind: str, data: bytes) -> object | None:
    """Do with `data` what a subscriber does; return the message, None for a WireError."""
    try:
        message = DECODERS[kind](data)
    except wire.WireError as error:
        assert 0 < len(str(error)) < 1000, "one short error message"
        return None
    for dispatch in dispatches_in(message):
        try:
            wire.to_client(dispatch)
        except wire.WireError as error:
            assert len(str(error)) < 1000
    # What decodes must encode and decode to the same message.
    assert DECODERS[kind](wire.encode(message)) == message  # type: ignore[arg-type]
    return message


# --- mutations --------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: 2**70, -10**30 ...
    | st.floats()  # NaN and infinities too (json.dumps writes them)
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "2026-13-45T99:00:00Z",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "2026-11-28T06:00:00",
            "2026-11-28T06:00:00+14:00",
            "",
            "\ud800",
            "UNSPECIFIED",
            "BATTERY",
            "NOT_A_CATEGORY",
        ]
    )
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indexes) into a JSON value, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of `value` with the item at `path` replaced (`_DELETE` removes it)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        if rest or new is not _DELETE:
            copy[head] = replaced(value[head], rest, new)
        else:
            del copy[head]
        return copy
    copy_list = list(value)
    if rest or new is not _DELETE:
        copy_list[head] = replaced(value[head], rest, new)
    else:
        del copy_list[head]
    return copy_list


_DELETE = object()


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid payload of some kind with one part of it replaced, removed or blown up."""
    kind = draw(st.sampled_from(sorted(VALID)))
    tree = json.loads(VALID[kind])
    path = draw(st.sampled_from(paths(tree)))
    how = draw(st.sampled_from(["value", "delete", "huge-array", "deep-nest", "big-int"]))
    if how == "delete" and path:
        new: Any = _DELETE
    elif how == "huge-array":
        new = [draw(SCALARS)] * draw(st.sampled_from([1_000, 100_000]))
    elif how == "deep-nest":
        depth = draw(st.sampled_from([64, 1_000, 50_000]))
        new = "NEST"  # spliced in as text below: json.dumps would recurse too
        text = json.dumps(replaced(tree, path, new))
        nest = draw(st.sampled_from(['{"a":', "["]))
        close = "}" if nest.startswith("{") else "]"
        return kind, text.replace('"NEST"', nest * depth + "1" + close * depth, 1).encode()
    elif how == "big-int":
        new = draw(st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**20, 10**400, -1, 0]))
    else:
        new = draw(JSON_VALUES)
    return kind, json.dumps(replaced(tree, path, new)).encode()


# --- the properties ---------------------------------------------------------------------


@BUDGET
@given(mutated())
@example(
    ("dispatch", VALID["dispatch"].replace(b'"duration":900', b'"duration":100000000000000000000'))
)
@example(
    ("running", VALID["running"].replace(b'"duration":900', b'"duration":-100000000000000000000'))
)
@example(("dispatch", VALID["dispatch"].replace(b'"id":42', b'"id":1180591620717411303424')))
@example(("dispatch", VALID["dispatch"].replace(b'"id":42', b'"id":-1')))
@example(("status", VALID["status"].replace(b'"bridge":"edge-1"', b'"bridge":"\x80\xff"')))
@example(("event", VALID["event"].replace(b'"interval":1', b'"interval":10000000000000')))
def test_mutated_payloads_give_a_message_or_one_wire_error(case: tuple[str, bytes]) -> None:
    kind, data = case
    consume(kind, data)


@BUDGET
@given(st.sampled_from(sorted(VALID)), st.binary(max_size=500))
def test_random_bytes_in_every_decoder_give_a_message_or_one_wire_error(
    kind: str, data: bytes
) -> None:
    consume(kind, data)


@BUDGET
@given(st.sampled_from(sorted(VALID)), st.data())
def test_valid_payloads_with_random_bytes_spliced_in_are_handled(kind: str, data: Any) -> None:
    valid = VALID[kind]
    start = data.draw(st.integers(0, len(valid)))
    end = data.draw(st.integers(start, min(len(valid), start + 20)))
    noise = data.draw(st.binary(max_size=20))
    consume(kind, valid[:start] + noise + valid[end:])


@pytest.mark.parametrize("kind", sorted(VALID))
def test_every_truncation_of_every_kind_is_a_wire_error(kind: str) -> None:
    valid = VALID[kind]
    assert consume(kind, valid) is not None
    for cut in range(len(valid)):
        assert consume(kind, valid[:cut]) is None, valid[:cut]


@pytest.mark.parametrize("kind", sorted(VALID))
def test_payload_of_another_kind_is_a_wire_error(kind: str) -> None:
    for other, data in VALID.items():
        if other != kind and {kind, other} != {"dispatch", "event"}:
            assert consume(kind, data) is None, (kind, other)


def test_huge_running_snapshot_decodes_or_fails_cleanly() -> None:
    """20,000 dispatches in one snapshot (~15 MB), below the decoder's size limit."""
    tree = json.loads(VALID["running"])
    tree["running"] = tree["running"][:1] * 20_000
    data = json.dumps(tree).encode()
    assert len(data) < wire.MAX_PAYLOAD_BYTES
    message = consume("running", data)
    assert isinstance(message, wire.RunningSnapshot)
    assert len(message.running) == 20_000


# --- topics -----------------------------------------------------------------------------

LEVEL_CHARS = st.sampled_from(
    [*"aZ09_-%/.+#$ \x00", "%2E", "%2e", "%25", "%ZZ", "%F0%9F", "\u00e9", "\U0001f600"]
)
LEVELS = st.lists(LEVEL_CHARS, max_size=12).map("".join)
LAYOUT = wire.TopicLayout.for_microgrid(1)


@BUDGET
@given(
    st.lists(LEVELS | st.sampled_from(["running", "dispatches", "events", "status"]), max_size=5)
)
@example(["SET%2EPOWER", "dispatches", "0042"])
@example(["SET%2EPOWER", "dispatches", "9" * 25])
@example(["SET%2EPOWER", "dispatches", "\u0661"])  # an Arabic-Indic digit
def test_random_topics_under_the_root_parse_or_give_one_wire_error(levels: list[str]) -> None:
    topic = "/".join([LAYOUT.root, *levels])
    try:
        ref = LAYOUT.parse(topic)
    except wire.WireError as error:
        assert len(str(error)) < 1000
        return
    # A topic that parses is exactly the one the layout would build for it.
    match ref.kind:
        case wire.TopicKind.STATUS:
            assert topic == LAYOUT.status
        case wire.TopicKind.RUNNING:
            assert topic == LAYOUT.running(ref.dispatch_type or "")
        case wire.TopicKind.EVENTS:
            assert topic == LAYOUT.events(ref.dispatch_type or "")
        case wire.TopicKind.DISPATCH:
            assert ref.dispatch_id is not None
            assert topic == LAYOUT.dispatch(ref.dispatch_type or "", ref.dispatch_id)


@BUDGET
@given(st.text(max_size=300))
@example("a/b")
@example("+")
@example("#")
@example("$SYS")
@example("with space")
@example("100%")
@example("\U0001f50b" * 256)
@example("\ud800")
def test_any_type_name_encodes_to_one_safe_level_or_one_wire_error(dispatch_type: str) -> None:
    try:
        level = wire.encode_type(dispatch_type)
    except wire.WireError:
        assert not dispatch_type or any(0xD800 <= ord(c) <= 0xDFFF for c in dispatch_type)
        return
    assert set(level) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-%")
    assert wire.decode_type(level) == dispatch_type
    assert LAYOUT.parse(LAYOUT.running(dispatch_type)).dispatch_type == dispatch_type
