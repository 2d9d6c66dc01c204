"""Actor execution status: the wire struct, the SDK's report, and the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds
from hypothesis import given, settings
from hypothesis import strategies as st

from actor_sdk import Dispatcher, manage, wire
from actor_sdk import _actor_status as actor_status
from actor_sdk._actor_status import (
    StatusBoard,
    StatusPublisher,
    default_actor_id,
    release_actor_id,
)
from testkit import broker as testkit_broker
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from testkit.processes import ManagedProcess, ProcessFactory, async_wait_until, wait_until
from testkit.proxy import TcpProxy
from tests.fixtures.sdk import SDK_TEST_TYPE, ActorLog, ScriptedBridge, managing, wire_dispatch

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _status(**changes: object) -> wire.ActorStatus:
    fields: dict[str, object] = {
        "state": "running",
        "types": {
            "SET.POWER": wire.ActorTypeStatus(state="running", dispatches=(3, 9)),
            "IDLE": wire.ActorTypeStatus(state="idle", dispatches=()),
        },
        "since": T0,
        "as_of": T0,
        "host": "edge-1",
        "error": None,
        "version": "0.1.0",
    }
    fields.update(changes)
    return wire.ActorStatus(**fields)  # type: ignore[arg-type]


# --- wire ---------------------------------------------------------------------


def test_actor_status_round_trips_with_every_field_written() -> None:
    status = _status()
    raw = wire.encode_actor_status(status)
    assert wire.decode_actor_status(raw) == status
    assert raw == (
        b'{"state":"running","types":{"SET.POWER":{"state":"running","dispatches":[3,9]},'
        b'"IDLE":{"state":"idle","dispatches":[]}},"since":"2026-01-02T03:04:05Z",'
        b'"as_of":"2026-01-02T03:04:05Z","host":"edge-1","error":null,"version":"0.1.0"}'
    )


def test_actor_status_of_a_newer_sdk_decodes() -> None:
    raw = wire.encode_actor_status(_status())[:-1] + b',"later":{"x":1}}'
    assert wire.decode_actor_status(raw) == _status()


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # the cleared topic
        b"offline",
        b"\xff\xfe",
        b"[]",
        b"{}",
        # A bridge status on the wrong topic, or an older draft without `types`.
        b'{"state":"online","upstream":"connected","synced_at":null,"session":1,'
        b'"bridge":"b","version":"1","dispatches":0}',
        b'{"state":"running","since":"2026-01-02T03:04:05Z","host":"h","version":"1"}',
        b'{"state":"busy","types":{},"since":"2026-01-02T03:04:05Z",'
        b'"as_of":"2026-01-02T03:04:05Z","host":"h","error":null,"version":"1"}',
        b'{"state":"idle","types":{"A":{"state":"offline","dispatches":[]}},'
        b'"since":"2026-01-02T03:04:05Z","as_of":"2026-01-02T03:04:05Z","host":"h",'
        b'"error":null,"version":"1"}',
        b'{"state":"idle","types":{},"since":"2026-01-02T03:04:05","as_of":'
        b'"2026-01-02T03:04:05Z","host":"h","error":null,"version":"1"}',
    ],
)
def test_garbage_or_old_actor_status_is_a_wire_error(raw: bytes) -> None:
    with pytest.raises(wire.WireError, match="invalid actor status payload"):
        wire.decode_actor_status(raw)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([*wire.ActorStatus.__struct_fields__, "types.A", "x"]), value=JSON)
def test_any_change_of_one_field_decodes_or_is_a_wire_error(field: str, value: object) -> None:
    document = json.loads(wire.encode_actor_status(_status()))
    if field.startswith("types."):
        document["types"][field.removeprefix("types.")] = value
    else:
        document[field] = value
    raw = json.dumps(document).encode()
    try:
        status = wire.decode_actor_status(raw)
    except wire.WireError as error:
        assert "invalid actor status payload" in str(error)
        return
    assert wire.decode_actor_status(wire.encode_actor_status(status)) == status


@given(raw=st.binary(max_size=200))
def test_any_bytes_decode_or_are_a_wire_error(raw: bytes) -> None:
    with contextlib.suppress(wire.WireError):
        wire.decode_actor_status(raw)


@pytest.mark.parametrize("actor_id", ["edge-1", "A_b-9", "x" * 128])
def test_actor_ids_of_the_allowed_characters_make_topics(actor_id: str) -> None:
    topic = wire.actor_status_topic(7, actor_id)
    assert topic == f"microgrid/7/actors/{actor_id}"
    assert wire.actor_id_of(topic) == (7, actor_id)


@pytest.mark.parametrize("actor_id", ["", "a/b", "a+", "#", "host.lan", "é", "a b", "x" * 129])
def test_other_actor_ids_are_refused(actor_id: str) -> None:
    with pytest.raises(wire.WireError, match=r"invalid actor id"):
        wire.actor_status_topic(7, actor_id)


@pytest.mark.parametrize(
    "topic",
    [
        "microgrid/7/dispatch/status",
        "microgrid/x/actors/a",
        "microgrid/7/actors/a/b",
        "a/7/actors/b",
    ],
)
def test_other_topics_are_not_actor_status_topics(topic: str) -> None:
    with pytest.raises(wire.WireError):
        wire.actor_id_of(topic)


def test_actor_status_filters() -> None:
    assert wire.actor_status_filter(7) == "microgrid/7/actors/+"
    assert wire.actor_status_filter() == "microgrid/+/actors/+"


# --- the SDK's report (unit: ActorSet and StatusBoard, no broker) --------------------


class _Set:
    """What `StatusBoard` reads of an `ActorSet`."""

    def __init__(self, running: tuple[int, ...] = (), failure: str | None = None) -> None:
        self.running_ids = running
        self.failure = failure


def test_board_overall_state_is_failed_over_running_over_idle() -> None:
    board = StatusBoard(host="h", version="1")
    later = T0 + timedelta(seconds=5)
    idle, changed = board.update({"A": _Set(), "B": _Set()}, T0)  # type: ignore[dict-item]
    assert (idle.state, changed, idle.since) == ("idle", True, T0)
    running, changed = board.update({"A": _Set((4, 2)), "B": _Set()}, later)  # type: ignore[dict-item]
    assert (running.state, changed, running.since) == ("running", True, later)
    assert running.types["A"] == wire.ActorTypeStatus(state="running", dispatches=(4, 2))
    failed, _ = board.update(
        {"A": _Set((4, 2)), "B": _Set(failure="boom")},  # type: ignore[dict-item]
        later + timedelta(seconds=1),
    )
    assert failed.state == "failed"
    assert failed.error == "type 'B': boom"
    assert failed.types["B"].state == "failed"
    # Nothing changed but the clock: no new message is due, `since` stays.
    again, changed = board.update(
        {"A": _Set((4, 2)), "B": _Set(failure="boom")},  # type: ignore[dict-item]
        later + timedelta(seconds=9),
    )
    assert not changed
    assert again.since == failed.since
    offline = board.offline(later)
    assert (offline.state, offline.types, offline.error) == ("offline", {}, None)


@pytest.mark.parametrize("bad", ["", "a b", "edge/1", "edge+", "café"])
async def test_a_bad_actor_id_is_refused_before_anything_connects(bad: str) -> None:
    with pytest.raises(ValueError, match=r"invalid actor id .*\[A-Za-z0-9_-\]"):
        Dispatcher(microgrid_id=1, broker="mqtt://localhost:1883", actor_id=bad)
    with pytest.raises(ValueError, match="invalid actor id"):
        await manage(
            broker="mqtt://localhost:1883",
            microgrid_id=1,
            dispatch_type="T",
            actor_factory=lambda info, updates: None,  # type: ignore[arg-type,return-value]
            actor_id=bad,
        )


def test_the_default_actor_id_is_stable_and_made_of_allowed_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "edge-7.site.example")
    monkeypatch.setattr(sys, "argv", ["/opt/site/pv_limit.py"])
    assert default_actor_id(3) == "edge-7-pv_limit-mg3"
    assert default_actor_id(3, "SET.POWER") == "edge-7-SET_POWER-mg3"
    monkeypatch.setattr(sys, "argv", ["/opt/site/peak_shaver/__main__.py"])
    assert default_actor_id(3) == "edge-7-peak_shaver-mg3"
    long = default_actor_id(3, "X" * 300)
    assert len(long) == 128
    assert long == default_actor_id(3, "X" * 300)
    wire.check_actor_id(long)
    # A second dispatcher of one process gets a suffix, the first's id comes back.
    first = Dispatcher(microgrid_id=3, broker="mqtt://localhost:1883")
    second = Dispatcher(microgrid_id=3, broker="mqtt://localhost:1883")
    assert (first.actor_id, second.actor_id) == (
        "edge-7-peak_shaver-mg3",
        "edge-7-peak_shaver-mg3-2",
    )
    release_actor_id(first.actor_id)
    release_actor_id(second.actor_id)
    assert Dispatcher(microgrid_id=3, broker="mqtt://localhost:1883").actor_id == first.actor_id
    release_actor_id(first.actor_id)


# --- end to end: API server, bridge, Mosquitto, an actor host; read as a field engineer ---

MICROGRID = 1
TYPE = "E2E_ACTORS"
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
MOSQUITTO_PUB = shutil.which("mosquitto_pub")

ACTOR_HOST = """
import asyncio, contextlib, os
from datetime import timedelta
from actor_sdk import manage

