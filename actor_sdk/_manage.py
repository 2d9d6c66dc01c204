"""`manage`: run the actors of one dispatch type until cancelled."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, SupportsInt

from actor_sdk import wire
from actor_sdk._actor_api import ActorFactory
from actor_sdk._actor_set import DEFAULT_FACTORY_TIMEOUT
from actor_sdk._actor_status import choose_actor_id, release_actor_id
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
    actor_id: str | None = None,
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
        actor_id: The MQTT client id and the last level of the execution status
            topic `microgrid/<id>/actors/<actor_id>` (`[A-Za-z0-9_-]`, 1 to 128
            characters); None: `<short host name>-<dispatch type>-mg<microgrid_id>`.
        **options: More `Dispatcher` options (TLS, credentials, reconnect delays).

    Raises:
        ValueError: The actor id has a character outside `[A-Za-z0-9_-]`.
    """
    chosen, claimed = choose_actor_id(actor_id, int(microgrid_id), dispatch_type)
    try:
        async with Dispatcher(
            microgrid_id=microgrid_id,
            broker=broker,
            topic_root=topic_root,
            max_blind_time=max_blind_time,
            actor_id=chosen,
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
    finally:
        if claimed:
            release_actor_id(chosen)
