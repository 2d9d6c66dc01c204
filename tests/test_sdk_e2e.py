"""End to end: local Dispatch API → `dispatch-bridge run` → Mosquitto → actor SDK.

The behaviours `frequenz-dispatch`'s own suite checks, ported to real processes:
dispatches are created and changed through the API server, the real bridge computes
and publishes the schedule, and the SDK's actors record what they went through.
Scenarios use their own dispatch types and run side by side within one bridge, so the
whole file takes about as long as its slowest scenario. Windows are seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import Dispatch as ClientDispatch
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import (
    Created,
    Deleted,
    Dispatcher,
    MergeByType,
    MergeByTypeTarget,
    MergeStrategy,
    Updated,
)
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, BridgeHandle
from testkit.broker import Broker
from testkit.processes import ProcessFactory
from testkit.proxy import TcpProxy
from tests.fixtures.sdk import ActorLog

pytestmark = pytest.mark.slow

MICROGRID = 1
EARLY = 0.3
"""How early an actor may start or stop, in seconds: `create` rounds start times."""
LATE = 1.0
"""How late an actor may start or stop, in seconds (two shared cores, many clients)."""
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SDK_DOC = REPO / "docs" / "actor-sdk.md"


def first_python_block(document: Path) -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", document.read_text(), re.S)
    assert blocks, f"{document} has no python example"
    return blocks[0]


def utcnow() -> datetime:
    return datetime.now(UTC)


def assert_near(actual: datetime, expected: datetime, what: str) -> None:
    delta = (actual - expected).total_seconds()
    assert -EARLY <= delta <= LATE, f"{what}: {delta:+.2f} s off ({actual} vs {expected})"


def end_of(dispatch: ClientDispatch) -> datetime:
    assert dispatch.duration is not None
    return dispatch.start_time + dispatch.duration


async def sleep_until(instant: datetime) -> None:
    """Wait for a wall-clock instant (the schedule's, not an event we could await)."""
    await asyncio.sleep(max(0.0, (instant - utcnow()).total_seconds()))


@dataclass
class Site:
    """The running stack, with helpers for scenarios."""

    api: ApiServerHandle
    broker: Broker
    client: DispatchApiClient
    bridge: BridgeHandle
    created_at: dict[int, datetime] = field(default_factory=dict)

    async def create(
        self,
        dispatch_type: str,
        *,
        start_in: float | None = 2.0,
        duration: float | None = 60,
        target: tuple[int, ...] = (1,),
        payload: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> ClientDispatch:
        start: datetime | str = (
            "NOW" if start_in is None else utcnow() + timedelta(seconds=start_in)
        )
        created = await self.client.create(
            microgrid_id=MicrogridId(MICROGRID),
            type=dispatch_type,
            start_time=start,  # type: ignore[arg-type]
            duration=None if duration is None else timedelta(seconds=duration),
            target=TargetIds(*target),
            payload=payload or {},
            dry_run=dry_run,
        )
        self.created_at[int(created.id)] = utcnow()
        return created

    def due(self, dispatch: ClientDispatch) -> datetime:
        """When the run can start: its start time, or when the API had it, if later.

        Under load a create can return after the start time it asked for; the bridge
        then starts the run at once, which is not the SDK being late.
        """
        return max(dispatch.start_time, self.created_at[int(dispatch.id)])

    async def update(self, dispatch: ClientDispatch, **fields: Any) -> None:
        await self.client.update(
            microgrid_id=MicrogridId(MICROGRID), dispatch_id=dispatch.id, new_fields=fields
        )

    async def delete(self, dispatch: ClientDispatch) -> None:
        await self.client.delete(microgrid_id=MicrogridId(MICROGRID), dispatch_id=dispatch.id)

    @contextlib.asynccontextmanager
    async def dispatcher(self, url: str | None = None) -> AsyncIterator[Dispatcher]:
        async with Dispatcher(
            microgrid_id=MICROGRID,
            broker=url or self.broker.url("actor"),
            reconnect_delay=timedelta(seconds=0.1),
            max_reconnect_delay=timedelta(seconds=0.5),
            keepalive=5,
        ) as dispatcher:
            yield dispatcher

    @contextlib.asynccontextmanager
    async def managed(
        self,
        dispatch_type: str,
        merge_strategy: MergeStrategy | None = None,
        *,
        log: ActorLog | None = None,
        retry_interval: timedelta = timedelta(seconds=60),
        url: str | None = None,
    ) -> AsyncIterator[ActorLog]:
        log = log or ActorLog()
        async with self.dispatcher(url) as dispatcher:
            await dispatcher.start_managing(
                dispatch_type,
                actor_factory=log.factory,
                merge_strategy=merge_strategy,
                retry_interval=retry_interval,
            )
            yield log


@pytest.fixture
async def site(
    api_server: ApiServerHandle, mqtt_broker: Broker, bridge_factory: BridgeFactory
) -> AsyncIterator[Site]:
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,))
    async with api_server.client() as client:
        yield Site(api_server, mqtt_broker, client, bridge)


