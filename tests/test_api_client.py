"""The local Dispatch API server through the real `DispatchApiClient`: create to delete.

One `dispatch-bridge api` subprocess serves the module; each test works in a
microgrid of its own, so tests never see each other's dispatches. What is stored
comes back unchanged, ids are never reused, an update changes only its fields,
and dispatches survive a restart and a kill -9 (a server of its own). Listing,
filters, pages and streams: `tests/test_api_client_list_stream.py`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule, Weekday
from frequenz.client.dispatch.types import (
    TargetCategories,
    TargetIds,
)

from bridge.api import create_dispatch
from testkit.api_server import ApiServerHandle
from tests.fixtures.api_server import list_all, new_microgrid, soon


async def test_create_then_get_returns_what_was_stored(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    start = soon(10)
    before = datetime.now(UTC)
    created = await client.create(
        microgrid,
        "SET_POWER",
        start,
        timedelta(minutes=15),
        TargetIds(7, 8),
        dry_run=True,
        payload={"power_w": 5000, "limits": {"soc": [20, 80]}},
    )
    fetched = await client.get(microgrid_id=microgrid, dispatch_id=created.id)
    assert fetched == created
    assert fetched.type == "SET_POWER"
    assert fetched.start_time == start
    assert fetched.duration == timedelta(minutes=15)
    assert fetched.target == TargetIds(7, 8)
    assert fetched.active and fetched.dry_run
    assert fetched.payload == {"power_w": 5000, "limits": {"soc": [20, 80]}}
    assert fetched.end_time == start + timedelta(minutes=15)
    # The server sets create and update time itself.
    assert before - timedelta(seconds=2) <= fetched.create_time <= datetime.now(UTC)
    assert fetched.update_time == fetched.create_time


async def test_create_with_category_target_and_recurrence(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    start = soon(5)
    rule = RecurrenceRule(
        frequency=Frequency.DAILY,
        interval=1,
        end_criteria=EndCriteria(count=3),
        byweekdays=[Weekday.MONDAY, Weekday.FRIDAY],
    )
    created = await client.create(
        microgrid,
        "CHARGE",
        start,
        timedelta(hours=1),
        TargetCategories(ElectricalComponentCategory.BATTERY),
        recurrence=rule,
    )
    fetched = await client.get(microgrid_id=microgrid, dispatch_id=created.id)
    assert fetched.recurrence == rule
    assert fetched.target == TargetCategories(ElectricalComponentCategory.BATTERY)
    assert fetched.end_time is not None and fetched.end_time > start + timedelta(days=2)


async def test_create_now_starts_at_the_server_clock(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    before = datetime.now(UTC)
    created = await client.create(microgrid, "NOW_TYPE", "NOW", None, TargetIds(1))
    assert (
        before - timedelta(seconds=2)
        <= created.start_time
        <= datetime.now(UTC) + timedelta(seconds=1)
    )
    assert created.duration is None and created.end_time is None


async def test_past_start_is_accepted_through_the_raw_helper(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    start = soon(-60)
    created = await create_dispatch(
        client,
        microgrid_id=int(microgrid),
        type="BACKFILL",
        start_time=start,
        duration=timedelta(hours=2),
        target=TargetIds(3),
    )
    assert created.start_time == start
    assert created.started_at(datetime.now(UTC))


async def test_ids_are_unique_and_never_reused(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    first = await client.create(microgrid, "A", soon(5), None, TargetIds(1))
    second = await client.create(microgrid, "A", soon(5), None, TargetIds(1))
    await client.delete(microgrid_id=microgrid, dispatch_id=second.id)
    third = await client.create(microgrid, "A", soon(5), None, TargetIds(1))
    assert int(first.id) < int(second.id) < int(third.id)


async def test_delete_removes_and_get_says_not_found(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    created = await client.create(microgrid, "GONE", soon(5), None, TargetIds(1))
    await client.delete(microgrid_id=microgrid, dispatch_id=created.id)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.get(microgrid_id=microgrid, dispatch_id=created.id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.delete(microgrid_id=microgrid, dispatch_id=created.id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await list_all(client, microgrid) == []


async def test_dispatch_of_another_microgrid_is_not_found(client: DispatchApiClient) -> None:
    microgrid, other = new_microgrid(), new_microgrid()
    created = await client.create(microgrid, "MINE", soon(5), None, TargetIds(1))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.get(microgrid_id=other, dispatch_id=created.id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await list_all(client, other) == []


async def test_update_changes_only_the_fields_in_the_mask(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    created = await client.create(
        microgrid, "UPD", soon(10), timedelta(minutes=5), TargetIds(1), payload={"a": 1}
    )
    new_start = soon(30)
    updated = await client.update(
        microgrid_id=microgrid,
        dispatch_id=created.id,
        new_fields={
            "start_time": new_start,
            "duration": timedelta(minutes=20),
            "active": False,
            "payload": {"b": {"c": 2}},
            "target": TargetIds(4, 5),
        },
    )
    assert updated.start_time == new_start
    assert updated.duration == timedelta(minutes=20)
    assert not updated.active
    assert updated.payload == {"b": {"c": 2}}
    assert updated.target == TargetIds(4, 5)
    assert updated.end_time == new_start + timedelta(minutes=20)
    assert updated.type == created.type and updated.dry_run == created.dry_run
    assert updated.create_time == created.create_time
    assert updated.update_time > created.update_time
    assert await client.get(microgrid_id=microgrid, dispatch_id=created.id) == updated

    only_active = await client.update(
        microgrid_id=microgrid, dispatch_id=created.id, new_fields={"active": True}
    )
    assert only_active.active
    assert only_active.payload == {"b": {"c": 2}} and only_active.start_time == new_start


async def test_update_duration_none_makes_it_endless(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    created = await client.create(microgrid, "UPD", soon(10), timedelta(minutes=5), TargetIds(1))
    updated = await client.update(
        microgrid_id=microgrid, dispatch_id=created.id, new_fields={"duration": None}
    )
    assert updated.duration is None and updated.end_time is None


async def test_update_recurrence_paths(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    start = soon(10)
    created = await client.create(microgrid, "REC", start, timedelta(hours=1), TargetIds(1))
    assert created.recurrence == RecurrenceRule()

    made_recurring = await client.update(
        microgrid_id=microgrid,
        dispatch_id=created.id,
        new_fields={
            "recurrence.frequency": Frequency.DAILY,
            "recurrence.interval": 2,
            "recurrence.end_criteria": EndCriteria(count=3),
            "recurrence.byhours": [6, 18],
        },
    )
    assert made_recurring.recurrence == RecurrenceRule(
        frequency=Frequency.DAILY, interval=2, end_criteria=EndCriteria(count=3), byhours=[6, 18]
    )
    assert made_recurring.end_time is not None
    assert made_recurring.end_time > start + timedelta(days=1)

    interval_only = await client.update(
        microgrid_id=microgrid, dispatch_id=created.id, new_fields={"recurrence.interval": 1}
    )
    assert interval_only.recurrence == RecurrenceRule(
        frequency=Frequency.DAILY, interval=1, end_criteria=EndCriteria(count=3), byhours=[6, 18]
    )

    until = start + timedelta(days=10)
    new_end = await client.update(
        microgrid_id=microgrid,
        dispatch_id=created.id,
        new_fields={"recurrence.end_criteria": EndCriteria(until=until), "recurrence.byhours": []},
    )
    assert new_end.recurrence.end_criteria == EndCriteria(until=until)
    assert new_end.recurrence.byhours == []
    assert await client.get(microgrid_id=microgrid, dispatch_id=created.id) == new_end


async def test_dispatches_survive_restart_and_kill9(api_server: ApiServerHandle) -> None:
    microgrid = MicrogridId(1)
    async with api_server.client() as client:
        kept = await client.create(microgrid, "KEEP", soon(10), timedelta(minutes=5), TargetIds(1))
        dropped = await client.create(microgrid, "DROP", soon(10), None, TargetIds(1))
        await client.delete(microgrid_id=microgrid, dispatch_id=dropped.id)
        updated = await client.update(
            microgrid_id=microgrid, dispatch_id=kept.id, new_fields={"payload": {"v": 2}}
        )

    assert api_server.stop() == 0  # SIGTERM is a clean stop
    api_server.start()
    async with api_server.client() as client:
        assert await list_all(client, microgrid) == [updated]
        after_restart = await client.create(microgrid, "NEW", soon(10), None, TargetIds(1))
        assert int(after_restart.id) > int(dropped.id)

    api_server.kill9()
    api_server.start()
    async with api_server.client() as client:
        assert {int(d.id) for d in await list_all(client, microgrid)} == {
            int(kept.id),
            int(after_restart.id),
        }
        newest = await client.create(microgrid, "NEWEST", soon(10), None, TargetIds(1))
        assert int(newest.id) > int(after_restart.id)
