"""The `MicrogridDispatchService` of the local Dispatch API server.

Each RPC authenticates the request (`bridge.api.auth`), validates it
(`bridge.api.validation`), changes the SQLite store in one transaction
(`bridge.api.store`) and, after the commit, offers the change to the open
streams of the microgrid (`bridge.api.streams`). The store and the stream
fan-out run synchronously on the event loop, with no `await` between commit
and fan-out, so every stream sees the changes in commit order.

Status codes: `UNAUTHENTICATED` for missing or wrong credentials,
`INVALID_ARGUMENT` for an invalid request, `NOT_FOUND` for an unknown dispatch
(or a microgrid outside the configured ones), `RESOURCE_EXHAUSTED` for a
stream that fell too far behind, `INTERNAL` for a failure of the server.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from frequenz.api.common.v1alpha8.pagination.pagination_info_pb2 import PaginationInfo
from frequenz.api.common.v1alpha8.streaming import event_pb2
from frequenz.api.common.v1alpha8.types.interval_pb2 import Interval
from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.client.dispatch.types import Dispatch as ClientDispatch

from bridge import convert, schedule
from bridge.api.auth import Authenticator, AuthError
from bridge.api.store import DispatchStore, PageKey, SqlFilter, TargetWanted
from bridge.api.streams import Closing, Overflowed, StreamHub
from bridge.api.validation import InvalidRequest, apply_update, validate_data

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "DispatchServicer", "compute_end_time"]

_logger = logging.getLogger("bridge.api")

DEFAULT_PAGE_SIZE = 1000
"""Page size of a list request that gives none."""

MAX_PAGE_SIZE = 10_000
"""Larger page sizes are reduced to this."""

_TOKEN_PREFIX = "p1"

_R = TypeVar("_R")


class _Refused(Exception):
    """A request is refused with a status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def compute_end_time(dispatch: pb.Dispatch) -> datetime | None:
    """Check a dispatch's rule and compute when it ends, with the shared schedule core.

    Args:
        dispatch: The dispatch (its metadata's times need not be final).

    Returns:
        The end of its last run, or None if it has no end.

    Raises:
        ValueError: The dispatch cannot be converted, or its recurrence rule
            can never produce an occurrence (`schedule.InvalidRecurrence`).
    """
    converted = convert.from_client(ClientDispatch.from_protobuf(dispatch))
    schedule.validate(converted)
    return schedule.end_time(converted)


def _round_to_second(moment: datetime) -> datetime:
    # The real server rounds start times to the nearest second; so does the client.
    return (moment + timedelta(microseconds=500_000)).replace(microsecond=0)


@dataclass(frozen=True)
class _PageToken:
    sort_field: int
    descending: bool
    page_size: int
    key: PageKey

    def encode(self) -> str:
        text = (
            f"{_TOKEN_PREFIX}:{self.sort_field}:{int(self.descending)}:{self.page_size}:"
            f"{self.key.value}:{self.key.id}"
        )
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> _PageToken:
        try:
            text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            prefix, field, desc, size, value, ident = text.split(":")
            if prefix != _TOKEN_PREFIX:
                raise ValueError(prefix)
            return cls(int(field), desc == "1", int(size), PageKey(int(value), int(ident)))
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "page_token is not a token this server issued",
            ) from None


