"""The local Dispatch API server through the real `DispatchApiClient`, over a real socket.

One `dispatch-bridge api` subprocess serves the module; each test works in a
microgrid of its own, so tests never see each other's dispatches.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.common.v1alpha8.types.interval_pb2 import Interval
from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from frequenz.channels import Receiver
from frequenz.client.base.conversion import to_timestamp
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.common.streaming import Event
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule, Weekday
from frequenz.client.dispatch.types import (
    BatteryType,
    Dispatch,
    DispatchEvent,
    TargetCategories,
    TargetIds,
)

from bridge.api import create_dispatch
from testkit.api_server import ApiServerHandle, raw_stub, signed_metadata

_microgrids = itertools.count(1001)


def new_microgrid() -> MicrogridId:
    return MicrogridId(next(_microgrids))


def soon(minutes: float) -> datetime:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).replace(microsecond=0)


@pytest.fixture
async def client(api_server_module: ApiServerHandle) -> AsyncIterator[DispatchApiClient]:
    async with api_server_module.client() as connected:
        yield connected


async def list_all(
    client: DispatchApiClient, microgrid: MicrogridId, **filters: object
) -> list[Dispatch]:
    found: list[Dispatch] = []
    async for page in client.list(microgrid, **filters):  # type: ignore[arg-type]
        found.extend(page)
    return found


async def ids(client: DispatchApiClient, microgrid: MicrogridId, **filters: object) -> set[int]:
    return {int(d.id) for d in await list_all(client, microgrid, **filters)}


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


@pytest.fixture
async def catalogue(client: DispatchApiClient) -> tuple[MicrogridId, dict[str, Dispatch]]:
    """Four dispatches that the filters tell apart."""
    microgrid = new_microgrid()
    made = {
        "a": await client.create(
            microgrid, "SET_POWER", soon(10), timedelta(minutes=5), TargetIds(1, 2)
        ),
        "b": await client.create(
            microgrid,
            "SET_POWER_LIMIT",
            soon(20),
            timedelta(minutes=10),
            TargetIds(3),
            active=False,
        ),
        "c": await client.create(
            microgrid,
            "CHARGE",
            soon(30),
            None,
            TargetCategories(ElectricalComponentCategory.BATTERY),
            dry_run=True,
        ),
        "d": await client.create(
            microgrid,
            "CHARGE",
            soon(40),
            timedelta(minutes=10),
            TargetIds(2, 9),
            recurrence=RecurrenceRule(
                frequency=Frequency.DAILY, interval=1, end_criteria=EndCriteria(count=3)
            ),
        ),
    }
    return microgrid, made


def idset(made: dict[str, Dispatch], names: str) -> set[int]:
    return {int(made[name].id) for name in names}


async def test_list_filters_by_active_and_dry_run(
    client: DispatchApiClient, catalogue: tuple[MicrogridId, dict[str, Dispatch]]
) -> None:
    microgrid, made = catalogue
    assert await ids(client, microgrid) == idset(made, "abcd")
    assert await ids(client, microgrid, active=True) == idset(made, "acd")
    assert await ids(client, microgrid, active=False) == idset(made, "b")
    assert await ids(client, microgrid, dry_run=True) == idset(made, "c")
    assert await ids(client, microgrid, dry_run=False, active=True) == idset(made, "ad")


async def test_list_filters_by_target(
    client: DispatchApiClient, catalogue: tuple[MicrogridId, dict[str, Dispatch]]
) -> None:
    microgrid, made = catalogue
    assert await ids(client, microgrid, target_components=[TargetIds(2)]) == idset(made, "ad")
    assert await ids(client, microgrid, target_components=[TargetIds(3), TargetIds(9)]) == idset(
        made, "bd"
    )
    battery = TargetCategories(ElectricalComponentCategory.BATTERY)
    assert await ids(client, microgrid, target_components=[battery]) == idset(made, "c")
    assert await ids(client, microgrid, target_components=[TargetIds(42)]) == set()


async def test_list_filters_by_ids_and_queries(
    client: DispatchApiClient, catalogue: tuple[MicrogridId, dict[str, Dispatch]]
) -> None:
    microgrid, made = catalogue
    a, b, c = (int(made[n].id) for n in "abc")
    assert await ids(client, microgrid, dispatch_ids=[a, c]) == {a, c}
    assert await ids(client, microgrid, filter_queries=[f"#{b}"]) == {b}
    assert await ids(client, microgrid, filter_queries=["POWER"]) == idset(made, "ab")
    assert await ids(client, microgrid, filter_queries=["_LIMIT"]) == idset(made, "b")
    assert await ids(client, microgrid, filter_queries=[f"#{a}", "CHARGE"]) == idset(made, "acd")
    assert await ids(client, microgrid, filter_queries=["#not_an_id"]) == set()
    assert await ids(client, microgrid, filter_queries=["NOTHING"]) == set()
    assert await ids(client, microgrid, dispatch_ids=[a, b], filter_queries=["LIMIT"]) == {b}


async def test_list_filters_by_start_and_end_time(
    client: DispatchApiClient, catalogue: tuple[MicrogridId, dict[str, Dispatch]]
) -> None:
    microgrid, made = catalogue
    b_start = made["b"].start_time
    assert await ids(client, microgrid, start_from=b_start) == idset(made, "bcd")
    assert await ids(client, microgrid, start_to=b_start) == idset(made, "a")
    assert await ids(client, microgrid, start_from=b_start, start_to=made["d"].start_time) == idset(
        made, "bc"
    )
    # End times respect recurrence: d ends two days after its first run; c never ends.
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert await ids(client, microgrid, end_from=tomorrow) == idset(made, "cd")
    assert await ids(client, microgrid, end_to=tomorrow) == idset(made, "ab")
    assert await ids(
        client, microgrid, end_from=made["a"].end_time, end_to=made["b"].end_time
    ) == idset(made, "a")


async def test_list_pages_through_every_dispatch_once(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    created = [
        await client.create(microgrid, f"PAGE_{n}", soon(5 + n), None, TargetIds(n + 1))
        for n in range(7)
    ]
    pages: list[list[int]] = []
    async for page in client.list(microgrid, page_size=3):
        pages.append([int(d.id) for d in page])
    assert [len(p) for p in pages] == [3, 3, 1]
    seen = [i for page in pages for i in page]
    # Newest first, as the API's default order.
    assert seen == sorted((int(d.id) for d in created), reverse=True)


async def test_list_reports_total_items_after_filtering(
    api_server_module: ApiServerHandle, client: DispatchApiClient
) -> None:
    microgrid = new_microgrid()
    for n in range(5):
        await client.create(microgrid, "TOTAL", soon(5), None, TargetIds(1), active=n % 2 == 0)
    request = pb.ListMicrogridDispatchesRequest(
        microgrid_id=int(microgrid),
        filter=pb.DispatchFilter(is_active=True),
        pagination_params=PaginationParams(page_size=2),
        sort_options=pb.SortOptions(
            sort_field=pb.SORT_FIELD_CREATE_TIME, sort_order=pb.SORT_ORDER_ASCENDING
        ),
    )
    seen: list[int] = []
    async with raw_stub(api_server_module) as stub:
        while True:
            response = await stub.ListMicrogridDispatches(
                request, metadata=signed_metadata("ListMicrogridDispatches")
            )
            assert response.pagination_info.total_items == 3
            seen += [d.metadata.dispatch_id for d in response.dispatches]
            if not response.pagination_info.next_page_token:
                break
            request.pagination_params.CopyFrom(
                PaginationParams(page_token=response.pagination_info.next_page_token)
            )
    assert len(seen) == 3 and seen == sorted(seen)


async def test_pagination_is_stable_when_dispatches_are_added_between_pages(
    client: DispatchApiClient,
) -> None:
    microgrid = new_microgrid()
    created = [await client.create(microgrid, "ST", soon(5), None, TargetIds(1)) for _ in range(4)]
    seen: list[int] = []
    async for page in client.list(microgrid, page_size=2):
        seen += [int(d.id) for d in page]
        if len(seen) == 2:
            await client.create(microgrid, "ST", soon(5), None, TargetIds(1))
    # Keyset pages: the newcomer (newest) is before the cursor; nothing repeats or goes missing.
    assert seen == sorted((int(d.id) for d in created), reverse=True)


async def _next_event(receiver: Receiver[DispatchEvent], within: float = 10.0) -> DispatchEvent:
    return await asyncio.wait_for(receiver.receive(), within)


async def _wait_until_streaming(
    client: DispatchApiClient, microgrid: MicrogridId, receivers: list[Receiver[DispatchEvent]]
) -> None:
    """Create probe dispatches until every receiver has seen one (its stream is up).

    The client's stream gives no signal when the server has subscribed it.
    """
    pending = list(receivers)
    for _ in range(50):
        probe = await client.create(microgrid, "PROBE", soon(5), None, TargetIds(1))
        still: list[Receiver[DispatchEvent]] = []
        for receiver in pending:
            try:
                while True:
                    event = await _next_event(receiver, within=0.3)
                    if event.dispatch.id == probe.id:
                        break
            except TimeoutError:
                still.append(receiver)
        pending = still
        if not pending:
            break
    else:
        raise AssertionError("streams did not come up")
    # Later probes may still be queued in receivers that were up early: skip to a marker.
    marker = await client.create(microgrid, "MARKER", soon(5), None, TargetIds(1))
    for receiver in receivers:
        while (await _next_event(receiver)).dispatch.id != marker.id:
            pass


async def test_two_streams_see_every_change_in_order(api_server_module: ApiServerHandle) -> None:
    microgrid = new_microgrid()
    async with (
        api_server_module.client() as writer,
        api_server_module.client() as first,
        api_server_module.client() as second,
    ):
        receivers = [first.stream(microgrid), second.stream(microgrid)]
        await _wait_until_streaming(writer, microgrid, receivers)

        a = await writer.create(microgrid, "S", soon(5), None, TargetIds(1))
        b = await writer.create(microgrid, "S", soon(6), None, TargetIds(2))
        a2 = await writer.update(
            microgrid_id=microgrid, dispatch_id=a.id, new_fields={"active": False}
        )
        await writer.delete(microgrid_id=microgrid, dispatch_id=b.id)
        expected = [
            (Event.CREATED, a.id, True),
            (Event.CREATED, b.id, True),
            (Event.UPDATED, a.id, False),
            (Event.DELETED, b.id, True),
        ]
        for receiver in receivers:
            got = []
            for _ in expected:
                event = await _next_event(receiver)
                got.append((event.event, event.dispatch.id, event.dispatch.active))
            assert got == expected
        assert a2.update_time > a.update_time


async def test_stream_is_subscribed_when_initial_metadata_arrives(
    api_server_module: ApiServerHandle, client: DispatchApiClient
) -> None:
    microgrid, other = new_microgrid(), new_microgrid()
    async with raw_stub(api_server_module) as stub:
        call, other_call = (
            stub.StreamMicrogridDispatches(
                pb.StreamMicrogridDispatchesRequest(microgrid_id=int(m)),
                metadata=signed_metadata("StreamMicrogridDispatches"),
            )
            for m in (microgrid, other)
        )
        await asyncio.wait_for(call.initial_metadata(), 10)
        await asyncio.wait_for(other_call.initial_metadata(), 10)
        created = await client.create(microgrid, "FIRST", soon(5), None, TargetIds(1))
        created_other = await client.create(other, "OTHER", soon(5), None, TargetIds(1))
        message = await asyncio.wait_for(call.read(), 10)
        assert message.dispatch.metadata.dispatch_id == int(created.id)
        assert message.event == Event.CREATED.value
        # Each stream sees only its own microgrid.
        message = await asyncio.wait_for(other_call.read(), 10)
        assert message.dispatch.metadata.dispatch_id == int(created_other.id)
        call.cancel()
        other_call.cancel()


async def test_gone_stream_holds_nothing_up(
    api_server_module: ApiServerHandle, client: DispatchApiClient
) -> None:
    microgrid = new_microgrid()
    async with raw_stub(api_server_module) as stub:
        request = pb.StreamMicrogridDispatchesRequest(microgrid_id=int(microgrid))
        gone = stub.StreamMicrogridDispatches(
            request, metadata=signed_metadata("StreamMicrogridDispatches")
        )
        alive = stub.StreamMicrogridDispatches(
            request, metadata=signed_metadata("StreamMicrogridDispatches")
        )
        await asyncio.wait_for(gone.initial_metadata(), 10)
        await asyncio.wait_for(alive.initial_metadata(), 10)
        gone.cancel()
        created = [
            await client.create(microgrid, "AFTER", soon(5), None, TargetIds(1)) for _ in range(20)
        ]
        for dispatch in created:
            message = await asyncio.wait_for(alive.read(), 10)
            assert message.dispatch.metadata.dispatch_id == int(dispatch.id)
        alive.cancel()


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


async def test_list_raw_filters_recurring_update_time_and_sort(
    api_server_module: ApiServerHandle, catalogue: tuple[MicrogridId, dict[str, Dispatch]]
) -> None:
    microgrid, made = catalogue

    async def listed(**request: Any) -> list[int]:
        async with raw_stub(api_server_module) as stub:
            response = await stub.ListMicrogridDispatches(
                pb.ListMicrogridDispatchesRequest(microgrid_id=int(microgrid), **request),
                metadata=signed_metadata("ListMicrogridDispatches"),
            )
        return [d.metadata.dispatch_id for d in response.dispatches]

    by_start = pb.SortOptions(
        sort_field=pb.SORT_FIELD_START_TIME, sort_order=pb.SORT_ORDER_ASCENDING
    )
    assert await listed(sort_options=by_start) == [int(made[n].id) for n in "abcd"]
    assert set(await listed(filter=pb.DispatchFilter(is_recurring=True))) == idset(made, "d")
    assert set(await listed(filter=pb.DispatchFilter(is_recurring=False))) == idset(made, "abc")
    since_d = Interval(start_time=to_timestamp(made["d"].update_time))
    assert await listed(filter=pb.DispatchFilter(update_time_interval=since_d)) == [
        int(made["d"].id)
    ]


async def test_category_without_type_matches_every_type(client: DispatchApiClient) -> None:
    microgrid = new_microgrid()
    any_battery = await client.create(
        microgrid, "ANY", soon(5), None, TargetCategories(ElectricalComponentCategory.BATTERY)
    )
    li_ion = await client.create(
        microgrid, "LI", soon(5), None, TargetCategories(BatteryType.LI_ION)
    )
    await client.create(
        microgrid, "INV", soon(5), None, TargetCategories(ElectricalComponentCategory.INVERTER)
    )
    battery = TargetCategories(ElectricalComponentCategory.BATTERY)
    assert await ids(client, microgrid, target_components=[battery]) == {
        int(any_battery.id),
        int(li_ion.id),
    }
    only_li_ion = TargetCategories(BatteryType.LI_ION)
    assert await ids(client, microgrid, target_components=[only_li_ion]) == {
        int(any_battery.id),
        int(li_ion.id),
    }
    sodium = TargetCategories(BatteryType.NA_ION)
    assert await ids(client, microgrid, target_components=[sodium]) == {int(any_battery.id)}
