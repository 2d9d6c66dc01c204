"""Start and stop the local Dispatch API server inside a running event loop.

`serve` is what `dispatch-bridge api` runs, and what `dispatch-bridge demo` or
a test can run in-process:

    async with serve("127.0.0.1:0", "dispatches.db", AuthConfig(key="k")) as server:
        print(server.url)  # grpc://127.0.0.1:PORT?ssl=false
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc

from bridge.api.auth import AuthConfig, Authenticator
from bridge.api.servicer import DispatchServicer
from bridge.api.store import DispatchStore
from bridge.api.streams import DEFAULT_QUEUE_SIZE, StreamHub

__all__ = ["ApiServer", "ServerStartError", "parse_listen", "serve"]

_logger = logging.getLogger("bridge.api")

SHUTDOWN_GRACE_S = 2.0
"""How long in-flight requests may take to finish on shutdown."""


class ServerStartError(RuntimeError):
    """The server cannot start: the address cannot be bound or the db opened."""


def parse_listen(text: str) -> tuple[str, int]:
    """Split a listen address into host and port.

    Args:
        text: `HOST:PORT`, `[IPv6]:PORT`; port 0 picks a free port.

    Returns:
        The host (without brackets) and the port.

    Raises:
        ValueError: The address is malformed.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:50051")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:50051")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


@dataclass
class ApiServer:
    """A running server."""

    host: str
    port: int
    db_path: Path
    servicer: DispatchServicer
    hub: StreamHub
    _server: grpc.aio.Server

    @property
    def address(self) -> str:
        """Where it listens, as `HOST:PORT`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL for `DispatchApiClient` and `dispatch-cli` (plain text, no TLS)."""
        return f"grpc://{self.address}?ssl=false"

    async def wait_for_termination(self) -> None:
        """Wait until the server stops."""
        await self._server.wait_for_termination()


@asynccontextmanager
async def serve(
    listen: str,
    db_path: str | Path,
    auth: AuthConfig,
    *,
    allow_past_start: bool = False,
    microgrids: Collection[int] | None = None,
    stream_queue_size: int = DEFAULT_QUEUE_SIZE,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[ApiServer]:
    """Run the Dispatch API server for the duration of the block.

    On leaving the block, open streams are ended with `UNAVAILABLE`, in-flight
    requests get `SHUTDOWN_GRACE_S` to finish, and the database is closed.

    Args:
        listen: `HOST:PORT` to listen on; port 0 picks a free port.
        db_path: The SQLite file (created if missing, with its directory).
        auth: The accepted credentials.
        allow_past_start: Accept start times in the past.
        microgrids: The microgrids served; None serves every positive id.
        stream_queue_size: How many changes a stream may lag before it is dropped.
        clock: Unix seconds now (replaceable in tests).

    Yields:
        The running server.

    Raises:
        ServerStartError: The address cannot be bound or the database opened.
        ValueError: `listen` is malformed.
    """
    host, port = parse_listen(listen)
    path = Path(db_path)
    try:
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        store = DispatchStore(path)
    except (OSError, sqlite3.Error) as error:
        raise ServerStartError(f"cannot open database {path}: {error}") from error
    hub = StreamHub(queue_size=stream_queue_size)
    servicer = DispatchServicer(
        store,
        Authenticator(auth),
        hub,
        allow_past_start=allow_past_start,
        microgrids=microgrids,
        clock=clock,
    )
    server = grpc.aio.server(
        options=[
            # Without this, gRPC sets SO_REUSEPORT and a second server could
            # silently share a port that is already in use.
            ("grpc.so_reuseport", 0),
            # Streams sit idle for hours and clients keep them alive with HTTP/2
            # pings (DispatchApiClient: every 60 s). gRPC's default allows one
            # ping per 5 minutes and answers the third early one with GOAWAY
            # "too_many_pings", which cut every bridge's stream every 3 minutes.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    )
    dispatch_pb2_grpc.add_MicrogridDispatchServiceServicer_to_server(servicer, server)
    bracketed = f"[{host}]" if ":" in host else host
    try:
        bound = server.add_insecure_port(f"{bracketed}:{port}")
    except RuntimeError as error:
        store.close()
        raise ServerStartError(f"cannot listen on {listen}: {error}") from None
    if bound == 0:
        store.close()
        raise ServerStartError(f"cannot listen on {listen}: address in use or not local")
    try:
        await server.start()
        running = ApiServer(host, bound, path, servicer, hub, server)
        _logger.info(
            "Dispatch API server listening on %s (db %s; auth: %s; past start times %s)",
            running.address,
            path,
            auth.describe(),
            "allowed" if allow_past_start else "refused",
        )
        yield running
    finally:
        hub.close()
        await server.stop(SHUTDOWN_GRACE_S)
        store.close()
        _logger.info("Dispatch API server on %s:%d stopped", host, bound)
