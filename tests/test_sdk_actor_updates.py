"""An actor that drops its receiver of updates: the SDK keeps going (`actor_sdk._actor_set`)."""

from __future__ import annotations

import asyncio
import gc
import itertools
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


class _SlowToStop:
    """Records its start and its stop, which takes a while."""

    def __init__(self, log: list[tuple[str, int]], number: int) -> None:
        self.log = log
        self.number = number

    def start(self) -> None:
        self.log.append(("start", self.number))

    async def stop(self, msg: str | None = None) -> None:
        self.log.append(("stopping", self.number))
        await asyncio.sleep(0.3)
        self.log.append(("stopped", self.number))


def slow_to_stop_actors(log: list[tuple[str, int]]) -> ActorSet:
    """One actor per dispatch, each `_SlowToStop`, numbered 1, 2, ... as created."""
    numbers = itertools.count(1)

    async def factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> _SlowToStop:
        return _SlowToStop(log, next(numbers))

    return ActorSet(
        "T",
        factory=factory,
        identity=lambda d: d.id,
        retry_interval=timedelta(seconds=1),
        clock=lambda: T0,
    )


async def test_a_new_actor_for_a_key_starts_only_once_its_previous_actor_stopped() -> None:
    """A stop and a start of one dispatch at once must not overlap (two actors at once).

    Stops run in tasks of their own; the start that follows a stop of the same key
    went ahead at once, so a chaos run saw the new actor start 10 ms before the old
    one had stopped.
    """
    log: list[tuple[str, int]] = []
    actors = slow_to_stop_actors(log)
    dispatch = from_wire(wire_dispatch(1, "T"))
    await actors.apply([dispatch], reason="")
    await async_wait_until(lambda: ("start", 1) in log, 5, "the first start")
    await actors.apply([], reason="stopped")
    await actors.apply([dispatch], reason="")  # again at once: the stop is under way
    await async_wait_until(lambda: ("start", 2) in log, 5, "the second start")
    assert log == [("start", 1), ("stopping", 1), ("stopped", 1), ("start", 2)]
    await actors.stop_all("done")
    assert log[-2:] == [("stopping", 2), ("stopped", 2)]


async def test_stop_start_stop_start_of_one_key_never_runs_two_actors_at_once() -> None:
    """The second stop (of a start still waiting) must not forget the first, still under way.

    It replaced the first in the key's record of stops and ended at once (it only
    cancelled the waiting creation), so the next start waited for nothing: actor 2
    started while actor 1 was still stopping.
    """
    log: list[tuple[str, int]] = []
    actors = slow_to_stop_actors(log)
    dispatch = from_wire(wire_dispatch(1, "T"))
    await actors.apply([dispatch], reason="")
    await async_wait_until(lambda: ("start", 1) in log, 5, "the first start")
    for applied in ([], [dispatch], [], [dispatch]):  # at once: actor 1 is still stopping
        await actors.apply(applied, reason="flapping")
    await async_wait_until(lambda: ("start", 2) in log, 5, "the last start")
    assert log == [("start", 1), ("stopping", 1), ("stopped", 1), ("start", 2)]
    await actors.stop_all("done")


async def test_apply_returns_once_its_new_actors_started() -> None:
    # Each start runs as a task: `apply` gives it its first step before its caller
    # handles the next message (a new actor does not wait behind other messages).
    log: list[tuple[str, int]] = []
    actors = slow_to_stop_actors(log)
    await actors.apply([from_wire(wire_dispatch(1, "T"))], reason="")
    assert log == [("start", 1)]
    await actors.stop_all("done")
