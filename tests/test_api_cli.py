"""The real `dispatch-cli` console script against `dispatch-bridge api`, as a user types it.

The server runs with an API key and a signing secret; `dispatch-cli` reads
them (and the URL) from its environment, the way a user keeps them off the
command line. Each step is checked through the real `DispatchApiClient` too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.recurrence import Frequency
from frequenz.client.dispatch.types import DispatchId, TargetIds

from testkit.api_server import DISPATCH_CLI, ApiServerHandle, run_dispatch_cli

MICROGRID = 7


async def cli(server: ApiServerHandle, *args: str, secret: str | None = None) -> tuple[int, str]:
    """Run `dispatch-cli ARGS` with the server's URL and credentials; return code and output."""
    return await run_dispatch_cli(server, *args, secret=secret)


@pytest.fixture(scope="module", autouse=True)
def _cli_installed() -> None:
    if not DISPATCH_CLI.exists():
        pytest.fail(
            f"{DISPATCH_CLI} is missing: install the test extras (frequenz-client-dispatch[cli])"
        )


async def test_create_list_get_update_delete_through_dispatch_cli(
    api_server_module: ApiServerHandle,
) -> None:
    server = api_server_module
    code, out = await cli(
        server,
        "create",
        str(MICROGRID),
        "SET_POWER",
        "1,2",
        "in 5 minutes",
        "10 minutes",
        "--payload",
        '{"power_w": 5000}',
    )
    assert code == 0, out
    assert "Dispatch created." in out
    match = re.search(r"ID:\s+DID(\d+)", out)
    assert match is not None, out
    dispatch_id = DispatchId(int(match.group(1)))

    async with server.client() as client:
        stored = await client.get(microgrid_id=MicrogridId(MICROGRID), dispatch_id=dispatch_id)
    assert stored.type == "SET_POWER"
    assert stored.target == TargetIds(1, 2)
    # dispatch-cli parses "10 minutes" relative to its clock: it may send 599 s.
    assert stored.duration is not None
    assert abs(stored.duration - timedelta(minutes=10)) <= timedelta(seconds=1)
    assert stored.payload == {"power_w": 5000}
    expected_start = datetime.now(UTC) + timedelta(minutes=5)
    assert abs(stored.start_time - expected_start) < timedelta(seconds=30)

    code, out = await cli(server, "list", str(MICROGRID))
    assert code == 0, out
    assert "SET_POWER" in out and "1 dispatches" in out

    code, out = await cli(server, "list", str(MICROGRID), "--filter-queries", "POWER")
    assert code == 0 and "1 dispatches" in out, out
    code, out = await cli(server, "list", str(MICROGRID), "--filter-queries", "NOTHING")
    assert code == 0 and "0 dispatches" in out, out

    code, out = await cli(server, "get", str(MICROGRID), str(int(dispatch_id)))
    assert code == 0, out
    assert f"DID{int(dispatch_id)}" in out and "SET_POWER" in out

    code, out = await cli(
        server,
        "update",
        str(MICROGRID),
        str(int(dispatch_id)),
        "--active",
        "false",
        "--frequency",
        "daily",
        "--interval",
        "1",
        "--count",
        "3",
    )
    assert code == 0, out
    assert "Dispatch updated" in out
    async with server.client() as client:
        updated = await client.get(microgrid_id=MicrogridId(MICROGRID), dispatch_id=dispatch_id)
    assert not updated.active
    assert updated.recurrence.frequency == Frequency.DAILY
    assert updated.recurrence.interval == 1
    assert updated.end_time is not None
    assert updated.end_time > stored.start_time + timedelta(days=2)

    code, out = await cli(server, "delete", str(MICROGRID), str(int(dispatch_id)))
    assert code == 0, out
    assert f"Dispatches deleted: [{int(dispatch_id)}]" in out

    code, out = await cli(server, "get", str(MICROGRID), str(int(dispatch_id)))
    assert "NOT_FOUND" in out


async def test_dispatch_cli_with_wrong_secret_is_refused(
    api_server_module: ApiServerHandle,
) -> None:
    _, out = await cli(api_server_module, "list", str(MICROGRID), secret="not-the-secret")
    assert "UNAUTHENTICATED" in out and "invalid signature" in out