def kinds(log: ActorLog) -> list[str]:
    return [r.kind for r in log.records]


# --- scenarios -------------------------------------------------------------------------


async def start_and_stop_with_payload_target_and_dry_run(site: Site) -> None:
    async with site.managed("E2E_START_STOP") as log:
        d = await site.create(
            "E2E_START_STOP",
            duration=2,
            target=(7, 8),
            payload={"power_w": 5000},
            dry_run=True,
        )
        start = await log.wait_count("start", 1)
        assert_near(start.wall, site.due(d), "start")
        assert start.info is not None
        assert start.info.options == {"power_w": 5000}
        assert set(start.info.target) == {7, 8}
        assert start.info.dry_run
        assert start.info._src.until == end_of(d)
        stop = await log.wait_count("stop", 1)
        assert_near(stop.wall, end_of(d), "stop")
    assert kinds(log) == ["start", "stop"]


async def running_dispatch_updated_is_an_update_and_delete_stops(site: Site) -> None:
    async with site.managed("E2E_UPDATE", MergeByType()) as log:
        d = await site.create("E2E_UPDATE", start_in=None, payload={"v": 1})
        await log.wait_count("start", 1)
        await site.update(d, payload={"v": 2})
        update = await log.wait_count("update", 1)
        assert update.info is not None and update.info.options == {"v": 2}
        await site.update(d, target=TargetIds(4, 5))
        update = await log.wait_count("update", 2)
        assert update.info is not None and set(update.info.target) == {4, 5}
        await site.delete(d)
        await log.wait_count("stop", 1)
    assert kinds(log) == ["start", "update", "update", "stop"]


async def inactive_stops_and_active_starts_again(site: Site) -> None:
    async with site.managed("E2E_ACTIVE") as log:
        d = await site.create("E2E_ACTIVE", start_in=None)
        await log.wait_count("start", 1)
        await site.update(d, active=False)
        await log.wait_count("stop", 1)
        await site.update(d, active=True)
        await log.wait_count("start", 2)
        await site.delete(d)
        await log.wait_count("stop", 2)
    assert kinds(log) == ["start", "stop", "start", "stop"]


async def endless_runs_until_deleted(site: Site) -> None:
    async with site.managed("E2E_ENDLESS_DELETE") as log:
        d = await site.create("E2E_ENDLESS_DELETE", start_in=None, duration=None)
        start = await log.wait_count("start", 1)
        assert start.info is not None and start.info._src.until is None
        await sleep_until(utcnow() + timedelta(seconds=2))
        assert kinds(log) == ["start"]
        await site.delete(d)
        await log.wait_count("stop", 1)


async def endless_changed_to_an_elapsed_duration_stops_at_once(site: Site) -> None:
    async with site.managed("E2E_ENDLESS_SHORTEN") as log:
        d = await site.create("E2E_ENDLESS_SHORTEN", start_in=None, duration=None)
        await log.wait_count("start", 1)
        await sleep_until(d.start_time + timedelta(seconds=2.5))
        changed_at = utcnow()
        await site.update(d, duration=timedelta(seconds=1))
        stop = await log.wait_count("stop", 1)
        assert (stop.wall - changed_at).total_seconds() < LATE


