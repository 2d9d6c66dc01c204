"""The wire topics (`actor_sdk.wire`): type names as topic levels, and the topic layout.

Every dispatch type, hostile ones too, encodes to one safe topic level that
decodes back; a `TopicLayout` builds and parses every topic kind of a microgrid
and refuses topics outside the contract. The payloads are tested in
`tests/test_wire.py`.
"""

from __future__ import annotations

import doctest
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actor_sdk import wire
from actor_sdk.wire import _topics as wire_topics

# --- topics -------------------------------------------------------------------

TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_%-]+")
HOSTILE_TYPES = [
    "a/b",
    "+",
    "#",
    ".",
    "..",
    " ",
    "SET POWER",
    "%",
    "%2E",
    "$SYS",
    "$SYS/broker/uptime",
    "microgrid/+/dispatch/#",
    "\u26a1\U0001f50b",
    "x" * 1024,
    "\U0001f50b" * 256,
    "\0",
    "a\0b",
    "\n\t\r",
    "\u00e9",
    "e\u0301",
    "status",
    "running",
    "dispatches",
]


@pytest.mark.parametrize("dispatch_type", HOSTILE_TYPES, ids=lambda t: repr(t)[:30])
def test_hostile_type_names_encode_to_one_safe_level_that_round_trips(
    dispatch_type: str,
) -> None:
    level = wire.encode_type(dispatch_type)
    assert TOPIC_LEVEL.fullmatch(level), level
    assert wire.decode_type(level) == dispatch_type


@settings(max_examples=500)
@given(st.text(min_size=1))
def test_every_type_encodes_to_one_safe_level_that_round_trips(dispatch_type: str) -> None:
    level = wire.encode_type(dispatch_type)
    assert TOPIC_LEVEL.fullmatch(level)
    assert wire.decode_type(level) == dispatch_type


def test_safe_characters_are_kept_and_others_escaped_upper_case() -> None:
    safe = string.ascii_letters + string.digits + "_-"
    assert wire.encode_type(safe) == safe
    assert wire.encode_type("SET.POWER") == "SET%2EPOWER"
    assert wire.encode_type("\u00e9") == "%C3%A9"


def test_empty_type_is_a_wire_error() -> None:
    with pytest.raises(wire.WireError, match="empty"):
        wire.encode_type("")


def test_type_that_is_not_utf8_encodable_is_a_wire_error() -> None:
    with pytest.raises(wire.WireError):
        wire.encode_type("lone \ud800 surrogate")


@pytest.mark.parametrize(
    "level",
    [
        "",
        "%",
        "%4",
        "%G0",
        "%2e",  # lower-case hex: not canonical
        "%41",  # 'A' needs no escape
        "%5F",  # '_' needs no escape
        "%C3",  # truncated UTF-8
        "%FF",  # never UTF-8
        "a.b",
        "a b",
        "a/b",
        "+",
        "#",
        "\u00e9",
        "$SYS",
        "\0",
    ],
)
def test_decode_type_rejects_non_canonical_levels(level: str) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_type(level)


@settings(max_examples=500)
@given(st.text(alphabet=string.printable + "\u00e9", max_size=20))
def test_decode_type_accepts_only_what_encode_type_produces(level: str) -> None:
    try:
        decoded = wire.decode_type(level)
    except wire.WireError:
        return
    assert wire.encode_type(decoded) == level


LAYOUT = wire.TopicLayout.for_microgrid(7)


def test_default_layout_of_a_microgrid() -> None:
    assert LAYOUT.root == "microgrid/7/dispatch"
    assert LAYOUT.status == "microgrid/7/dispatch/status"
    assert LAYOUT.everything == "microgrid/7/dispatch/#"
    assert LAYOUT.running("SET.POWER") == "microgrid/7/dispatch/SET%2EPOWER/running"
    assert LAYOUT.dispatch("A", 42) == "microgrid/7/dispatch/A/dispatches/42"
    assert LAYOUT.dispatches("SET.POWER") == "microgrid/7/dispatch/SET%2EPOWER/dispatches/+"
    assert LAYOUT.events("A") == "microgrid/7/dispatch/A/events"


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=50) | st.sampled_from(HOSTILE_TYPES), st.integers(0, 2**63))
def test_topic_layout_parse_round_trips_every_topic_kind(dispatch_type: str, did: int) -> None:
    assert LAYOUT.parse(LAYOUT.running(dispatch_type)) == wire.TopicRef(
        wire.TopicKind.RUNNING, dispatch_type
    )
    assert LAYOUT.parse(LAYOUT.events(dispatch_type)) == wire.TopicRef(
        wire.TopicKind.EVENTS, dispatch_type
    )
    assert LAYOUT.parse(LAYOUT.dispatch(dispatch_type, did)) == wire.TopicRef(
        wire.TopicKind.DISPATCH, dispatch_type, did
    )
    assert LAYOUT.parse(LAYOUT.status) == wire.TopicRef(wire.TopicKind.STATUS)
    for topic in (LAYOUT.running(dispatch_type), LAYOUT.dispatch(dispatch_type, did)):
        assert topic.count("/") == LAYOUT.root.count("/") + topic[len(LAYOUT.root) :].count("/")
        assert not set("+# .\0") & set(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "microgrid/8/dispatch/A/running",
        "microgrid/7/dispatch",
        "microgrid/7/dispatch/",
        "microgrid/7/dispatch/A",
        "microgrid/7/dispatch/A/unknown",
        "microgrid/7/dispatch/A/running/extra",
        "microgrid/7/dispatch/A/dispatches",
        "microgrid/7/dispatch/A/dispatches/x",
        "microgrid/7/dispatch/A/dispatches/-1",
        "microgrid/7/dispatch/A/dispatches/007",  # one dispatch, one topic
        "microgrid/7/dispatch/A/dispatches/+7",
        "microgrid/7/dispatch/A/dispatches/" + "1" * 5000,  # int() would raise ValueError
        "microgrid/7/dispatch/A/dispatches/\u0663",  # an Arabic-Indic digit
        "microgrid/7/dispatch/A.B/running",
        "microgrid/7/dispatch//running",
        "microgrid/7/dispatch/status/extra",
        "microgrid/7/dispatch/+/running",
        "microgrid/7/dispatch/#",
    ],
    ids=lambda t: t[:60],
)
def test_topic_layout_parse_rejects_topics_outside_the_contract(topic: str) -> None:
    with pytest.raises(wire.WireError):
        LAYOUT.parse(topic)


@pytest.mark.parametrize("template", ["", "/", "site/+/dispatch", "site/#", "a\0b"])
def test_invalid_topic_root_is_a_wire_error(template: str) -> None:
    with pytest.raises(wire.WireError):
        wire.TopicLayout.for_microgrid(1, template)


def test_custom_topic_root_template() -> None:
    layout = wire.TopicLayout.for_microgrid(3, "sites/{microgrid_id}/schedule/")
    assert layout.status == "sites/3/schedule/status"
    assert layout.parse("sites/3/schedule/A/running").dispatch_type == "A"


# --- the module's own examples ------------------------------------------------


def test_docstring_examples_of_the_wire_module_pass() -> None:
    result = doctest.testmod(wire_topics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@settings(max_examples=300)
@given(st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=40))
def test_a_type_of_kept_characters_is_its_own_level_both_ways(dispatch_type: str) -> None:
    # The fast path (no byte-by-byte work) must agree with the general rule.
    assert wire.encode_type(dispatch_type) == dispatch_type
    assert wire.decode_type(dispatch_type) == dispatch_type
