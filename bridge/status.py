"""What the bridge's status says, and whether it vouches for the retained tree; pure.

`StatusBoard` collects the facts the service, the upstream and the publisher
learn (upstream link, last listing, knowledge age, skipped dispatches,
refused publishes, problems) and turns them into a `wire.BridgeStatus` at a
given instant. It never reads the clock: `status()` takes `now`.

The state rule (docs/contract.md): `online` only while the knowledge of the
tree is confirmed: the upstream stream is connected after a listing, or the
last confirmation (a listing in this run, or the loaded cache's `synced_at`)
is younger than `max_knowledge_age`. Otherwise `syncing`, with `error` saying
why. A live stream keeps the knowledge confirmed however long ago it listed:
every change reaches the bridge while it is connected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from actor_sdk import wire
from bridge import __version__

__all__ = ["ProblemKey", "StatusBoard"]

ProblemKey = Literal["knowledge", "refused", "peer", "clock", "skipped", "journal", "cache"]


@dataclass(slots=True)
class _Problem:
    text: str
    expires: datetime | None


@dataclass(slots=True)
class StatusBoard:
    """The facts behind the status of one microgrid's bridge."""

    bridge: str
    status_interval: int = 5
    max_knowledge_age: timedelta = timedelta(days=1)
    upstream: Literal["connected", "disconnected"] = "disconnected"
    synced_at: datetime | None = None
    knowledge_at: datetime | None = None
    dispatches: int = 0
    skipped: int = 0
    refused: int = 0
    _problems: dict[str, _Problem] = field(default_factory=dict)

    def report(self, key: ProblemKey, text: str, *, expires: datetime | None = None) -> None:
        """Record a problem; the newest one is the status's `error`.

        Args:
            key: Which kind of problem (a later report of the same kind replaces it).
            text: What happened and what to do, for a field engineer.
            expires: When the problem stops being reported unless reported again.
        """
        self._problems.pop(key, None)
        self._problems[key] = _Problem(text, expires)

    def resolve(self, key: ProblemKey) -> None:
        """Forget a problem that is over.

        Args:
            key: Which kind of problem.
        """
        self._problems.pop(key, None)

    def vouches(self, now: datetime) -> bool:
        """Whether the bridge vouches for the retained tree at `now`.

        Args:
            now: The current instant.

        Returns:
            True when the knowledge is confirmed and young enough.
        """
        if self.knowledge_at is None:
            return False
        if self.upstream == "connected" and self.synced_at is not None:
            return True
        return now - self.knowledge_at <= self.max_knowledge_age

    def status(self, now: datetime, session: int, *, offline: bool = False) -> wire.BridgeStatus:
        """The status at `now`.

        Args:
            now: The current instant (the status's `as_of`).
            session: The broker session the status belongs to.
            offline: Make the will / clean-stop status.

        Returns:
            The status.
        """
        vouches = self.vouches(now)
        if offline:
            state: Literal["online", "syncing", "offline"] = "offline"
        else:
            state = "online" if vouches else "syncing"
        return wire.BridgeStatus(
            state=state,
            upstream=self.upstream,
            synced_at=self.synced_at,
            session=session,
            bridge=self.bridge,
            version=__version__,
            dispatches=self.dispatches,
            as_of=now,
            status_interval=self.status_interval,
            knowledge_at=self.knowledge_at,
            skipped=self.skipped,
            refused=self.refused,
            error=self._error(now, vouches),
            contract=wire.STATUS_CONTRACT,
            tree_counts=True,
        )

    def _error(self, now: datetime, vouches: bool) -> str | None:
        if not vouches:
            self.report("knowledge", self._knowledge_problem(now))
        else:
            self.resolve("knowledge")
        for key in [k for k, p in self._problems.items() if p.expires and p.expires <= now]:
            del self._problems[key]
        if not self._problems:
            return None
        return next(reversed(self._problems.values())).text

    def _knowledge_problem(self, now: datetime) -> str:
        if self.knowledge_at is None:
            return (
                "not vouching for the retained topics: no sync with the Dispatch API in this run "
                "and no valid cache; waiting for the Dispatch API"
            )
        age = (now - self.knowledge_at).total_seconds()
        return (
            f"not vouching for the retained topics: the dispatches were last confirmed by the "
            f"Dispatch API {_duration(age)} ago ({self.knowledge_at.isoformat()}), more than the "
            f"maximum age of {_duration(self.max_knowledge_age.total_seconds())} "
            "(--max-knowledge-age); waiting for the Dispatch API"
        )


def _duration(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