async def endless_changed_to_a_longer_duration_stops_at_the_new_end(site: Site) -> None:
    async with site.managed("E2E_ENDLESS_LONGER") as log:
        d = await site.create("E2E_ENDLESS_LONGER", start_in=None, duration=None)
        await log.wait_count("start", 1)
        elapsed = (utcnow() - d.start_time).total_seconds()
        duration = timedelta(seconds=math.ceil(elapsed) + 2)
        await site.update(d, duration=duration)
        update = await log.wait_count("update", 1)  # the actor learns its end
        assert update.info is not None and update.info._src.until == d.start_time + duration
        stop = await log.wait_count("stop", 1)
        assert_near(stop.wall, d.start_time + duration, "stop at the new end")


async def ended_before_the_actor_process_started_is_never_started(site: Site) -> None:
    d = await site.create("E2E_ENDED", duration=1)
    await sleep_until(end_of(d) + timedelta(seconds=0.5))
    async with site.managed("E2E_ENDED") as log:
        later = await site.create("E2E_ENDED", start_in=None, duration=60)
        start = await log.wait_count("start", 1)
        assert start.dispatch_id == int(later.id)
    assert [r.dispatch_id for r in log.of("start")] == [int(later.id)]


async def created_for_later_starts_on_time(site: Site) -> None:
    async with site.managed("E2E_LATER") as log:
        d = await site.create("E2E_LATER", start_in=3, duration=2)
        start = await log.wait_count("start", 1)
        assert_near(start.wall, site.due(d), "start")
        stop = await log.wait_count("stop", 1)
        assert_near(stop.wall, end_of(d), "stop")


async def overlapping_merge_by_type_one_actor_stops_at_the_later_end(site: Site) -> None:
    async with site.managed("E2E_OVERLAP", MergeByType()) as log:
        first = await site.create("E2E_OVERLAP", start_in=2, duration=3, payload={"n": 1})
        second = await site.create("E2E_OVERLAP", start_in=3, duration=3, payload={"n": 2})
        await log.wait_count("stop", 1, within=15)
        # The first ends while the second runs: the actor follows the second.
        stop = log.of("stop")[0]
        assert_near(stop.wall, end_of(second), "stop at the end of the later")
        assert stop.dispatch_id == int(second.id)
    assert kinds(log)[0] == "start" and kinds(log).count("start") == 1
    assert kinds(log).count("stop") == 1
    assert log.of("start")[0].dispatch_id == int(first.id)


async def back_to_back_merge_by_type_has_no_stop_in_between(site: Site) -> None:
    async with site.managed("E2E_BACK_TO_BACK", MergeByType()) as log:
        first = await site.create("E2E_BACK_TO_BACK", start_in=2, duration=2)
        second_start = first.start_time + timedelta(seconds=2)
        second = await site.create(
            "E2E_BACK_TO_BACK",
            start_in=(second_start - utcnow()).total_seconds(),
            duration=2,
        )
        assert second.start_time == end_of(first)
        stop = await log.wait_count("stop", 1, within=15)
        assert_near(stop.wall, end_of(second), "stop at the end of the second")
    assert kinds(log) == ["start", "update", "stop"]


async def merge_by_type_target_one_actor_per_target(site: Site) -> None:
    async with site.managed("E2E_BY_TARGET", MergeByTypeTarget()) as log:
        for target in ((1,), (2,), (1,)):
            await site.create("E2E_BY_TARGET", start_in=None, target=target)
        await log.wait_count("start", 2)
        await log.wait_for(lambda lg: len(lg.factory_calls) >= 2)
        assert sorted(tuple(sorted(i.target)) for i in log.running.values()) == [(1,), (2,)]


async def no_strategy_one_actor_per_dispatch(site: Site) -> None:
    async with site.managed("E2E_NO_MERGE") as log:
        a = await site.create("E2E_NO_MERGE", start_in=None)
        b = await site.create("E2E_NO_MERGE", start_in=None)
        await log.wait_count("start", 2)
        assert log.running_dispatch_ids() == sorted([int(a.id), int(b.id)])


async def dry_run_and_real_never_share_an_actor(site: Site) -> None:
    async with site.managed("E2E_DRY", MergeByType()) as log:
        await site.create("E2E_DRY", start_in=None, dry_run=True)
        await site.create("E2E_DRY", start_in=None, dry_run=False)
        await log.wait_count("start", 2)
        assert sorted(i.dry_run for i in log.running.values()) == [False, True]


