"""What the SDK starts: actors, their factories, and the information they get."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from frequenz.channels import Receiver
from frequenz.client.dispatch.types import TargetComponents

from actor_sdk._dispatch_model import Dispatch

__all__ = ["Actor", "ActorFactory", "DispatchInfo"]


class Actor(Protocol):
    """Anything with `start()` and `async stop(msg)`; a `frequenz.sdk` actor fits."""

    def start(self) -> None:
        """Start the actor; it runs in the background until stopped."""

    def stop(self, msg: str, /) -> Awaitable[None]:
        """Stop the actor.

        Args:
            msg: Why it stops, for its logs.
        """


@dataclass(frozen=True, kw_only=True)
class DispatchInfo:
    """What an actor needs to know of the dispatch it runs for."""

    target: TargetComponents
    """The components to act on."""

    dry_run: bool
    """Whether to only pretend (log, do not act)."""

    options: dict[str, Any]
    """The dispatch's payload."""

    _src: Dispatch
    """The dispatch this information comes from (a running one)."""

    @property
    def components(self) -> TargetComponents:
        """The target (the name `frequenz-dispatch` used before `target`)."""
        return self.target

    @classmethod
    def from_dispatch(cls, dispatch: Dispatch) -> DispatchInfo:
        """Build the information for an actor from a dispatch.

        Args:
            dispatch: The running dispatch.

        Returns:
            The information.
        """
        return cls(
            target=dispatch.target,
            dry_run=dispatch.dry_run,
            options=dispatch.payload,
            _src=dispatch,
        )


ActorFactory = Callable[[DispatchInfo, Receiver[DispatchInfo]], Actor | Awaitable[Actor]]
"""Creates an actor from its first information and a receiver of later updates.

May be a coroutine function (as `frequenz-dispatch` requires) or a plain one.
"""
