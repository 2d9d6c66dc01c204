"""The offline cache under crashes, old formats and a state dir that cannot be written.

Real processes only: the API server, Mosquitto and `dispatch-bridge run`,
killed with SIGKILL in the middle of bursts of changes; a full filesystem is a
real (tiny) tmpfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import DispatchId, TargetIds

from actor_sdk import wire
from bridge.service import strip_state
from testkit.api_server import ApiServerFactory, ApiServerHandle
from testkit.bridge import BridgeFactory, retained_snapshot
from testkit.broker import Broker
from testkit.processes import wait_until
from tests.fixtures.cache import cache_path, cached_dispatches

pytestmark = pytest.mark.slow

MICROGRID = 6
V1_SAMPLE = Path(__file__).parent / "data" / "v1-cache"


async def churn(
    client: DispatchApiClient,
    stop: asyncio.Event,
    rng: random.Random,
    live: list[int],
    created: set[int],
) -> int:
    """Create, update and delete dispatches in bursts of 10 concurrent calls until `stop`."""
    mg = MicrogridId(MICROGRID)
    calls = 0

    async def one() -> None:
        roll = rng.random()
        if roll < 0.6 or len(live) < 5:
            new = await client.create(
                microgrid_id=mg,
                type=rng.choice(["CRASH_A", "CRASH_B"]),
                start_time=datetime.now(UTC) + timedelta(hours=1),
                duration=timedelta(minutes=5),
                target=TargetIds(1),
                payload={"n": rng.randrange(10**6)},
            )
            live.append(int(new.id))
            created.add(int(new.id))
        elif roll < 0.85:
            await client.update(
                microgrid_id=mg,
                dispatch_id=DispatchId(rng.choice(live)),
                new_fields={"payload": {"n": rng.randrange(10**6)}},
            )
        else:
            victim = live.pop(rng.randrange(len(live)))
            await client.delete(microgrid_id=mg, dispatch_id=DispatchId(victim))

    while not stop.is_set():
        results = await asyncio.gather(*(one() for _ in range(10)), return_exceptions=True)
        calls += sum(1 for r in results if r is None)
    return calls


async def api_state(client: DispatchApiClient) -> dict[int, datetime]:
    """The update time of every dispatch the API holds."""
    found: dict[int, datetime] = {}
    async for page in client.list(MicrogridId(MICROGRID)):
        for d in page:
            found[int(d.id)] = d.update_time
    return found


def published_state(broker: Broker, layout: wire.TopicLayout) -> dict[int, wire.Dispatch]:
    """The dispatches the broker holds as retained topics (what the bridge published)."""
    tree = retained_snapshot(broker, layout.everything)
    dispatches = [wire.decode_dispatch(p) for t, p in tree.items() if "/dispatches/" in t and p]
    return {d.id: d for d in dispatches}


async def test_kill9_during_bursts_of_changes_loses_nothing_the_bridge_published(
    api_server_factory: ApiServerFactory, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> None:
    api_server = api_server_factory(extra_env={"PYTHONFAULTHANDLER": "1"})
    rng = random.Random(20261202)
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,))
    bridge.wait_synced()
    layout = bridge.layout()
    live: list[int] = []
    created: set[int] = set()
    checked = 0
    async with api_server.client() as client:
        for kill in range(3):
            stop = asyncio.Event()
            worker = asyncio.create_task(churn(client, stop, rng, live, created))
            await asyncio.sleep(rng.uniform(0.5, 2.0))  # a random point in the bursts
            bridge.kill9()
            stop.set()
            assert await worker > 0
            published = published_state(mqtt_broker, layout)
            cached = cached_dispatches(bridge.state_dir, MICROGRID)
            api = await api_state(client)
            # Everything the broker holds from the bridge is in the cache, unless the
            # cache is already ahead with what the API acknowledged after it.
            for dispatch_id, shown in published.items():
                held = cached.get(dispatch_id)
                if held is not None and strip_state(held) == strip_state(shown):
                    continue
                # The cache may be ahead of the broker (it is written first), with a newer
                # version or a deletion that the API acknowledged; never behind it.
                newest = api.get(dispatch_id)
                if held is None:
                    assert newest is None, (kill, dispatch_id, "published, not cached")
                else:
                    assert shown.update_time < held.update_time, (kill, dispatch_id)
                    assert newest is None or held.update_time <= newest, (kill, dispatch_id)
            # And the cache holds nothing the API never had.
            assert set(cached) <= created, kill
            checked += len(published)
            bridge.start()
            await asyncio.to_thread(
                bridge.process.wait_for_output,
                f"loaded {len(cached)} dispatches from the cache",
                20,
            )
            bridge.wait_synced(count=kill + 2)
    assert checked > 30  # the bursts published something to check
    assert bridge.stop() == 0


async def test_a_bridge_migrates_the_json_cache_of_the_previous_version(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(V1_SAMPLE, state)
    api_server.stop()  # the migrated cache alone must do
    bridge = bridge_factory(api_server, mqtt_broker, (7,), state_dir=state)
    bridge.process.wait_for_output("loaded 3 dispatches from the cache", 20)
    output = bridge.output()
    assert "migrated 3 dispatches from the old dispatch cache" in output
    assert not (state / "microgrid-7" / "dispatches.json").exists()
    assert sorted(cached_dispatches(state, 7)) == [101, 102, 103]
    topic = bridge.layout().dispatch("SET_POWER", 101)
    tree = await asyncio.to_thread(
        wait_until,
        lambda: t if topic in (t := retained_snapshot(mqtt_broker, topic)) else None,
        10,
        "the migrated dispatch published",
    )
    assert wire.decode_dispatch(tree[topic]).payload["note"] == "ünïcode ✓"
    assert bridge.stop() == 0
    # The session counter of the old version goes on.
    assert int((state / "microgrid-7" / "session").read_text()) > 41


async def test_a_cache_that_cannot_be_opened_leaves_the_bridge_running_from_memory(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    cache_path(state, MICROGRID).mkdir(parents=True)  # unwritable also for root
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,), state_dir=state)
    bridge.wait_synced()
    assert "cannot open the dispatch cache" in bridge.output()
    assert "running from memory" in bridge.output()
    async with api_server.client() as client:
        created = await client.create(
            microgrid_id=MicrogridId(MICROGRID),
            type="FROM_MEMORY",
            start_time=datetime.now(UTC) + timedelta(hours=1),
            duration=timedelta(seconds=5),
            target=TargetIds(1),
        )
    topic = bridge.layout().dispatch("FROM_MEMORY", int(created.id))
    await asyncio.to_thread(
        wait_until, lambda: topic in retained_snapshot(mqtt_broker, topic), 10, "published"
    )
    assert bridge.stop() == 0


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 320 KB tmpfs (needs the right to mount, as root in the test container)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_a_full_state_dir_runs_from_memory_then_writes_again(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    tiny_tmpfs: Path,
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,), state_dir=tiny_tmpfs)
    bridge.wait_synced()
    mg = MicrogridId(MICROGRID)
    big = {"filler": "x" * 3000}
    async with api_server.client() as client:
        created = []
        for _ in range(12):
            created += await asyncio.gather(
                *(
                    client.create(
                        microgrid_id=mg,
                        type="FULL",
                        start_time=datetime.now(UTC) + timedelta(hours=1),
                        duration=timedelta(seconds=5),
                        target=TargetIds(1),
                        payload=big,
                    )
                    for _ in range(10)
                )
            )
        await asyncio.to_thread(
            bridge.process.wait_for_output, "cannot write the dispatch cache", 20
        )
        assert "running from memory" in bridge.output()
        last = created[-1]
        topic = bridge.layout().dispatch("FULL", int(last.id))
        await asyncio.to_thread(
            wait_until, lambda: topic in retained_snapshot(mqtt_broker, topic), 10, "published"
        )
        # Space comes back: the whole cache is written again.
        remount = ["mount", "-o", "remount,size=64m", str(tiny_tmpfs)]
        await asyncio.to_thread(subprocess.run, remount, check=True)
        await asyncio.to_thread(
            bridge.process.wait_for_output, "the dispatch cache .* is written again", 20
        )
    assert {int(c.id) for c in created} <= set(cached_dispatches(tiny_tmpfs, MICROGRID))
    assert bridge.stop() == 0