async def stopping_one_leaves_another_types_and_targets_actor_running(site: Site) -> None:
    short_a, other = ActorLog(), ActorLog()
    async with site.dispatcher() as dispatcher:
        await dispatcher.start_managing(
            "E2E_KEEP_A", actor_factory=short_a.factory, merge_strategy=MergeByTypeTarget()
        )
        await dispatcher.start_managing("E2E_KEEP_B", actor_factory=other.factory)
        short = await site.create("E2E_KEEP_A", start_in=None, duration=2, target=(1,))
        await site.create("E2E_KEEP_A", start_in=None, duration=30, target=(2,))
        await site.create("E2E_KEEP_B", start_in=None, duration=30)
        await short_a.wait_count("start", 2)
        await other.wait_count("start", 1)
        stop = await short_a.wait_count("stop", 1)
        assert stop.dispatch_id == int(short.id)
        await sleep_until(utcnow() + timedelta(seconds=0.5))
        assert len(short_a.of("stop")) == 1 and len(short_a.running) == 1
        assert other.of("stop") == []


async def failing_factory_starts_after_two_retry_intervals(site: Site) -> None:
    log = ActorLog(fail_next=2)
    retry = timedelta(seconds=1)
    async with site.managed("E2E_RETRY", log=log, retry_interval=retry):
        d = await site.create("E2E_RETRY", start_in=2, duration=30)
        start = await log.wait_count("start", 1)
        assert_near(start.wall, site.due(d) + 2 * retry, "start after two retries")
        assert len(log.factory_calls) == 3


async def reconnect_after_a_start_a_stop_and_a_whole_run_were_missed(site: Site) -> None:
    proxy = TcpProxy(site.broker.host, site.broker.port)
    await proxy.start()
    try:
        async with site.managed("E2E_RECONNECT", url=proxy.url(site.broker)) as log:
            before = await site.create("E2E_RECONNECT", start_in=None, duration=None)
            await log.wait_count("start", 1)
            await proxy.cut()
            missed = await site.create("E2E_RECONNECT", start_in=1, duration=1)
            started = await site.create("E2E_RECONNECT", start_in=1, duration=30)
            await site.delete(before)  # an endless run: only the bridge can stop it
            await sleep_until(end_of(missed) + timedelta(seconds=0.5))
            assert [r.kind for r in log.records] == ["start"]  # cut off: nothing changed
            await proxy.resume()
            await log.wait_for(
                lambda lg: lg.running_dispatch_ids() == [int(started.id)], what="the new run"
            )
            await sleep_until(utcnow() + timedelta(seconds=0.5))
        starts = [r.dispatch_id for r in log.of("start")]
        assert starts == [int(before.id), int(started.id)], log.describe()
        assert [r.dispatch_id for r in log.of("stop")] == [int(before.id), int(started.id)]
    finally:
        await proxy.close()


async def lifecycle_and_running_state_receivers(site: Site) -> None:
    existing = await site.create("E2E_EVENTS", start_in=60)
    async with site.dispatcher() as dispatcher:
        events = dispatcher.new_lifecycle_events_receiver("E2E_EVENTS")
        states = await dispatcher.new_running_state_event_receiver("E2E_EVENTS")

        async def event() -> object:
            return await asyncio.wait_for(events.receive(), 10)

        first = await event()
        assert isinstance(first, Created) and first.dispatch.id == existing.id
        d = await site.create("E2E_EVENTS", start_in=None, duration=30)
        created = await event()
        assert isinstance(created, Created) and created.dispatch.id == d.id
        started = await asyncio.wait_for(states.receive(), 10)
        assert started.id == d.id and started.started
        await site.update(d, payload={"x": 1})
        updated = await event()
        assert isinstance(updated, Updated) and updated.dispatch.payload == {"x": 1}
        changed = await asyncio.wait_for(states.receive(), 10)
        assert changed.started and changed.payload == {"x": 1}
        await site.delete(d)
        deleted = await event()
        assert isinstance(deleted, Deleted) and deleted.dispatch.id == d.id
        stopped = await asyncio.wait_for(states.receive(), 10)
        assert stopped.id == d.id and not stopped.started


