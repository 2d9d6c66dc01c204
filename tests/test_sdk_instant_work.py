"""The SDK's own work at a scheduled instant (#13: actors switched late by its own cost).

With 30 managed types and 100 starts at one instant, the timer's reconcile of every
type made the last actors wait for the types with nothing due (bench/lateness.py).
And a start told before the estimate of the bridge's clock converged was never made
on the own clock: its deadline was set only by a later message of its type.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from frequenz.channels import Receiver

from actor_sdk import DispatchInfo, wire
from actor_sdk._actor_set import ActorSet
from actor_sdk._bridge_clock import CONVERGED_AFTER, BridgeClock
from actor_sdk._dispatch_model import Dispatch
from actor_sdk._planner import Handoff
from tests.fixtures.reconcile_shell import NOW, START, Shell, T, told
from tests.fixtures.sdk import wire_dispatch

OTHER = "OTHER_TYPE"


class _Actor:
    def start(self) -> None:
        pass

    async def stop(self, msg: str | None = None) -> None:
        pass


async def _factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> _Actor:
    return _Actor()


class CountingActorSet(ActorSet):
    """An `ActorSet` that notes the type each time the reconciler applies a running set."""

    def __init__(self, name: str, applied: list[str], shell: Shell) -> None:
        super().__init__(
            name,
            factory=_factory,
            identity=lambda dispatch: dispatch.id,
            retry_interval=timedelta(seconds=60),
            clock=lambda: shell.now,
        )
        self._applied = applied

    async def apply(
        self, running: Iterable[Dispatch], *, reason: str, going_on: Iterable[Handoff] = ()
    ) -> None:
        self._applied.append(self.name)
        await super().apply(running, reason=reason, going_on=going_on)


def live_shell_managing_two_types() -> tuple[Shell, list[str]]:
    """A live view managing `T` and `OTHER`, and the list of types each apply names."""
    shell = Shell()
    applied: list[str] = []
    for dispatch_type in (T, OTHER):
        shell.reconciler.managed[dispatch_type] = CountingActorSet(dispatch_type, applied, shell)
    shell.status()
    shell.snapshot()
    return shell, applied


async def test_a_deadline_reconciles_only_the_types_that_are_due() -> None:
    shell, applied = live_shell_managing_two_types()
    shell.dispatch(told(1, START))
    # The other type runs a dispatch until long after START: nothing of it is due then.
    other = wire_dispatch(2, OTHER, start=NOW - timedelta(seconds=1), duration=600)
    shell.view.apply_dispatch(OTHER, 2, wire.encode(other), events=False)
    await shell.at(NOW)
    assert sorted(applied) == [OTHER, T]
    assert shell.reconciler.deadline == START

    applied.clear()
    shell.now = START
    await shell.reconciler.run_due()

    assert applied == [T]
    assert sorted(int(i) for i in shell.reconciler.effective[T]) == [1]
    await shell.reconciler.managed[T].stop_all("done")


async def test_every_type_is_reconciled_at_a_deadline_where_the_view_stops_being_live() -> None:
    shell, applied = live_shell_managing_two_types()
    await shell.at(NOW)
    live_until = shell.view.live_until
    assert live_until is not None and shell.reconciler.deadline == live_until

    applied.clear()
    shell.now = live_until
    await shell.reconciler.run_due()

    assert sorted(applied) == [OTHER, T]
    assert not shell.reconciler.was_live


async def test_a_start_told_before_the_clock_estimate_converged_is_made_on_the_own_clock() -> None:
    shell = Shell(BridgeClock())
    shell.status()
    shell.snapshot()
    shell.dispatch(told(1, START))
    assert await shell.at(NOW) == []
    assert shell.reconciler.deadline != START  # no own-clock start yet

    # Live messages in as many seconds as the estimate needs; none of the type.
    for seconds in range(CONVERGED_AFTER, 0, -1):
        sent = NOW - timedelta(seconds=seconds)
        shell.reconciler.observe_bridge_time(sent, sent)

    assert shell.reconciler.deadline == START
    shell.now = START
    await shell.reconciler.run_due()
    assert sorted(int(i) for i in shell.reconciler.effective[T]) == [1]
