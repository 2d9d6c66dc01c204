"""The demo's sample dispatches: a few of each kind, created through the Dispatch API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.common.microgrid.electrical_components import (
    ElectricalComponentCategory,
)
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetCategories, TargetComponents, TargetIds

from bridge.api import AuthConfig, create_dispatch

__all__ = ["Sample", "create_samples"]


@dataclass(frozen=True)
class Sample:
    """One sample dispatch: when it starts relative to now, and what the demo says of it."""

    type: str
    start: timedelta
    duration: timedelta
    target: TargetComponents
    payload: dict[str, Any]
    recurrence: RecurrenceRule | None
    what: str


def _samples() -> list[Sample]:
    minutely = RecurrenceRule(frequency=Frequency.MINUTELY, interval=1)
    return [
        Sample(
            "CHARGE_BATTERY",
            -timedelta(minutes=2),
            timedelta(minutes=30),
            TargetCategories(ElectricalComponentCategory.BATTERY),
            {"power_w": 5000},
            None,
            "running now, for 30 minutes",
        ),
        Sample(
            "HEARTBEAT",
            -timedelta(seconds=50),
            timedelta(seconds=20),
            TargetIds(7),
            {},
            minutely,
            "every minute, for 20 seconds",
        ),
        Sample(
            "LIMIT_PV",
            timedelta(minutes=1),
            timedelta(minutes=10),
            TargetCategories(ElectricalComponentCategory.INVERTER),
            {"max_power_w": 8000},
            None,
            "starts in a minute, for 10 minutes",
        ),
        Sample(
            "PEAK_SHAVING",
            -timedelta(minutes=1),
            timedelta(minutes=4),
            TargetIds(7, 8),
            {"limit_w": 20000},
            None,
            "running now, for 3 more minutes",
        ),
        Sample(
            "PEAK_SHAVING",
            timedelta(minutes=2),
            timedelta(minutes=6),
            TargetIds(7, 8),
            {"limit_w": 15000},
            None,
            "in 2 minutes, for 6: overlaps the other (one merged actor runs 9 minutes)",
        ),
    ]


async def create_samples(
    api_url: str, auth: AuthConfig, microgrid_id: int
) -> list[tuple[int, Sample]] | None:
    """Create the samples, unless the microgrid already has dispatches (a kept `--dir`)."""
    async with DispatchApiClient(
        server_url=api_url, auth_key=auth.key, sign_secret=auth.sign_secret
    ) as client:
        async for page in client.list(MicrogridId(microgrid_id), page_size=1):
            if any(True for _ in page):
                return None
            break
        now = datetime.now(UTC).replace(microsecond=0)
        created = []
        for sample in _samples():
            dispatch = await create_dispatch(
                client,
                microgrid_id=microgrid_id,
                type=sample.type,
                start_time=now + sample.start,
                duration=sample.duration,
                target=sample.target,
                payload=sample.payload,
                recurrence=sample.recurrence,
            )
            created.append((int(dispatch.id), sample))
        return created
