"""Builders shared by the schedule tests: wire dispatches and the reference oracle."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

from frequenz.client.dispatch import types as client_types

from actor_sdk import wire
from testkit.dispatches import dispatch

_T = TypeVar("_T")

__all__ = [
    "OracleTooSlow",
    "client",
    "dispatch",
    "expected_state",
    "oracle",
    "rule",
    "shift",
    "time_limit",
]


def rule(frequency: str, interval: int = 1, **fields: Any) -> wire.Recurrence:
    """Build a recurrence rule; `count`/`until` become its end criteria."""
    count = fields.pop("count", None)
    until = fields.pop("until", None)
    end = None if count is None and until is None else wire.EndCriteria(count=count, until=until)
    return wire.Recurrence(frequency=frequency, interval=interval, end=end, **fields)  # type: ignore[arg-type]


class OracleTooSlow(Exception):
    """The reference took longer than the test allows for one call."""


_REFERENCE_CODE = ("/dateutil/", "/frequenz/client/dispatch/")
"""Where `time_limit` may raise: in the reference's own code, nowhere else."""

_RETRY_S = 0.002


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Abort the reference when it walks too far (it can walk to year 9999).

    The alarm raises only inside the reference's code, at a line: raised anywhere
    (in hypothesis, a `with` statement's cleanup, pytest), the error could leave a
    frame without a line number, and pytest crashed printing it (an INTERNALERROR
    that failed two fresh-clone CI runs in `test_run_state_equals_reference`).
    Elsewhere the alarm comes again 2 ms later.
    """

    def _expire(signum: int, frame: Any) -> None:
        if (
            frame is not None
            and frame.f_lineno is not None
            and any(part in frame.f_code.co_filename for part in _REFERENCE_CODE)
        ):
            raise OracleTooSlow
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)

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
