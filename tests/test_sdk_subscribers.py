"""Unit tests of `actor_sdk._subscribers`: what the receivers handed out are sent."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from frequenz.client.dispatch.types import DispatchId

from actor_sdk._dispatch_model import Dispatch, from_wire
from actor_sdk._merge_strategies import MergeByType
from actor_sdk._subscribers import Subscribers
from actor_sdk._view import BridgeView
from tests.fixtures.sdk import wire_dispatch


class _BrokenFilter(MergeByType):
    """A caller's strategy with a bug in its filter."""

    def filter(self, dispatches: Mapping[DispatchId, Dispatch], dispatch: Dispatch) -> bool:
        raise RuntimeError("a bug in the caller's strategy")


async def test_a_merge_strategy_that_raises_costs_no_receiver_its_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It raised out of the send to every receiver of the type: the receivers after
    # it got nothing, and the reconcile of the type's actors only logged it.
    subscribers = Subscribers(BridgeView(1))
    broken = await subscribers.running_state_receiver("T", _BrokenFilter(), {})
    plain = await subscribers.running_state_receiver("T", None, {})
    started = from_wire(wire_dispatch(1, "T"))

    await subscribers.notify_running_state("T", {}, {started.id: started})

    async with asyncio.timeout(5):
        assert (await plain.receive()).id == started.id
        assert (await broken.receive()).id == started.id  # unfiltered, not lost
    assert "of a running state receiver of type 'T' failed on dispatch 1" in caplog.text
    await subscribers.close()
