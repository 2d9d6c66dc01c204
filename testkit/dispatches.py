"""A wire dispatch built from the fields the schedule reads.

Shared by `bench/schedule.py` and the schedule tests (`tests/schedule_cases.py`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from actor_sdk import wire

__all__ = ["CREATED", "dispatch"]

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
"""The create and update time of every dispatch built here (the schedule ignores it)."""


def dispatch(
    *,
    start: datetime,
    duration: int | None = 60,
    active: bool = True,
    recurrence: wire.Recurrence | None = None,
    dispatch_id: int = 1,
    dispatch_type: str = "SCHEDULE",
) -> wire.Dispatch:
    """Build a wire dispatch with the fields the schedule cares about.

    Args:
        start: The start time.
        duration: The duration in seconds (None: runs until stopped).
        active: Whether it is active.
        recurrence: The recurrence rule, if any.
        dispatch_id: The id.
        dispatch_type: The type.

    Returns:
        The dispatch, with no computed state (`running` false, no `until`/`next_run`).
    """
    return wire.Dispatch(
        id=dispatch_id,
        type=dispatch_type,
        start_time=start,
        duration=duration,
        target=wire.Target(ids=(1,)),
        active=active,
        dry_run=False,
        payload={},
        recurrence=recurrence,
        create_time=CREATED,
        update_time=CREATED,
        end_time=None,
        running=False,
        until=None,
        next_run=None,
    )