class Actor:
    def __init__(self, info):
        self.info = info
    def start(self):
        print(f"start {int(self.info._src.id)} until {self.info._src.until}", flush=True)
    async def stop(self, msg=None):
        print(f"stop {int(self.info._src.id)}: {msg}", flush=True)

async def factory(info, updates):
    if info.options.get("fail"):
        raise RuntimeError(f"no inverter for dispatch {int(info._src.id)}")
    return Actor(info)

async def main():
    await manage(
        broker=os.environ["MQTT_URL"],
        microgrid_id=int(os.environ["MICROGRID"]),
        dispatch_type=os.environ["DISPATCH_TYPE"],
        actor_factory=factory,
        actor_id=os.environ.get("ACTOR_ID") or None,
        reconnect_delay=timedelta(seconds=0.1),
        keepalive=5,
    )

with contextlib.suppress(KeyboardInterrupt):
    asyncio.run(main())
"""


def actor_host(
    process_factory: ProcessFactory,
    broker: Broker,
    tmp_path: Path,
    *,
    actor_id: str | None,
    dispatch_type: str = TYPE,
) -> ManagedProcess:
    """Start an actor host: a program that runs `manage(...)`, as a site would."""
    script = tmp_path / "actor_host.py"
    script.write_text(ACTOR_HOST)
    return process_factory(
        [sys.executable, str(script)],
        name="actor-host",
        extra_env={
            "MQTT_URL": f"mqtt://{broker.host}:{broker.port}",
            "MQTT_USERNAME": broker.username("actor") or "",
            "MQTT_PASSWORD": broker.actor_password or "",
            "MICROGRID": str(MICROGRID),
            "DISPATCH_TYPE": dispatch_type,
            "ACTOR_ID": actor_id or "",
        },
    )


def read_retained(broker: Broker, topic: str, user: str = "actor") -> bytes | None:
    """What a field engineer sees: `mosquitto_sub -C 1` of a retained topic (None: nothing)."""
    assert MOSQUITTO_SUB is not None
    done = subprocess.run(
        [MOSQUITTO_SUB, *broker.cli_args(user), "-t", topic, "-C", "1", "-W", "1", "-N"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return done.stdout if done.returncode == 0 and done.stdout else None


async def status_when(
    broker: Broker, topic: str, condition: Callable[[wire.ActorStatus], bool], within: float = 15
) -> wire.ActorStatus:
    """Poll the retained status with `mosquitto_sub` until it meets `condition`."""

    def probe() -> wire.ActorStatus | None:
        raw = read_retained(broker, topic)
        status = None if raw is None else wire.decode_actor_status(raw)
        return status if status is not None and condition(status) else None

    return await asyncio.to_thread(wait_until, probe, within, f"a status on {topic}")


needs_mosquitto_clients = pytest.mark.skipif(
    MOSQUITTO_SUB is None or MOSQUITTO_PUB is None,
    reason="needs mosquitto_sub and mosquitto_pub (apt-get install mosquitto-clients)",
)


@needs_mosquitto_clients
def mosquitto_pub(broker: Broker, client_id: str, topic: str, payload: bytes) -> None:
    """Publish a retained message as the `actor` user with a client id of our choice."""
    assert MOSQUITTO_PUB is not None
    args = ["-i", client_id, "-q", "1", "-r", "-t", topic, "-m", payload.decode()]
    subprocess.run([MOSQUITTO_PUB, *broker.cli_args("actor"), *args], check=True, timeout=10)


async def test_an_actor_host_reports_what_it_runs_and_its_will_says_offline(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    process_factory: ProcessFactory,
    tmp_path: Path,
) -> None:
    mqtt_broker.require_acl()
    bridge_factory(api_server, mqtt_broker, (MICROGRID,), extra_args=["--status-interval", "1"])
    topic = wire.actor_status_topic(MICROGRID, "edge-7")
    host = actor_host(process_factory, mqtt_broker, tmp_path, actor_id="edge-7")
    idle = await status_when(mqtt_broker, topic, lambda s: TYPE in s.types)
    assert idle.state == "idle"
    assert idle.types == {TYPE: wire.ActorTypeStatus(state="idle", dispatches=())}
    assert idle.host == socket.gethostname()
    assert idle.error is None
    async with api_server.client() as client:
        run = await client.create(
            microgrid_id=MicrogridId(MICROGRID),
            type=TYPE,
            start_time="NOW",
            duration=timedelta(seconds=60),
            target=TargetIds(1),
            payload={},
        )
        running = await status_when(mqtt_broker, topic, lambda s: s.state == "running")
        assert running.types[TYPE].dispatches == (int(run.id),)
        assert running.since >= idle.since
        broken = await client.create(
            microgrid_id=MicrogridId(MICROGRID),
            type=TYPE,
            start_time="NOW",
            duration=timedelta(seconds=60),
            target=TargetIds(2),
            payload={"fail": True},
        )
        failed = await status_when(mqtt_broker, topic, lambda s: s.state == "failed")
    # Failed over running: the type still runs the first dispatch and says so.
    assert failed.types[TYPE] == wire.ActorTypeStatus(state="failed", dispatches=(int(run.id),))
    assert failed.error is not None
    assert f"no inverter for dispatch {int(broken.id)}" in failed.error

    # Another client logged in as `actor` cannot write this host's topic: dropped.
    forged = wire.encode_actor_status(msgspec.structs.replace(failed, state="idle", host="forged"))
    await asyncio.to_thread(mosquitto_pub, mqtt_broker, "edge-8", topic, forged)
    # What edge-8 may write, it can (so the dropped write above was the ACL at work).
    own = wire.actor_status_topic(MICROGRID, "edge-8")
    await asyncio.to_thread(mosquitto_pub, mqtt_broker, "edge-8", own, forged)
    assert await asyncio.to_thread(read_retained, mqtt_broker, own) == forged
    kept = await asyncio.to_thread(read_retained, mqtt_broker, topic)
    assert kept is not None
    assert wire.decode_actor_status(kept) == failed

    # The host dies: the broker publishes its will.
    await asyncio.to_thread(host.kill9)
    offline = await status_when(mqtt_broker, topic, lambda s: s.state == "offline")
    assert (offline.types, offline.error) == ({}, None)
    assert "did not store" not in host.program_output()


async def test_a_broker_whose_acl_drops_the_status_is_logged_once_and_actors_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A site that upgraded the SDK but kept the ACL of before: no `%c` pattern line.
    # Mosquitto 2.0.11 then closes the connection of a client after a denied publish.
    old_acl = tmp_path / "old-acl"
    shipped = testkit_broker.SHIPPED_ACL.read_text().splitlines()
    old_acl.write_text("\n".join(line for line in shipped if "actors" not in line) + "\n")
    monkeypatch.setattr(testkit_broker, "SHIPPED_ACL", old_acl)
    monkeypatch.setattr(actor_status, "PUBLISH_TIMEOUT_S", 0.5)
    caplog.set_level(logging.INFO, logger="actor_sdk")
    broker = testkit_broker.start_broker(tmp_path / "broker")

    def connections() -> int:
        return caplog.text.count("connected to the broker")

    try:
        broker.require_acl()
        log = ActorLog()
        async with ScriptedBridge(broker, MICROGRID) as bridge:
            await bridge.status("online")
            async with managing(bridge, log, actor_id="edge-old") as dispatcher:
                await async_wait_until(
                    lambda: "no longer publishing" in caplog.text, 15, "the refusal logged"
                )
                # Given up: the next connection holds (one was lost after every status).
                await async_wait_until(lambda: dispatcher.is_live, 15, "a live view")
                held = connections()
                await bridge.running(SDK_TEST_TYPE, [wire_dispatch(1, SDK_TEST_TYPE)])
                await log.wait_count("start", 1)
                await bridge.running(SDK_TEST_TYPE, [])
                await log.wait_count("stop", 1)
                await bridge.running(SDK_TEST_TYPE, [wire_dispatch(2, SDK_TEST_TYPE)])
                await log.wait_count("start", 2)
                await asyncio.sleep(2)  # four publish timeouts: no more reconnects
                assert connections() == held, caplog.text
                assert dispatcher.is_live
        refusals = [r for r in caplog.records if "no longer publishing" in r.getMessage()]
        assert len(refusals) == 1, refusals
        assert "microgrid/1/actors/edge-old" in refusals[0].getMessage()
        assert "deploy/mosquitto/acl" in refusals[0].getMessage()
        assert held <= 1 + actor_status.LOST_UNCONFIRMED_LIMIT
        assert [r.kind for r in log.records] == ["start", "stop", "start", "stop"]
    finally:
        broker.close()


async def test_a_type_no_longer_managed_leaves_the_status(
    scripted_bridge: ScriptedBridge, mqtt_broker_session: Broker
) -> None:
    await scripted_bridge.status("online")
    topic = wire.actor_status_topic(scripted_bridge.microgrid_id, "edge-types")
    async with managing(scripted_bridge, ActorLog(), actor_id="edge-types") as dispatcher:
        await status_when(mqtt_broker_session, topic, lambda s: SDK_TEST_TYPE in s.types)
        await dispatcher.stop_managing(SDK_TEST_TYPE)
        left = await status_when(mqtt_broker_session, topic, lambda s: s.types == {})
        assert left.state == "idle"
    # A clean stop says offline itself (no will: the connection closed cleanly).
    await status_when(mqtt_broker_session, topic, lambda s: s.state == "offline")


async def test_a_status_stuck_on_a_dead_link_never_delays_a_stop_and_is_told_after_it(
    scripted_bridge: ScriptedBridge, mqtt_broker_session: Broker, broker_proxy: TcpProxy
) -> None:
    await scripted_bridge.status("online")
    topic = wire.actor_status_topic(scripted_bridge.microgrid_id, "edge-cut")
    now = datetime.now(UTC)
    ending = wire_dispatch(
        1, SDK_TEST_TYPE, start=now - timedelta(seconds=10), until=now + timedelta(seconds=1.5)
    )
    staying = wire_dispatch(2, SDK_TEST_TYPE, duration=600)
    log = ActorLog()
    url = broker_proxy.url(mqtt_broker_session)
    async with managing(scripted_bridge, log, url, keepalive=2, actor_id="edge-cut"):
        await scripted_bridge.running(SDK_TEST_TYPE, [ending, staying])
        await log.wait_count("start", 2)
        both = await status_when(mqtt_broker_session, topic, lambda s: s.state == "running")
        assert both.types[SDK_TEST_TYPE].dispatches == (1, 2)
        # A silent partition: the status publish of the stop gets no answer...
        broker_proxy.partition()
        stop = await log.wait_count("stop", 1, within=5)
        # ...and the fail-safe stop is on time all the same (the promise is 100 ms).
        assert ending.until is not None
        assert (stop.wall - ending.until).total_seconds() <= 0.25
        # The broker sees the dead link and tells the will; once healed, the truth.
        await status_when(mqtt_broker_session, topic, lambda s: s.state == "offline")
        broker_proxy.heal()
        after = await status_when(mqtt_broker_session, topic, lambda s: s.state == "running")
        assert after.types[SDK_TEST_TYPE].dispatches == (2,)


class _Client:
    """Stands in for a connected aiomqtt client: every publish is acknowledged."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(self, topic: str, payload: bytes, **_: object) -> None:
        self.published.append(payload)


