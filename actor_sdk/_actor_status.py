"""The actor execution status: what this SDK connection runs, for everyone to read.

`microgrid/<id>/actors/<actor_id>`, retained, QoS 1 (the contract's "Actor execution
status"). `StatusBoard` is the pure part: from what each managed type runs it makes
the `wire.ActorStatus`, keeps `since`, and says whether anything changed.
`StatusPublisher` is the thin shell: a task of its own publishes the latest status
whenever it changed (many changes in a row make one message) and after every
connect, so the reconciler never waits for the broker, least of all for a stop.
The connection's MQTT will is the `offline` status; a clean stop publishes it too.

MQTT 3.1.1 brokers acknowledge a publish their ACL drops, so the SDK subscribes to
its own topic and expects its message back: when it does not come, it logs once
(the ACL, the client id) and carries on without.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.metadata
import logging
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt

from actor_sdk import wire
from actor_sdk._actor_set import ActorSet

__all__ = [
    "StatusBoard",
    "StatusPublisher",
    "choose_actor_id",
    "default_actor_id",
    "release_actor_id",
]

_logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0
"""How long one status publish (or the echo that proves it stored) may take."""

STATUS_SETTLE_S = 0.5
"""How long a change of what runs waits before the status is published (a burst: once).

Past a scheduled instant's burst of starts on a busy host: with 100 actor processes on
2 cores the last ones start 60-190 ms after the instant (bench/fanout.py), and a status
published 50 ms after each start (encoded, sent, acknowledged, its echo read back and
acknowledged: 0.9 ms of CPU per process, and the broker's fan-out of 100 of them) took
the CPU those starts were waiting for."""

LOST_UNCONFIRMED_LIMIT = 2
"""After this many connections in a row lost before the broker echoed our status, stop.

Mosquitto 2.0 closes a client whose publish a per-user ACL denies: without a limit
an actor host with an old ACL would reconnect after every status it publishes.
"""

_MAX_ID = 128


def _version() -> str:
    try:
        return importlib.metadata.version("dispatch-bridge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _level(text: str) -> str:
    """Turn text into actor id characters: each other character becomes `_`."""
    return "".join(char if char in wire.ACTOR_ID_CHARACTERS else "_" for char in text)


def _program() -> str:
    """The program's name: the script's, or the package's for `python -m package`."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if path.stem == "__main__":
        return path.parent.name or "python"
    return path.stem or "python"


def default_actor_id(microgrid_id: int, what: str | None = None) -> str:
    """Return the default actor id: `<short host name>-<what>-mg<microgrid_id>`.

    `what` is the managed type for `manage(...)`, the program's name (the script
    without `.py`, or the package run with `python -m`) for a `Dispatcher`. The
    same host running the same program again gets the same id. Characters outside
    `[A-Za-z0-9_-]` become `_`; an id longer than 128 characters is cut and ends
    with a digest of the whole.

    Args:
        microgrid_id: The microgrid.
        what: The managed type, or None for the program's name.

    Returns:
        The id.
    """
    host = socket.gethostname().split(".")[0] or "host"
    actor_id = _level(f"{host}-{what if what is not None else _program()}-mg{microgrid_id}")
    if len(actor_id) > _MAX_ID:
        digest = hashlib.sha256(actor_id.encode()).hexdigest()[:12]
        actor_id = f"{actor_id[: _MAX_ID - 13]}-{digest}"
    return actor_id


_claimed: collections.Counter[str] = collections.Counter()


def choose_actor_id(
    actor_id: str | None, microgrid_id: int, what: str | None = None
) -> tuple[str, bool]:
    """Check the given actor id, or claim the default one.

    A default id already held by a dispatcher of this process gets `-2`, `-3`...:
    two connections with one client id would take turns throwing each other off
    the broker.

    Args:
        actor_id: The id given, or None for the default.
        microgrid_id: The microgrid.
        what: For the default: the managed type, or None for the program's name.

    Returns:
        The id, and whether it was claimed (then give it back with
        `release_actor_id` once its dispatcher stopped).

    Raises:
        ValueError: The given id is empty, too long, or has a character outside
            `[A-Za-z0-9_-]`.
    """
    if actor_id is not None:
        try:
            return wire.check_actor_id(actor_id), False
        except wire.WireError as error:
            raise ValueError(str(error)) from None
    base = default_actor_id(microgrid_id, what)
    candidate, number = base, 1
    while _claimed[candidate]:
        number += 1
        suffix = f"-{number}"
        candidate = f"{base[: _MAX_ID - len(suffix)]}{suffix}"
    _claimed[candidate] += 1
    return candidate, True


def release_actor_id(actor_id: str) -> None:
    """Give back a claimed id from `choose_actor_id`.

    Args:
        actor_id: The id.
    """
    _claimed[actor_id] -= 1
    if _claimed[actor_id] <= 0:
        del _claimed[actor_id]


async def within(work: Coroutine[Any, Any, object], seconds: float | None = None) -> bool:
    """Run `work` for at most `seconds`; return whether it finished without an error.

    The work runs in a task of its own and is cancelled when late: unlike
    `asyncio.wait_for` (used inside aiomqtt) on Python 3.11, a cancellation of the
    caller is never swallowed when the work finishes at the same moment.

    Args:
        work: The coroutine.
        seconds: The longest wait; None for `PUBLISH_TIMEOUT_S`.

    Returns:
        True when it finished in time without raising.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait(
            {task}, timeout=PUBLISH_TIMEOUT_S if seconds is None else seconds
        )
    finally:
        task.cancel()
    if not done or task.cancelled() or task.exception() is not None:
        what = getattr(work, "__qualname__", "work")
        _logger.debug("%s: %s", what, "late" if not done else task.exception())
        return False
    return True


class StatusBoard:
    """Makes the status from what each managed type runs; knows when it changed."""

    def __init__(self, *, host: str, version: str) -> None:
        """Create a board with nothing reported yet.

        Args:
            host: The host name.
            version: The SDK's version.
        """
        self._host = host
        self._version = version
        self._state: wire.ActorState | None = None
        self._since: datetime | None = None
        self._content: tuple[object, ...] | None = None

    def update(
        self, actors: Mapping[str, ActorSet], now: datetime
    ) -> tuple[wire.ActorStatus, bool]:
        """Return the status now, and whether it differs from the last one (`as_of` aside).

        Args:
            actors: The actors of each managed type.
            now: The current instant.

        Returns:
            The status, and whether what runs, a state or the error changed.
        """
        types: dict[str, wire.ActorTypeStatus] = {}
        errors: list[str] = []
        for name in sorted(actors):
            actor_set = actors[name]
            running = actor_set.running_ids
            failure = actor_set.failure
            if failure is not None:
                errors.append(f"type {name!r}: {failure}")
            state: wire.ActorTypeState = (
                "failed" if failure is not None else "running" if running else "idle"
            )
            types[name] = wire.ActorTypeStatus(state=state, dispatches=running)
        states = {entry.state for entry in types.values()}
        overall: wire.ActorState = next(
            (state for state in ("failed", "running") if state in states), "idle"
        )
        error = "; ".join(errors) or None
        content = (overall, tuple(types.items()), error)
        changed = content != self._content
        self._content = content
        if overall != self._state or self._since is None:
            self._state, self._since = overall, now
        status = wire.ActorStatus(
            state=overall,
            types=types,
            since=self._since,
            as_of=now,
            host=self._host,
            error=error,
            version=self._version,
        )
        return status, changed

    def offline(self, now: datetime) -> wire.ActorStatus:
        """Return the `offline` status (the will, or a clean stop).

        Args:
            now: When the connection was made (will) or the stop (clean stop).

        Returns:
            The status: nothing runs.
        """
        return wire.ActorStatus(
            state="offline",
            types={},
            since=now,
            as_of=now,
            host=self._host,
            error=None,
            version=self._version,
        )


class StatusPublisher:
    """Publishes the status of one SDK connection whenever it changed, off the hot path."""

    def __init__(
        self,
        topic: str,
        actors: Callable[[], Mapping[str, ActorSet]],
        *,
        clock: Callable[[], datetime],
        who: str,
        in_sync: Callable[[], bool] = lambda: True,
        settle: float = STATUS_SETTLE_S,
    ) -> None:
        """Create a publisher; nothing is sent before `run`.

        Args:
            topic: `microgrid/<id>/actors/<actor_id>`.
            actors: Returns the actors of each managed type.
            clock: The wall clock (UTC).
            who: The broker user and client id, for the log line of a refusal.
            in_sync: Whether the connection's retained messages were all received
                (before that, a missing echo proves nothing).
            settle: Seconds a change waits before it is published (`STATUS_SETTLE_S`).
        """
        self.topic = topic
        self._actors = actors
        self._clock = clock
        self._who = who
        self._board = StatusBoard(host=socket.gethostname(), version=_version())
        self._dirty = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._sent: bytes | None = None
        """The payload this connection holds on the broker; None: send again."""
        self._echo: asyncio.Event = asyncio.Event()
        self._awaited: bytes | None = None
        self._complained = False
        self._in_sync = in_sync
        self._settle = settle
        self._unconfirmed = False
        """A status was published on this connection and its echo has not come."""
        self._lost_unconfirmed = 0
        self._given_up = False

    def will(self) -> aiomqtt.Will:
        """Return the will of a new connection: `offline`, retained.

        Returns:
            The will.
        """
        payload = wire.encode_actor_status(self._board.offline(self._clock()))
        return aiomqtt.Will(self.topic, payload, qos=1, retain=True)

    def farewell(self) -> tuple[str, bytes]:
        """Return the topic and payload a clean stop publishes: `offline`.

        Returns:
            The topic and the payload.
        """
        return self.topic, wire.encode_actor_status(self._board.offline(self._clock()))

    def changed(self) -> None:
        """What runs may have changed: look again (cheap; never waits)."""
        self._dirty.set()

    def connected(self, client: aiomqtt.Client | None) -> None:
        """A connection came up (a client) or went (None): publish again on it.

        Args:
            client: The connected client, or None.
        """
        if client is None and self._client is not None and self._unconfirmed:
            self._lost_unconfirmed += 1
            if self._lost_unconfirmed >= LOST_UNCONFIRMED_LIMIT and not self._given_up:
                self._given_up = True
                _logger.warning(
                    "the broker closed this actor host's connection %d times in a row "
                    "right after it published its status on %s (its ACL does not let %s "
                    "write it? Mosquitto closes such clients): no longer publishing it; "
                    "actors run as usual; see deploy/mosquitto/acl",
                    self._lost_unconfirmed,
                    self.topic,
                    self._who,
                )
        self._unconfirmed = False
        self._client = client
        self._sent = None
        self._dirty.set()

    def echo(self, payload: bytes) -> None:
        """A message on our own topic arrived (the broker stored what we sent?).

        Args:
            payload: Its payload.
        """
        if self._awaited is not None and payload == self._awaited:
            self._echo.set()
            self._unconfirmed = False
            self._lost_unconfirmed = 0

    async def run(self) -> None:
        """Publish each change until cancelled, once a burst of changes has settled."""
        while True:
            await self._dirty.wait()
            # Off the instant: at a scheduled start every actor host switches its actors
            # at once, and the status (encoded, published, its echo read back) took CPU
            # the other hosts' starts were waiting for (bench/fanout.py); one publish
            # then says what a burst of starts and stops left running.
            await asyncio.sleep(self._settle)
            self._dirty.clear()
            try:
                status, changed = self._board.update(self._actors(), self._clock())
            except Exception:  # never let the status take the dispatcher down
                _logger.exception("making the actor status failed; not publishing it")
                continue
            client = self._client
            if self._given_up or client is None or (not changed and self._sent is not None):
                continue
            if not self._in_sync():
                continue  # after the subscriptions and their retained burst: poked then
            payload = wire.encode_actor_status(status)
            self._echo.clear()
            self._awaited = payload
            self._unconfirmed = True
            if not await within(client.publish(self.topic, payload, qos=1, retain=True)):
                continue  # the link notices a dead connection itself; `connected` follows
            if client is self._client:
                self._sent = payload
            if not self._complained:
                await self._expect_echo()

    async def _expect_echo(self) -> None:
        while not await within(self._echo.wait()):
            if self._client is None:
                return  # the connection went: no conclusion
            if not self._in_sync():
                continue  # the echo may wait behind a burst of retained messages
            self._complained = True
            _logger.warning(
                "the broker did not store this actor host's status on %s (its ACL does "
                "not let %s write it?): actors run as usual, but watch and field "
                "engineers cannot see what they run; see deploy/mosquitto/acl",
                self.topic,
                self._who,
            )
            return
