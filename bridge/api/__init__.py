"""The local Dispatch API server: `MicrogridDispatchService` over SQLite.

Run it with `dispatch-bridge api`, or in-process with `serve`:

    async with serve("127.0.0.1:0", "dispatches.db", AuthConfig(key="k")) as server:
        client = DispatchApiClient(server_url=server.url, auth_key="k")

`create_dispatch` creates a dispatch with a past start time, which the
client library refuses to send.
"""

from bridge.api.auth import AuthConfig
from bridge.api.backfill import create_dispatch
from bridge.api.server import ApiServer, ServerStartError, parse_listen, serve

__all__ = [
    "ApiServer",
    "AuthConfig",
    "ServerStartError",
    "create_dispatch",
    "parse_listen",
    "serve",
]
