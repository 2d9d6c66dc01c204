"""Authentication of the local Dispatch API server: raw gRPC with crafted metadata.

The metadata is built here independently of the server's code, the way
`frequenz-client-base` builds it (see `signed_metadata`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds

from bridge.api.auth import AuthConfig, Authenticator, AuthError, sign
from testkit.api_server import (
    TEST_KEY,
    TEST_SECRET,
    ApiServerFactory,
    ApiServerHandle,
    raw_stub,
    signed_metadata,
)

LIST = "ListMicrogridDispatches"
REQUEST = pb.ListMicrogridDispatchesRequest(microgrid_id=1)


@pytest.fixture
async def stub(
    api_server_module: ApiServerHandle,
) -> AsyncIterator[dispatch_pb2_grpc.MicrogridDispatchServiceStub]:
    async with raw_stub(api_server_module) as connected:
        yield connected


async def refused(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub, metadata: list[tuple[str, str]]
) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListMicrogridDispatches(REQUEST, metadata=metadata)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details: str = error.value.details() or ""
    return details


async def test_right_key_and_signature_pass(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    response = await stub.ListMicrogridDispatches(REQUEST, metadata=signed_metadata(LIST))
    assert response.pagination_info.total_items >= 0


async def test_missing_key_is_refused(stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub) -> None:
    assert "missing API key" in await refused(stub, [])


async def test_wrong_key_is_refused(stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub) -> None:
    # Signed correctly with the secret, but the key is not the server's.
    assert "unknown API key" in await refused(stub, signed_metadata(LIST, key="other-key"))


async def test_missing_signature_is_refused(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    assert "missing signature" in await refused(stub, signed_metadata(LIST, secret=None))


async def test_wrong_secret_is_refused(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    assert "invalid signature" in await refused(stub, signed_metadata(LIST, secret="wrong"))


async def test_signature_of_another_method_is_refused(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    metadata = signed_metadata("DeleteMicrogridDispatch")
    assert "invalid signature" in await refused(stub, metadata)


async def test_stale_and_future_timestamps_are_refused(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    now = int(time.time())
    assert "stale timestamp" in await refused(stub, signed_metadata(LIST, ts=now - 300))
    assert "stale timestamp" in await refused(stub, signed_metadata(LIST, ts=now + 300))
    # Slightly off clocks are fine.
    await stub.ListMicrogridDispatches(REQUEST, metadata=signed_metadata(LIST, ts=now - 20))


async def test_replayed_nonce_is_refused(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    metadata = signed_metadata(LIST)
    await stub.ListMicrogridDispatches(REQUEST, metadata=metadata)
    assert "replayed" in await refused(stub, metadata)
    # A fresh nonce passes again.
    await stub.ListMicrogridDispatches(REQUEST, metadata=signed_metadata(LIST))


async def test_stream_is_authenticated_too(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    call = stub.StreamMicrogridDispatches(
        pb.StreamMicrogridDispatchesRequest(microgrid_id=1),
        metadata=signed_metadata("StreamMicrogridDispatches", secret="wrong"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_real_client_with_wrong_credentials_is_refused(
    api_server_module: ApiServerHandle,
) -> None:
    for options in ({"auth_key": "nope"}, {"sign_secret": "nope"}):
        async with api_server_module.client(**options) as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.get(microgrid_id=MicrogridId(1), dispatch_id=1)  # type: ignore[arg-type]
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_secrets_never_reach_the_log(
    api_server_module: ApiServerHandle, stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub
) -> None:
    await refused(stub, signed_metadata(LIST, secret="wrong"))
    log = api_server_module.log()
    assert "UNAUTHENTICATED" in log
    assert TEST_KEY not in log and TEST_SECRET not in log


async def test_server_without_secret_accepts_the_key_alone(
    api_server_factory: ApiServerFactory,
) -> None:
    server = api_server_factory(secret=None)
    async with raw_stub(server) as stub:
        await stub.ListMicrogridDispatches(REQUEST, metadata=signed_metadata(LIST, secret=None))
        assert "unknown API key" in await refused(stub, [("key", "other")])
    async with server.client() as client:
        await client.create(MicrogridId(1), "KEY_ONLY", "NOW", None, TargetIds(1))


# --- The authenticator alone (no server) -----------------------------------------------


def _metadata(
    key: str, secret: str, ts: int, nonce: str, method: str = LIST
) -> list[tuple[str, str]]:
    return [
        ("key", key),
        ("ts", str(ts)),
        ("nonce", nonce),
        ("sig", sign(secret, key, str(ts), nonce, method)),
    ]


def test_nonces_are_forgotten_once_their_timestamp_is_stale() -> None:
    auth = Authenticator(AuthConfig(key="k", sign_secret="s", window_s=60))
    auth.check(_metadata("k", "s", 1000, "n1"), LIST, now=1000)
    with pytest.raises(AuthError, match="replayed"):
        auth.check(_metadata("k", "s", 1000, "n1"), LIST, now=1030)
    auth.check(_metadata("k", "s", 1100, "n2"), LIST, now=1100)
    # n1's timestamp left the window, so the memory dropped it; a replay is stale now.
    assert auth.remembered_nonces == 1
    with pytest.raises(AuthError, match="stale"):
        auth.check(_metadata("k", "s", 1000, "n1"), LIST, now=1100)


def test_nonce_memory_is_bounded() -> None:
    auth = Authenticator(AuthConfig(key="k", sign_secret="s", window_s=60, max_nonces=3))
    for n in range(3):
        auth.check(_metadata("k", "s", 1000, f"n{n}"), LIST, now=1000)
    with pytest.raises(AuthError) as error:
        auth.check(_metadata("k", "s", 1000, "n3"), LIST, now=1000)
    assert error.value.overloaded
    auth.check(_metadata("k", "s", 1100, "n4"), LIST, now=1100)
    assert auth.remembered_nonces == 1


def test_bytes_metadata_and_padded_signature_are_accepted() -> None:
    auth = Authenticator(AuthConfig(key="k", sign_secret="s"))
    sig = sign("s", "k", "1000", "bm9uY2U=", LIST)
    auth.check(
        [("key", "k"), ("ts", b"1000"), ("nonce", b"bm9uY2U="), ("sig", (sig + "=").encode())],
        LIST,
        now=1000,
    )


def test_config_repr_hides_secrets() -> None:
    text = repr(AuthConfig(key="very-secret-key", sign_secret="very-secret-secret"))
    assert "very-secret" not in text
