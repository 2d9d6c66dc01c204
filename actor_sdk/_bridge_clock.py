"""The bridge's clock as seen from here: an offset estimate that queueing cannot fool; pure.

Deadlines (`until`, `next_run`) are instants on the bridge's clock. Each message the
bridge published while we were subscribed (retain flag 0) carries `as_of`, the
bridge's time when it was made; the difference `arrived - as_of` is the true offset
(local minus bridge) plus the delay on the way (broker, network, our receive queue),
which is never negative. As NTP's clock filter does, the estimate is the smallest
difference over a window of recent samples: a sample delayed by a burst of retained
messages or a busy broker is larger, never smaller, so it cannot move the estimate.
The window is counted in seconds that brought samples, not in samples: a burst of
delayed live messages (a healed partition flushes everything the bridge published
meanwhile, each `as_of` seconds old) is one second of the window, so it cannot push
the good samples out (seen in a chaos run: "3.2 s ahead" for a moment, with no skew).

Until samples arrived in `CONVERGED_AFTER` different seconds, the offset in use is
zero (the local clock): the samples of one second could all be one delayed burst.
Retained replays are never samples: their `as_of` may be hours old.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta

__all__ = ["CONVERGED_AFTER", "SKEW_WORTH_LOGGING", "BridgeClock"]

CONVERGED_AFTER = 4
"""Seconds with live samples needed before deadlines use the bridge's clock (about 4
status intervals): samples of one second may all be one delayed burst (a freshly
started SDK got its first four in one, 2.9 s late, and started a run past its until)."""

WINDOW = 16
"""Seconds with samples the minimum is taken over (80 s at the bridge's 5 s status interval)."""

SKEW_WORTH_LOGGING = timedelta(seconds=1)
"""An offset beyond this is logged (and a change of the estimate by more than it)."""


class BridgeClock:
    """Estimates `local - bridge` from live messages' `as_of` and their arrival times."""

    def __init__(self, *, window: int = WINDOW, converged_after: int = CONVERGED_AFTER) -> None:
        """Create an estimator with no samples (the local clock is used).

        Args:
            window: Seconds with samples the minimum is taken over.
            converged_after: Seconds with samples needed before the estimate is used.
        """
        self._seconds: deque[tuple[int, timedelta]] = deque(maxlen=window)
        """Per arrival second (unix), the smallest sample that arrived in it."""
        self._converged_after = converged_after
        self._offset = timedelta(0)
        self._logged = timedelta(0)

    @property
    def converged(self) -> bool:
        """Whether enough samples arrived for deadlines to use the bridge's clock."""
        return len(self._seconds) >= self._converged_after

    @property
    def offset(self) -> timedelta:
        """Local clock minus the bridge's clock; zero until converged."""
        return self._offset

    def to_bridge(self, local: datetime) -> datetime:
        """Return the bridge's time at a local instant.

        Args:
            local: An instant on the local clock.

        Returns:
            The same instant on the bridge's clock (as estimated).
        """
        return local - self._offset

    def to_local(self, bridge: datetime) -> datetime:
        """Return the local time at an instant of the bridge's clock.

        Args:
            bridge: An instant on the bridge's clock (a run's `until`).

        Returns:
            The same instant on the local clock (as estimated).
        """
        return bridge + self._offset

    def observe(self, as_of: datetime, arrived: datetime) -> str | None:
        """Take one sample: a live message made at `as_of` arrived at `arrived`.

        Args:
            as_of: When the bridge made the message (its clock).
            arrived: When it arrived here (the local clock).

        Returns:
            A line worth logging when the estimate converged beyond
            `SKEW_WORTH_LOGGING` or later moved by more than that; None otherwise.
        """
        sample, second = arrived - as_of, int(arrived.timestamp())
        if (
            self._seconds and second <= self._seconds[-1][0]
        ):  # the same second (or a clock step back)
            last, smallest = self._seconds[-1]
            self._seconds[-1] = (last, min(smallest, sample))
        else:
            self._seconds.append((second, sample))
        if not self.converged:
            return None
        self._offset = min(smallest for _, smallest in self._seconds)
        if abs(self._offset - self._logged) <= SKEW_WORTH_LOGGING:
            return None
        self._logged = self._offset
        seconds = self._offset.total_seconds()
        if abs(self._offset) <= SKEW_WORTH_LOGGING:
            return f"clock offset to the bridge back within {SKEW_WORTH_LOGGING.seconds} s"
        direction = "ahead of" if seconds > 0 else "behind"
        return (
            f"local clock is {abs(seconds):.1f} s {direction} the bridge's: runs start "
            "and stop by the bridge's clock (corrected here); check NTP on both hosts"
        )
