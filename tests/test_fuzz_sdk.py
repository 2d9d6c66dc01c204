"""Fuzzing the actor SDK through its real entry point: messages from a real broker.

A `Dispatcher` (connected as the `actor` user) manages actors of one type from a
scripted bridge's retained state; an `admin` client then publishes garbage on every
topic the SDK subscribes to (the managed type's `running` topic, other types'
`running` topics, `dispatches/ID` topics, the status topic, and levels that are not
encoded types): random bytes, mutated valid payloads, snapshots of another
microgrid or type, huge and deeply nested payloads. After each batch the bridge
publishes its next real snapshot, and the test waits until the actor received it:
proof that the dispatcher still runs and reads, and that no garbage changed what
runs (one start, no stop, the latest real payload). Budget: `max_examples` batches.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actor_sdk import Dispatcher, wire
from testkit.broker import Broker
from tests.fixtures.sdk import ActorLog, ScriptedBridge, new_microgrid_id, wire_dispatch
from tests.test_fuzz_wire import VALID, mutated

TYPE = "FUZZ.TYPE"
OTHER = "OTHER TYPE"


@dataclass
class Harness:
    """A dispatcher managing `TYPE`, its actors' log, the bridge, a garbage publisher."""

    bridge: ScriptedBridge
    log: ActorLog
    dispatcher: Dispatcher
    garbage: aiomqtt.Client
    layout: wire.TopicLayout
    round: int = 0

    async def next_real_snapshot(self) -> None:
        """Publish the bridge's next snapshot and wait until the actor has it."""
        self.round += 1
        wanted = {"round": self.round}
        await self.bridge.running(TYPE, [wire_dispatch(1, TYPE, duration=3600, payload=wanted)])

        def has_it(log: ActorLog) -> bool:
            last = [r for r in log.records if r.info is not None]
            return bool(last) and last[-1].info.options == wanted  # type: ignore[union-attr]

        await self.log.wait_for(has_it, 10, f"the actor to receive round {self.round}")

    def check(self) -> None:
        """Still running, one actor started once, never stopped."""
        assert self.dispatcher.is_running
        assert [r.dispatch_id for r in self.log.of("start")] == [1]
        assert self.log.of("stop") == []
        assert self.log.running_dispatch_ids() == [1]


@pytest.fixture
async def harness(mqtt_broker_session: Broker) -> AsyncIterator[Harness]:
    broker = mqtt_broker_session
    microgrid_id = new_microgrid_id()
    log = ActorLog()
    async with ScriptedBridge(broker, microgrid_id) as bridge:
        await bridge.status("online")
        await bridge.running(TYPE, [wire_dispatch(1, TYPE, duration=3600, payload={"round": 0})])
        dispatcher = Dispatcher(
            microgrid_id=microgrid_id,
            broker=broker.url("actor"),
            sync_timeout=timedelta(seconds=5),
        )
        async with dispatcher, aiomqtt.Client(**broker.client_kwargs("admin")) as garbage:
            await dispatcher.start_managing(TYPE, actor_factory=log.factory)
            await log.wait_count("start", 1)
            yield Harness(bridge, log, dispatcher, garbage, bridge.layout)


# --- garbage ------------------------------------------------------------------------------


def broken(decoder: Any, payload: bytes) -> bytes:
    """The payload, made undecodable if it happens to decode (trailing garbage)."""
    try:
        decoder(payload)
    except wire.WireError:
        return payload or b"\x00"
    return payload + b"}"


def foreign_snapshot(microgrid_id: int, dispatch_type: str, seq: int) -> bytes:
    """A valid snapshot of another microgrid or type, with a very high sequence number."""
    tree = json.loads(VALID["running"])
    tree.update(microgrid_id=microgrid_id, type=dispatch_type, seq=seq, session=2**40)
    return json.dumps(tree, separators=(",", ":")).encode()


def spliced(payload: bytes, at: int, noise: bytes) -> bytes:
    """`noise` inserted into `payload` at a position (clamped), e.g. bad UTF-8 in a string."""
    at = min(at, len(payload))
    return payload[:at] + noise + payload[at:]


PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.builds(
        spliced,
        st.sampled_from(list(VALID.values())),
        st.integers(0, 2000),
        st.sampled_from([b"\x80", b"\xff\xfe", b"\xed\xa0\x80", b"\\ud800", b"\x00"]),
    ),
    mutated().map(lambda case: case[1]),
    st.sampled_from(list(VALID.values())),
    st.sampled_from(
        [
            b"[" * 100_000 + b"]" * 100_000,
            b'{"running":[' + b"1," * 100_000 + b"1]}",
            b"\xff\xfe\xfd",
            b"null",
            b"{}",
            VALID["status"].replace(b"edge-1", b"edge-\xff"),
            VALID["running"].replace(b'"type":"SET.POWER"', b'"type":"SET\x80POWER"', 1),
            VALID["running"].replace(b'"duration":900', b'"duration":100000000000000000000'),
            VALID["running"].replace(b'"id":42', b'"id":-42'),
        ]
    ),
)


@st.composite
def garbage_message(draw: st.DrawFn, root: str) -> tuple[str, bytes, bool]:
    """(topic, payload, retain): garbage the SDK receives on one of its subscriptions."""
    layout = wire.TopicLayout(root)
    payload = draw(PAYLOADS)
    retain = draw(st.booleans())
    where = draw(
        st.sampled_from(["managed", "managed-foreign", "other", "dispatch", "status", "bad-level"])
    )
    if where == "managed":
        return layout.running(TYPE), broken(wire.decode_running, payload), retain
    if where == "managed-foreign":
        foreign = draw(st.sampled_from([(1, TYPE), (999_999, TYPE), (0, OTHER)]))
        return layout.running(TYPE), foreign_snapshot(*foreign, seq=2**62), retain
    if where == "other":
        return layout.running(OTHER), payload, retain
    if where == "dispatch":
        dispatch_type = draw(st.sampled_from([TYPE, OTHER]))
        dispatch_id = draw(st.sampled_from([1, 2, 42, 2**64 - 1]))
        return layout.dispatch(dispatch_type, dispatch_id), payload, retain
    if where == "status":
        return layout.status, broken(wire.decode_status, payload), retain
    level = draw(st.sampled_from(["%ZZ", "%2e", "a%", "%F0%9F", "%41", "x.y", "\u00e9"]))
    kind = draw(st.sampled_from(["running", "dispatches/1", "dispatches/007"]))
    return f"{root}/{level}/{kind}", payload, retain


# --- the tests ----------------------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_garbage_on_every_subscribed_topic_leaves_actors_in_the_right_state(
    harness: Harness, data: Any
) -> None:
    batch = data.draw(st.lists(garbage_message(harness.layout.root), min_size=1, max_size=4))
    for topic, payload, retain in batch:
        await harness.garbage.publish(topic, payload, qos=1, retain=retain)
    await harness.next_real_snapshot()
    harness.check()


async def test_a_new_dispatcher_syncs_past_retained_garbage(mqtt_broker_session: Broker) -> None:
    broker = mqtt_broker_session
    microgrid_id = new_microgrid_id()
    layout = wire.TopicLayout.for_microgrid(microgrid_id)
    log = ActorLog()
    async with ScriptedBridge(broker, microgrid_id) as bridge:
        await bridge.status("online")
        await bridge.running(TYPE, [wire_dispatch(1, TYPE, duration=3600)])
        garbage = {
            layout.running(OTHER): b"\xff garbage",
            layout.running("FOURTH"): foreign_snapshot(microgrid_id, "FOURTH", 1)
            .replace(b'"bridge"', b'"\xff"')
            .replace(b'"payload":{', b'"payload":{"\x80":1,'),
            layout.running("THIRD"): foreign_snapshot(microgrid_id, "THIRD", 1).replace(
                b'"duration":900', b'"duration":100000000000000000000'
            ),
            layout.dispatch(TYPE, 1): b'{"id": "one"}',
            layout.dispatch(TYPE, 2): VALID["dispatch"],  # id and type do not match the topic
            layout.dispatch(OTHER, 3): b"[" * 50_000,
            f"{layout.root}/%ZZ/running": VALID["running"],
            f"{layout.root}/%41/dispatches/1": VALID["dispatch"],
        }
        for topic, payload in garbage.items():
            await bridge.raw(topic, payload)
        async with Dispatcher(microgrid_id=microgrid_id, broker=broker.url("actor")) as dispatcher:
            await dispatcher.start_managing(TYPE, actor_factory=log.factory)
            await log.wait_count("start", 1)
            assert dispatcher.is_running and dispatcher.is_live
            assert log.running_dispatch_ids() == [1]
