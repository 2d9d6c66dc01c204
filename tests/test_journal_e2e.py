"""End to end: the audit journals, with the real API server, bridge, Mosquitto and SDK.

A dispatch is created with `dispatch-cli`, changed and deleted with the client;
the bridge's journal records each step in order, `dispatch-bridge audit` prints
them, an SDK `Dispatcher(journal=...)` records its actor's start and stop, and a
small `--journal-max-bytes` keeps exactly `--journal-files` files.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import DispatchId, TargetIds

from actor_sdk import Dispatcher, wire
from actor_sdk.journal import journal_files, payload_digest, read_journal
from bridge.config import journal_path
from testkit.api_server import ApiServerHandle, dispatch_bridge_command, run_dispatch_cli
from testkit.bridge import BridgeFactory, retained_snapshot
from testkit.broker import Broker
from testkit.processes import async_wait_until, wait_until
from tests.fixtures.sdk import ActorLog, utcnow

pytestmark = pytest.mark.slow

MICROGRID = 1


def entries(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_journal(path) if isinstance(e, dict)]


def of_dispatch(path: Path, dispatch_id: int, source: str) -> list[str]:
    return [
        e["event"]
        for e in entries(path)
        if e.get("dispatch_id") == dispatch_id and e["source"] == source
    ]


async def audit(*args: str) -> tuple[int, str]:
    """Run `dispatch-bridge audit ARGS`; its exit code and standard output."""
    process = await asyncio.create_subprocess_exec(
        *dispatch_bridge_command(),
        "audit",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    assert "cannot be read" not in errors.decode()
    return process.returncode, output.decode()


async def test_the_journals_record_a_dispatch_from_creation_to_deletion(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    tmp_path: Path,
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,))
    bridge.wait_synced()
    journal = journal_path(bridge.state_dir)
    sdk_journal = tmp_path / "sdk" / "actors.jsonl"
    log = ActorLog()
    async with (
        api_server.client() as client,
        Dispatcher(
            microgrid_id=MICROGRID, broker=mqtt_broker.url("actor"), journal=sdk_journal
        ) as dispatcher,
    ):
        await dispatcher.start_managing("AUDITED", actor_factory=log.factory)
        code, output = await run_dispatch_cli(
            api_server, "create", str(MICROGRID), "AUDITED", "7", "in 6 seconds", "2 seconds"
        )
        assert code == 0, output
        match = re.search(r"ID:\s+DID(\d+)", output)
        assert match is not None, output
        dispatch_id = int(match.group(1))
        mg, did = MicrogridId(MICROGRID), DispatchId(dispatch_id)
        await client.update(
            microgrid_id=mg, dispatch_id=did, new_fields={"payload": {"power_w": 1000}}
        )
        await log.wait_count("stop", 1, within=20)
        await client.delete(microgrid_id=mg, dispatch_id=did)
        await async_wait_until(
            lambda: "deleted" in of_dispatch(journal, dispatch_id, "bridge"), timeout=10
        )
    assert of_dispatch(journal, dispatch_id, "bridge") == [
        "created",
        "updated",
        "started",
        "stopped",
        "deleted",
    ]
    assert of_dispatch(journal, dispatch_id, "upstream") == ["created", "updated", "deleted"]
    [updated] = [
        e
        for e in entries(journal)
        if e.get("dispatch_id") == dispatch_id and e["source"] == "bridge"
        if e["event"] == "updated"
    ]
    assert updated["changed"] == ["payload"]

    code, output = await audit("--state-dir", str(bridge.state_dir), "--dispatch", str(dispatch_id))
    assert code == 0, output
    lines = output.splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["upstream", "created"],
        ["bridge", "created"],
        ["upstream", "updated"],
        ["bridge", "updated"],
        ["bridge", "started"],
        ["bridge", "stopped"],
        ["upstream", "deleted"],
        ["bridge", "deleted"],
    ]
    assert all(f"dispatch {dispatch_id} (AUDITED)" in line for line in lines[1:])
    assert "changed: payload" in lines[3]

    # The SDK's journal (closed with the Dispatcher): the start and the stop, with the
    # digest of the payload the actor ran with.
    sdk = [e for e in entries(sdk_journal) if e["dispatch_id"] == dispatch_id]
    assert [e["event"] for e in sdk] == ["started", "stopped"]
    assert sdk[0]["payload_digest"] == payload_digest({"power_w": 1000})
    assert sdk[0]["type"] == "AUDITED" and sdk[0]["microgrid_id"] == MICROGRID
    code, output = await audit("--journal", str(sdk_journal), "--json")
    assert code == 0, output
    assert [json.loads(line)["event"] for line in output.splitlines()] == ["started", "stopped"]


async def test_rotation_keeps_the_configured_number_of_files(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
) -> None:
    bridge = bridge_factory(
        api_server,
        mqtt_broker,
        (MICROGRID,),
        extra_args=["--journal-max-bytes", "2048"],
        extra_env={"DISPATCH_BRIDGE_JOURNAL_FILES": "3"},
    )
    bridge.wait_synced()
    journal = journal_path(bridge.state_dir)
    created: list[int] = []
    async with api_server.client() as client:
        for _ in range(40):  # ~2 entries of ~200 bytes each: ~8 KB, 4 files' worth
            dispatch = await client.create(
                microgrid_id=MicrogridId(MICROGRID),
                type="ROTATED",
                start_time=utcnow() + timedelta(hours=1),
                duration=timedelta(minutes=5),
                target=TargetIds(7),
            )
            created.append(int(dispatch.id))

    def last_one_journaled() -> bool:
        return "created" in of_dispatch(journal, created[-1], "bridge")

    await async_wait_until(last_one_journaled, timeout=15)
    files = journal_files(journal)
    assert [f.name for f in files] == ["journal.jsonl.2", "journal.jsonl.1", "journal.jsonl"]
    assert all(f.stat().st_size <= 2048 for f in files)
    kept = [e["dispatch_id"] for e in entries(journal) if e["source"] == "bridge"]
    assert kept == created[-len(kept) :]  # the newest, in order
    assert created[0] not in kept


async def test_a_journal_that_cannot_be_written_is_reported_and_the_bridge_runs_on(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "journal").write_text("a file where the journal's directory should be")
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,), state_dir=state_dir)
    bridge.wait_synced()
    topic = bridge.layout().status

    def status() -> wire.BridgeStatus:
        return wire.decode_status(retained_snapshot(mqtt_broker, topic, 0.3)[topic])

    def reported() -> bool:
        return "cannot write the journal" in (status().error or "")

    await asyncio.to_thread(wait_until, reported, 15, "the journal problem")
    current = await asyncio.to_thread(status)
    assert current.state == "online"
    assert str(state_dir / "journal" / "journal.jsonl") in (current.error or "")
    # Still publishing: a new dispatch reaches its topic.
    async with api_server.client() as client:
        dispatch = await client.create(
            microgrid_id=MicrogridId(MICROGRID),
            type="UNJOURNALED",
            start_time=utcnow() + timedelta(hours=1),
            duration=timedelta(minutes=5),
            target=TargetIds(7),
        )
    dispatch_topic = bridge.layout().dispatch("UNJOURNALED", int(dispatch.id))

    def published() -> bool:
        return dispatch_topic in retained_snapshot(mqtt_broker, dispatch_topic, 0.3)

    await asyncio.to_thread(wait_until, published, 15, "the new dispatch's topic")
    assert bridge.output().count("cannot write the journal") == 1  # logged once
