"""Invalid requests get the right status code, change nothing, and the server keeps serving.

Raw gRPC requests (signed like the real client) reach the server with values
the client library would refuse to send.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from testkit.api_server import ApiServerFactory, ApiServerHandle, raw_stub, signed_metadata

Stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
_microgrids = itertools.count(2001)
Rule = pb.RecurrenceRule


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def data(**fields: Any) -> pb.DispatchData:
    defaults: dict[str, Any] = {
        "type": "VALID",
        "start_time": timestamp(datetime.now(UTC) + timedelta(minutes=10)),
        "duration": 600,
        "target": pb.TargetComponents(component_ids=pb.TargetComponents.IdSet(ids=[1])),
        "is_active": True,
    }
    defaults.update(fields)
    return pb.DispatchData(**defaults)


def nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    assert isinstance(value, dict)
    return value


def struct(value: dict[str, Any]) -> Struct:
    result = Struct()
    result.update(value)
    return result


@pytest.fixture
async def stub(api_server_module: ApiServerHandle) -> AsyncIterator[Stub]:
    async with raw_stub(api_server_module) as connected:
        yield connected


async def create(
    stub: Stub, dispatch: pb.DispatchData, microgrid: int, **extra: Any
) -> pb.Dispatch:
    response = await stub.CreateMicrogridDispatch(
        pb.CreateMicrogridDispatchRequest(microgrid_id=microgrid, dispatch_data=dispatch, **extra),
        metadata=signed_metadata("CreateMicrogridDispatch"),
    )
    result: pb.Dispatch = response.dispatch
    return result


async def expect(code: grpc.StatusCode, call: Any, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == code, error.value.details()
    details = error.value.details() or ""
    for word in words:
        assert word in details, details


async def count(stub: Stub, microgrid: int) -> int:
    response = await stub.ListMicrogridDispatches(
        pb.ListMicrogridDispatchesRequest(microgrid_id=microgrid),
        metadata=signed_metadata("ListMicrogridDispatches"),
    )
    total: int = response.pagination_info.total_items
    return total


INVALID_CREATES: list[tuple[str, pb.DispatchData, tuple[str, ...]]] = [
    ("empty type", data(type=""), ("type must not be empty",)),
    ("blank type", data(type="   "), ("type must not be empty",)),
    ("no target", data(target=None), ("target is required",)),
    (
        "interval 0 with a frequency",
        data(recurrence=Rule(freq=Rule.FREQUENCY_DAILY, interval=0)),
        ("interval 0",),
    ),
    (
        "unspecified frequency with other fields",
        data(recurrence=Rule(interval=2, byhours=[5])),
        ("UNSPECIFIED",),
    ),
    (
        "hour out of range",
        data(recurrence=Rule(freq=Rule.FREQUENCY_DAILY, interval=1, byhours=[24])),
        ("byhours",),
    ),
    (
        "count out of range",
        data(
            recurrence=Rule(
                freq=Rule.FREQUENCY_DAILY, interval=1, end_criteria=Rule.EndCriteria(count=0)
            )
        ),
        ("count",),
    ),
    (
        "monthdays with weekly",
        data(recurrence=Rule(freq=Rule.FREQUENCY_WEEKLY, interval=1, bymonthdays=[1])),
        ("WEEKLY",),
    ),
    (
        "rule that never occurs",
        data(
            # Starts at midnight: an HOURLY interval of 2 reaches even hours only.
            start_time=timestamp(
                datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
                + timedelta(days=2)
            ),
            recurrence=Rule(freq=Rule.FREQUENCY_HOURLY, interval=2, byhours=[1, 3, 5]),
        ),
        ("never",),
    ),
    ("payload too large", data(payload=struct({"x": "a" * 60_000})), ("50 KB",)),
    ("payload too deep", data(payload=struct(nested(6))), ("6 levels",)),
]


@pytest.mark.parametrize(
    ("dispatch", "words"),
    [pytest.param(d, w, id=name) for name, d, w in INVALID_CREATES],
)
async def test_invalid_create_is_refused_and_stores_nothing(
    stub: Stub, dispatch: pb.DispatchData, words: tuple[str, ...]
) -> None:
    microgrid = next(_microgrids)
    await expect(INVALID, create(stub, dispatch, microgrid), *words)
    assert await count(stub, microgrid) == 0
    # The server keeps serving.
    assert (await create(stub, data(), microgrid)).metadata.dispatch_id > 0


async def test_payload_at_the_limits_is_accepted(stub: Stub) -> None:
    microgrid = next(_microgrids)
    deep = await create(stub, data(payload=struct(nested(5))), microgrid)
    assert deep.data.payload == struct(nested(5))
    await create(stub, data(payload=struct({"x": "a" * 40_000})), microgrid)


async def test_unknown_dispatch_is_not_found(stub: Stub) -> None:
    microgrid = next(_microgrids)
    meta = signed_metadata
    await expect(
        NOT_FOUND,
        stub.GetMicrogridDispatch(
            pb.GetMicrogridDispatchRequest(microgrid_id=microgrid, dispatch_id=999_999),
            metadata=meta("GetMicrogridDispatch"),
        ),
        "999999",
    )
    await expect(
        NOT_FOUND,
        stub.DeleteMicrogridDispatch(
            pb.DeleteMicrogridDispatchRequest(microgrid_id=microgrid, dispatch_id=999_999),
            metadata=meta("DeleteMicrogridDispatch"),
        ),
    )
    await expect(
        NOT_FOUND,
        stub.UpdateMicrogridDispatch(
            pb.UpdateMicrogridDispatchRequest(
                microgrid_id=microgrid,
                dispatch_id=999_999,
                update_mask=FieldMask(paths=["is_active"]),
            ),
            metadata=meta("UpdateMicrogridDispatch"),
        ),
    )


async def test_microgrid_zero_is_invalid(stub: Stub) -> None:
    await expect(INVALID, create(stub, data(), 0), "microgrid_id")


def update(stub: Stub, microgrid: int, dispatch_id: int, paths: list[str], **fields: Any) -> Any:
    return stub.UpdateMicrogridDispatch(
        pb.UpdateMicrogridDispatchRequest(
            microgrid_id=microgrid,
            dispatch_id=dispatch_id,
            update_mask=FieldMask(paths=paths),
            update=pb.UpdateMicrogridDispatchRequest.DispatchUpdate(**fields),
        ),
        metadata=signed_metadata("UpdateMicrogridDispatch"),
    )


async def test_invalid_updates_are_refused_and_change_nothing(stub: Stub) -> None:
    microgrid = next(_microgrids)
    stored = await create(stub, data(), microgrid)
    dispatch_id = stored.metadata.dispatch_id
    RuleUpdate = pb.UpdateMicrogridDispatchRequest.DispatchUpdate.RecurrenceRuleUpdate
    await expect(INVALID, update(stub, microgrid, dispatch_id, ["colour"]), "unknown")
    await expect(INVALID, update(stub, microgrid, dispatch_id, ["recurrence.colour"]), "unknown")
    await expect(INVALID, update(stub, microgrid, dispatch_id, ["type"]), "cannot be updated")
    await expect(INVALID, update(stub, microgrid, dispatch_id, []), "empty")
    await expect(
        INVALID,
        update(
            stub,
            microgrid,
            dispatch_id,
            ["recurrence.freq"],
            recurrence=RuleUpdate(freq=Rule.FREQUENCY_DAILY),
        ),
        "interval 0",
    )
    await expect(
        INVALID,
        update(
            stub,
            microgrid,
            dispatch_id,
            ["payload", "is_active"],
            payload=struct(nested(7)),
            is_active=False,
        ),
        "levels",
    )
    response = await stub.GetMicrogridDispatch(
        pb.GetMicrogridDispatchRequest(microgrid_id=microgrid, dispatch_id=dispatch_id),
        metadata=signed_metadata("GetMicrogridDispatch"),
    )
    assert response.dispatch == stored
    # A valid update still works afterwards.
    updated = await update(stub, microgrid, dispatch_id, ["is_active"], is_active=False)
    assert not updated.dispatch.data.is_active


async def test_bad_list_requests_are_invalid(stub: Stub) -> None:
    microgrid = next(_microgrids)
    await expect(
        INVALID,
        stub.ListMicrogridDispatches(
            pb.ListMicrogridDispatchesRequest(
                microgrid_id=microgrid, pagination_params=PaginationParams(page_token="garbage!")
            ),
            metadata=signed_metadata("ListMicrogridDispatches"),
        ),
        "page_token",
    )


async def test_past_start_is_refused_without_the_flag(api_server_factory: ApiServerFactory) -> None:
    server = api_server_factory(allow_past_start=False, extra_args=["--microgrid-id", "1,2"])
    async with raw_stub(server) as stub:
        past = data(start_time=timestamp(datetime.now(UTC) - timedelta(minutes=5)))
        await expect(INVALID, create(stub, past, 1), "in the past", "--allow-past-start")
        # Within the tolerance (the client rounds to the second) and "now" are fine.
        await create(stub, data(start_time=timestamp(datetime.now(UTC) - timedelta(seconds=1))), 1)
        await create(stub, data(start_time=None), 1, start_immediately=True)
        stored = await create(stub, data(), 2)
        await expect(
            INVALID,
            update(
                stub,
                2,
                stored.metadata.dispatch_id,
                ["start_time"],
                start_time=timestamp(datetime.now(UTC) - timedelta(hours=1)),
            ),
            "in the past",
        )
        # Only the configured microgrids exist.
        await expect(NOT_FOUND, create(stub, data(), 3), "microgrid 3")
        assert await count(stub, 1) == 2
