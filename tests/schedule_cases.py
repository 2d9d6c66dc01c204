"""Builders shared by the schedule tests: wire dispatches and the reference oracle."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from frequenz.client.dispatch import types as client_types

from actor_sdk import wire

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_T = TypeVar("_T")


def dispatch(
    *,
    start: datetime,
    duration: int | None = 60,
    active: bool = True,
    recurrence: wire.Recurrence | None = None,
    dispatch_id: int = 1,
) -> wire.Dispatch:
    """Build a wire dispatch with the fields the schedule cares about."""
    return wire.Dispatch(
        id=dispatch_id,
        type="TEST",
        start_time=start,
        duration=duration,
        target=wire.Target(ids=(1,)),
        active=active,
        dry_run=False,
        payload={},
        recurrence=recurrence,
        create_time=T0,
        update_time=T0,
        end_time=None,
        running=False,
        until=None,
        next_run=None,
    )


def rule(frequency: str, interval: int = 1, **fields: Any) -> wire.Recurrence:
    """Build a recurrence rule; `count`/`until` become its end criteria."""
    count = fields.pop("count", None)
    until = fields.pop("until", None)
    end = None if count is None and until is None else wire.EndCriteria(count=count, until=until)
    return wire.Recurrence(frequency=frequency, interval=interval, end=end, **fields)  # type: ignore[arg-type]


class OracleTooSlow(Exception):
    """The reference took longer than the test allows for one call."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Abort the reference when it walks too far (it can walk to year 9999)."""

    def _expire(signum: int, frame: Any) -> None:
        raise OracleTooSlow

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def client(d: wire.Dispatch) -> client_types.Dispatch:
    return wire.to_client(d)


def oracle(call: Callable[[], _T]) -> _T:
    """Run a reference call, silencing dateutil's count+until deprecation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return call()


def expected_state(
    d: wire.Dispatch, now: datetime
) -> tuple[bool, datetime | None, datetime | None]:
    """What the reference says: running, until (when running), next_run."""
    ref = client(d)
    running = oracle(lambda: ref.started_at(now))
    until = None
    if running and d.duration is not None:
        until = oracle(lambda: ref._until(now))
    next_run = oracle(lambda: ref.next_run_after(now))
    return running, until, next_run


def shift(instant: datetime, seconds: float) -> datetime:
    return instant + timedelta(seconds=seconds)
