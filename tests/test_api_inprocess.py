"""The server run in-process with `bridge.api.serve`: slow streams, shutdown, the stream hub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from frequenz.api.common.v1alpha8.streaming import event_pb2
from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import TargetIds

from bridge.api import ApiServer, AuthConfig, ServerStartError, parse_listen, serve
from bridge.api.streams import Closing, Overflowed, StreamHub
from testkit.api_server import signed_metadata

KEY, SECRET = "k", "s"
BIG_PAYLOAD = {"blob": "x" * 40_000}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ApiServer]:
    async with serve(
        "127.0.0.1:0",
        tmp_path / "db.sqlite3",
        AuthConfig(key=KEY, sign_secret=SECRET),
        stream_queue_size=4,
    ) as running:
        yield running


def stream(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub, microgrid: int
) -> grpc.aio.UnaryStreamCall:
    return stub.StreamMicrogridDispatches(
        pb.StreamMicrogridDispatchesRequest(microgrid_id=microgrid),
        metadata=signed_metadata("StreamMicrogridDispatches", key=KEY, secret=SECRET),
    )


async def test_a_stream_that_does_not_read_is_dropped_and_holds_no_one_up(
    server: ApiServer,
) -> None:
    async with (
        grpc.aio.insecure_channel(server.address) as channel,
        DispatchApiClient(server_url=server.url, auth_key=KEY, sign_secret=SECRET) as client,
    ):
        stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
        slow, fast = stream(stub, 1), stream(stub, 1)
        await asyncio.wait_for(slow.initial_metadata(), 10)
        await asyncio.wait_for(fast.initial_metadata(), 10)
        received: list[int] = []
        progress = asyncio.Condition()

        async def read_fast() -> None:
            async for message in fast:
                async with progress:
                    received.append(message.dispatch.metadata.dispatch_id)
                    progress.notify_all()

        reader = asyncio.create_task(read_fast())
        created: list[int] = []
        deadline = time.monotonic() + 30
        # Big messages fill the slow stream's flow-control window; then its queue overflows.
        while server.hub.count(1) == 2:
            assert time.monotonic() < deadline, "the slow stream was never dropped"
            dispatch = await client.create(
                MicrogridId(1), "BIG", "NOW", None, TargetIds(1), payload=BIG_PAYLOAD
            )
            created.append(int(dispatch.id))
        more = await client.create(MicrogridId(1), "AFTER", "NOW", None, TargetIds(1))
        created.append(int(more.id))

        async with progress:
            await asyncio.wait_for(progress.wait_for(lambda: len(received) >= len(created)), 20)
        assert received == created
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in slow:
                pass
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "reconnect and list again" in (error.value.details() or "")
        fast.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_shutdown_ends_open_streams_promptly(tmp_path: Path) -> None:
    async with serve(
        "127.0.0.1:0", tmp_path / "db.sqlite3", AuthConfig(key=KEY, sign_secret=SECRET)
    ) as running:
        channel = grpc.aio.insecure_channel(running.address)
        call = stream(dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel), 1)
        await asyncio.wait_for(call.initial_metadata(), 10)
        started = time.monotonic()
    assert time.monotonic() - started < 1.5
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()


async def test_port_in_use_raises_server_start_error(server: ApiServer, tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="cannot listen"):
        async with serve(server.address, tmp_path / "other.db", AuthConfig(key=KEY)):
            pass


async def test_not_a_database_raises_server_start_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ServerStartError, match="cannot open database"):
        async with serve("127.0.0.1:0", garbage, AuthConfig(key=KEY)):
            pass


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("localhost", ":50051", "::1:5", "host:port", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


async def test_hub_drops_only_the_subscription_that_falls_behind() -> None:
    hub = StreamHub(queue_size=2)
    slow, fast, elsewhere = hub.subscribe(1), hub.subscribe(1), hub.subscribe(2)
    dispatch = pb.Dispatch(metadata=pb.DispatchMetadata(dispatch_id=1))
    dropped = 0
    for n in range(3):
        dropped += hub.publish(1, event_pb2.EVENT_CREATED, dispatch)
        if n < 2:
            fast.queue.get_nowait()  # the fast one keeps up
    assert dropped == 1 and slow.dropped and not fast.dropped
    assert hub.count(1) == 1 and hub.count(2) == 1
    items = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert isinstance(items[-1], Overflowed) and len(items) == 3
    assert fast.queue.qsize() == 1 and elsewhere.queue.empty()
    hub.close()
    assert hub.count() == 0
    assert isinstance(elsewhere.queue.get_nowait(), Closing)


async def test_a_client_pinging_every_second_keeps_its_stream(server: ApiServer) -> None:
    # DispatchApiClient pings every 60 s on an idle stream; gRPC's server default
    # (one ping per 5 minutes, two strikes) answered that with GOAWAY every 3 minutes.
    # The same policy at a one-second ping interval shows it within seconds.
    channel = grpc.aio.insecure_channel(
        server.address,
        options=[
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
    call = stream(stub, 1)
    await asyncio.wait_for(call.initial_metadata(), 10)
    # Several ping intervals with no data on the stream: the pings must be tolerated.
    await asyncio.sleep(5)
    async with DispatchApiClient(server_url=server.url, auth_key=KEY, sign_secret=SECRET) as client:
        created = await client.create(MicrogridId(1), "PING_TEST", "NOW", None, TargetIds(1))
    event = await asyncio.wait_for(call.read(), 10)
    assert event.dispatch.metadata.dispatch_id == int(created.id)
    call.cancel()
    await channel.close()
