"""End to end: the `upcoming` topics, as `mosquitto_sub` reads them from a real bridge.

`dispatch-bridge api` → `dispatch-bridge run --upcoming-hours 2` → Mosquitto →
`mosquitto_sub`; dispatches created and deleted with the real `dispatch-cli`.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from actor_sdk import wire
from testkit.api_server import ApiServerHandle, run_dispatch_cli
from testkit.bridge import BridgeFactory, TapFactory, retained_snapshot
from testkit.broker import Broker

pytestmark = pytest.mark.slow

MICROGRID = 1
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"


async def create(api: ApiServerHandle, dispatch_type: str, start: str, duration: str) -> int:
    """Create a dispatch with `dispatch-cli`; return its id."""
    code, output = await run_dispatch_cli(
        api, "create", str(MICROGRID), dispatch_type, "7", start, duration
    )
    assert code == 0, output
    match = re.search(r"ID:\s+DID(\d+)", output)
    assert match is not None, output
    return int(match.group(1))


def retain(broker: Broker, topic: str, payload: bytes) -> None:
    """Publish a retained message as `admin` with `mosquitto_pub`."""
    subprocess.run(
        [MOSQUITTO_PUB, *broker.cli_args("admin"), "-t", topic, "-r", "-q", "1", "-s"],
        input=payload,
        check=True,
        timeout=15,
    )


def listed(payload: bytes) -> list[int] | None:
    """The ids an upcoming payload lists (None: cleared)."""
    return [run.id for run in wire.decode_upcoming(payload).runs] if payload else None


async def test_upcoming_lists_the_runs_of_the_window_and_follows_changes(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
) -> None:
    layout = wire.TopicLayout.for_microgrid(MICROGRID)
    # A retained list left by a type that no longer exists: cleared after the sync.
    stale = layout.upcoming("GONE")
    await asyncio.to_thread(retain, mqtt_broker, stale, b"{}")
    assert stale in retained_snapshot(mqtt_broker, stale)
    tap = mqtt_tap_factory(mqtt_broker, f"microgrid/{MICROGRID}/dispatch/+/upcoming")
    bridge = bridge_factory(api_server, mqtt_broker, extra_args=["--upcoming-hours", "2"])
    bridge.wait_synced()
    await asyncio.to_thread(tap.wait_latest, stale, lambda payload: payload == b"", 20)

    soon = await create(api_server, "UPC", "in 30 minutes", "10 minutes")
    later = await create(api_server, "UPC", "in 3 hours", "10 minutes")
    topic = layout.upcoming("UPC")
    payload = await asyncio.to_thread(tap.wait_latest, topic, lambda p: listed(p) == [soon], 20)
    message = wire.decode_upcoming(payload)
    (run,) = message.runs
    # As long as the dispatch the bridge holds: dispatch-cli turns "10 minutes" into
    # 599 s when it reads the clock twice more than half a second apart (a loaded host).
    held = retained_snapshot(mqtt_broker, layout.dispatch("UPC", soon))
    duration = wire.decode_dispatch(held[layout.dispatch("UPC", soon)]).duration
    assert duration is not None and abs(duration - 600) <= 1
    assert run.end is not None and run.end - run.start == timedelta(seconds=duration)
    assert abs(run.start - (datetime.now(UTC) + timedelta(minutes=30))) < timedelta(minutes=1)
    assert message.until - message.as_of == timedelta(hours=2)
    assert not message.truncated
    assert later not in listed(payload)  # type: ignore[operator]
    # Retained: a field engineer connecting now reads the same list.
    assert retained_snapshot(mqtt_broker, topic)[topic] == payload

    code, output = await run_dispatch_cli(api_server, "delete", str(MICROGRID), str(soon))
    assert code == 0, output
    await asyncio.to_thread(tap.wait_latest, topic, lambda p: listed(p) == [], 20)
