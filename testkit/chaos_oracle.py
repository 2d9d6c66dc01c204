"""The chaos run's oracle: what should run when, by `frequenz-client-dispatch` itself.

The bridge computes runs with `bridge.schedule`; judging it with the same code would
hide a bug in it. This oracle asks the client library's own `Dispatch`
(`started_at`, `_until`, `next_run_after`), on the dispatches as the Dispatch API
returned them to the driver (start times as the API stored them: it rounds them to
the second). It walks occurrence by occurrence, so it stays cheap only for short
recurrences (the driver's have at most a handful of occurrences).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from frequenz.client.dispatch.types import Dispatch

Interval = tuple[float, float]
"""A half-open interval [start, stop) in unix seconds."""

_NUDGE = timedelta(microseconds=1)


def to_dt(t: float) -> datetime:
    """Unix seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(t, UTC)


def windows(dispatch: Dispatch, begin: float, end: float) -> list[Interval]:
    """The intervals within [begin, end) in which the client library says it runs.

    Args:
        dispatch: The dispatch as the Dispatch API holds it.
        begin: Start of the span, unix seconds.
        end: End of the span, unix seconds.

    Returns:
        The runs, sorted, clipped to the span.
    """
    found: list[Interval] = []
    if not dispatch.active:
        return found
    moment, stop_at = to_dt(begin), to_dt(end)
    while moment < stop_at:
        if dispatch.started_at(moment):
            until = None if dispatch.duration is None else dispatch._until(moment)
            stop = stop_at if until is None else min(until, stop_at)
            found.append((moment.timestamp(), stop.timestamp()))
            moment = max(stop, moment + _NUDGE)
            continue
        upcoming = dispatch.next_run_after(moment)
        if upcoming is None or upcoming >= stop_at:
            break
        moment = max(upcoming, moment + _NUDGE)
    return found


def running_ids(dispatches: Iterable[Dispatch], t: float) -> list[int]:
    """The ids of the dispatches that run at `t`, sorted."""
    moment = to_dt(t)
    return sorted(int(d.id) for d in dispatches if d.started_at(moment))
