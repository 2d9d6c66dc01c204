"""End to end: `dispatch-bridge api` → `dispatch-bridge run` → Mosquitto → `mosquitto_sub`.

Real processes only: the local API server, Mosquitto with the shipped config,
the bridge as a subprocess, `dispatch-cli` to create dispatches and
`mosquitto_sub` to read the topics. Several scenarios share one bridge and
run side by side while a minutely recurring dispatch comes round twice.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import DispatchId, TargetIds

from actor_sdk import wire
from bridge import convert, schedule
from bridge.service import strip_state
from testkit.api_server import ApiServerHandle, run_dispatch_cli
from testkit.bridge import BridgeFactory, MqttTap, TapFactory, retained_snapshot
from testkit.broker import Broker
from tests.fixtures.bridge_flow import running_ids, synced_bridge, wait_flips

pytestmark = pytest.mark.slow

MICROGRID = 1
ON_TIME_S = 0.5
"""How late a scheduled start or stop may reach mosquitto_sub (generous: 2 shared cores)."""
HOSTILE = "a/b.c+#d e"


async def dispatch_cli(server: ApiServerHandle, *args: str) -> str:
    """Run the real `dispatch-cli` against the server; return its output (exit 0 asserted)."""
    code, output = await run_dispatch_cli(server, *args)
    assert code == 0, output
    return output


def assert_on_time(
    observed: list[tuple[float, bool]], expected: list[tuple[datetime, bool]]
) -> list[float]:
    """Each flip happened at its instant (not before, at most ON_TIME_S after); the lateness."""
    assert [running for _, running in observed] == [running for _, running in expected]
    lateness = []
    for (at, _), (instant, _) in zip(observed, expected, strict=True):
        late = at - instant.timestamp()
        assert -0.005 <= late <= ON_TIME_S, f"flip at {instant} seen {late * 1000:.1f} ms late"
        lateness.append(late)
    return lateness


async def check_updates_and_delete(
    client: DispatchApiClient, tap: MqttTap, broker: Broker, layout: wire.TopicLayout
) -> None:
    """Payload, active and duration updates, and a delete, take effect at once."""
    mg = MicrogridId(MICROGRID)
    # Updates and deletes take effect at once, on a long-running dispatch.
    upd = await client.create(
        microgrid_id=mg,
        type="UPD",
        start_time=datetime.now(UTC) + timedelta(seconds=2),
        duration=timedelta(hours=1),
        target=TargetIds(3),
        payload={"step": 1},
    )
    upd_id = int(upd.id)
    upd_running = layout.running("UPD")
    await asyncio.to_thread(tap.wait_latest, upd_running, lambda p: running_ids(p) == [upd_id], 10)
    await client.update(
        microgrid_id=mg, dispatch_id=DispatchId(upd_id), new_fields={"payload": {"step": 2}}
    )
    await asyncio.to_thread(
        tap.wait_latest,
        upd_running,
        lambda p: bool(p) and wire.decode_running(p).running[0].payload == {"step": 2},
        3,
    )
    # The snapshot goes out ahead of the dispatch topic (the publisher's two queues).
    await asyncio.to_thread(
        tap.wait_latest,
        layout.dispatch("UPD", upd_id),
        lambda p: bool(p) and wire.decode_dispatch(p).payload == {"step": 2},
        3,
    )
    await client.update(
        microgrid_id=mg, dispatch_id=DispatchId(upd_id), new_fields={"active": False}
    )
    await asyncio.to_thread(tap.wait_latest, upd_running, lambda p: running_ids(p) == [], 3)
    await client.update(
        microgrid_id=mg, dispatch_id=DispatchId(upd_id), new_fields={"active": True}
    )
    await asyncio.to_thread(tap.wait_latest, upd_running, lambda p: running_ids(p) == [upd_id], 3)
    # Shortened so that its run is over: stops at once.
    await client.update(
        microgrid_id=mg,
        dispatch_id=DispatchId(upd_id),
        new_fields={"duration": timedelta(seconds=1)},
    )
    await asyncio.to_thread(tap.wait_latest, upd_running, lambda p: running_ids(p) == [], 3)
    # The dispatch topic follows the snapshot (9 ms later seen on a NATS cluster): awaited.
    await asyncio.to_thread(
        tap.wait_latest,
        layout.dispatch("UPD", upd_id),
        lambda p: bool(p) and (s := wire.decode_dispatch(p)).duration == 1 and not s.running,
        3,
    )

    # Delete clears the retained topic (an empty retained message).
    await client.delete(microgrid_id=mg, dispatch_id=DispatchId(upd_id))
    upd_topic = layout.dispatch("UPD", upd_id)
    await asyncio.to_thread(tap.wait_latest, upd_topic, lambda p: p == b"", 3)
    assert upd_topic not in retained_snapshot(broker, layout.everything)
    events = [wire.decode_event(m.payload) for m in tap.on(layout.events("UPD"))]
    assert [e.event for e in events] == [
        "created",
        "updated",
        "updated",
        "updated",
        "updated",
        "deleted",
    ]


async def check_hostile_type(
    client: DispatchApiClient, tap: MqttTap, broker: Broker, layout: wire.TopicLayout
) -> None:
    """A type with `/ . + #` and a space goes under its encoded level; nothing else changes."""
    mg = MicrogridId(MICROGRID)
    # A hostile type name lands under its encoded level, and nothing else changes.
    before = retained_snapshot(broker, layout.everything)
    seen_before = len(tap.messages())
    hostile = await client.create(
        microgrid_id=mg,
        type=HOSTILE,
        start_time=datetime.now(UTC) + timedelta(hours=1),
        duration=timedelta(seconds=10),
        target=TargetIds(9),
    )
    level = f"{layout.root}/a%2Fb%2Ec%2B%23d%20e"
    hostile_topic = f"{level}/dispatches/{int(hostile.id)}"
    payload = await asyncio.to_thread(tap.wait_latest, hostile_topic, bool, 5)
    assert wire.decode_dispatch(payload).type == HOSTILE
    await asyncio.to_thread(tap.wait_latest, f"{level}/running", lambda p: running_ids(p) == [], 5)
    others = (f"{layout.root}/ONE_OFF/", f"{layout.root}/REC/")
    new_topics = {m.topic for m in tap.messages()[seen_before:] if not m.topic.startswith(others)}
    assert new_topics == {hostile_topic, f"{level}/running", f"{level}/events", layout.status}
    after = retained_snapshot(broker, layout.everything)
    changed = {t for t in before.keys() | after.keys() if before.get(t) != after.get(t)}
    # The one-off may have switched meanwhile; everything else is as it was.
    changed = {t for t in changed if not t.startswith(others)}
    assert changed == {hostile_topic, f"{level}/running", layout.status}
    assert wire.decode_type(level.rsplit("/", 1)[1]) == HOSTILE


async def test_dispatches_flow_from_the_api_to_retained_topics_on_time(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    tap, bridge, layout = synced_bridge(
        api_server, mqtt_broker, bridge_factory, mqtt_tap_factory, MICROGRID
    )
    mg = MicrogridId(MICROGRID)
    lateness: list[float] = []

    async with api_server.client() as client:
        # A minutely dispatch of 3 s: runs at start and a minute later.
        now = datetime.now(UTC)
        recurring = await client.create(
            microgrid_id=mg,
            type="REC",
            start_time=now.replace(microsecond=0) + timedelta(seconds=5),
            duration=timedelta(seconds=3),
            target=TargetIds(1),
            recurrence=RecurrenceRule(frequency=Frequency.MINUTELY, interval=1),
        )
        rec_id = int(recurring.id)

        # A one-off created with the real dispatch-cli.
        out = await dispatch_cli(
            api_server,
            "create",
            str(MICROGRID),
            "ONE_OFF",
            "7,8",
            "in 15 seconds",
            "3 seconds",
            "--payload",
            '{"power_w": 5000}',
        )
        match = re.search(r"ID:\s+DID(\d+)", out)
        assert match is not None, out
        one_id = int(match.group(1))
        one_off = await client.get(microgrid_id=mg, dispatch_id=DispatchId(one_id))

        # Its topic: the exact dispatch, with its computed state.
        topic = layout.dispatch("ONE_OFF", one_id)
        payload = await asyncio.to_thread(tap.wait_latest, topic, bool)
        published = wire.decode_dispatch(payload)
        assert strip_state(published) == convert.from_client(one_off)
        assert (published.running, published.until, published.next_run) == (
            False,
            None,
            one_off.start_time,
        )
        assert published.payload == {"power_w": 5000}
        assert published.target == wire.Target(ids=(7, 8))
        assert retained_snapshot(mqtt_broker, topic)[topic] == payload

        await check_updates_and_delete(client, tap, mqtt_broker, layout)
        await check_hostile_type(client, tap, mqtt_broker, layout)

        # The one-off starts and stops on time.
        one_running = layout.running("ONE_OFF")
        observed = await wait_flips(tap, one_running, one_id, 2, 20)
        end = one_off.start_time + (one_off.duration or timedelta())
        lateness += assert_on_time(observed, [(one_off.start_time, True), (end, False)])
        snapshot = wire.decode_running(
            next(m.payload for m in tap.on(one_running) if running_ids(m.payload) == [one_id])
        )
        assert snapshot.running[0].until == end
        assert snapshot.microgrid_id == MICROGRID and snapshot.type == "ONE_OFF"

        # The recurring one starts and stops twice, on time.
        rec = convert.from_client(recurring)
        first = rec.start_time
        expected = [
            (first, True),
            (first + timedelta(seconds=3), False),
            (first + timedelta(seconds=60), True),
            (first + timedelta(seconds=63), False),
        ]
        assert schedule.run_state(rec, first).running
        observed = await wait_flips(tap, layout.running("REC"), rec_id, 4, 90)
        lateness += assert_on_time(observed, expected)

    # seq grows within the session; the session is the status's.
    snapshots = [
        wire.decode_running(m.payload)
        for m in tap.messages()
        if m.topic.endswith("/running") and m.payload
    ]
    status = wire.decode_status(tap.latest(layout.status) or b"")
    assert status.state == "online" and status.upstream == "connected"
    assert {s.session for s in snapshots} == {status.session}
    seqs = [s.seq for s in snapshots]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    print(
        f"start/stop lateness at mosquitto_sub: max {max(lateness) * 1000:.1f} ms, "
        f"all {[round(x * 1000, 1) for x in lateness]} ms"
    )
    assert bridge.stop() == 0
    assert wire.decode_status(tap.latest(layout.status) or b"").state == "offline"
