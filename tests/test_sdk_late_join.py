"""Late join: an SDK started in the middle of a run starts the actor for the remainder.

It never replays a run that ended before it started, and `Dispatch.missed_runs`
tells an actor what it missed (frequenz-dispatch's name and meaning).
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule
from frequenz.client.dispatch.types import Dispatch as ClientDispatch
from frequenz.client.dispatch.types import TargetIds
from frequenz.dispatch import Dispatch as ReferenceDispatch

from actor_sdk import Dispatch, wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from testkit.broker import Broker
from testkit.processes import ProcessFactory
from tests.test_sdk_actor_status import MICROGRID, actor_host, needs_mosquitto_clients, status_when

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def client_dispatch(
    *,
    start: datetime = T0,
    duration: timedelta | None = timedelta(seconds=30),
    recurrence: RecurrenceRule | None = None,
) -> ClientDispatch:
    return ClientDispatch(
        id=1,  # type: ignore[arg-type]
        type="T",
        start_time=start,
        duration=duration,
        target=TargetIds(1),
        active=True,
        dry_run=False,
        payload={},
        recurrence=recurrence or RecurrenceRule(),
        create_time=T0,
        update_time=T0,
        end_time=None,
    )


def dispatch(
    *,
    start: datetime = T0,
    duration: timedelta | None = timedelta(seconds=30),
    recurrence: RecurrenceRule | None = None,
) -> Dispatch:
    return Dispatch(client_dispatch(start=start, duration=duration, recurrence=recurrence))


MINUTELY = RecurrenceRule(frequency=Frequency.MINUTELY, interval=1)


# --- missed_runs -----------------------------------------------------------------------


def test_a_one_off_run_started_in_the_window_is_missed_once() -> None:
    one = dispatch()
    assert list(one.missed_runs(T0 - timedelta(hours=1), now=T0 + timedelta(hours=1))) == [T0]
    # `since` is included, now is not; a start after now or before `since` is not missed.
    assert list(one.missed_runs(T0, now=T0 + timedelta(seconds=1))) == [T0]
    assert list(one.missed_runs(T0 - timedelta(hours=1), now=T0)) == []
    assert list(one.missed_runs(T0 + timedelta(seconds=1), now=T0 + timedelta(hours=1))) == []


def test_every_recurring_start_in_the_window_is_missed_in_order() -> None:
    every_minute = dispatch(recurrence=MINUTELY)
    missed = list(
        every_minute.missed_runs(T0 + timedelta(seconds=10), now=T0 + timedelta(minutes=4))
    )
    assert missed == [T0 + timedelta(minutes=n) for n in (1, 2, 3)]
    limited = dispatch(
        recurrence=RecurrenceRule(
            frequency=Frequency.MINUTELY, interval=2, end_criteria=EndCriteria(count=3)
        )
    )
    assert list(limited.missed_runs(T0, now=T0 + timedelta(hours=1))) == [
        T0,
        T0 + timedelta(minutes=2),
        T0 + timedelta(minutes=4),
    ]


def test_an_endless_dispatch_has_one_start_like_the_reference() -> None:
    endless = dispatch(duration=None, recurrence=MINUTELY)
    assert list(endless.missed_runs(T0 - timedelta(minutes=1), now=T0 + timedelta(hours=1))) == [T0]


def test_the_default_now_is_the_local_clock() -> None:
    now = datetime.now(UTC)
    every_minute = dispatch(start=now - timedelta(minutes=2, seconds=30), recurrence=MINUTELY)
    assert len(list(every_minute.missed_runs(now - timedelta(minutes=10)))) == 3
    assert list(dispatch(start=now + timedelta(minutes=1)).missed_runs(now)) == []


@pytest.mark.parametrize(
    ("recurrence", "since"),
    [
        (RecurrenceRule(), T0 - timedelta(hours=1)),
        (MINUTELY, T0 + timedelta(seconds=10)),
        (RecurrenceRule(frequency=Frequency.HOURLY, interval=3), T0 - timedelta(days=1)),
    ],
)
def test_the_first_missed_run_is_the_reference_libraries(
    recurrence: RecurrenceRule, since: datetime
) -> None:
    # frequenz-dispatch 1.0.4 yields its first missed start again and again (it
    # walks on from `since = next_run` with an inclusive `next_run_after`), so only
    # its first answer can be compared; ours goes on to the next start.
    client = client_dispatch(start=datetime.now(UTC) - timedelta(hours=5), recurrence=recurrence)
    ours, reference = Dispatch(client), ReferenceDispatch(client)
    since = ours.start_time + (since - T0)
    assert list(islice(reference.missed_runs(since), 3)) == [next(ours.missed_runs(since))] * 3


# --- end to end: an actor host that reboots mid-dispatch ---------------------------------

LATE_TYPE = "E2E_LATE_JOIN"


def starts(output: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2]) for m in re.finditer(r"^start (\d+) until (\S+ \S+)$", output, re.M)]


@needs_mosquitto_clients
async def test_an_actor_host_restarted_mid_dispatch_runs_the_remainder_and_replays_nothing(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    process_factory: ProcessFactory,
    tmp_path: Path,
) -> None:
    bridge_factory(api_server, mqtt_broker, (MICROGRID,), extra_args=["--status-interval", "1"])
    topic = wire.actor_status_topic(MICROGRID, "edge-9")
    host = actor_host(
        process_factory, mqtt_broker, tmp_path, actor_id="edge-9", dispatch_type=LATE_TYPE
    )
    async with api_server.client() as client:

        async def create(duration: float) -> ClientDispatch:
            return await client.create(
                microgrid_id=MicrogridId(MICROGRID),
                type=LATE_TYPE,
                start_time="NOW",
                duration=timedelta(seconds=duration),
                target=TargetIds(1),
                payload={},
            )

        long_run = await create(30)
        await asyncio.to_thread(host.wait_for_output, rf"(?m)^start {int(long_run.id)} ", 15)
        assert long_run.duration is not None
        end = long_run.start_time + long_run.duration
        await asyncio.to_thread(host.kill9)
        # While the host is down, a short run starts and ends.
        short_run = await create(1)
    assert short_run.duration is not None
    short_end = short_run.start_time + short_run.duration
    await status_when(mqtt_broker, topic, lambda s: s.state == "offline")
    await asyncio.sleep(max(0.0, (short_end - datetime.now(UTC)).total_seconds()) + 0.3)

    restarted_at = datetime.now(UTC)
    host.start()
    running = await status_when(
        mqtt_broker, topic, lambda s: s.state == "running" and s.since >= restarted_at
    )
    assert running.types[LATE_TYPE].dispatches == (int(long_run.id),)
    # Python start-up, connect, retained sync, then the bridge's next live status
    # (every second here; 5 s by default): no other wait.
    late_by = (running.since - restarted_at).total_seconds()
    assert late_by < 5, late_by
    # The same run goes on to its own end, not for a new duration from the restart.
    assert starts(host.program_output()) == [(int(long_run.id), str(end))] * 2
    assert f"start {int(short_run.id)} " not in host.program_output()
