"""The local Dispatch API server through the real `DispatchApiClient`: list and stream.

One `dispatch-bridge api` subprocess serves the module; each test works in a
microgrid of its own, so tests never see each other's dispatches. Every list
filter, pagination (totals, stable keyset pages) and the change streams (every
change in order, subscribed once the initial metadata arrives, a gone stream
holds nothing up). Creating, updating and deleting: `tests/test_api_client.py`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

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
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule
from frequenz.client.dispatch.types import (
    BatteryType,
    Dispatch,
    DispatchEvent,
    TargetCategories,
    TargetIds,
)

from testkit.api_server import ApiServerHandle, raw_stub, signed_metadata
from tests.fixtures.api_server import list_all, new_microgrid, soon


async def ids(client: DispatchApiClient, microgrid: MicrogridId, **filters: object) -> set[int]:
    return {int(d.id) for d in await list_all(client, microgrid, **filters)}


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
