"""Back-to-back runs of one merged actor before the bridge's clock is known (`handoffs`).

Until the estimate of the bridge's clock converges, own-clock starts wait for the
bridge's snapshot but stops do not. On a host whose clock is ahead of the bridge's,
a run ends early by the local clock; a merged actor whose next run begins at that
end must go on into it, not stop and start again one broker hop later (a chaos
run's host, 0.2 s ahead, had its merged actor stopped for 0.15 s between two runs).
An actor of one dispatch must still not start before the bridge confirms it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import timedelta

import msgspec
import pytest
from frequenz.channels import Receiver

from actor_sdk import DispatchInfo
from actor_sdk._actor_set import ActorSet
from actor_sdk._bridge_clock import BridgeClock
from actor_sdk._dispatch_model import Dispatch
from testkit.processes import async_wait_until
from tests.fixtures.reconcile_shell import NOW, START, Shell, T, told
from tests.fixtures.sdk import wire_dispatch

AFTER_END = START + timedelta(milliseconds=60)
"""Past the first run's end and the live grace, on the local clock."""


class Events:
    """What the actors of a set did, in order: ("start" | "stop", the id it started for)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    async def factory(self, info: DispatchInfo, updates: Receiver[DispatchInfo]) -> _Actor:
        return _Actor(self, info, updates)


class _Actor:
    def __init__(self, events: Events, info: DispatchInfo, updates: Receiver[DispatchInfo]) -> None:
        self.events, self.info, self.updates = events, info, updates

    def start(self) -> None:
        self.events.log.append(("start", int(self.info._src.id)))

    async def stop(self, msg: str | None = None) -> None:
        self.events.log.append(("stop", int(self.info._src.id)))


def managed_shell(identity: str) -> tuple[Shell, ActorSet, Events]:
    """A live view on a clock not yet estimated; dispatch 1 runs until START, 2 is told
    to start at START; the type's actors keyed by type (merged) or by dispatch."""
    shell = Shell(BridgeClock())
    events = Events()
    key: Callable[[Dispatch], Hashable] = (
        (lambda d: d.type) if identity == "merged" else (lambda d: int(d.id))
    )
    keyed = ActorSet(
        T,
        factory=events.factory,
        identity=key,
        retry_interval=timedelta(seconds=1),
        clock=lambda: shell.now,
    )
    shell.reconciler.managed[T] = keyed
    shell.status()
    first = wire_dispatch(1, T, start=START - timedelta(seconds=10), duration=10)
    assert first.until == START
    shell.snapshot(first, next_change=START)
    shell.dispatch(first)
    shell.dispatch(told(2, START))
    return shell, keyed, events


def bridge_confirms_second_run(shell: Shell) -> None:
    """The bridge's snapshot of START arrives (a broker hop after it)."""
    shell.now = START + timedelta(milliseconds=200)
    second = msgspec.structs.replace(
        told(2, START), running=True, until=START + timedelta(seconds=60), next_run=None
    )
    shell.snapshot(second, next_change=second.until)


async def started(actors: ActorSet, ids: tuple[int, ...]) -> None:
    await async_wait_until(lambda: actors.running_ids == ids, 5, f"actors for {ids}")


async def test_a_merged_actor_goes_on_into_the_next_run_before_the_clock_is_known() -> None:
    shell, actors, events = managed_shell("merged")
    assert await shell.at(NOW) == [1]
    await started(actors, (1,))
    # The first run is over on the local clock; the second's start waits for the bridge.
    assert await shell.at(AFTER_END, heartbeat=True) == []
    assert actors.running_ids == (2,)  # the actor goes on, now for dispatch 2
    bridge_confirms_second_run(shell)
    assert await shell.at(shell.now) == [2]
    await actors.wait_idle()
    assert events.log == [("start", 1)]  # never stopped, never started again
    await actors.stop_all("done")


async def test_a_change_of_the_run_gone_on_into_is_taken_at_once() -> None:
    shell, actors, events = managed_shell("merged")
    assert await shell.at(NOW) == [1]
    await started(actors, (1,))
    assert await shell.at(AFTER_END, heartbeat=True) == []
    assert actors.running_ids == (2,)
    shell.dispatch(told(2, START, active=False))  # deactivated before the bridge confirmed
    assert shell.reconciler.needs_run(T, 2)
    assert await shell.at(shell.now) == []
    await actors.wait_idle()
    assert not actors.running_ids
    assert events.log == [("start", 1), ("stop", 1)]


async def test_a_run_gone_on_into_ends_at_its_until_without_the_bridges_word() -> None:
    shell, actors, events = managed_shell("merged")
    assert await shell.at(NOW) == [1]
    await started(actors, (1,))
    assert await shell.at(AFTER_END, heartbeat=True) == []
    assert actors.running_ids == (2,)
    # No snapshot of START ever comes (the view stays live): the run's own end stops it.
    assert await shell.at(AFTER_END + timedelta(seconds=59), heartbeat=True) == []
    assert actors.running_ids == (2,)
    assert await shell.at(AFTER_END + timedelta(seconds=60), heartbeat=True) == []
    await actors.wait_idle()
    assert not actors.running_ids
    assert events.log == [("start", 1), ("stop", 1)]  # the actor started for 1


async def test_an_actor_of_one_dispatch_still_waits_for_the_bridge() -> None:
    shell, actors, events = managed_shell("per dispatch")
    assert await shell.at(NOW) == [1]
    await started(actors, (1,))
    assert await shell.at(AFTER_END, heartbeat=True) == []
    await actors.wait_idle()
    assert actors.running_ids == ()
    assert events.log == [("start", 1), ("stop", 1)]
    bridge_confirms_second_run(shell)
    assert await shell.at(shell.now) == [2]
    await started(actors, (2,))
    await actors.stop_all("done")


@pytest.mark.parametrize("change", ["a gap before the next run", "the first run deleted"])
async def test_no_handoff_where_the_bridge_sees_a_gap(change: str) -> None:
    shell, actors, events = managed_shell("merged")
    assert await shell.at(NOW) == [1]
    await started(actors, (1,))
    if change == "a gap before the next run":
        shell.dispatch(told(2, START + timedelta(seconds=1)))
        shell.snapshot(
            wire_dispatch(1, T, start=START - timedelta(seconds=10), duration=10),
            next_change=START,
        )
    else:  # the bridge's snapshot no longer has it: it stops at once
        shell.snapshot(next_change=START)
        assert await shell.at(NOW) == []
    assert await shell.at(AFTER_END, heartbeat=True) == []
    await actors.wait_idle()
    assert actors.running_ids == ()
    assert events.log == [("start", 1), ("stop", 1)]
    await actors.stop_all("done")
