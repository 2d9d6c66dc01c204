"""Hostile input through the local API server and the bridge, read back from the broker.

Dispatches with hostile type names, payloads at the size and depth limits, every
recurrence field at its limits, and a burst of 2,000 creates go into a real
`dispatch-bridge api` with raw gRPC requests; a real bridge publishes them to a real
Mosquitto. Afterwards a fresh subscriber's view of the retained tree must be exactly
the truth computed from what the API lists: every accepted dispatch on the topic
its encoded type names, with the definition the API holds; the `running` snapshots
equal to `bridge.schedule.running_at` of those dispatches; no topic outside the
contract (no stray levels from `/`, `+`, `#` in a type); and what the API refused
left no trace. Requests over a limit are refused by the API with a message that
names the limit.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.client.common.microgrid import MicrogridId
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from actor_sdk import wire
from bridge import convert, schedule
from bridge.api.validation import MAX_PAYLOAD_BYTES, MAX_PAYLOAD_DEPTH
from bridge.service import strip_state
from testkit.api_server import ApiServerHandle, raw_stub, signed_metadata
from testkit.bridge import BridgeFactory, BridgeHandle, MqttTap, TapFactory, retained_snapshot
from testkit.broker import Broker

Stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub
Rule = pb.RecurrenceRule
MG = 1
LAYOUT = wire.TopicLayout.for_microgrid(MG)

HOSTILE_TYPES = [
    "a/b",
    "+",
    "#",
    "$SYS",
    "$SYS/broker/uptime",
    "with spaces inside",
    " leading and trailing ",
    "%",
    "%2F",
    "100%25",
    "SET.POWER",
    "..",
    "a//b/",
    "microgrid/2/dispatch/X/running",
    "nul\x00byte",
    "tab\tnew\nline",
    "\u202eright-to-left",
    "e\u0301 combining",
    "\U0001f50b\U0001f31e emoji",
    "\U0001f50b" * 256,  # 256 characters, 1 KB of UTF-8, 3 KB as a topic level
    "x" * 256,
]


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def struct(value: dict[str, Any]) -> Struct:
    result = Struct()
    result.update(value)
    return result


def data(dispatch_type: str, **fields: Any) -> pb.DispatchData:
    """A dispatch that runs from a second ago for an hour, unless told otherwise."""
    defaults: dict[str, Any] = {
        "type": dispatch_type,
        "start_time": timestamp(datetime.now(UTC) - timedelta(seconds=1)),
        "duration": 3600,
        "target": pb.TargetComponents(component_ids=pb.TargetComponents.IdSet(ids=[1, 2])),
        "is_active": True,
    }
    defaults.update(fields)
    return pb.DispatchData(**defaults)


def payload_of_size(size: int) -> dict[str, Any]:
    """A payload whose compact JSON is exactly `size` bytes (as the API measures it)."""
    empty = len(json.dumps({"x": ""}, separators=(",", ":")).encode())
    payload = {"x": "p" * (size - empty)}
    assert len(json.dumps(payload, separators=(",", ":")).encode()) == size
    return payload


def nested(depth: int) -> dict[str, Any]:
    value: Any = "leaf"
    for level in range(depth):
        value = {f"level{depth - level}": value, "n": level}
    assert isinstance(value, dict)
    return value


def rule(freq: int, interval: int = 1, **fields: Any) -> Rule:
    return Rule(freq=freq, interval=interval, **fields)


SOON = datetime.now(UTC).replace(microsecond=0)
LIMIT_RULES: list[tuple[str, Rule]] = [
    ("minutely-every", rule(Rule.FREQUENCY_MINUTELY)),
    ("minutely-max-interval", rule(Rule.FREQUENCY_MINUTELY, 10_000)),
    ("hourly-count-1", rule(Rule.FREQUENCY_HOURLY, end_criteria=Rule.EndCriteria(count=1))),
    ("daily-count-4096", rule(Rule.FREQUENCY_DAILY, end_criteria=Rule.EndCriteria(count=4096))),
    (
        "weekly-until-far",
        rule(
            Rule.FREQUENCY_WEEKLY,
            end_criteria=Rule.EndCriteria(until_time=timestamp(datetime(2099, 12, 31, tzinfo=UTC))),
            byweekdays=list(range(1, 8)),
        ),
    ),
    (
        "monthly-every-list-full",
        rule(
            Rule.FREQUENCY_MONTHLY,
            byminutes=list(range(60)),
            byhours=list(range(24)),
            bymonthdays=[*range(-31, 0), *range(1, 32)],
            bymonths=list(range(1, 13)),
        ),
    ),
    (
        "yearly-max-interval",
        rule(Rule.FREQUENCY_YEARLY, 10_000, bymonths=[1, 12], bymonthdays=[-1, 1]),
    ),
    ("daily-edges", rule(Rule.FREQUENCY_DAILY, byminutes=[0, 59], byhours=[0, 23])),
]
REFUSED: list[tuple[str, pb.DispatchData, str]] = [
    ("type 1 KB", data("t" * 1024), "limit is 256"),
    ("type 257 emoji", data("\U0001f50b" * 257), "limit is 256"),
    (
        "payload 50 KB + 1",
        data("BIG", payload=struct(payload_of_size(MAX_PAYLOAD_BYTES + 1))),
        "50 KB",
    ),
    ("payload depth 6", data("DEEP", payload=struct(nested(MAX_PAYLOAD_DEPTH + 1))), "levels"),
    ("interval 10001", data("R", recurrence=rule(Rule.FREQUENCY_DAILY, 10_001)), "interval"),
    ("interval 0", data("R", recurrence=rule(Rule.FREQUENCY_DAILY, 0)), "interval"),
    (
        "count 4097",
        data("R", recurrence=rule(Rule.FREQUENCY_DAILY, end_criteria=Rule.EndCriteria(count=4097))),
        "count",
    ),
    ("minute 60", data("R", recurrence=rule(Rule.FREQUENCY_DAILY, byminutes=[60])), "byminutes"),
    ("hour 24", data("R", recurrence=rule(Rule.FREQUENCY_DAILY, byhours=[24])), "byhours"),
    ("weekday 8", data("R", recurrence=rule(Rule.FREQUENCY_DAILY, byweekdays=[8])), "byweekdays"),
    (
        "monthday 0",
        data("R", recurrence=rule(Rule.FREQUENCY_DAILY, bymonthdays=[0])),
        "bymonthdays",
    ),
    (
        "monthday 32",
        data("R", recurrence=rule(Rule.FREQUENCY_DAILY, bymonthdays=[32])),
        "bymonthdays",
    ),
    ("month 13", data("R", recurrence=rule(Rule.FREQUENCY_DAILY, bymonths=[13])), "bymonths"),
]


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def stub(api_server: ApiServerHandle) -> AsyncIterator[Stub]:
    async with raw_stub(api_server) as connected:
        yield connected


async def create(stub: Stub, dispatch: pb.DispatchData) -> int:
    response = await stub.CreateMicrogridDispatch(
        pb.CreateMicrogridDispatchRequest(microgrid_id=MG, dispatch_data=dispatch),
        metadata=signed_metadata("CreateMicrogridDispatch"),
    )
    return int(response.dispatch.metadata.dispatch_id)


async def api_truth(api: ApiServerHandle) -> dict[int, wire.Dispatch]:
    """Every dispatch the API lists for the microgrid, as wire structs without state."""
    found: dict[int, wire.Dispatch] = {}
    async with api.client() as client:
        async for page in client.list(MicrogridId(MG)):
            for dispatch in page:
                found[int(dispatch.id)] = convert.from_client(dispatch)
    return found


def dispatch_topics(messages: dict[str, bytes]) -> dict[int, str]:
    """Dispatch id -> topic, for the retained non-empty dispatch topics."""
    found = {}
    for topic, payload in messages.items():
        ref = LAYOUT.parse(topic)
        if ref.kind is wire.TopicKind.DISPATCH and payload:
            assert ref.dispatch_id is not None
            found[ref.dispatch_id] = topic
    return found


def wait_for_topics(tap: MqttTap, wanted: set[int], timeout: float) -> None:
    """Wait (polling the tap's log every half second) until every id was published."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while True:
        tap.process.check_alive()
        seen = set()
        for message in tap.messages():
            if "/dispatches/" in message.topic and message.payload:
                seen.add(int(message.topic.rsplit("/", 1)[1]))
        if wanted <= seen:
            return
        if time.monotonic() > deadline:
            missing = sorted(wanted - seen)
            raise AssertionError(f"{len(missing)} dispatches never published: {missing[:20]}")
        time.sleep(0.5)


def check_tree_is_the_truth(
    retained: dict[str, bytes], truth: dict[int, wire.Dispatch], bridge: BridgeHandle
) -> None:
    """The retained tree equals what the API holds, computed by the schedule core."""
    status = wire.decode_status(retained.pop(LAYOUT.status))
    assert (status.state, status.dispatches) == ("online", len(truth))
    by_id = dispatch_topics(retained)
    assert set(by_id) == set(truth), "published ids differ from the API's"
    running_topics = {}
    for topic, payload in retained.items():
        ref = LAYOUT.parse(topic)  # no topic outside the contract
        assert ref.kind in (
            wire.TopicKind.DISPATCH,
            wire.TopicKind.RUNNING,
            wire.TopicKind.UPCOMING,
        ), topic
        if ref.kind is wire.TopicKind.RUNNING and payload:
            running_topics[ref.dispatch_type] = wire.decode_running(payload)
        if ref.kind is wire.TopicKind.UPCOMING and payload:
            upcoming = wire.decode_upcoming(payload)  # decodes, and names its own type
            assert upcoming.type == ref.dispatch_type, topic
    for dispatch_id, topic in by_id.items():
        published = wire.decode_dispatch(retained[topic])
        expected = truth[dispatch_id]
        assert topic == LAYOUT.dispatch(expected.type, dispatch_id)
        assert strip_state(published) == strip_state(expected), dispatch_id
    types = {d.type for d in truth.values()}
    for dispatch_type in types:
        snapshot = running_topics.get(dispatch_type)
        assert snapshot is not None, f"no running snapshot of {dispatch_type!r}"
        of_type = [d for d in truth.values() if d.type == dispatch_type]
        expected_running, _ = schedule.running_at(of_type, snapshot.as_of)
        assert [d.id for d in snapshot.running] == [d.id for d in expected_running], dispatch_type
    assert "Traceback" not in bridge.output()


async def await_(func: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking helper without blocking the event loop."""
    return await asyncio.to_thread(func, *args)


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_hostile_types_limit_payloads_and_limit_rules_are_published_exactly(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
    stub: Stub,
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker, (MG,))
    bridge.wait_synced(1)
    tap = mqtt_tap_factory(mqtt_broker, LAYOUT.everything)
    sentinel = await create(stub, data("SENTINEL", payload=struct({"keep": "me"})))
    await await_(wait_for_topics, tap, {sentinel}, 10)
    sentinel_topic = LAYOUT.dispatch("SENTINEL", sentinel)
    sentinel_before = wire.decode_dispatch(tap.latest(sentinel_topic) or b"")

    accepted = {sentinel}
    for dispatch_type in HOSTILE_TYPES:
        accepted.add(await create(stub, data(dispatch_type, payload=struct({"t": dispatch_type}))))
    biggest = payload_of_size(MAX_PAYLOAD_BYTES)
    big_id = await create(stub, data("LIMITS", payload=struct(biggest)))
    deepest = nested(MAX_PAYLOAD_DEPTH)
    deep_id = await create(stub, data("LIMITS", payload=struct(deepest)))
    accepted |= {big_id, deep_id}
    for name, limit_rule in LIMIT_RULES:
        fields = {"start_time": timestamp(SOON), "duration": 30, "recurrence": limit_rule}
        accepted.add(await create(stub, data("RULES", payload=struct({"rule": name}), **fields)))
    for name, refused, words in REFUSED:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await create(stub, refused)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert words in (error.value.details() or ""), (name, error.value.details())

    await await_(wait_for_topics, tap, accepted, 20)
    truth = await api_truth(api_server)
    assert set(truth) == accepted, "the API holds exactly the accepted dispatches"
    retained = await await_(retained_snapshot, mqtt_broker, LAYOUT.everything, 2.0)
    check_tree_is_the_truth(retained, truth, bridge)

    # The hostile names stayed one level: nothing landed outside this microgrid's tree
    # (e.g. "microgrid/2/dispatch/X/running" as a type, or "$SYS").
    everything = await await_(retained_snapshot, mqtt_broker, "#", 2.0)
    assert {topic for topic in everything if not topic.startswith(LAYOUT.root + "/")} == set()
    # The 50 KB payload and the 5-level payload arrived whole; the 1 KB type too.
    assert wire.decode_dispatch(retained[LAYOUT.dispatch("LIMITS", big_id)]).payload == biggest
    assert wire.decode_dispatch(retained[LAYOUT.dispatch("LIMITS", deep_id)]).payload == deepest
    kilobyte_type = "\U0001f50b" * 256
    assert any(t.startswith(f"{LAYOUT.root}/{wire.encode_type(kilobyte_type)}/") for t in retained)
    sentinel_after = wire.decode_dispatch(retained[sentinel_topic])
    assert strip_state(sentinel_after) == strip_state(sentinel_before)
    assert sentinel_after.running


@pytest.mark.slow
async def test_burst_of_2000_creates_is_published_completely_and_correctly(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
    stub: Stub,
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker, (MG,))
    bridge.wait_synced(1)
    tap = mqtt_tap_factory(mqtt_broker, LAYOUT.everything)
    sentinel = await create(stub, data("SENTINEL"))
    await await_(wait_for_topics, tap, {sentinel}, 10)

    counter = itertools.count()
    gate = asyncio.Semaphore(32)
    later = timestamp(datetime.now(UTC) + timedelta(hours=1))

    async def one() -> int:
        n = next(counter)
        # Ten types; every 50th runs now, the rest start in an hour.
        fields: dict[str, Any] = {"payload": struct({"n": n})}
        if n % 50:
            fields["start_time"] = later
        async with gate:
            return await create(stub, data(f"BURST/{n % 10}", **fields))

    started = time.monotonic()
    ids = await asyncio.gather(*(one() for _ in range(2000)))
    created_s = time.monotonic() - started
    assert len(set(ids)) == 2000
    await await_(wait_for_topics, tap, set(ids), 60)
    published_s = time.monotonic() - started

    truth = await api_truth(api_server)
    assert len(truth) == 2001
    retained = await await_(retained_snapshot, mqtt_broker, LAYOUT.everything, 3.0)
    check_tree_is_the_truth(retained, truth, bridge)
    print(f"2000 creates: API {created_s:.1f} s, all published {published_s:.1f} s")