SCENARIOS: list[Callable[[Site], Awaitable[None]]] = [
    start_and_stop_with_payload_target_and_dry_run,
    running_dispatch_updated_is_an_update_and_delete_stops,
    inactive_stops_and_active_starts_again,
    endless_runs_until_deleted,
    endless_changed_to_an_elapsed_duration_stops_at_once,
    endless_changed_to_a_longer_duration_stops_at_the_new_end,
    ended_before_the_actor_process_started_is_never_started,
    created_for_later_starts_on_time,
    overlapping_merge_by_type_one_actor_stops_at_the_later_end,
    back_to_back_merge_by_type_has_no_stop_in_between,
    merge_by_type_target_one_actor_per_target,
    no_strategy_one_actor_per_dispatch,
    dry_run_and_real_never_share_an_actor,
    stopping_one_leaves_another_types_and_targets_actor_running,
    failing_factory_starts_after_two_retry_intervals,
    reconnect_after_a_start_a_stop_and_a_whole_run_were_missed,
    lifecycle_and_running_state_receivers,
]


async def test_frequenz_dispatch_behaviours_through_the_bridge(site: Site) -> None:
    """Every scenario above, side by side on one bridge; all failures are reported."""
    results = await asyncio.gather(
        *(asyncio.wait_for(scenario(site), 40) for scenario in SCENARIOS),
        return_exceptions=True,
    )
    failures = [
        f"--- {scenario.__name__}:\n" + "".join(traceback.format_exception(result))
        for scenario, result in zip(SCENARIOS, results, strict=True)
        if isinstance(result, BaseException)
    ]
    assert not failures, "\n".join(failures)


async def test_bridge_killed_while_an_actor_runs_stops_it_at_its_until(site: Site) -> None:
    async with site.managed("E2E_KILLED") as log:
        d = await site.create("E2E_KILLED", start_in=None, duration=4)
        await log.wait_count("start", 1)
        site.bridge.kill9()
        stop = await log.wait_count("stop", 1, within=10)
        assert_near(stop.wall, end_of(d), "stop at until without the bridge")
        assert stop.msg is not None and "no live view" in stop.msg


async def test_broker_killed_and_restarted_no_double_start_no_missed_start(site: Site) -> None:
    async with site.managed("E2E_BROKER") as log:
        steady = await site.create("E2E_BROKER", start_in=None, duration=60)
        await log.wait_count("start", 1)
        await asyncio.to_thread(site.broker.kill9)
        # Created while the broker is down: the bridge publishes it once it is back.
        during = await site.create("E2E_BROKER", start_in=None, duration=60)
        await asyncio.to_thread(site.broker.start)
        await log.wait_count("start", 2, within=20)
        await sleep_until(utcnow() + timedelta(seconds=1))
        assert [r.dispatch_id for r in log.of("start")] == [int(steady.id), int(during.id)]
        assert log.of("stop") == []


async def test_the_documented_example_runs(
    site: Site, process_factory: ProcessFactory, tmp_path: Path
) -> None:
    readme_example = first_python_block(README)
    assert readme_example == first_python_block(SDK_DOC), "README and docs/actor-sdk.md differ"
    example = tmp_path / "example.py"
    example.write_text(readme_example)
    process = process_factory(
        [sys.executable, str(example)],
        name="example",
        extra_env={
            "MQTT_URL": f"mqtt://{site.broker.host}:{site.broker.port}",
            "MQTT_USERNAME": site.broker.username("actor") or "",
            "MQTT_PASSWORD": site.broker.actor_password or "",
        },
    )
    d = await site.create("EXAMPLE_TYPE", start_in=1.5, duration=30, payload={"power_w": 10})
    await asyncio.to_thread(process.wait_for_output, r"start: \{'power_w': 10(\.0)?\} on \[1\]", 15)
    await site.update(d, payload={"power_w": 20})
    await asyncio.to_thread(process.wait_for_output, r"update: \{'power_w': 20(\.0)?\}", 10)
    process.signal(signal.SIGINT)
    # The stop of Ctrl-C, not the dispatch's own end 30 s after its start.
    await asyncio.to_thread(process.wait_for_output, r"stop: Dispatcher stopped", 15)
    # Ctrl-C is the documented way to stop it: a clean exit, no traceback of any kind.
    code = await asyncio.to_thread(process.wait, 10)
    output = process.program_output()
    assert code == 0, f"exit code {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
