"""Lifecycle events of dispatches: created, updated, deleted."""

from __future__ import annotations

from dataclasses import dataclass

from actor_sdk._dispatch_model import Dispatch

__all__ = ["Created", "Deleted", "DispatchEvent", "Updated"]


@dataclass(frozen=True)
class Created:
    """A dispatch appeared (also sent for every dispatch already there at start)."""

    dispatch: Dispatch
    """The dispatch that was created."""


@dataclass(frozen=True)
class Updated:
    """A dispatch's definition changed."""

    dispatch: Dispatch
    """The dispatch as it is now."""


@dataclass(frozen=True)
class Deleted:
    """A dispatch was deleted (or moved to another type)."""

    dispatch: Dispatch
    """The dispatch as it was last known, with `deleted` set."""


DispatchEvent = Created | Updated | Deleted
"""A lifecycle event, to be matched with `match ... case Created(dispatch): ...`."""
