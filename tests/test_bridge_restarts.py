"""Restart paths of the bridge, end to end: the cache, the API server, the broker, crashes.

Real processes only (API server, Mosquitto, `dispatch-bridge run`,
`mosquitto_sub`); faults are real too (SIGTERM, kill -9, a database changed
while its server is down).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import DispatchId, TargetIds

from actor_sdk import wire
from bridge import convert
from bridge.service import strip_state
from testkit.api_server import ApiServerHandle
from testkit.bridge import MOSQUITTO_SUB, BridgeFactory, MqttTap, TapFactory, retained_snapshot
from testkit.broker import Broker
from testkit.processes import wait_until
from tests.fixtures.bridge_flow import running_ids, synced_bridge, wait_flips
from tests.fixtures.cache import cache_path, cached_dispatches

pytestmark = pytest.mark.slow

MICROGRID = 3
ON_TIME_S = 0.5


def status_of(tap: MqttTap, layout: wire.TopicLayout) -> wire.BridgeStatus | None:
    payload = tap.latest(layout.status)
    return wire.decode_status(payload) if payload else None


async def test_bridge_restarted_while_the_api_is_down_runs_from_its_cache_then_reconciles(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    tap, bridge, layout = synced_bridge(
        api_server, mqtt_broker, bridge_factory, mqtt_tap_factory, MICROGRID
    )
    mg = MicrogridId(MICROGRID)
    async with api_server.client() as client:
        soon = await client.create(
            microgrid_id=mg,
            type="CACHED",
            start_time=datetime.now(UTC) + timedelta(seconds=12),
            duration=timedelta(seconds=2),
            target=TargetIds(1),
        )
        doomed = await client.create(
            microgrid_id=mg,
            type="DOOMED",
            start_time=datetime.now(UTC) + timedelta(hours=2),
            duration=timedelta(seconds=60),
            target=TargetIds(2),
        )
    soon_id, doomed_id = int(soon.id), int(doomed.id)
    doomed_topic = layout.dispatch("DOOMED", doomed_id)
    await asyncio.to_thread(tap.wait_latest, doomed_topic, bool)
    wait_until(lambda: doomed_id in cached_dispatches(bridge.state_dir, MICROGRID), 5, "the cache")
    first = status_of(tap, layout)
    assert first is not None and first.state == "online"

    # SIGTERM: offline status, exit 0.
    assert bridge.stop() == 0
    offline = status_of(tap, layout)
    assert offline is not None and offline.state == "offline"
    assert offline.session == first.session

    # The API goes away; meanwhile a dispatch is deleted behind the bridge's back.
    api_server.stop()
    with sqlite3.connect(api_server.db_path) as db:
        assert db.execute("DELETE FROM dispatches WHERE id = ?", (doomed_id,)).rowcount == 1

    bridge.start()
    online = await asyncio.to_thread(
        tap.wait_for,
        lambda _: s if (s := status_of(tap, layout)) and s.state == "online" else None,
        10,
        "the restarted bridge online",
    )
    assert online.session > first.session
    assert online.upstream == "disconnected"
    assert online.dispatches == 2
    assert "loaded 2 dispatches from the cache" in bridge.output()

    # From the cache alone, the dispatch starts and stops on time.
    observed = await wait_flips(tap, layout.running("CACHED"), soon_id, 2, 20)
    start = soon.start_time.timestamp()
    assert 0 <= observed[0][0] - start <= ON_TIME_S
    assert 0 <= observed[1][0] - (start + 2) <= ON_TIME_S
    assert wire.decode_status(tap.latest(layout.status) or b"").upstream == "disconnected"
    assert doomed_topic in retained_snapshot(mqtt_broker, layout.everything)

    # The API comes back: the bridge lists, diffs, and clears what was deleted.
    api_server.start()
    await asyncio.to_thread(tap.wait_latest, doomed_topic, lambda p: p == b"", 15)
    status = await asyncio.to_thread(
        tap.wait_for,
        lambda _: s if (s := status_of(tap, layout)) and s.upstream == "connected" else None,
        5,
        "upstream connected",
    )
    assert status.dispatches == 1
    deleted = [wire.decode_event(m.payload) for m in tap.on(layout.events("DOOMED"))]
    assert [e.event for e in deleted] == ["created", "deleted"]
    tree = retained_snapshot(mqtt_broker, layout.everything)
    assert doomed_topic not in tree
    assert running_ids(tree[layout.running("DOOMED")]) == []
    wait_until(
        lambda: doomed_id not in cached_dispatches(bridge.state_dir, MICROGRID),
        5,
        "the cache to drop the deleted dispatch",
    )


async def test_broker_killed_and_rolled_back_gets_every_retained_topic_right_again(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    mqtt_broker.require_control()
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,))
    bridge.wait_synced()
    layout = bridge.layout()
    mg = MicrogridId(MICROGRID)
    async with api_server.client() as client:
        created = [
            await client.create(
                microgrid_id=mg,
                type=kind,
                start_time=datetime.now(UTC) + timedelta(seconds=offset),
                duration=timedelta(hours=1),
                target=TargetIds(index),
                payload={"n": index},
            )
            for index, (kind, offset) in enumerate(
                [("KEEP", 1), ("KEEP", 3600), ("GONE", 1), ("LATE", 3600)]
            )
        ]
        keep_a, keep_b, gone, late = (int(d.id) for d in created)
        await client.delete(microgrid_id=mg, dispatch_id=DispatchId(late))
        tap = mqtt_tap_factory(mqtt_broker, f"microgrid/{MICROGRID}/dispatch/#")
        await asyncio.to_thread(
            tap.wait_latest,
            layout.running("GONE"),
            lambda p: running_ids(p) == [gone],
            10,
        )
        # A clean restart saves the broker's state with GONE in it...
        mqtt_broker.restart()
        bridge.process.wait_for_output(r"session 2\)", 15)
        # ... then GONE is deleted and NEW created, and the broker dies before its autosave.
        await client.delete(microgrid_id=mg, dispatch_id=DispatchId(gone))
        new = await client.create(
            microgrid_id=mg,
            type="NEW",
            start_time=datetime.now(UTC) + timedelta(hours=3),
            duration=timedelta(seconds=5),
            target=TargetIds(5),
        )
        tap2 = mqtt_tap_factory(mqtt_broker, f"microgrid/{MICROGRID}/dispatch/NEW/#")
        await asyncio.to_thread(tap2.wait_latest, layout.running("NEW"), bool, 10)
        mqtt_broker.kill9()
        killed = time.monotonic()
        mqtt_broker.start()
        truth = {int(d.id): convert.from_client(d) async for d in _all(client, mg)}

    expected_dispatch_topics = {layout.dispatch(d.type, i) for i, d in truth.items()}
    assert {keep_a, keep_b, int(new.id)} == set(truth)

    def correct() -> dict[str, bytes] | None:
        tree = retained_snapshot(mqtt_broker, layout.everything)
        dispatch_topics = {t for t in tree if "/dispatches/" in t}
        if dispatch_topics != expected_dispatch_topics:
            return None
        status = wire.decode_status(tree[layout.status])
        if status.state != "online" or status.session < 3:
            return None
        return tree

    tree = await asyncio.to_thread(wait_until, correct, 15, "every retained topic right")
    elapsed = time.monotonic() - killed
    status = wire.decode_status(tree[layout.status])
    for dispatch_id, dispatch in truth.items():
        published = wire.decode_dispatch(tree[layout.dispatch(dispatch.type, dispatch_id)])
        assert strip_state(published) == dispatch
    keep = wire.decode_running(tree[layout.running("KEEP")])
    assert [d.id for d in keep.running] == [keep_a]
    assert keep.session == status.session
    assert running_ids(tree[layout.running("GONE")]) == []
    assert running_ids(tree[layout.running("NEW")]) == []
    print(f"broker kill -9 and restart: every retained topic right after {elapsed:.2f} s")

    # The bridge crashes: the broker publishes its will, offline with the same session.
    tap3 = mqtt_tap_factory(mqtt_broker, layout.status)
    await asyncio.to_thread(
        tap3.wait_latest, layout.status, lambda p: wire.decode_status(p).state == "online", 5
    )
    bridge.kill9()
    payload = await asyncio.to_thread(
        tap3.wait_latest, layout.status, lambda p: wire.decode_status(p).state == "offline", 10
    )
    assert wire.decode_status(payload).session == status.session


async def _all(client: object, mg: MicrogridId):  # type: ignore[no-untyped-def]
    async for page in client.list(microgrid_id=mg):  # type: ignore[attr-defined]
        for dispatch in page:
            yield dispatch


async def test_one_bridge_serves_two_microgrids_and_reports_the_api_link_in_each_status(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    tap = mqtt_tap_factory(mqtt_broker, "microgrid/+/dispatch/#")
    bridge = bridge_factory(api_server, mqtt_broker, (11, 12))
    bridge.wait_synced(2)
    ids = {}
    async with api_server.client() as client:
        for microgrid in (11, 12):
            created = await client.create(
                microgrid_id=MicrogridId(microgrid),
                type=f"KIND_{microgrid}",
                start_time=datetime.now(UTC) + timedelta(hours=1),
                duration=timedelta(minutes=5),
                target=TargetIds(microgrid),
            )
            ids[microgrid] = int(created.id)
    layouts = {m: wire.TopicLayout.for_microgrid(m) for m in (11, 12)}
    for microgrid, layout in layouts.items():
        topic = layout.dispatch(f"KIND_{microgrid}", ids[microgrid])
        payload = await asyncio.to_thread(tap.wait_latest, topic, bool)
        assert wire.decode_dispatch(payload).id == ids[microgrid]
    # Each microgrid's tree holds only its own dispatch.
    tree = retained_snapshot(mqtt_broker, "microgrid/+/dispatch/+/dispatches/+")
    assert set(tree) == {layouts[m].dispatch(f"KIND_{m}", ids[m]) for m in (11, 12)}

    def upstream_is(state: str) -> bool:
        statuses = [status_of(tap, layout) for layout in layouts.values()]
        return all(s is not None and s.upstream == state for s in statuses)

    await asyncio.to_thread(tap.wait_for, lambda _: upstream_is("connected"), 10, "connected")
    api_server.kill9()
    await asyncio.to_thread(
        tap.wait_for, lambda _: upstream_is("disconnected"), 10, "upstream disconnected"
    )
    api_server.start()
    await asyncio.to_thread(
        tap.wait_for, lambda _: upstream_is("connected"), 15, "upstream connected again"
    )
    sessions = {status_of(tap, layout).session for layout in layouts.values()}  # type: ignore[union-attr]
    assert sessions == {1}
    assert "reconnecting in" in bridge.output()


async def test_a_corrupt_cache_is_ignored_and_the_bridge_syncs_from_the_api(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    cache = cache_path(state, MICROGRID)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"SQLite format 3\x00" + b"\x5a" * 8192)
    async with api_server.client() as client:
        created = await client.create(
            microgrid_id=MicrogridId(MICROGRID),
            type="AFTER_CORRUPTION",
            start_time=datetime.now(UTC) + timedelta(hours=1),
            duration=timedelta(seconds=5),
            target=TargetIds(1),
        )
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,), state_dir=state)
    bridge.wait_synced()
    assert "is corrupt" in bridge.output()
    topic = bridge.layout().dispatch("AFTER_CORRUPTION", int(created.id))
    tree = await asyncio.to_thread(
        wait_until,
        lambda: t if topic in (t := retained_snapshot(mqtt_broker, topic)) else None,
        10,
        "the dispatch published",
    )
    assert wire.decode_dispatch(tree[topic]).id == int(created.id)
    wait_until(
        lambda: int(created.id) in cached_dispatches(state, MICROGRID), 5, "the cache rewritten"
    )
    assert bridge.stop() == 0


async def test_a_restored_tree_whose_snapshot_counts_a_lost_topic_does_not_hold_the_scan_open(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    """A broker restored from its autosave may hold a snapshot counting a topic it lost.

    The autosave can fall between the snapshot's publish and its dispatch topic's:
    the tree then never adds up. The stale-topic scan must end 3 s after the last
    retained message all the same, although the bridge's own status keeps coming back
    live on its topic (every second here): counting those live messages held the scan
    open for good, and with it the republishing of what the broker lost (seen in a
    chaos run: the SDKs never in sync again).
    """
    microgrid = MICROGRID + 10
    bridge = bridge_factory(
        api_server, mqtt_broker, (microgrid,), extra_args=["--status-interval", "1"]
    )
    bridge.wait_vouching()
    layout = bridge.layout()
    async with api_server.client() as client:
        created = await client.create(
            microgrid_id=MicrogridId(microgrid),
            type="COUNTED",
            start_time=datetime.now(UTC) + timedelta(hours=1),
            duration=timedelta(minutes=5),
            target=TargetIds(1),
        )
    topic = layout.running("COUNTED")

    def counted() -> bytes | None:
        payload = retained_snapshot(mqtt_broker, topic).get(topic)
        return payload if payload and wire.decode_running(payload).dispatches == 1 else None

    snapshot = wire.decode_running(await asyncio.to_thread(wait_until, counted, 15, "the count"))
    assert bridge.stop() == 0
    tally = wire.TypeTally()
    tally.put(int(created.id), created.update_time)
    tally.put(int(created.id) + 1000, created.update_time)  # the topic the broker lost
    planted = msgspec.structs.replace(snapshot, dispatches=2, digest=tally.digest)
    mosquitto_pub = MOSQUITTO_SUB.replace("mosquitto_sub", "mosquitto_pub")
    await asyncio.to_thread(
        subprocess.run,
        [mosquitto_pub, *mqtt_broker.cli_args("admin"), "-q", "1", "-r", "-t", topic, "-s"],
        input=wire.encode(planted),
        check=True,
        timeout=15,
    )

    bridge.start()
    started = time.monotonic()
    read_back = "the broker's retained tree read back"
    wait_until(
        bridge.process.alive_and(lambda: bridge.output().count(read_back) >= 2),
        20,
        "the second run's read-back",
    )
    assert time.monotonic() - started < 12
    assert "the stale-topic scan got no retained message for 3 s" in bridge.output()
    assert "'COUNTED': 1 of 2 dispatch topics" in bridge.output()
    # And the tree adds up again: the snapshot of this session counts what is there.
    republished = await asyncio.to_thread(
        wait_until,
        lambda: (
            (p := retained_snapshot(mqtt_broker, topic).get(topic))
            and wire.decode_running(p).session == 2
            and p
        ),
        15,
        "the snapshot of session 2",
    )
    assert wire.decode_running(republished).dispatches == 1


async def test_a_cache_never_synced_is_not_taken_as_the_whole_truth(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    """A first listing cut short leaves a cache of some pages and no sync time.

    Pages are written to the cache as they are applied (the listing is published page
    by page). Restarted on such a cache with the API down, the bridge publishes what it
    holds but must not clear what the broker holds beyond it: the dispatches of the
    pages never listed are as true as before.
    """
    microgrid = MICROGRID + 20
    tap, bridge, layout = synced_bridge(
        api_server, mqtt_broker, bridge_factory, mqtt_tap_factory, microgrid
    )
    async with api_server.client() as client:
        created = [
            await client.create(
                microgrid_id=MicrogridId(microgrid),
                type="PAGED",
                start_time=datetime.now(UTC) + timedelta(hours=2),
                duration=timedelta(minutes=5),
                target=TargetIds(1),
            )
            for _ in range(2)
        ]
    kept, unlisted = (int(d.id) for d in created)
    unlisted_topic = layout.dispatch("PAGED", unlisted)
    await asyncio.to_thread(tap.wait_latest, unlisted_topic, bool)
    wait_until(lambda: unlisted in cached_dispatches(bridge.state_dir, microgrid), 5, "the cache")
    assert bridge.stop() == 0
    api_server.stop()
    # What a first listing stopped after its first page leaves behind.
    with sqlite3.connect(cache_path(bridge.state_dir, microgrid)) as db:
        db.execute("DELETE FROM dispatches WHERE id = ?", (unlisted,))
        assert db.execute("DELETE FROM meta WHERE key = 'synced_at'").rowcount == 1

    bridge.start()
    deferred = "stale ones are cleared after the first sync"
    cleared = "clearing 1 stale dispatch"
    wait_until(
        lambda: deferred in bridge.output() or cleared in bridge.output(), 15, "the read-back"
    )
    assert deferred in bridge.output() and cleared not in bridge.output()
    tree = retained_snapshot(mqtt_broker, layout.everything)
    assert unlisted_topic in tree and layout.dispatch("PAGED", kept) in tree
