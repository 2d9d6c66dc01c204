"""Requests to the bridge end to end (#15 items 2 and 6): resync, hold, release.

Real processes only: the local API server, Mosquitto with the shipped config
and ACL (user `operator`), `dispatch-bridge run`, `mosquitto_pub` and
`mosquitto_sub` as an operator would use them, the `dispatch-bridge resync`,
`hold` and `release` commands as subprocesses, and a real SDK `Dispatcher`
whose actor must stop while its type is held.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import Dispatcher, wire
from bridge.journal import journal_path
from testkit.api_server import ApiServerHandle, dispatch_bridge_command
from testkit.bridge import MOSQUITTO_SUB, BridgeFactory, MqttTap, Received, TapFactory
from testkit.broker import Broker
from testkit.nats import NatsNode
from testkit.processes import free_port, wait_until
from tests.fixtures.sdk import ActorLog
from tests.test_metrics import scrape

pytestmark = pytest.mark.slow

LAYOUT = wire.TopicLayout.for_microgrid(1)
MOSQUITTO_PUB = MOSQUITTO_SUB.replace("mosquitto_sub", "mosquitto_pub")


async def create_running(api: ApiServerHandle, dispatch_type: str) -> int:
    """Create a dispatch that started a second ago and runs for an hour."""
    async with api.client() as client:
        created = await client.create(
            microgrid_id=MicrogridId(1),
            type=dispatch_type,
            start_time=datetime.now(UTC) + timedelta(seconds=1),
            duration=timedelta(hours=1),
            target=TargetIds(1),
        )
    return int(created.id)


def publish(
    broker: Broker, user: str, topic: str, payload: str | bytes, *, retain: bool = False
) -> None:
    """Publish with `mosquitto_pub` (QoS 1) as `user`, as an operator would."""
    data = payload.encode() if isinstance(payload, str) else payload
    retained = ["-r"] if retain else []
    subprocess.run(
        [MOSQUITTO_PUB, *broker.cli_args(user), "-q", "1", *retained, "-t", topic, "-s"],
        input=data,
        check=True,
        timeout=15,
    )


def answer_of(tap: MqttTap, action: str, transaction: object) -> tuple[int, wire.RequestAnswer]:
    """Wait for the answer carrying `transaction`; its index among the tap's messages."""

    def find(messages: list[Received]) -> tuple[int, wire.RequestAnswer] | None:
        for index, message in enumerate(messages):
            if message.topic == LAYOUT.response(action):
                answer = wire.decode_answer(message.payload)
                if answer.transaction == transaction:
                    assert not message.retain
                    return index, answer
        return None

    return tap.wait_for(find, 20, f"the answer to {action} {transaction!r}")


