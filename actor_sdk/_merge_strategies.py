"""Merge strategies: which dispatches share one actor.

A strategy gives every dispatch an identity; dispatches with equal identities that
run at the same time are served by one actor. `filter` decides, for the running
state receiver, whether a message passes (a stop is held back while another
dispatch of the same identity still runs).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping

from frequenz.client.dispatch.types import DispatchId
from frequenz.core.id import BaseId

from actor_sdk._dispatch_model import Dispatch

__all__ = ["DispatchActorId", "MergeByType", "MergeByTypeTarget", "MergeStrategy"]


class DispatchActorId(BaseId, str_prefix="SDKA"):
    """The identity of the actor a dispatch belongs to."""


def _stable_id(*parts: object) -> int:
    """Map parts to a positive integer that is the same in every process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _target_key(dispatch: Dispatch) -> tuple[str, ...]:
    # Sorted reprs: a frozenset's iteration order is not the same in every process.
    return tuple(sorted(repr(item) for item in dispatch.target))


class MergeStrategy(ABC):
    """How dispatches map to actors; subclass it for a custom strategy."""

    @abstractmethod
    def identity(self, dispatch: Dispatch) -> DispatchActorId:
        """Return the identity of the actor that serves a dispatch.

        Args:
            dispatch: The dispatch.

        Returns:
            Equal for dispatches that share an actor.
        """

    @abstractmethod
    def filter(self, dispatches: Mapping[DispatchId, Dispatch], dispatch: Dispatch) -> bool:
        """Decide whether a running state message passes to the receiver.

        Args:
            dispatches: The dispatches of the type, with their current state.
            dispatch: The dispatch whose state changed.

        Returns:
            True to send the message.
        """


class MergeByType(MergeStrategy):
    """One actor per dispatch type and dry_run flag."""

    def identity(self, dispatch: Dispatch) -> DispatchActorId:
        """Return an identity from the type and the dry_run flag.

        Args:
            dispatch: The dispatch.

        Returns:
            The identity.
        """
        return DispatchActorId(_stable_id(dispatch.type, dispatch.dry_run))

    def filter(self, dispatches: Mapping[DispatchId, Dispatch], dispatch: Dispatch) -> bool:
        """Pass every start and update; pass a stop only if no other of its group runs.

        Args:
            dispatches: The dispatches of the type, with their current state.
            dispatch: The dispatch whose state changed.

        Returns:
            True to send the message.
        """
        if dispatch.started:
            return True
        identity = self.identity(dispatch)
        return not any(
            other.started and other.id != dispatch.id and self.identity(other) == identity
            for other in dispatches.values()
        )


class MergeByTypeTarget(MergeByType):
    """One actor per dispatch type, dry_run flag and target."""

    def identity(self, dispatch: Dispatch) -> DispatchActorId:
        """Return an identity from the type, the dry_run flag and the target.

        Args:
            dispatch: The dispatch.

        Returns:
            The identity.
        """
        return DispatchActorId(_stable_id(dispatch.type, dispatch.dry_run, _target_key(dispatch)))
