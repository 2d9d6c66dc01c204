"""The bridge's fail-safe status, end to end (#11 items 1, 4, 6, 7; #18 item 6).

Real processes only: the local API server, Mosquitto with the shipped config
and ACL, `dispatch-bridge run` subprocesses, `mosquitto_sub` reading what
they publish, and the tests' `TcpProxy` for a silent partition.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
from frequenz.api.dispatch.v1 import dispatch_pb2
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, MqttTap, TapFactory, retained_snapshot
from testkit.broker import Broker, write_password_file
from testkit.processes import wait_until
from testkit.proxy import TcpProxy

pytestmark = pytest.mark.slow

LAYOUT = wire.TopicLayout.for_microgrid(1)
FAST = ["--status-interval", "1"]


def status_where(
    tap: MqttTap, check: object, timeout: float = 20.0, layout: wire.TopicLayout = LAYOUT
) -> wire.BridgeStatus:
    """Wait until the latest status on the tap passes `check`; return it."""
    assert callable(check)
    payload = tap.wait_latest(
        layout.status, lambda p: bool(p) and bool(check(wire.decode_status(p))), timeout
    )
    return wire.decode_status(payload)


async def create_running(api: ApiServerHandle, microgrid: int = 1, **fields: object) -> int:
    """Create a dispatch of type FS that starts in a second and runs for an hour."""
    async with api.client() as client:
        created = await client.create(
            microgrid_id=MicrogridId(microgrid),
            type="FS",
            start_time=datetime.now(UTC) + timedelta(seconds=1),
            duration=timedelta(hours=1),
            target=TargetIds(1),
            **fields,  # type: ignore[arg-type]
        )
    return int(created.id)


def test_a_blind_bridge_says_syncing_republishes_and_goes_online_once_synced(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    tap = mqtt_tap_factory(mqtt_broker, LAYOUT.status)
    api_server.stop()
    bridge = bridge_factory(api_server, mqtt_broker, extra_args=FAST)
    syncing = status_where(tap, lambda s: s.state == "syncing")
    assert syncing.contract == 2 and syncing.status_interval == 1
    assert syncing.knowledge_at is None and syncing.as_of is not None
    assert syncing.error is not None and "no valid cache" in syncing.error
    # Republished live (retain 0) every interval, each as of its own moment.
    live = tap.wait_for(
        lambda ms: x if len(x := [m for m in ms if not m.retain and m.payload]) >= 3 else None,
        15,
        "three live statuses",
    )
    stamps = [wire.decode_status(m.payload).as_of for m in live]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    api_server.start()
    online = status_where(tap, lambda s: s.state == "online")
    assert online.knowledge_at is not None and online.error is None
    assert online.upstream == "connected"
    bridge.stop()
    assert wire.decode_status(tap.latest(LAYOUT.status) or b"").state == "offline"


def test_knowledge_older_than_the_maximum_age_is_not_vouched_for(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
    tmp_path: object,
) -> None:
    tap = mqtt_tap_factory(mqtt_broker, "microgrid/1/dispatch/#")
    dispatch_id = asyncio.run(create_running(api_server))
    bridge = bridge_factory(api_server, mqtt_broker, extra_args=[*FAST, "--max-knowledge-age", "3"])
    first = status_where(tap, lambda s: s.state == "online" and s.dispatches == 1)
    # The API goes away: the running bridge's knowledge ages past 3 s.
    api_server.stop()
    stale = status_where(tap, lambda s: s.state == "syncing" and s.upstream == "disconnected")
    assert stale.error is not None and "maximum age" in stale.error
    bridge.stop()
    # Restarted from its cache with the API still down: a cache younger than the
    # (default) maximum age is vouched for at once; every running snapshot is
    # republished in the new session.
    again = bridge_factory(api_server, mqtt_broker, extra_args=FAST, state_dir=bridge.state_dir)
    cached = status_where(tap, lambda s: s.state == "online" and s.session > first.session)
    assert cached.knowledge_at is not None and cached.synced_at is not None

    def republished(messages: list) -> bool:  # type: ignore[type-arg]
        for m in messages:
            if m.topic == LAYOUT.running("FS") and m.payload:
                snap = wire.decode_running(m.payload)
                if snap.session == cached.session and [d.id for d in snap.running] == [dispatch_id]:
                    return True
        return False

    tap.wait_for(lambda ms: republished(ms) or None, 15, "the running snapshot republished")
    again.stop()
    # And with a maximum age shorter than the cache's age: not vouched for.
    old = bridge_factory(
        api_server,
        mqtt_broker,
        extra_args=[*FAST, "--max-knowledge-age", "1"],
        state_dir=bridge.state_dir,
    )
    too_old = status_where(tap, lambda s: s.state == "syncing" and s.session > cached.session)
    assert too_old.error is not None and "maximum age" in too_old.error
    old.stop()


def _corrupt_recurrence(db_path: object, dispatch_id: int) -> None:
    """Give a stored dispatch a recurrence frequency no client knows (as a newer API would)."""
    with sqlite3.connect(str(db_path)) as db:
        (blob,) = db.execute(
            "SELECT dispatch FROM dispatches WHERE id = ?", (dispatch_id,)
        ).fetchone()
        pb = dispatch_pb2.Dispatch.FromString(blob)
        pb.data.recurrence.freq = 99  # type: ignore[assignment]
        db.execute(
            "UPDATE dispatches SET dispatch = ? WHERE id = ?", (pb.SerializeToString(), dispatch_id)
        )


def test_a_dispatch_the_bridge_cannot_convert_is_kept_not_deleted(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    tap = mqtt_tap_factory(mqtt_broker, "microgrid/1/dispatch/#")
    dispatch_id = asyncio.run(
        create_running(api_server, recurrence=RecurrenceRule(frequency=Frequency.DAILY, interval=1))
    )
    bridge = bridge_factory(api_server, mqtt_broker, extra_args=FAST)
    topic = LAYOUT.dispatch("FS", dispatch_id)
    # The version that holds once it runs (the one before its start changes at the start).
    held = tap.wait_latest(topic, lambda p: bool(p) and wire.decode_dispatch(p).running)
    api_server.stop()
    _corrupt_recurrence(api_server.db_path, dispatch_id)
    api_server.start()
    bridge.wait_synced(2)
    status = status_where(tap, lambda s: s.skipped == 1 and s.upstream == "connected")
    assert status.state == "online" and status.dispatches == 1
    assert tap.latest(topic) == held, "the held version must stay"
    assert not [m for m in tap.on(LAYOUT.events("FS")) if b'"deleted"' in m.payload]
    assert retained_snapshot(mqtt_broker, topic).get(topic) == held
    assert bridge.output().count(f"dispatch {dispatch_id} from the Dispatch API cannot be") == 1


def test_a_publish_the_acl_refuses_is_an_error_in_log_and_status(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    mqtt_broker.require_acl()
    mqtt_broker.require_control()
    assert mqtt_broker.workdir is not None
    # The shipped ACL's per-microgrid bridge user, allowed microgrid 1 only (plus
    # the status topic of microgrid 2, so that the refusals can be seen there).
    password = "mg1-secret-5e1f"
    users = {u: p for u, p in mqtt_broker.passwords.items() if p}
    write_password_file(mqtt_broker.workdir / "passwd", {**users, "bridge-mg1": password})
    with (mqtt_broker.workdir / "acl").open("a") as acl:
        acl.write(
            "\nuser bridge-mg1\ntopic readwrite microgrid/1/dispatch/#\n"
            "topic readwrite microgrid/2/dispatch/status\n"
        )
    mqtt_broker.restart()
    asyncio.run(create_running(api_server, microgrid=2))
    tap = mqtt_tap_factory(mqtt_broker, "microgrid/+/dispatch/#")
    bridge = bridge_factory(
        api_server,
        mqtt_broker,
        microgrid_ids=(1, 2),
        extra_args=FAST,
        extra_env={"MQTT_USERNAME": "bridge-mg1", "MQTT_PASSWORD": password},
    )
    mg2 = wire.TopicLayout.for_microgrid(2)
    refused = status_where(tap, lambda s: s.refused >= 1, layout=mg2)
    assert refused.error is not None and "refused" in refused.error
    assert "0x87" in refused.error or "not authorized" in refused.error.lower()
    assert status_where(tap, lambda s: s.state == "online").refused == 0
    assert "ERROR" in bridge.output() and "microgrid 2: the MQTT broker refused" in bridge.output()
    assert not [m for m in tap.messages() if m.topic.startswith("microgrid/2/dispatch/FS")]


def test_two_bridges_for_one_microgrid_are_reported(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    tap = mqtt_tap_factory(mqtt_broker, LAYOUT.status)
    first = bridge_factory(
        api_server, mqtt_broker, extra_args=FAST, extra_env={"DISPATCH_BRIDGE_NAME": "alpha"}
    )
    status_where(tap, lambda s: s.bridge == "alpha" and s.state == "online")
    bridge_factory(
        api_server, mqtt_broker, extra_args=FAST, extra_env={"DISPATCH_BRIDGE_NAME": "beta"}
    )
    seen = status_where(
        tap, lambda s: s.bridge == "alpha" and s.error is not None and "another bridge" in s.error
    )
    assert seen.error is not None and "'beta'" in seen.error
    wait_until(lambda: "another bridge ('beta'" in first.output(), 10, "the error in the log")


async def test_a_silent_partition_fires_the_will_and_heals(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    proxy = TcpProxy(mqtt_broker.host, mqtt_broker.port)
    await proxy.start()
    try:
        tap = mqtt_tap_factory(mqtt_broker, "microgrid/1/dispatch/#")
        dispatch_id = await create_running(api_server)
        await asyncio.to_thread(
            bridge_factory,
            api_server,
            mqtt_broker,
            extra_args=FAST,
            extra_env={"MQTT_URL": f"mqtt://127.0.0.1:{proxy.port}"},
        )
        before = await asyncio.to_thread(status_where, tap, lambda s: s.state == "online")
        proxy.partition()
        cut_at = datetime.now(UTC).timestamp()
        # Keepalive 15 s: the broker gives up after 1.5 x 15 s and sends the will.
        await asyncio.to_thread(status_where, tap, lambda s: s.state == "offline", 40)
        fired = tap.on(LAYOUT.status)[-1].at - cut_at
        assert fired <= 1.5 * 15 + 3, f"the will fired {fired:.1f} s after the partition"
        proxy.heal()
        after = await asyncio.to_thread(
            status_where, tap, lambda s: s.state == "online" and s.session > before.session, 40
        )

        def republished(messages: list) -> bool:  # type: ignore[type-arg]
            for m in messages:
                if m.topic == LAYOUT.running("FS") and m.payload:
                    snap = wire.decode_running(m.payload)
                    if snap.session == after.session and dispatch_id in [
                        d.id for d in snap.running
                    ]:
                        return True
            return False

        await asyncio.to_thread(
            tap.wait_for, lambda ms: republished(ms) or None, 15, "the snapshot republished"
        )
    finally:
        await proxy.close()
