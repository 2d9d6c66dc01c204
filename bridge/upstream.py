"""The Dispatch API side of one microgrid: stream first, then list, then diff on every restart.

Each connection attempt, with a fresh `DispatchApiClient` (a fresh gRPC
channel, so gRPC's own reconnect backoff never delays ours):

1. Open `StreamMicrogridDispatches` and wait for its initial metadata (the
   local API server sends it once the subscription is registered; a server
   that sends none is waited for at most `stream_ready_timeout`). Events that
   arrive from now on are buffered.
2. List every dispatch of the microgrid (all pages) and hand the list over as
   `Synced`: the service diffs it against what it holds, so what was created,
   updated or deleted while disconnected is published as such.
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
into `wire.Dispatch` with `wire.from_protobuf`: `client.list()` builds the
client's dataclasses first, most of a 100k sync's time.

`grpc.aio.AioRpcError` never leaves this module: it becomes `UpstreamError`,
which is logged with what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import grpc
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.dispatch.v1 import dispatch_pb2
from frequenz.client.common.streaming import Event
from frequenz.client.dispatch import DispatchApiClient

from actor_sdk import wire
from bridge.publisher import Backoff
from bridge.service import EventKind, LinkChanged, StreamEvent, Synced, UpstreamItem

__all__ = ["Upstream", "UpstreamError", "UpstreamSettings"]

_logger = logging.getLogger("bridge.upstream")

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
    ) -> None:
        """Create the upstream; `run()` connects.

        Args:
            settings: The Dispatch API.
            microgrid_id: The microgrid.
            sink: Receives what the upstream delivers (never blocks).
            page_size: Dispatches per list page.
            stream_ready_timeout: The longest wait for the stream's initial metadata.
            backoff: Reconnect delays (default: 0.5 s doubling to 30 s, jittered).
        """
        self._settings = settings
        self.microgrid_id = microgrid_id
        self._sink = sink
        self._page_size = page_size
        self._stream_ready_timeout = stream_ready_timeout
        self._backoff = backoff or Backoff()
        self.syncs = 0
        self._buffer: list[StreamEvent] = []
        self._live = False

    async def run(self) -> None:
        """Connect, sync and stream until cancelled; reconnect on every failure."""
        while True:
            try:
                await self._session()
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
            await asyncio.sleep(delay)

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
            listed = await self._list_all(client)
            self._check_reader(reader, "during the list")
            _logger.info(
                "microgrid %d: connected to the Dispatch API %s; listed %d dispatches",
                self.microgrid_id,
                self._settings.url,
                len(listed),
            )
            self._sink(LinkChanged(True))
            self._sink(Synced(listed))
            self.syncs += 1
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

    @staticmethod
    def _check_reader(reader: asyncio.Task[None], when: str) -> None:
        if reader.done():
            reader.result()  # raises the stream's error, if any
            raise UpstreamError(f"the server ended the stream {when}")

    async def _read(
        self, call: AsyncIterator[dispatch_pb2.StreamMicrogridDispatchesResponse]
    ) -> None:
        async for message in call:
            try:
                kind = _KINDS[Event(message.event)]
                dispatch = wire.from_protobuf(message.dispatch)
            except Exception as error:  # a malformed event must not end the stream
                _logger.error(
                    "microgrid %d: ignoring a stream event that cannot be read: %s",
                    self.microgrid_id,
                    error,
                )
                continue
            item = StreamEvent(kind, dispatch, buffered=not self._live)
            if self._live:
                self._sink(item)
            else:
                self._buffer.append(item)

    async def _list_all(self, client: DispatchApiClient) -> list[wire.Dispatch]:
        # A page of large payloads can exceed gRPC's 4 MB message limit, which
        # the client reports as RESOURCE_EXHAUSTED: retrying the same page size
        # would fail forever, so the listing starts over with pages half as big.
        while True:
            try:
                return await self._list_pages(client)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or self._page_size == 1:
                    raise
                self._page_size = max(1, self._page_size // 2)
                _logger.warning(
                    "microgrid %d: a list page was too large (%s); listing again with pages of %d",
                    self.microgrid_id,
                    _describe_rpc(error),
                    self._page_size,
                )

    async def _list_pages(self, client: DispatchApiClient) -> list[wire.Dispatch]:
        # The stub, not `client.list()`: its pages convert each protobuf into the
        # client's dataclasses first, which was most of a 100k sync's time.
        listed: list[wire.Dispatch] = []
        request = dispatch_pb2.ListMicrogridDispatchesRequest(
            microgrid_id=self.microgrid_id,
            pagination_params=PaginationParams(page_size=self._page_size),
        )
        while True:
            response = await client.stub.ListMicrogridDispatches(request, timeout=30.0)
            for pb in response.dispatches:
                try:
                    listed.append(wire.from_protobuf(pb))
                except Exception as error:
                    _logger.error(
                        "microgrid %d: ignoring dispatch %s that cannot be converted: %s",
                        self.microgrid_id,
                        pb.metadata.dispatch_id,
                        error,
                    )
            token = response.pagination_info.next_page_token
            if not token:
                return listed
            request.pagination_params.CopyFrom(PaginationParams(page_token=token))


def _describe_rpc(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    details = error.details() or ""
    hint = ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        hint = " (check DISPATCH_API_AUTH_KEY and DISPATCH_API_SIGN_SECRET)"
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {details[:300]}{hint}"
