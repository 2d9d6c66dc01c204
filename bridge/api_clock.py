"""The bridge's clock checked against the Dispatch API's; pure.

Each streamed create or update carries the API's `update_time` of the change. Its
arrival time minus that is the offset between the clocks (ours minus the API's) plus
the delay on the way, which is never negative. So:

* a sample more than `CLOCK_TOLERANCE` below zero proves the bridge's clock behind,
  at once (no delay makes a sample smaller);
* a sample more than `CLOCK_TOLERANCE` above zero may be delay alone: a healed
  partition of the bridge's link to the API delivers every change it held at once,
  each as old as the partition. The bridge is said to be ahead only when the
  smallest sample of `SECONDS_NEEDED` different seconds that brought changes is, a
  held burst counting as one second (the SDK's estimate of the bridge's clock,
  `actor_sdk._bridge_clock`, with a short window: changes are sparse);
* a sample within the tolerance shows the clocks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from actor_sdk._bridge_clock import BridgeClock

__all__ = ["CLOCK_TOLERANCE", "SECONDS_NEEDED", "ApiClockCheck", "ClockVerdict"]

CLOCK_TOLERANCE = timedelta(seconds=2)
"""The largest offset between the bridge's clock and the API's that is not reported."""

SECONDS_NEEDED = 3
"""Different seconds with changes whose smallest sample must exceed the tolerance
before the bridge's clock is said to be ahead."""


@dataclass(frozen=True)
class ClockVerdict:
    """What one change showed: a problem (text), the clocks agreeing, or nothing yet."""

    problem: str | None
    agree: bool


class ApiClockCheck:
    """Judges the offset of the bridge's clock from the API's, one change at a time."""

    def __init__(self) -> None:
        """Create a check with no samples."""
        self._smallest = BridgeClock(window=SECONDS_NEEDED, converged_after=SECONDS_NEEDED)

    def observe(self, dispatch_id: int, update_time: datetime, arrived: datetime) -> ClockVerdict:
        """Take one streamed change: the API made it at `update_time`; it arrived at `arrived`.

        Args:
            dispatch_id: The dispatch changed (named in the problem).
            update_time: The change's time by the API's clock.
            arrived: When it arrived, by the bridge's clock.

        Returns:
            The problem to report, or that the clocks agree, or neither (no
            proof either way: a sample ahead that may be delay).
        """
        sample = arrived - update_time
        self._smallest.observe(update_time, arrived)
        if abs(sample) <= CLOCK_TOLERANCE:
            return ClockVerdict(problem=None, agree=True)
        if sample < timedelta(0):
            offset = sample
        elif self._smallest.converged and self._smallest.offset > CLOCK_TOLERANCE:
            offset = self._smallest.offset
        else:
            return ClockVerdict(problem=None, agree=False)
        seconds = offset.total_seconds()
        problem = (
            f"the bridge's clock is {abs(seconds):.1f} s "
            f"{'ahead of' if seconds > 0 else 'behind'} the Dispatch API's (dispatch "
            f"{dispatch_id} changed at {update_time.isoformat()} by the API's clock); starts "
            "and stops are published on the bridge's clock: check its time synchronisation (NTP)"
        )
        return ClockVerdict(problem=problem, agree=False)
