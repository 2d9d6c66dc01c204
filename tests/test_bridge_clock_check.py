"""The bridge's clock checked against the Dispatch API's (#18 item 6), end to end.

The local API server runs in this process with a clock 20 s behind the test
machine's (`serve(clock=...)`, the one seam for it), so every change it streams
carries an `update_time` 20 s before it arrives: to a real `dispatch-bridge run`
subprocess, its clock is 20 s ahead of the API's. Once changes in a few different
seconds show it (one late change may only have been held on the way), the bridge
must say so in its log and in its retained status (read by `mosquitto_sub`), and
take it back once a change shows the clocks agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import Dispatch, TargetIds

from actor_sdk import wire
from bridge.api import AuthConfig, serve
from bridge.api_clock import SECONDS_NEEDED
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory, BridgeHandle, TapFactory
from testkit.broker import Broker

LAYOUT = wire.TopicLayout.for_microgrid(1)
SKEW_S = 20.0


async def latest_status(tap_wait: object, check: object) -> wire.BridgeStatus:
    assert callable(tap_wait) and callable(check)
    payload = await asyncio.to_thread(
        tap_wait, LAYOUT.status, lambda p: bool(p) and bool(check(wire.decode_status(p))), 20.0
    )
    return wire.decode_status(payload)


async def next_second() -> None:
    """Wait for the wall clock's next whole second (the check counts seconds with changes)."""
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)


@contextlib.asynccontextmanager
async def skewed_api_and_bridge(
    tmp_path: Path, broker: Broker, bridge_factory: BridgeFactory, skew: list[float]
) -> AsyncIterator[tuple[DispatchApiClient, BridgeHandle]]:
    """The API server in this process, `skew[0]` seconds behind, and a synced bridge."""
    api = ApiServerHandle(tmp_path / "api")  # only its credentials and port: served here
    assert api.key is not None and api.secret is not None
    async with serve(
        "127.0.0.1:0",
        tmp_path / "api" / "api.sqlite3",
        AuthConfig(key=api.key, sign_secret=api.secret),
        clock=lambda: time.time() - skew[0],
    ) as server:
        api.port = int(server.address.rpartition(":")[2])
        bridge = bridge_factory(api, broker, extra_args=["--status-interval", "1"], start=False)
        await asyncio.to_thread(bridge.start)
        await asyncio.to_thread(bridge.wait_synced)
        async with api.client() as client:
            yield client, bridge
    assert bridge.stop() == 0


async def create(client: DispatchApiClient, target: int = 1) -> Dispatch:
    """A dispatch an hour ahead (nothing runs: only its `update_time` matters)."""
    return await client.create(
        microgrid_id=MicrogridId(1),
        type="CLOCK",
        start_time=datetime.now(UTC) + timedelta(hours=1),
        duration=timedelta(seconds=60),
        target=TargetIds(target),
    )


async def test_a_bridge_clock_off_from_the_apis_is_reported_until_they_agree(
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
    tmp_path: Path,
) -> None:
    skew = [SKEW_S]
    tap = mqtt_tap_factory(mqtt_broker, LAYOUT.status)
    async with skewed_api_and_bridge(tmp_path, mqtt_broker, bridge_factory, skew) as (
        client,
        bridge,
    ):
        created = await create(client)
        for seconds in range(SECONDS_NEEDED - 1):  # late changes in other seconds
            await next_second()
            await client.update(
                microgrid_id=MicrogridId(1),
                dispatch_id=created.id,
                new_fields={"duration": timedelta(seconds=61 + seconds)},
            )

        reported = await latest_status(tap.wait_latest, lambda s: "clock" in (s.error or ""))
        assert reported.error is not None
        assert "the bridge's clock is 20" in reported.error
        assert "ahead of the Dispatch API's" in reported.error
        assert reported.state == "online"  # it keeps working: a warning, not a stop
        assert "the bridge's clock is 20" in bridge.output()

        skew[0] = 0.0
        await client.update(
            microgrid_id=MicrogridId(1), dispatch_id=created.id, new_fields={"active": False}
        )
        await latest_status(tap.wait_latest, lambda s: s.error is None)
        assert "agrees with the Dispatch API's again" in bridge.output()


async def test_a_change_that_arrives_late_once_is_no_clock_alarm(
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    mqtt_tap_factory: TapFactory,
    tmp_path: Path,
) -> None:
    # As a change held by a partition of the bridge's link to the API: made 8 s
    # before it arrives. Then the clocks agree again: no alarm at any time.
    skew = [8.0]
    tap = mqtt_tap_factory(mqtt_broker, LAYOUT.everything)
    async with skewed_api_and_bridge(tmp_path, mqtt_broker, bridge_factory, skew) as (
        client,
        bridge,
    ):
        late = await create(client)
        await asyncio.to_thread(tap.wait_latest, LAYOUT.dispatch("CLOCK", int(late.id)), bool, 20.0)
        skew[0] = 0.0
        on_time = await create(client, target=2)
        await asyncio.to_thread(
            tap.wait_latest, LAYOUT.dispatch("CLOCK", int(on_time.id)), bool, 20.0
        )
        # Statuses (1 s apart) until 2 s after the on-time change: any alarm was published.
        after = datetime.now(UTC) + timedelta(seconds=2)
        await latest_status(tap.wait_latest, lambda s: s.as_of is not None and s.as_of > after)

        statuses = [wire.decode_status(m.payload) for m in tap.on(LAYOUT.status) if m.payload]
        assert statuses
        assert [s.error for s in statuses if "clock" in (s.error or "")] == []
        assert "the bridge's clock is" not in bridge.output()