async def test_a_missing_echo_is_concluded_only_once_the_retained_burst_is_over(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(actor_status, "PUBLISH_TIMEOUT_S", 0.05)
    in_sync = False
    publisher = actor_status.StatusPublisher(
        "microgrid/1/actors/x",
        dict,
        clock=lambda: T0,
        who="user 'actor' with client id 'x'",
        in_sync=lambda: in_sync,
    )
    client = _Client()
    running = asyncio.create_task(publisher.run())
    try:
        publisher.connected(client)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert client.published == []  # not before the subscriptions' retained burst
        in_sync = True
        publisher.changed()
        await async_wait_until(lambda: client.published, 5, "a publish")
        in_sync = False  # a reconnect: the retained burst again
        await asyncio.sleep(0.3)  # six echo timeouts while retained messages still come
        assert "did not store" not in caplog.text
        in_sync = True
        await async_wait_until(lambda: "did not store" in caplog.text, 5, "the warning")
        await asyncio.sleep(0.3)  # said once, not once per timeout
        assert caplog.text.count("did not store") == 1
        publisher.connected(client)  # type: ignore[arg-type]
        await async_wait_until(lambda: len(client.published) >= 2, 5, "a second publish")
    finally:
        running.cancel()
    assert caplog.text.count("did not store") == 1


def test_a_dispatcher_refused_for_its_url_keeps_no_default_actor_id() -> None:
    with pytest.raises(ValueError, match="scheme"):
        Dispatcher(microgrid_id=4, broker="http://localhost:1883")
    kept = Dispatcher(microgrid_id=4, broker="mqtt://localhost:1883")
    try:
        assert kept.actor_id == default_actor_id(4)  # not `-2`
    finally:
        release_actor_id(kept.actor_id)


class _CountingClient:
    """Stands in for a connected client: counts the publishes."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, topic: str, payload: bytes, **kwargs: object) -> None:
        self.published.append(topic)


class _SignallingClient(_CountingClient):
    """A `_CountingClient` that also says when it published."""

    def __init__(self) -> None:
        super().__init__()
        self.publish_seen = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, **kwargs: object) -> None:
        await super().publish(topic, payload, **kwargs)
        self.publish_seen.set()


async def test_a_change_waits_out_the_burst_of_starts_of_every_actor_host() -> None:
    # 100 actor processes on 2 cores start their actors 60-190 ms after a scheduled
    # instant (bench/fanout.py): a status sent 50 ms after each start (0.9 ms of CPU in
    # each process, and the broker's fan-out) delayed the starts still waiting.
    status = StatusPublisher(
        "microgrid/1/actors/burst", dict, clock=lambda: datetime.now(UTC), who="a"
    )
    client = _SignallingClient()
    status.connected(client)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    changed_at = loop.time()
    status.changed()
    running = asyncio.ensure_future(status.run())
    try:
        await asyncio.wait_for(client.publish_seen.wait(), 5)
        assert loop.time() - changed_at >= 0.25
        assert client.published == [status.topic]
    finally:
        running.cancel()


async def test_a_change_is_published_once_its_burst_has_settled() -> None:
    # At a scheduled instant every actor host switches at once: the status waits out
    # the burst instead of taking CPU from the starts (bench/fanout.py).
    status = StatusPublisher(
        "microgrid/1/actors/settle", dict, clock=lambda: datetime.now(UTC), who="a", settle=3600
    )
    client = _CountingClient()
    status.connected(client)  # type: ignore[arg-type]
    running = asyncio.ensure_future(status.run())
    try:
        for _ in range(20):
            status.changed()
            await asyncio.sleep(0)
        assert client.published == []  # the burst may still go on
    finally:
        running.cancel()
