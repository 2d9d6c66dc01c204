"""Who hears about dispatches: the lifecycle event and running state receivers, per type."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

from frequenz.channels import BroadcastChannel, Receiver, Sender, SenderError
from frequenz.client.dispatch.types import DispatchId

from actor_sdk._dispatch_model import Dispatch
from actor_sdk._event import Created, DispatchEvent
from actor_sdk._merge_strategies import MergeStrategy
from actor_sdk._planner import running_state_changes
from actor_sdk._receivers import PrimedReceiver
from actor_sdk._view import BridgeView

__all__ = ["Subscribers"]

_logger = logging.getLogger(__name__)

_CHANNEL_LIMIT = 16384

_T = TypeVar("_T")


@dataclass
class _StateSubscription:
    sender: Sender[Dispatch]
    strategy: MergeStrategy | None


class Subscribers:
    """The receivers handed out by a `Dispatcher`, and what they are sent."""

    def __init__(self, view: BridgeView) -> None:
        """Create a set without receivers.

        Args:
            view: The view the dispatches come from (for the context of a stop).
        """
        self._view = view
        self._running_state: dict[str, list[_StateSubscription]] = {}
        self._lifecycle: dict[str, list[Sender[DispatchEvent]]] = {}

    def running_state_types(self) -> set[str]:
        """Return the types someone follows the running state of."""
        return set(self._running_state)

    def wants_lifecycle(self, dispatch_type: str) -> bool:
        """Tell whether someone follows the lifecycle events of a type.

        Args:
            dispatch_type: The type.

        Returns:
            True when a lifecycle receiver of the type was handed out.
        """
        return dispatch_type in self._lifecycle

    def lifecycle_receiver(self, dispatch_type: str) -> Receiver[DispatchEvent]:
        """Return a new lifecycle receiver, primed with a `Created` per known dispatch.

        Args:
            dispatch_type: The type.

        Returns:
            The receiver.
        """
        known = sorted(self._view.dispatches(dispatch_type).values(), key=lambda d: d.id)
        sender, receiver = BroadcastChannel[DispatchEvent](
            name=f"lifecycle-{dispatch_type}", limit=_CHANNEL_LIMIT
        )
        self._lifecycle.setdefault(dispatch_type, []).append(sender)
        return PrimedReceiver([Created(dispatch) for dispatch in known], receiver)

    async def running_state_receiver(
        self,
        dispatch_type: str,
        merge_strategy: MergeStrategy | None,
        running: dict[DispatchId, Dispatch],
    ) -> Receiver[Dispatch]:
        """Return a new running state receiver, primed with what runs now.

        Args:
            dispatch_type: The type.
            merge_strategy: Its `filter` decides what passes; None passes everything.
            running: The dispatches of the type that run now.

        Returns:
            The receiver.
        """
        sender, receiver = BroadcastChannel[Dispatch](
            name=f"running-state-{dispatch_type}", limit=_CHANNEL_LIMIT
        )
        for message in running_state_changes({}, running, lambda d: d):
            await sender.send(message)
        self._running_state.setdefault(dispatch_type, []).append(
            _StateSubscription(sender, merge_strategy)
        )
        return receiver

    async def publish_lifecycle(self, events: list[DispatchEvent]) -> None:
        """Send lifecycle events to the receivers of their type.

        Args:
            events: The events.
        """
        for event in events:
            dispatch_type = event.dispatch.type
            senders = self._lifecycle.get(dispatch_type, [])
            kept = [s for s in senders if await _delivered(s, event, "lifecycle", dispatch_type)]
            if len(kept) != len(senders):
                _forget(self._lifecycle, dispatch_type, kept)

    async def notify_running_state(
        self,
        dispatch_type: str,
        previous: dict[DispatchId, Dispatch],
        current: dict[DispatchId, Dispatch],
    ) -> None:
        """Send the running state messages of a change of what runs.

        Args:
            dispatch_type: The type.
            previous: What ran before, by id.
            current: What runs now, by id.
        """
        subscriptions = self._running_state.get(dispatch_type)
        if not subscriptions:
            return

        def stopped(dispatch: Dispatch) -> Dispatch:
            known = self._view.dispatch(dispatch_type, int(dispatch.id))
            if known is None:
                return dispatch.with_state(running=False, deleted=True)
            return known.with_state(running=False)

        messages = running_state_changes(previous, current, stopped)
        if not messages:
            return
        context: dict[DispatchId, Dispatch] = {
            dispatch.id: dispatch.with_state(running=False)
            for dispatch in self._view.dispatches(dispatch_type).values()
        }
        context.update(current)
        kept = [
            subscription
            for subscription in subscriptions
            if await _sent_all(subscription, messages, context, dispatch_type)
        ]
        if len(kept) != len(subscriptions):
            _forget(self._running_state, dispatch_type, kept)

    async def close(self) -> None:
        """Close every receiver handed out."""
        for senders in self._lifecycle.values():
            for sender in senders:
                await sender.aclose()
        for subscriptions in self._running_state.values():
            for subscription in subscriptions:
                await subscription.sender.aclose()
        self._lifecycle.clear()
        self._running_state.clear()


async def _sent_all(
    subscription: _StateSubscription,
    messages: list[Dispatch],
    context: dict[DispatchId, Dispatch],
    dispatch_type: str,
) -> bool:
    """Send a subscription the messages its strategy passes; False once it is gone."""
    strategy = subscription.strategy
    for message in messages:
        if strategy is not None and not _passes(strategy, context, message, dispatch_type):
            continue
        if not await _delivered(subscription.sender, message, "running state", dispatch_type):
            return False
    return True


def _passes(
    strategy: MergeStrategy,
    context: dict[DispatchId, Dispatch],
    message: Dispatch,
    dispatch_type: str,
) -> bool:
    """Ask a receiver's merge strategy; one that raises lets the message through."""
    try:
        return strategy.filter(context, message)
    except Exception:  # the caller's code: never the other receivers' or the actors' loss
        _logger.exception(
            "the merge strategy %s of a running state receiver of type %r failed on "
            "dispatch %d; the message is sent unfiltered",
            type(strategy).__name__,
            dispatch_type,
            int(message.id),
        )
        return True


async def _delivered(sender: Sender[_T], message: _T, kind: str, dispatch_type: str) -> bool:
    """Send one message; False when its receiver was dropped (the channel is closed)."""
    try:
        await sender.send(message)
    except SenderError:
        # Never an error of the dispatcher's: one receiver fewer, and nothing else
        # (the actors of the type, the fail-safe stops) may depend on its sends.
        _logger.info(
            "a %s receiver of type %r is gone (its channel is closed): no longer sent to",
            kind,
            dispatch_type,
        )
        return False
    return True


def _forget(table: dict[str, list[_T]], dispatch_type: str, kept: list[_T]) -> None:
    """Keep only the receivers still there; a type without any leaves the table."""
    if kept:
        table[dispatch_type] = kept
    else:
        table.pop(dispatch_type, None)