def command(
    broker: Broker, action: str, *args: str, user: str = "operator"
) -> tuple[int, str, float]:
    """Run `dispatch-bridge <action>` as `user`; exit code, stdout and seconds taken."""
    started = time.monotonic()
    done = subprocess.run(
        [
            *dispatch_bridge_command(),
            action,
            "--broker",
            broker.url(user),
            "--microgrid-id",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def snapshot_of(tap: MqttTap, dispatch_type: str, check: object) -> wire.RunningSnapshot:
    assert callable(check)
    payload = tap.wait_latest(
        LAYOUT.running(dispatch_type),
        lambda p: bool(p) and bool(check(wire.decode_running(p))),
        20,
    )
    return wire.decode_running(payload)


def test_resync_republishes_everything_then_answers_and_garbage_gets_an_error(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    # A type called "request" keeps its own topics beside the request topics.
    ids = {t: asyncio.run(create_running(api_server, t)) for t in ("RS", "request")}
    tap = mqtt_tap_factory(mqtt_broker, "microgrid/1/dispatch/#")
    bridge = bridge_factory(api_server, mqtt_broker)
    bridge.wait_synced()
    for dispatch_type, dispatch_id in ids.items():
        snapshot_of(tap, dispatch_type, lambda s, i=dispatch_id: [d.id for d in s.running] == [i])
    listings = bridge.output().count("listed 2 dispatches")
    before = len(tap.messages())

    publish(
        mqtt_broker,
        "operator",
        LAYOUT.request("resync"),
        '{"transaction": {"who": "t1", "n": [1, 2]}}',
    )
    index, answer = answer_of(tap, "resync", {"who": "t1", "n": [1, 2]})
    assert answer.status == "ok" and answer.error is None, answer
    assert answer.dispatches == 2 and answer.microgrid_id == 1 and answer.synced_at is not None
    assert bridge.output().count("listed 2 dispatches") == listings + 1
    # The rebirth reached the broker before the answer: every dispatch topic, every
    # running snapshot and the status came again, live.
    republished = {m.topic for m in tap.messages()[before:index] if not m.retain and m.payload}
    expected = {LAYOUT.status} | {
        topic for t, i in ids.items() for topic in (LAYOUT.running(t), LAYOUT.dispatch(t, i))
    }
    assert expected <= republished, expected - republished
    # An operator may write the three request topics only, not the running topic
    # of a type called "request" (the resync below is the fence: the broker has
    # handled the earlier publish by then).
    assert LAYOUT.running("request") == "microgrid/1/dispatch/request/running"
    publish(mqtt_broker, "operator", LAYOUT.running("request"), "forged", retain=True)

    # The command does the same, as an operator would, and exits 0.
    code, output, _ = command(mqtt_broker, "resync")
    assert code == 0, output
    assert "resync ok (microgrid 1): 2 dispatches" in output
    assert b"forged" not in [m.payload for m in tap.on(LAYOUT.running("request"))]

    # Garbage: an error answer with a null transaction, a log line, no crash.
    publish(mqtt_broker, "operator", LAYOUT.request("resync"), b"\xff not json")
    _, garbage = answer_of(tap, "resync", None)
    assert garbage.status == "error" and garbage.error is not None
    assert "not JSON" in garbage.error
    publish(mqtt_broker, "operator", LAYOUT.request("hold"), '{"transaction": 7, "type": 42}')
    _, wrong = answer_of(tap, "hold", 7)
    assert wrong.status == "error" and wrong.error is not None and "$.type" in wrong.error
    assert "cannot read a resync request" in bridge.output()
    bridge.process.check_alive()


def test_resync_with_the_api_down_answers_an_error_at_once(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    asyncio.run(create_running(api_server, "RS"))
    bridge = bridge_factory(api_server, mqtt_broker, extra_env={"DISPATCH_BRIDGE_RETRY_MAX": "30"})
    bridge.wait_synced()
    api_server.stop()
    code, output, took = command(mqtt_broker, "resync")
    assert code == 1, output
    assert "resync error (microgrid 1): Dispatch API:" in output
    assert "republished the dispatches held instead" in output
    assert took < 8, f"answered after {took:.1f} s"
    # The JSON answer, for scripts.
    code, output, _ = command(mqtt_broker, "resync", "--json")
    answer, _ = json.JSONDecoder().raw_decode(output, output.index("{"))
    assert code == 1 and answer["status"] == "error" and answer["dispatches"] == 1


def test_no_bridge_means_no_answer_in_time(mqtt_broker: Broker) -> None:
    code, output, took = command(mqtt_broker, "resync", "--timeout", "1")
    assert code == 1 and "no answer on microgrid/1/dispatch/response/resync within 1 s" in output
    assert took < 10
    # Outside what the ACL lets the operator read: said at once, not as a silent wait.
    code, output, _ = command(
        mqtt_broker, "hold", "--all", "--topic-root", "elsewhere/{microgrid_id}"
    )
    assert code == 1 and "may this user send requests and read the answers" in output


def test_hold_stops_the_actors_release_restarts_them_and_an_actor_may_not_ask(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    held_id = asyncio.run(create_running(api_server, "HOLDME"))
    other_id = asyncio.run(create_running(api_server, "OTHER"))
    tap = mqtt_tap_factory(mqtt_broker, "microgrid/1/dispatch/#")
    port = free_port()
    bridge = bridge_factory(
        api_server,
        mqtt_broker,
        extra_args=["--status-interval", "1", "--metrics-listen", f"127.0.0.1:{port}"],
    )
    bridge.wait_synced()
    metrics = f"http://127.0.0.1:{port}/metrics"
    hold_me = (("microgrid", "1"), ("type", "HOLDME"))

    async def scenario() -> None:
        log = ActorLog()
        async with Dispatcher(
            microgrid_id=1,
            broker=mqtt_broker.url("actor"),
            reconnect_delay=timedelta(seconds=0.1),
        ) as dispatcher:
            await dispatcher.start_managing("HOLDME", actor_factory=log.factory)
            await log.wait_for(lambda log: log.running_dispatch_ids() == [held_id], 20)

            # An actor's request is dropped by the broker and changes nothing.
            publish(
                mqtt_broker,
                "actor",
                LAYOUT.request("hold"),
                '{"transaction": "sneaky", "type": "HOLDME"}',
            )
            code, output, _ = await asyncio.to_thread(command, mqtt_broker, "resync")
            assert code == 0, output
            assert not [m for m in tap.on(LAYOUT.response("hold")) if b"sneaky" in m.payload]
            assert log.running_dispatch_ids() == [held_id]

            code, output, _ = await asyncio.to_thread(
                command, mqtt_broker, "hold", "--type", "HOLDME", "--reason", "maintenance"
            )
            assert code == 0, output
            assert "hold ok (microgrid 1): held now: 'HOLDME' (maintenance)" in output
            held = snapshot_of(tap, "HOLDME", lambda s: s.held)
            assert held.running == () and held.next_change is None
            assert held.hold_reason == "maintenance"
            await log.wait_for(lambda log: log.running_dispatch_ids() == [], 20)
            values = scrape(metrics)
            assert values[("dispatch_bridge_type_on_hold", hold_me)] == 1
            assert values[("dispatch_bridge_running", hold_me)] == 0
            # Another type runs on.
            assert [d.id for d in snapshot_of(tap, "OTHER", lambda s: True).running] == [other_id]

            code, output, _ = await asyncio.to_thread(
                command, mqtt_broker, "release", "--type", "HOLDME"
            )
            assert code == 0, output
            assert "held now: nothing" in output
            released = snapshot_of(tap, "HOLDME", lambda s: not s.held)
            assert [d.id for d in released.running] == [held_id]
            await log.wait_for(lambda log: log.running_dispatch_ids() == [held_id], 20)

    asyncio.run(scenario())


def test_a_hold_works_without_the_cloud_and_survives_a_restart(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    dispatch_id = asyncio.run(create_running(api_server, "KEEP"))
    tap = mqtt_tap_factory(mqtt_broker, "microgrid/1/dispatch/#")
    bridge = bridge_factory(api_server, mqtt_broker)
    bridge.wait_synced()
    snapshot_of(tap, "KEEP", lambda s: [d.id for d in s.running] == [dispatch_id])
    api_server.stop()

    code, output, _ = command(mqtt_broker, "hold", "--all")
    assert code == 0, output
    assert "every type (held by a local request)" in output
    first = snapshot_of(tap, "KEEP", lambda s: s.held)
    assert first.running == ()
    bridge.stop()

    # Restarted with the cloud still away: held from its first snapshot on.
    again = bridge_factory(api_server, mqtt_broker, state_dir=bridge.state_dir)
    restarted = snapshot_of(tap, "KEEP", lambda s: s.session > first.session)
    assert restarted.held and restarted.running == ()
    assert "holds kept in" in again.output()
    # A release of one type leaves the hold of every type in force, and says so.
    code, output, _ = command(mqtt_broker, "release", "--type", "KEEP")
    assert code == 1 and "stays held: every type is held" in output
    code, output, _ = command(mqtt_broker, "release", "--all")
    assert code == 0, output
    free = snapshot_of(tap, "KEEP", lambda s: not s.held)
    assert [d.id for d in free.running] == [dispatch_id]
    # The audit journal has both, across the restart; not the refused release.
    journal = journal_path(bridge.state_dir)

    def requests() -> list[tuple[str, str | None, int]] | None:
        lines = journal.read_text().splitlines() if journal.exists() else []
        found = [json.loads(line) for line in lines if '"source":"request"' in line]
        entries = [(e["event"], e["type"], e["session"]) for e in found]
        return entries if len(entries) >= 2 else None

    assert wait_until(requests, 10, "the journal's hold and release") == [
        ("held", None, first.session),
        ("released", None, restarted.session),
    ]
    audit = subprocess.run(
        [*dispatch_bridge_command(), "audit", "--state-dir", str(bridge.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert audit.returncode == 0, audit.stderr
    assert [line.split()[1:3] for line in audit.stdout.splitlines() if " request " in line] == [
        ["request", "held"],
        ["request", "released"],
    ]


def test_requests_over_mqtt_311_on_nats(
    api_server: ApiServerHandle,
    nats_server: NatsNode,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    # NATS speaks MQTT 3.1.1 only (the bridge falls back); it has no operator user:
    # the fixture's admin asks.
    dispatch_id = asyncio.run(create_running(api_server, "NATS_HOLD"))
    tap = mqtt_tap_factory(nats_server, "microgrid/1/dispatch/#")
    bridge = bridge_factory(api_server, nats_server)
    bridge.wait_synced()
    assert "(MQTT 3.1.1, session 1)" in bridge.output()
    code, output, _ = command(nats_server, "resync", user="admin")
    assert code == 0 and "resync ok (microgrid 1): 1 dispatches" in output, output
    code, output, _ = command(nats_server, "hold", "--type", "NATS_HOLD", user="admin")
    assert code == 0, output
    assert snapshot_of(tap, "NATS_HOLD", lambda s: s.held).running == ()
    code, output, _ = command(nats_server, "release", "--all", user="admin")
    assert code == 0, output
    free = snapshot_of(tap, "NATS_HOLD", lambda s: not s.held and s.running)
    assert [d.id for d in free.running] == [dispatch_id]
