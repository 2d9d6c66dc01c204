"""The dispatch as the SDK hands it out: the client's `Dispatch` plus the bridge's state.

`started`, `until` and `next_run` come from what the bridge computed and published
(`running`, `until`, `next_run` of the wire struct), not from the local clock: every
host sees the same answer, and the SDK sends a fresh `Dispatch` whenever that state
changes. `started_at(now)` and `next_run_after(after)` of the client class are still
there for callers that want to compute for another instant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from frequenz.client.dispatch.types import Dispatch as ClientDispatch

from actor_sdk import wire

__all__ = ["Dispatch", "definition", "from_wire", "runtime_state"]

_CLIENT_FIELDS = tuple(field.name for field in dataclasses.fields(ClientDispatch))


@dataclasses.dataclass(frozen=True)
class Dispatch(ClientDispatch):
    """A dispatch with its running state as the bridge computed it.

    Equal to `frequenz.dispatch.Dispatch` in shape: the client's dispatch, a
    `deleted` flag, and `started` / `until` / `next_run`.
    """

    deleted: bool = False
    """Whether the dispatch was deleted (a final stop message carries this)."""

    as_of: datetime | None = None
    """The instant the bridge computed this state for (None when unknown)."""

    # Not `_until`: the client class has a method of that name.
    _state_running: bool = False
    _state_until: datetime | None = None
    _state_next_run: datetime | None = None

    def __init__(
        self,
        client_dispatch: ClientDispatch,
        *,
        running: bool = False,
        until: datetime | None = None,
        next_run: datetime | None = None,
        as_of: datetime | None = None,
        deleted: bool = False,
    ) -> None:
        """Wrap a client dispatch with its computed state.

        Args:
            client_dispatch: The dispatch as `frequenz-client-dispatch` models it.
            running: Whether it runs at `as_of`.
            until: The end of the current run (None when not running or endless).
            next_run: The next start after `as_of`.
            as_of: The instant the state was computed for.
            deleted: Whether the dispatch was deleted.
        """
        super().__init__(**{name: getattr(client_dispatch, name) for name in _CLIENT_FIELDS})
        object.__setattr__(self, "deleted", deleted)
        object.__setattr__(self, "as_of", as_of)
        object.__setattr__(self, "_state_running", running)
        object.__setattr__(self, "_state_until", until)
        object.__setattr__(self, "_state_next_run", next_run)

    @property
    def started(self) -> bool:
        """Whether the dispatch runs, as the bridge computed it (False once deleted)."""
        return self._state_running and self.active and not self.deleted

    @property
    def until(self) -> datetime | None:
        """The end of the current run; None when not running or running until changed."""
        return self._state_until if self.started else None

    @property
    def next_run(self) -> datetime | None:
        """The next start after `as_of`, as the bridge computed it; None when none."""
        return None if self.deleted else self._state_next_run

    def missed_runs(self, since: datetime, now: datetime | None = None) -> Iterator[datetime]:
        """Yield each start of a run from `since` (included) up to now (excluded), once.

        As `frequenz.dispatch.Dispatch.missed_runs`: the starts `next_run_after`
        gives, walked from `since`, before the local clock's now. An actor that
        joined late (its host rebooted mid-dispatch) may use it to see what it
        missed; the SDK itself never replays a past run. Unlike frequenz-dispatch
        1.0.4, whose generator yields its first missed start again and again
        without end, this one ends.

        Args:
            since: The earliest start of interest.
            now: The end of the window; None for the local clock's now.

        Yields:
            The start of each missed run, in order.
        """
        end = datetime.now(UTC) if now is None else now
        run = self.next_run_after(since)
        while run is not None and run < end:
            yield run
            # `next_run_after` includes its argument: step past this start.
            run = self.next_run_after(run + timedelta(microseconds=1))

    def with_state(
        self,
        *,
        running: bool,
        until: datetime | None = None,
        deleted: bool | None = None,
    ) -> Dispatch:
        """Return a copy with another running state (for stop messages).

        Args:
            running: Whether it runs.
            until: The end of the current run.
            deleted: Whether it was deleted; None keeps the flag.

        Returns:
            The copy.
        """
        return Dispatch(
            self,
            running=running,
            until=until,
            next_run=self._state_next_run,
            as_of=self.as_of,
            deleted=self.deleted if deleted is None else deleted,
        )


def from_wire(message: wire.Dispatch, *, as_of: datetime | None = None) -> Dispatch:
    """Build the SDK's dispatch from the wire struct.

    Args:
        message: The dispatch as published.
        as_of: The instant its state was computed for, when known.

    Returns:
        The dispatch.

    Raises:
        WireError: The dispatch names a target the client library does not know.
    """
    return Dispatch(
        wire.to_client(message),
        running=message.running,
        until=message.until,
        next_run=message.next_run,
        as_of=as_of,
    )


def definition(dispatch: ClientDispatch) -> tuple[Any, ...]:
    """Return what a user defined of a dispatch (no computed state), for comparison.

    Args:
        dispatch: The dispatch.

    Returns:
        The client fields, in order.
    """
    return tuple(getattr(dispatch, name) for name in _CLIENT_FIELDS)


def runtime_state(dispatch: Dispatch) -> tuple[Any, ...]:
    """Return what a running actor needs to know of a dispatch, for change detection.

    A change in any of these is a reason to tell the actor (an update); a change
    elsewhere (e.g. a recurrence edit that leaves the current run alone) is not.

    Args:
        dispatch: The dispatch.

    Returns:
        The started flag, type, target, dry_run, payload, duration, start and end.
    """
    return (
        dispatch.started,
        dispatch.type,
        dispatch.target,
        dispatch.dry_run,
        dispatch.payload,
        dispatch.duration,
        dispatch.start_time,
        dispatch.until,
    )