class DispatchServicer(dispatch_pb2_grpc.MicrogridDispatchServiceServicer):
    """The Dispatch API over a `DispatchStore`."""

    def __init__(
        self,
        store: DispatchStore,
        authenticator: Authenticator,
        hub: StreamHub,
        *,
        allow_past_start: bool = False,
        microgrids: Collection[int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the servicer.

        Args:
            store: Where dispatches live.
            authenticator: Checks each request's credentials.
            hub: The open streams.
            allow_past_start: Accept start times in the past.
            microgrids: The microgrids this server knows; None accepts every
                positive id.
            clock: Unix seconds now (replaceable in tests).
        """
        self._store = store
        self._auth = authenticator
        self._hub = hub
        self._allow_past_start = allow_past_start
        self._microgrids = None if microgrids is None else frozenset(microgrids)
        self._clock = clock

    # --- plumbing -------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> None:
        try:
            self._auth.check(context.invocation_metadata() or (), method, self._clock())
        except AuthError as error:
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if error.overloaded
                else grpc.StatusCode.UNAUTHENTICATED
            )
            raise _Refused(code, str(error)) from None

    def _microgrid(self, microgrid_id: int) -> int:
        if microgrid_id <= 0:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"microgrid_id must be a positive integer, got {microgrid_id}",
            )
        if self._microgrids is not None and microgrid_id not in self._microgrids:
            raise _Refused(
                grpc.StatusCode.NOT_FOUND, f"microgrid {microgrid_id} is not known to this server"
            )
        return microgrid_id

    async def _unary(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        request: Any,
        handler: Callable[[Any], _R],
    ) -> _R:
        started = time.perf_counter()
        microgrid_id = getattr(request, "microgrid_id", None)
        try:
            self._authenticate(context, method)
            result = handler(request)
        except _Refused as refusal:
            _logger.warning(
                "%s microgrid=%s refused %s: %s (peer %s)",
                method,
                microgrid_id,
                refusal.code.name,
                refusal.message,
                context.peer(),
            )
            await context.abort(refusal.code, refusal.message)
            raise  # unreachable: abort raises
        except Exception:
            _logger.exception("%s microgrid=%s failed", method, microgrid_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{method} failed inside the server; see its log"
            )
            raise
        _logger.debug(
            "%s microgrid=%s ok (%.1f ms)",
            method,
            microgrid_id,
            (time.perf_counter() - started) * 1000,
        )
        return result

    def _end_time(self, dispatch_id: int, data: pb.DispatchData) -> datetime | None:
        try:
            return compute_end_time(
                pb.Dispatch(metadata=pb.DispatchMetadata(dispatch_id=dispatch_id), data=data)
            )
        except ValueError as error:
            message = str(error).removeprefix(f"dispatch {dispatch_id}: ")
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"invalid dispatch: {message}"
            ) from None

    def _not_found(self, microgrid_id: int, dispatch_id: int) -> _Refused:
        return _Refused(
            grpc.StatusCode.NOT_FOUND,
            f"dispatch {dispatch_id} does not exist in microgrid {microgrid_id}",
        )

    # --- RPCs -----------------------------------------------------------------

    async def CreateMicrogridDispatch(
        self, request: pb.CreateMicrogridDispatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateMicrogridDispatchResponse:
        """Create a dispatch (see the API).

        Args:
            request: The request.
            context: The call.

        Returns:
            The created dispatch.
        """
        return await self._unary(context, "CreateMicrogridDispatch", request, self._create)

    def _create(
        self, request: pb.CreateMicrogridDispatchRequest
    ) -> pb.CreateMicrogridDispatchResponse:
        microgrid_id = self._microgrid(request.microgrid_id)
        now = self._now()
        data = pb.DispatchData()
        data.CopyFrom(request.dispatch_data)
        if request.start_immediately:
            data.start_time.FromDatetime(_round_to_second(now))
        elif data.HasField("start_time"):
            data.start_time.FromDatetime(_round_to_second(data.start_time.ToDatetime(tzinfo=UTC)))
        try:
            validate_data(
                data,
                now=now,
                check_start=not request.start_immediately,
                allow_past_start=self._allow_past_start,
            )
        except InvalidRequest as error:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        end_time = self._end_time(0, data)
        dispatch = self._store.create(microgrid_id, data, now, end_time)
        self._hub.publish(microgrid_id, event_pb2.EVENT_CREATED, dispatch)
        _logger.debug(
            "created dispatch %d (%s) in microgrid %d",
            dispatch.metadata.dispatch_id,
            data.type,
            microgrid_id,
        )
        return pb.CreateMicrogridDispatchResponse(dispatch=dispatch)

    async def UpdateMicrogridDispatch(
        self, request: pb.UpdateMicrogridDispatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateMicrogridDispatchResponse:
        """Update the fields of a dispatch named by the field mask (see the API).

        Args:
            request: The request.
            context: The call.

        Returns:
            The updated dispatch.
        """
        return await self._unary(context, "UpdateMicrogridDispatch", request, self._update)

    def _update(
        self, request: pb.UpdateMicrogridDispatchRequest
    ) -> pb.UpdateMicrogridDispatchResponse:
        microgrid_id = self._microgrid(request.microgrid_id)
        dispatch_id = request.dispatch_id
        current = self._store.get(microgrid_id, dispatch_id)
        if current is None:
            raise self._not_found(microgrid_id, dispatch_id)
        now = self._now()
        paths = list(request.update_mask.paths)
        try:
            data = apply_update(current.data, request.update, paths)
            if "start_time" in paths and data.HasField("start_time"):
                data.start_time.FromDatetime(
                    _round_to_second(data.start_time.ToDatetime(tzinfo=UTC))
                )
            validate_data(
                data,
                now=now,
                check_start="start_time" in paths,
                allow_past_start=self._allow_past_start,
            )
        except InvalidRequest as error:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        end_time = self._end_time(dispatch_id, data)
        dispatch = self._store.replace(microgrid_id, dispatch_id, data, now, end_time)
        if dispatch is None:  # deleted meanwhile; cannot happen on one event loop
            raise self._not_found(microgrid_id, dispatch_id)
        self._hub.publish(microgrid_id, event_pb2.EVENT_UPDATED, dispatch)
        return pb.UpdateMicrogridDispatchResponse(dispatch=dispatch)

    async def GetMicrogridDispatch(
        self, request: pb.GetMicrogridDispatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMicrogridDispatchResponse:
        """Get one dispatch (see the API).

        Args:
            request: The request.
            context: The call.

        Returns:
            The dispatch.
        """
        return await self._unary(context, "GetMicrogridDispatch", request, self._get)

    def _get(self, request: pb.GetMicrogridDispatchRequest) -> pb.GetMicrogridDispatchResponse:
        microgrid_id = self._microgrid(request.microgrid_id)
        dispatch = self._store.get(microgrid_id, request.dispatch_id)
        if dispatch is None:
            raise self._not_found(microgrid_id, request.dispatch_id)
        return pb.GetMicrogridDispatchResponse(microgrid_id=microgrid_id, dispatch=dispatch)

    async def DeleteMicrogridDispatch(
        self, request: pb.DeleteMicrogridDispatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteMicrogridDispatchResponse:
        """Delete one dispatch (see the API).

        Args:
            request: The request.
            context: The call.

        Returns:
            The ids of the deleted dispatch.
        """
        return await self._unary(context, "DeleteMicrogridDispatch", request, self._delete)

    def _delete(
        self, request: pb.DeleteMicrogridDispatchRequest
    ) -> pb.DeleteMicrogridDispatchResponse:
        microgrid_id = self._microgrid(request.microgrid_id)
        dispatch = self._store.delete(microgrid_id, request.dispatch_id)
        if dispatch is None:
            raise self._not_found(microgrid_id, request.dispatch_id)
        # The event carries the dispatch as it was, update_time included, as the
        # real API does: readers must not ignore it as "not newer".
        self._hub.publish(microgrid_id, event_pb2.EVENT_DELETED, dispatch)
        return pb.DeleteMicrogridDispatchResponse(
            microgrid_id=microgrid_id, dispatch_id=request.dispatch_id
        )

    async def ListMicrogridDispatches(
        self, request: pb.ListMicrogridDispatchesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMicrogridDispatchesResponse:
        """List dispatches of a microgrid: filters, sort, pages (see the API).

        Args:
            request: The request.
            context: The call.

        Returns:
            One page of dispatches.
        """
        return await self._unary(context, "ListMicrogridDispatches", request, self._list)

    def _list(
        self, request: pb.ListMicrogridDispatchesRequest
    ) -> pb.ListMicrogridDispatchesResponse:
        microgrid_id = self._microgrid(request.microgrid_id)
        where = _sql_filter(request.filter)
        params = request.pagination_params
        after: PageKey | None = None
        if params.page_token:
            token = _PageToken.decode(params.page_token)
            sort_field, descending, page_size = token.sort_field, token.descending, token.page_size
            after = token.key
        else:
            page_size = min(params.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            sort_field = request.sort_options.sort_field
            if sort_field not in pb.SortField.values():
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"sort_field {sort_field} is unknown"
                )
            # The API's default order is newest first.
            descending = request.sort_options.sort_order != pb.SORT_ORDER_ASCENDING
        total = self._store.count(microgrid_id, where)
        rows = self._store.query(
            microgrid_id,
            where,
            sort_field=sort_field,
            descending=descending,
            after=after,
            limit=page_size + 1,
        )
        next_token = None
        if len(rows) > page_size:
            rows = rows[:page_size]
            key = PageKey(rows[-1].sort_value, rows[-1].id)
            next_token = _PageToken(sort_field, descending, page_size, key).encode()
        info = PaginationInfo(total_items=total, next_page_token=next_token)
        # The stored bytes are serialized `Dispatch` messages: a page is their
        # concatenation as field 1, parsed once in C instead of row by row.
        parts = [_field_bytes(1, row.dispatch) for row in rows]
        parts.append(_field_bytes(2, info.SerializeToString()))
        response = pb.ListMicrogridDispatchesResponse()
        response.ParseFromString(b"".join(parts))
        return response

    async def StreamMicrogridDispatches(
        self, request: pb.StreamMicrogridDispatchesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamMicrogridDispatchesResponse]:
        """Stream every change of the microgrid's dispatches as it happens.

        The initial metadata is sent as soon as the stream is subscribed, so a
        client that awaits it knows that no later change can be missed.

        Args:
            request: The request.
            context: The call.

        Yields:
            One message per create, update and delete, in commit order.
        """
        method = "StreamMicrogridDispatches"
        try:
            self._authenticate(context, method)
            microgrid_id = self._microgrid(request.microgrid_id)
        except _Refused as refusal:
            _logger.warning(
                "%s microgrid=%s refused %s: %s (peer %s)",
                method,
                request.microgrid_id,
                refusal.code.name,
                refusal.message,
                context.peer(),
            )
            await context.abort(refusal.code, refusal.message)
            return
        # Read once, while the call is live: gRPC's context.peer() after the client
        # cancelled the call crashed the server with a segfault (grpcio 1.85).
        peer = context.peer()
        subscription = self._hub.subscribe(microgrid_id)
        _logger.debug(
            "%s microgrid=%d opened (peer %s, %d open)",
            method,
            microgrid_id,
            peer,
            self._hub.count(microgrid_id),
        )
        try:
            await context.send_initial_metadata(())
            while True:
                item = await subscription.queue.get()
                if isinstance(item, Overflowed):
                    message = (
                        f"stream fell behind by more than {self._hub.queue_size} changes "
                        "and was dropped; reconnect and list again"
                    )
                    _logger.warning(
                        "%s microgrid=%d dropped: %s (peer %s)",
                        method,
                        microgrid_id,
                        message,
                        peer,
                    )
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                    return
                if isinstance(item, Closing):
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect later"
                    )
                    return
                yield item
        finally:
            self._hub.unsubscribe(subscription)
            _logger.debug("%s microgrid=%d closed (peer %s)", method, microgrid_id, peer)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    """Encode a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bounds(filter_: pb.DispatchFilter, name: str) -> tuple[int | None, int | None]:
    if not filter_.HasField(name):  # type: ignore[arg-type]
        return None, None
    interval: Interval = getattr(filter_, name)
    low = interval.start_time.ToMicroseconds() if interval.HasField("start_time") else None
    high = interval.end_time.ToMicroseconds() if interval.HasField("end_time") else None
    return low, high


def _sql_filter(filter_: pb.DispatchFilter) -> SqlFilter:
    """Translate the API's list filter into the store's."""
    start_from, start_to = _bounds(filter_, "start_time_interval")
    end_from, end_to = _bounds(filter_, "end_time_interval")
    update_from, update_to = _bounds(filter_, "update_time_interval")
    targets = [TargetWanted.from_protobuf(target) for target in filter_.targets]
    return SqlFilter(
        is_active=filter_.is_active if filter_.HasField("is_active") else None,
        is_dry_run=filter_.is_dry_run if filter_.HasField("is_dry_run") else None,
        is_recurring=(
            filter_.is_recurring if filter_.WhichOneof("recurrence") == "is_recurring" else None
        ),
        dispatch_ids=tuple(filter_.dispatch_ids),
        start_from=start_from,
        start_to=start_to,
        end_from=end_from,
        end_to=end_to,
        update_from=update_from,
        update_to=update_to,
        queries=tuple(q for q in filter_.queries if q),
        targets=tuple(t for t in targets if t.ids or t.categories),
    )
