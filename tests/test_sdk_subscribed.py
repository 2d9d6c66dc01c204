"""The SDK's subscription to a type is in place when the call that made it returns.

A broker may take a moment to set a subscription up (a node of a NATS cluster does):
a dispatch topic published right after `start_managing` or
`new_running_state_event_receiver` returned must still reach the SDK. A `TcpProxy`
that holds what the SDK sends stretches that moment for as long as the test wants,
without a sleep. tests/test_nats_matrix.py runs these on NATS too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from actor_sdk import Created, Dispatcher, wire
from testkit.broker import Broker
from testkit.proxy import TcpProxy
from tests.fixtures.sdk import ActorLog, ScriptedBridge, dispatcher_for, wire_dispatch

FOLLOWED = "SDK_SUBSCRIBED"


def _start_managing(dispatcher: Dispatcher) -> Awaitable[object]:
    return dispatcher.start_managing(FOLLOWED, actor_factory=ActorLog().factory)


def _new_receiver(dispatcher: Dispatcher) -> Awaitable[object]:
    return dispatcher.new_running_state_event_receiver(FOLLOWED)


@pytest.mark.parametrize(
    "follow", [_start_managing, _new_receiver], ids=["start_managing", "receiver"]
)
async def test_the_call_returns_once_the_broker_acknowledged_the_subscription(
    follow: Callable[[Dispatcher], Awaitable[object]],
    scripted_bridge: ScriptedBridge,
    mqtt_broker_session: Broker,
    broker_proxy: TcpProxy,
) -> None:
    await scripted_bridge.status("online")
    layout = scripted_bridge.layout
    async with dispatcher_for(scripted_bridge, broker_proxy.url(mqtt_broker_session)) as dispatcher:
        broker_proxy.hold()  # the broker has not got the SUBSCRIBE while this holds
        call = asyncio.ensure_future(follow(dispatcher))
        await asyncio.wait_for(broker_proxy.holding.wait(), 5)
        assert not call.done(), "returned before the broker had the subscription"
        broker_proxy.release()
        await asyncio.wait_for(call, 5)
        # The type is subscribed already: this receiver makes no new subscription.
        events = dispatcher.new_lifecycle_events_receiver(FOLLOWED)
        # Not retained: it reaches only those subscribed when it is published.
        dispatch = wire_dispatch(1, FOLLOWED, running=False)
        await scripted_bridge.raw(layout.dispatch(FOLLOWED, 1), wire.encode(dispatch), retain=False)
        created = await asyncio.wait_for(events.receive(), 5)
        assert isinstance(created, Created) and int(created.dispatch.id) == 1
