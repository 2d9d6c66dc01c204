"""Create a dispatch with any start time, past ones included.

`DispatchApiClient.create` refuses a start time in the past on the client side,
before sending anything. Demos, tests and back-fills need such dispatches (on a
server started with `--allow-past-start`), so this helper sends the raw
`CreateMicrogridDispatch` request through the client's own channel, with its
authentication and signing.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any, cast

from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch._internal_types import DispatchCreateRequest
from frequenz.client.dispatch.recurrence import RecurrenceRule
from frequenz.client.dispatch.types import Dispatch, TargetComponents

__all__ = ["create_dispatch"]


async def create_dispatch(
    client: DispatchApiClient,
    *,
    microgrid_id: int,
    type: str,
    start_time: datetime,
    duration: timedelta | None,
    target: TargetComponents,
    active: bool = True,
    dry_run: bool = False,
    payload: dict[str, Any] | None = None,
    recurrence: RecurrenceRule | None = None,
) -> Dispatch:
    """Create a dispatch without the client's check that it starts in the future.

    Args:
        client: A connected client (its key and signing secret are used).
        microgrid_id: The microgrid.
        type: The dispatch type.
        start_time: The start, timezone-aware; may lie in the past.
        duration: Its duration; None runs until changed.
        target: The target components.
        active: Whether it is active.
        dry_run: Whether it is a dry run.
        payload: The payload.
        recurrence: The recurrence rule.

    Returns:
        The dispatch as the server stored it.

    Raises:
        ValueError: `start_time` is naive.
    """
    if start_time.tzinfo is None or start_time.utcoffset() is None:
        raise ValueError("start_time must be timezone-aware")
    request = DispatchCreateRequest(
        microgrid_id=MicrogridId(microgrid_id),
        type=type,
        start_time=start_time,
        duration=duration,
        target=target,
        active=active,
        dry_run=dry_run,
        payload=payload or {},
        recurrence=recurrence,
    ).to_protobuf()
    response = await cast(
        Awaitable[pb.CreateMicrogridDispatchResponse],
        client.stub.CreateMicrogridDispatch(request, timeout=client.call_timeout.total_seconds()),
    )
    return Dispatch.from_protobuf(response.dispatch)
