"""An actor that drops its receiver of updates: the SDK keeps going (`actor_sdk._actor_set`)."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta

import pytest
from frequenz.channels import Receiver

from actor_sdk import DispatchInfo
from actor_sdk._actor_set import ActorSet
from actor_sdk._dispatch_model import from_wire
from testkit.processes import async_wait_until
from tests.fixtures.sdk import wire_dispatch

T0 = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)


class _Forgetful:
    """Keeps only its first parameters; its receiver of updates is garbage."""

    def __init__(self) -> None:
        self.stopped = False

    def start(self) -> None:
        pass

    async def stop(self, msg: str | None = None) -> None:
        self.stopped = True


async def test_an_update_to_an_actor_without_its_receiver_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    created: list[_Forgetful] = []

    async def factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> _Forgetful:
        created.append(_Forgetful())
        return created[-1]

    actors = ActorSet(
        "T",
        factory=factory,
        identity=lambda d: d.type,  # one actor for the type: the second dispatch updates it
        retry_interval=timedelta(seconds=1),
        clock=lambda: T0,
    )
    await actors.apply([from_wire(wire_dispatch(1, "T"))], reason="")
    await async_wait_until(lambda: actors.running_ids == (1,), 5, "the start")
    gc.collect()  # the receiver the factory was given is gone
    await actors.apply([from_wire(wire_dispatch(2, "T"))], reason="")  # raised SenderError
    assert "does not keep its receiver of updates" in caplog.text
    await actors.stop_all("done")
    assert len(created) == 1 and created[0].stopped
