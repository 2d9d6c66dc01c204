"""The shipped site-to-central bridge config, on two real Mosquitto processes.

The site broker is the shipped mosquitto.conf plus deploy/mosquitto/bridge-central.conf
(its address and credentials pointed at a second, "central" Mosquitto; TLS off on
loopback). A real dispatch-bridge publishes onto the site; a subscriber on the central
broker sees the site's tree: retained topics, a dispatch created, and its topic
cleared when the dispatch is deleted.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, retained_snapshot
from testkit.broker import (
    ROLES,
    SHIPPED_CONFIG,
    Broker,
    adapt_config,
    find_mosquitto,
    write_acl,
    write_password_file,
)
from testkit.processes import ManagedProcess, free_port, wait_until

pytestmark = pytest.mark.slow

BRIDGE_CONFIG = Path(__file__).parents[1] / "deploy" / "mosquitto" / "bridge-central.conf"
MICROGRID = 31


def bridge_config_for(central: Broker) -> str:
    """The shipped bridge config, pointed at `central` as its `bridge` user, without TLS."""
    values = {
        "address": f"{central.host}:{central.port}",
        "remote_username": str(central.username("bridge")),
        "remote_password": str(central.bridge_password),
        "remote_clientid": "site-bridge-test",
    }
    lines = []
    for line in BRIDGE_CONFIG.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in ("bridge_cafile", "bridge_insecure"):
            continue  # loopback, no TLS
        lines.append(f"{key} {values[key]}" if key in values else line)
    text = "\n".join(lines) + "\n"
    assert "CHANGE" not in re.sub(r"(?m)^#.*$", "", text), "a value left to set"
    return text


@pytest.fixture
def site_broker(mqtt_broker: Broker, tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto with the shipped config and the shipped bridge to `mqtt_broker`."""
    binary = find_mosquitto()
    assert binary is not None, "the site broker needs the mosquitto binary"
    workdir = tmp_path / "site"
    (workdir / "data").mkdir(parents=True)
    passwords: dict[str, str | None] = {role: f"{role}-site" for role in ROLES}
    write_password_file(workdir / "passwd", {u: p for u, p in passwords.items() if p})
    write_acl(workdir / "acl")
    port = free_port()
    config = adapt_config(
        SHIPPED_CONFIG.read_text(),
        listener=f"{port} 127.0.0.1",
        persistence_dir=str(workdir / "data"),
        password_file=str(workdir / "passwd"),
        acl_file=str(workdir / "acl"),
        run_as_root=os.geteuid() == 0,
        log_file=str(workdir / "mosquitto.log"),
    )
    (workdir / "mosquitto.conf").write_text(config + bridge_config_for(mqtt_broker))
    site = Broker(
        kind="mosquitto", host="127.0.0.1", port=port, passwords=passwords, workdir=workdir
    )
    site._process = ManagedProcess(
        [binary, "-c", str(workdir / "mosquitto.conf")],
        name="mosquitto-site",
        log_path=workdir / "mosquitto.log",
    )
    site.start()
    try:
        yield site
    finally:
        site.close()


async def test_a_subscriber_on_the_central_broker_sees_the_sites_tree(
    api_server: ApiServerHandle,
    site_broker: Broker,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
) -> None:
    central = mqtt_broker
    bridge = bridge_factory(api_server, site_broker, (MICROGRID,))
    bridge.wait_synced()
    layout = bridge.layout()
    async with api_server.client() as client:
        created = await client.create(
            microgrid_id=MicrogridId(MICROGRID),
            type="FLEET",
            start_time="NOW",
            duration=None,
            target=TargetIds(1),
            payload={"site": "test"},
        )
    topic = layout.dispatch("FLEET", int(created.id))

    running = layout.running("FLEET")

    def central_tree(ids: list[int], *, holds_topic: bool) -> dict[str, bytes] | None:
        # The bridge publishes `running` before the dispatch topic, and the broker bridge
        # forwards them one after the other: wait for both, not for the first alone.
        retained = retained_snapshot(central, layout.everything)
        snapshot = retained.get(running)
        if not snapshot or [d.id for d in wire.decode_running(snapshot).running] != ids:
            return None
        return retained if (topic in retained) == holds_topic else None

    retained = await asyncio.to_thread(
        wait_until,
        lambda: central_tree([int(created.id)], holds_topic=True),
        30,
        "the central broker to hold the running dispatch and its topic",
    )
    assert wire.decode_dispatch(retained[topic]).payload == {"site": "test"}
    assert wire.decode_status(retained[layout.status]).state == "online"

    async with api_server.client() as client:
        await client.delete(microgrid_id=MicrogridId(MICROGRID), dispatch_id=created.id)
    await asyncio.to_thread(
        wait_until,
        lambda: central_tree([], holds_topic=False),
        30,
        "the central broker to hold an empty snapshot and no cleared dispatch topic",
    )
