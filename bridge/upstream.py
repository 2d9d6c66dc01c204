"""The Dispatch API side of one microgrid: stream first, then list, then diff on every restart.

Each connection attempt, with a fresh `DispatchApiClient` (a fresh gRPC
channel, so gRPC's own reconnect backoff never delays ours):

1. Open `StreamMicrogridDispatches` and wait for its initial metadata (the
   local API server sends it once the subscription is registered; a server
   that sends none is waited for at most `stream_ready_timeout`). Events that
   arrive from now on are buffered.
2. List every dispatch of the microgrid, page by page: each page but the last is
   handed over as `Listed` once converted (the service publishes it at once, while
   the next page is listed), the last as `Synced` with the ids of the pages before:
   the service diffs the whole listing against what it holds, so what was created,
   updated or deleted while disconnected is published as such (deletions only
   once the listing is complete).
3. Replay the buffered events, marked `buffered` (a create or update not newer
   than the listed state is skipped; a delete always applies), then pass
   events on as they come.
4. When the stream ends or fails: report `LinkChanged(False)`, wait with
   capped, jittered backoff, go to 1.

Why the stub and not `DispatchApiClient.stream()`: the client's stream
(a `GrpcStreamBroadcaster`) reports `StreamStarted` before the call is
established, retries on its own schedule, and stops for good when the server
ends the stream cleanly; the bridge must know when the subscription is live
(to list after it, with no gap) and must list again after every restart. The
client still provides the channel, authentication and signing. The list,
too, calls the stub (pages of `page_size`, 5000 by default, under gRPC's 4 MB
message limit at the usual payload sizes) and converts each protobuf straight
into `wire.Dispatch` with one `convert.ListingConverter` per listing (each distinct
rule, target and instant converted once): `client.list()` builds the client's
dataclasses first, most of a 100k sync's time.

A dispatch that cannot be converted (an unknown enum value from a newer
API, a field out of range) is never a deletion: the listing reports its id
as `unconvertible` so the service keeps the version it holds (a new one is
left out), a streamed update of it is skipped, and a streamed deletion still
applies by id. Each is logged once per reason and counted in the status's
`skipped`.

`RESOURCE_EXHAUSTED` on a list page is a message-size error only when gRPC
says so ("larger than max"): then the listing starts over with pages half as
big, and the next listing tries the normal size again. Any other
`RESOURCE_EXHAUSTED` is rate limiting: the connection backs off and retries.

The bridge's clock is checked against the API's (`bridge.api_clock`): a streamed
create or update carries the server's `update_time` of the change; an offset beyond
`CLOCK_TOLERANCE` (for a clock ahead: in changes of several seconds, since a held
burst arrives late) is logged and put in the status's `error` until a later change
shows the clocks agree.

`grpc.aio.AioRpcError` never leaves this module: it becomes `UpstreamError`,
which is logged with what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import grpc
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.dispatch.v1 import dispatch_pb2
from frequenz.client.common.streaming import Event
from frequenz.client.dispatch import DispatchApiClient

from actor_sdk import wire
from actor_sdk.mqtt import Backoff
from actor_sdk.wall_clock import utc_now
from bridge import convert
from bridge.api_clock import ApiClockCheck
from bridge.service import (
    DeletedById,
    EventKind,
    LinkChanged,
    Listed,
    StreamEvent,
    Synced,
    UpstreamItem,
)

__all__ = ["Upstream", "UpstreamError", "UpstreamSettings"]


_logger = logging.getLogger("bridge.upstream")

_CONVERT_SLICE = 500
"""Dispatches a listing converts between two turns of the event loop (10-25 ms of work):
a page of 5,000 held the loop, and every scheduled change with it, for a quarter second."""

_KINDS: dict[Event, EventKind] = {
    Event.CREATED: "created",
    Event.UPDATED: "updated",
    Event.DELETED: "deleted",
}


class UpstreamError(Exception):
    """The Dispatch API could not be reached, or refused or ended a call."""


class UpstreamSettings:
    """How to reach the Dispatch API; secrets are kept out of `repr`."""

    def __init__(self, url: str, auth_key: str, sign_secret: str | None) -> None:
        """Create the settings.

        Args:
            url: The server URL, e.g. `grpc://host:port?ssl=false`.
            auth_key: The API key.
            sign_secret: The signing secret, if requests are signed.
        """
        self.url = url
        self.auth_key = auth_key
        self.sign_secret = sign_secret

    def __repr__(self) -> str:
        return f"UpstreamSettings(url={self.url!r})"


class Upstream:
    """Feeds one microgrid's service with the Dispatch API's dispatches and changes."""

    def __init__(
        self,
        settings: UpstreamSettings,
        microgrid_id: int,
        sink: Callable[[UpstreamItem], None],
        *,
        page_size: int = 5000,
        stream_ready_timeout: float = 3.0,
        backoff: Backoff | None = None,
        on_skipped: Callable[[int], None] = lambda count: None,
        on_clock: Callable[[str | None], None] = lambda problem: None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Create the upstream; `run()` connects.

        Args:
            settings: The Dispatch API.
            microgrid_id: The microgrid.
            sink: Receives what the upstream delivers (never blocks).
            page_size: Dispatches per list page.
            stream_ready_timeout: The longest wait for the stream's initial metadata.
            backoff: Reconnect delays (default: 0.5 s doubling to 30 s, jittered).
            on_skipped: Told how many dispatches cannot be converted, when it changes.
            on_clock: Told a clock offset problem (text), or None once the clocks agree.
            clock: Returns now (compared with the API's times).
        """
        self._settings = settings
        self.microgrid_id = microgrid_id
        self._sink = sink
        self._page_size = self._normal_page_size = page_size
        self._skipped: dict[int, str] = {}
        self._on_skipped = on_skipped
        self._on_clock = on_clock
        self._clock = clock
        self._clock_problem: str | None = None
        self._api_clock = ApiClockCheck()
        self._stream_ready_timeout = stream_ready_timeout
        self._backoff = backoff or Backoff()
        self.syncs = 0
        self._buffer: list[UpstreamItem] = []
        self._live = False
        self._relist = asyncio.Event()

    def resync(self) -> None:
        """List again now (`bridge.request_handler`).

        Connects at once when waiting to reconnect; opens a new stream and lists when
        streaming; a listing under way already does.
        """
        self._relist.set()

    async def run(self) -> None:
        """Connect, sync and stream until cancelled; reconnect on every failure."""
        while True:
            self._relist.clear()
            try:
                if await self._session_until_resync():
                    continue
                reason = "the server ended the stream"
            except UpstreamError as error:
                reason = str(error)
            except Exception as error:  # never let the upstream die: log and retry
                _logger.exception(
                    "microgrid %d: unexpected Dispatch API failure", self.microgrid_id
                )
                reason = f"unexpected error {type(error).__name__}: {error}"
            self._sink(LinkChanged(False, reason))
            delay = self._backoff.next()
            _logger.warning(
                "microgrid %d: Dispatch API %s: %s; reconnecting in %.1f s, then listing again",
                self.microgrid_id,
                self._settings.url,
                reason,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relist.wait(), delay)

    async def _session_until_resync(self) -> bool:
        """Run one session; True when a resync ended it (to connect again at once)."""
        session = asyncio.create_task(self._session())
        try:
            while True:
                relist = asyncio.create_task(self._relist.wait())
                await asyncio.wait({session, relist}, return_when=asyncio.FIRST_COMPLETED)
                relist.cancel()
                if session.done():
                    session.result()  # the session's error, if any
                    return False
                self._relist.clear()
                if self._live:
                    return True
        finally:
            session.cancel()
            # Wait for it to end without taking its outcome: a cancellation of this task
            # that came with the session's own error must stay a cancellation (it became
            # that error, and the bridge went on reconnecting instead of stopping).
            await asyncio.wait({session})
            if not session.cancelled():
                session.exception()  # retrieved, so that it is not logged as forgotten

    async def _session(self) -> None:
        client = DispatchApiClient(
            server_url=self._settings.url,
            auth_key=self._settings.auth_key,
            sign_secret=self._settings.sign_secret,
            call_timeout=timedelta(seconds=30),
        )
        try:
            await self._stream_and_list(client)
        finally:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def _stream_and_list(self, client: DispatchApiClient) -> None:
        request = dispatch_pb2.StreamMicrogridDispatchesRequest(microgrid_id=self.microgrid_id)
        self._buffer = []
        self._live = False
        try:
            call = client.stub.StreamMicrogridDispatches(request)
        except Exception as error:
            raise UpstreamError(f"cannot open the stream: {error}") from None
        reader = asyncio.create_task(self._read(call))
        try:
            try:
                await asyncio.wait_for(call.initial_metadata(), self._stream_ready_timeout)
            except TimeoutError:
                _logger.debug("no initial metadata on the stream: listing anyway")
            self._check_reader(reader, "before the list")
            await self._list_and_hand_over(client, reader)
            for item in self._buffer:
                self._sink(item)
            self._buffer.clear()
            self._live = True
            self._backoff.reset()
            await reader
        except grpc.aio.AioRpcError as error:
            raise UpstreamError(_describe_rpc(error)) from None
        finally:
            reader.cancel()
            call.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _list_and_hand_over(
        self, client: DispatchApiClient, reader: asyncio.Task[None]
    ) -> None:
        """List everything: each page but the last as `Listed`, the last as `Synced`.

        The listing lives only as long as this call: the service keeps what it
        needs, and the session that goes on streaming holds no second copy.
        """
        listing = await self._list_all(client)
        self._check_reader(reader, "during the list")
        _logger.info(
            "microgrid %d: connected to the Dispatch API %s; listed %d dispatches",
            self.microgrid_id,
            self._settings.url,
            len(listing.last) + len(listing.before),
        )
        unconvertible = listing.unconvertible
        self._sink(LinkChanged(True))
        self._sink(Synced(listing.last, frozenset(unconvertible), listing.before))
        self._note_skipped(unconvertible, replace=True)
        self.syncs += 1

    @staticmethod
    def _check_reader(reader: asyncio.Task[None], when: str) -> None:
        if reader.done():
            reader.result()  # raises the stream's error, if any
            raise UpstreamError(f"the server ended the stream {when}")

    async def _read(
        self, call: AsyncIterator[dispatch_pb2.StreamMicrogridDispatchesResponse]
    ) -> None:
        async for message in call:
            item: UpstreamItem
            dispatch_id = message.dispatch.metadata.dispatch_id
            try:
                kind = _KINDS[Event(message.event)]
            except ValueError:
                _logger.error(
                    "microgrid %d: ignoring a stream event of unknown kind %d (dispatch %d)",
                    self.microgrid_id,
                    message.event,
                    dispatch_id,
                )
                continue
            try:
                dispatch = convert.from_protobuf(message.dispatch)
            except Exception as error:  # a malformed event must not end the stream
                if kind != "deleted":
                    self._note_skipped({dispatch_id: f"{type(error).__name__}: {error}"})
                    continue
                item = DeletedById(dispatch_id)
            else:
                if self._live and kind != "deleted":
                    self._check_clock(dispatch)
                if dispatch_id in self._skipped:
                    del self._skipped[dispatch_id]
                    self._on_skipped(len(self._skipped))
                item = StreamEvent(kind, dispatch, buffered=not self._live)
            if self._live:
                self._sink(item)
            else:
                self._buffer.append(item)

    def _note_skipped(self, skipped: dict[int, str], *, replace: bool = False) -> None:
        """Log each newly unconvertible dispatch once, and report the count."""
        for dispatch_id, reason in skipped.items():
            if self._skipped.get(dispatch_id) != reason:
                _logger.error(
                    "microgrid %d: dispatch %d from the Dispatch API cannot be converted (%s): "
                    "keeping the version held, if any, until a version that converts arrives "
                    "(never treated as deleted)",
                    self.microgrid_id,
                    dispatch_id,
                    reason,
                )
        before = len(self._skipped)
        if replace:
            self._skipped = dict(skipped)
        else:
            self._skipped.update(skipped)
        if replace or len(self._skipped) != before:
            self._on_skipped(len(self._skipped))

    def _check_clock(self, dispatch: wire.Dispatch) -> None:
        """Compare a fresh change's `update_time` (the API's clock) with ours."""
        verdict = self._api_clock.observe(dispatch.id, dispatch.update_time, self._clock())
        if verdict.agree and self._clock_problem is not None:
            _logger.info(
                "microgrid %d: the bridge's clock agrees with the Dispatch API's again",
                self.microgrid_id,
            )
            self._clock_problem = None
            self._on_clock(None)
        if verdict.problem is None:
            return
        if self._clock_problem is None:
            _logger.error("microgrid %d: %s", self.microgrid_id, verdict.problem)
        self._clock_problem = verdict.problem
        self._on_clock(verdict.problem)

    async def _list_all(self, client: DispatchApiClient) -> _Listing:
        # A page of large payloads can exceed gRPC's 4 MB message limit, which
        # the client reports as RESOURCE_EXHAUSTED: retrying the same page size
        # would fail forever, so the listing starts over with pages half as big.
        # Rate limiting is RESOURCE_EXHAUSTED too: that one backs off instead.
        while True:
            try:
                listed = await self._list_pages(client)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if not is_message_size_error(error):
                    raise UpstreamError(
                        f"rate limited by the Dispatch API ({_describe_rpc(error)}); backing off"
                    ) from None
                if self._page_size == 1:
                    raise
                self._page_size = max(1, self._page_size // 2)
                _logger.warning(
                    "microgrid %d: a list page was too large (%s); listing again with pages of %d",
                    self.microgrid_id,
                    _describe_rpc(error),
                    self._page_size,
                )
                continue
            if self._page_size != self._normal_page_size:
                _logger.info(
                    "microgrid %d: listed with pages of %d; the next listing uses %d again",
                    self.microgrid_id,
                    self._page_size,
                    self._normal_page_size,
                )
                self._page_size = self._normal_page_size
            return listed

    async def _list_pages(self, client: DispatchApiClient) -> _Listing:
        # The stub, not `client.list()`: its pages convert each protobuf into the
        # client's dataclasses first, which was most of a 100k sync's time.
        listing = _Listing()
        converter = convert.ListingConverter()  # equal types, instants, targets: held once
        next_page = self._ask_page(client, None)
        try:
            while next_page is not None:
                response = await next_page
                token = response.pagination_info.next_page_token
                # The next page is asked for before this one is converted: the server
                # makes it while this process converts.
                next_page = self._ask_page(client, token) if token else None
                if listing.last:
                    # Handed over before the next page is converted: the service publishes
                    # it meanwhile (100k at start-up: the first topics after 0.5 s, not 4 s).
                    listing.before.update(d.id for d in listing.last)
                    self._sink(Listed(listing.last))
                    listing.last = []
                for index, pb in enumerate(response.dispatches):
                    if index and index % _CONVERT_SLICE == 0:
                        await asyncio.sleep(0)  # the schedule and the publisher run meanwhile
                    try:
                        listing.last.append(converter.convert(pb))
                    except Exception as error:
                        listing.unconvertible[pb.metadata.dispatch_id] = (
                            f"{type(error).__name__}: {error}"
                        )
        finally:
            if next_page is not None:
                next_page.cancel()
        return listing

    def _ask_page(self, client: DispatchApiClient, token: str | None) -> Any:
        """Start the call for one list page (the first when `token` is None)."""
        params = (
            PaginationParams(page_size=self._page_size)
            if token is None
            else PaginationParams(page_token=token)
        )
        request = dispatch_pb2.ListMicrogridDispatchesRequest(
            microgrid_id=self.microgrid_id, pagination_params=params
        )
        return client.stub.ListMicrogridDispatches(request, timeout=30.0)


@dataclass(slots=True)
class _Listing:
    """One listing of the API, while its pages come."""

    last: list[wire.Dispatch] = field(default_factory=list)
    """The page converted last, not handed over yet."""
    before: set[int] = field(default_factory=set)
    """The ids of the pages handed over as `Listed`."""
    unconvertible: dict[int, str] = field(default_factory=dict)
    """Ids that could not be converted, and why."""


def is_message_size_error(error: grpc.aio.AioRpcError) -> bool:
    """Whether a RESOURCE_EXHAUSTED error is gRPC's message size limit (not rate limiting).

    Args:
        error: The error.

    Returns:
        True for "Received message larger than max (N vs. M)" and its kin.
    """
    details = (error.details() or "").lower()
    return "larger than max" in details or "message size" in details


def _describe_rpc(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    details = error.details() or ""
    hint = ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        hint = " (check DISPATCH_API_AUTH_KEY and DISPATCH_API_SIGN_SECRET)"
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {details[:300]}{hint}"
