"""Many dispatches at once: a realistic mix of create requests, and a bulk fill of the
local API server's SQLite file before it starts (for the scale tests and benches).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any


def mix(
    count: int, now: datetime, seed: int = 8, *, microgrid_id: int = 1, types: int = 50
) -> list[Any]:
    """`count` create requests of the realistic mix of `bench/scale.py`, over `types` types."""
    from frequenz.client.common.microgrid import MicrogridId  # noqa: PLC0415
    from frequenz.client.common.microgrid.electrical_components import (  # noqa: PLC0415
        ElectricalComponentCategory,
    )
    from frequenz.client.dispatch._internal_types import (  # noqa: PLC0415
        DispatchCreateRequest,
    )
    from frequenz.client.dispatch.recurrence import (  # noqa: PLC0415
        EndCriteria,
        Frequency,
        RecurrenceRule,
        Weekday,
    )
    from frequenz.client.dispatch.types import TargetCategories, TargetIds  # noqa: PLC0415

    rng = random.Random(seed)
    base = now.replace(microsecond=0)
    requests = []
    for index in range(count):
        roll = rng.random()
        rule = None
        duration: timedelta | None = timedelta(minutes=15)
        if roll < 0.40:
            start = base + timedelta(seconds=rng.randint(3600, 30 * 86400))
        elif roll < 0.55:
            start = base - timedelta(seconds=rng.randint(2 * 86400, 60 * 86400))
            duration = timedelta(hours=1)
        elif roll < 0.60:
            start = base - timedelta(seconds=rng.randint(60, 3000))
            duration = rng.choice([timedelta(hours=1), None])
        else:
            frequency = rng.choice(
                [
                    Frequency.MINUTELY,
                    Frequency.HOURLY,
                    Frequency.DAILY,
                    Frequency.WEEKLY,
                    Frequency.MONTHLY,
                    Frequency.YEARLY,
                ]
            )
            # Ages keep the reference's walk over past occurrences bearable
            # (a few hundred on average; bench/schedule.py covers the extremes).
            age = {
                Frequency.MINUTELY: 8 * 3600,
                Frequency.HOURLY: 30 * 86400,
            }.get(frequency, 2 * 365 * 86400)
            start = base - timedelta(seconds=rng.randint(3600, age))
            rule = RecurrenceRule(frequency=frequency, interval=rng.choice([1, 1, 2, 3]))
            duration = {
                Frequency.MINUTELY: timedelta(seconds=10),
                Frequency.HOURLY: timedelta(minutes=5),
            }.get(frequency, timedelta(hours=1))
            if frequency == Frequency.MINUTELY:
                rule.interval = 1
            if frequency == Frequency.WEEKLY:
                rule.byweekdays = [Weekday.MONDAY, Weekday.THURSDAY]
            if frequency == Frequency.MONTHLY:
                rule.bymonthdays = [1, 15, -1]
            if rng.random() < 0.1:
                rule.end_criteria = EndCriteria(count=rng.randint(1, 5000))
            elif rng.random() < 0.1:
                rule.end_criteria = EndCriteria(until=base + timedelta(days=rng.randint(-30, 300)))
        target: Any = (
            TargetIds(*rng.sample(range(1, 200), rng.randint(1, 4)))
            if rng.random() < 0.8
            else TargetCategories(ElectricalComponentCategory.BATTERY)
        )
        requests.append(
            DispatchCreateRequest(
                microgrid_id=MicrogridId(microgrid_id),
                type=f"SCALE_TYPE_{index % types}",
                start_time=start,
                duration=duration,
                target=target,
                active=rng.random() < 0.95,
                dry_run=False,
                payload={"power_w": rng.randint(-10_000, 10_000), "n": index},
                recurrence=rule,
            )
        )
    return requests


def populate(db_path: Path, microgrid_id: int, requests: Iterable[Any], now: datetime) -> int:
    """Bulk-insert dispatches into the API server's SQLite file (before it starts).

    Goes through `bridge.api.store.DispatchStore.create`, the servicer's own store
    call, with the end time the servicer would compute; `synchronous=OFF` for the
    fill only (the server reopens the file with its own settings).

    Args:
        db_path: The database file.
        microgrid_id: The microgrid.
        requests: `frequenz.client.dispatch` `DispatchCreateRequest`s.
        now: Their create time.

    Returns:
        How many were inserted.
    """
    from frequenz.api.dispatch.v1 import dispatch_pb2 as pb  # noqa: PLC0415

    from bridge.api.servicer import compute_end_time  # noqa: PLC0415
    from bridge.api.store import DispatchStore  # noqa: PLC0415

    store = DispatchStore(db_path)
    store._db.execute("PRAGMA synchronous=OFF")
    count = 0
    try:
        for request in requests:
            data = request.to_protobuf().dispatch_data
            end = compute_end_time(pb.Dispatch(data=data))
            store.create(microgrid_id, data, now, end)
            count += 1
    finally:
        store.close()
    return count
