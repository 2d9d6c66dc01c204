"""`manage`: run the actors of one dispatch type until cancelled."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, SupportsInt

from actor_sdk import wire
from actor_sdk._actor import ActorFactory
from actor_sdk._actors import DEFAULT_FACTORY_TIMEOUT
from actor_sdk._dispatcher import DEFAULT_MAX_BLIND_TIME, Dispatcher
from actor_sdk._merge_strategies import MergeStrategy

__all__ = ["manage"]


async def manage(
    *,
    broker: str,
    microgrid_id: SupportsInt,
    dispatch_type: str,
    actor_factory: ActorFactory,
    merge_strategy: MergeStrategy | None = None,
    retry_interval: timedelta = timedelta(seconds=60),
    factory_timeout: timedelta = DEFAULT_FACTORY_TIMEOUT,
    max_blind_time: timedelta = DEFAULT_MAX_BLIND_TIME,
    topic_root: str = wire.DEFAULT_TOPIC_ROOT,
    **options: Any,
) -> None:
    """Create, start, update and stop the actors of one type until cancelled.

    Connects (and reconnects) to the broker, follows the running snapshot the
    bridge publishes, and keeps actors matching it. On cancellation every actor
    it started is stopped.

    Args:
        broker: `mqtt://user:pass@host:port` or `mqtts://...`.
        microgrid_id: The microgrid.
        dispatch_type: The type whose dispatches run the actors.
        actor_factory: Makes an actor from a `DispatchInfo` and a receiver of updates.
        merge_strategy: Which dispatches share an actor; None is one per dispatch.
        retry_interval: How long to wait before calling a failed factory again.
        factory_timeout: How long the factory may take to return an actor before
            the start counts as failed (and is retried after `retry_interval`).
        max_blind_time: How long an endless run (no `until`) goes on without a
            live view of the bridge before its actor stops.
        topic_root: The topic root; `{microgrid_id}` is replaced.
        **options: More `Dispatcher` options (TLS, credentials, reconnect delays).
    """
    async with Dispatcher(
        microgrid_id=microgrid_id,
        broker=broker,
        topic_root=topic_root,
        max_blind_time=max_blind_time,
        **options,
    ) as dispatcher:
        await dispatcher.start_managing(
            dispatch_type,
            actor_factory=actor_factory,
            merge_strategy=merge_strategy,
            retry_interval=retry_interval,
            factory_timeout=factory_timeout,
        )
        await dispatcher
