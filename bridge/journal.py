"""The bridge's audit journal: every state change and every upstream event, as JSON lines.

`<state-dir>/journal/journal.jsonl`, rotated by `actor_sdk.journal.JournalWriter`
(`run --journal-max-bytes`, default 10 MiB per file; `run --journal-files`, default
5 files in all, 0 for no journal). One journal for every microgrid of the bridge;
each entry says its microgrid. `dispatch-bridge audit` reads it.

Each entry is one JSON object with `time` (the step's instant for upstream
events, the hand-over for changes), `source`, `event`, `microgrid_id` and
`session` (the bridge's broker session when the entry was made: the `session`
of the snapshots actors saw), and, where it applies, `dispatch_id`, `type`:

| source | event | more |
|---|---|---|
| `upstream` | `created`, `updated`, `deleted` (streamed) | `update_time`, `buffered` |
| `upstream` | `listed` (a complete listing) | `dispatches`, `unconvertible` |
| `upstream` | `connected`, `disconnected` | `reason` (disconnected) |
| `bridge` | `created`, `updated`, `deleted` (published) | `changed` (updated): fields |
| `bridge` | `started`, `stopped` (a run began or ended) | `until` (started) |

What is not journaled: republishing unchanged state (after a reconnect, a
status heartbeat), a stream event that changes nothing, and the first listing
of a bridge that had no cache (journaled as one `listed` entry, not one
`created` per dispatch: the bridge sends no lifecycle events for it either).

Entries are made after the step handed its topics to the publisher (10 ms
later, as the log lines), in the order things happened (an upstream event,
then what it changed), so journaling never delays a start or a stop; writing
happens on the writer's own thread.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from actor_sdk import wire
from actor_sdk.journal import DEFAULT_FILES, DEFAULT_MAX_BYTES, JournalWriter, format_time
from actor_sdk.wall_clock import utc_now
from bridge.config import SettingsSource, journal_path
from bridge.core import Outbox
from bridge.publisher import Publisher
from bridge.request_handler import RequestHandler
from bridge.service import (
    DeletedById,
    LinkChanged,
    MicrogridService,
    StreamEvent,
    Synced,
    UpstreamItem,
)
from bridge.status import StatusBoard

__all__ = [
    "BridgeJournal",
    "JournalSettings",
    "add_arguments",
    "changed_fields",
    "load_settings",
    "start",
]

_DEFER_S = 0.01
"""How long after a step its outcome is journaled (its topics go first)."""

_SLICE = 200
"""Entries made per turn of the event loop (about a millisecond): a step that changed
100,000 dispatches never holds the loop for the half second its entries take."""

_COMPUTED = frozenset({"running", "until", "next_run", "update_time"})
"""Fields that are not a change of the dispatch itself."""


@dataclass(frozen=True)
class JournalSettings:
    """The journal's retention; `files == 0` turns it off."""

    max_bytes: int = DEFAULT_MAX_BYTES
    files: int = DEFAULT_FILES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--journal-max-bytes` and `--journal-files` to `dispatch-bridge run`.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--journal-max-bytes",
        metavar="BYTES",
        help="rotate the audit journal (<state-dir>/journal/journal.jsonl) at this size "
        f"(env DISPATCH_BRIDGE_JOURNAL_MAX_BYTES; default {DEFAULT_MAX_BYTES} = 10 MiB)",
    )
    parser.add_argument(
        "--journal-files",
        metavar="N",
        help="how many journal files to keep, the current one included; 0 keeps no journal "
        f"(env DISPATCH_BRIDGE_JOURNAL_FILES; default {DEFAULT_FILES})",
    )


def _parse_count(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError("expected a whole number")
        number = int(float(value))
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


def load_settings(source: SettingsSource) -> JournalSettings:
    """Resolve the journal settings (flags, environment, `[bridge]` table).

    Args:
        source: The settings source of `dispatch-bridge run`.

    Returns:
        The settings.
    """
    return JournalSettings(
        max_bytes=source.get(
            "journal_max_bytes",
            env="DISPATCH_BRIDGE_JOURNAL_MAX_BYTES",
            parse=_parse_count(1024, 1 << 40),
            default=DEFAULT_MAX_BYTES,
        ),
        files=source.get(
            "journal_files",
            env="DISPATCH_BRIDGE_JOURNAL_FILES",
            parse=_parse_count(0, 1000),
            default=DEFAULT_FILES,
        ),
    )


def changed_fields(before: wire.Dispatch, after: wire.Dispatch) -> list[str]:
    """The fields in which two versions of a dispatch differ, computed state aside.

    Args:
        before: The version held before.
        after: The new version.

    Returns:
        The field names, in the struct's order.
    """
    return [
        name
        for name in wire.Dispatch.__struct_fields__
        if name not in _COMPUTED and getattr(before, name) != getattr(after, name)
    ]


class BridgeJournal:
    """Turns one microgrid's upstream items and outboxes into journal entries."""

    def __init__(
        self,
        writer: JournalWriter,
        microgrid_id: int,
        session: Callable[[], int],
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Create the journal of a microgrid.

        Args:
            writer: The (shared) writer.
            microgrid_id: The microgrid.
            session: Returns the current broker session.
            clock: The wall clock (the time of a step's outcome).
        """
        self._writer = writer
        self._microgrid_id = microgrid_id
        self._session = session
        self._clock = clock
        self._formatted: tuple[datetime | None, str | None] = (None, None)
        self._pending: deque[Iterator[None]] = deque()
        self._scheduled = False

    def _enqueue(self, work: Iterator[None]) -> None:
        """Make the entries of `work` after the step, in order, a slice at a time."""
        self._pending.append(work)
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_later(_DEFER_S, self._drain)
        except RuntimeError:  # stepped without a loop (tests)
            self._drain()
            return
        self._scheduled = True

    def _drain(self) -> None:
        made = 0
        while self._pending and made < _SLICE:
            try:
                next(self._pending[0])
                made += 1
            except StopIteration:
                self._pending.popleft()
        self._scheduled = bool(self._pending)
        if self._scheduled:
            asyncio.get_running_loop().call_soon(self._drain)

    def _format(self, time: datetime) -> str | None:
        # The entries of one step share their instant: formatted once.
        if time != self._formatted[0]:
            self._formatted = (time, format_time(time))
        return self._formatted[1]

    def _append(self, time: datetime, session: int, source: str, event: str, **more: Any) -> None:
        self._writer.append(
            {
                "time": self._format(time),
                "source": source,
                "event": event,
                "microgrid_id": self._microgrid_id,
                "session": session,
                **more,
            }
        )

    def upstream(self, item: UpstreamItem, now: datetime) -> None:
        """Journal an upstream item (`MicrogridService.on_upstream`), after the step.

        Args:
            item: What the upstream delivered.
            now: The step's instant.
        """
        # Counted now: the step empties a listing's list as it applies it.
        listed = len(item.dispatches) + len(item.listed_before) if isinstance(item, Synced) else 0
        self._enqueue(self._upstream(item, now, self._session(), listed))

    def _upstream(
        self, item: UpstreamItem, now: datetime, session: int, listed: int
    ) -> Iterator[None]:
        match item:
            case StreamEvent(kind=kind, dispatch=dispatch, buffered=buffered):
                self._append(
                    now,
                    session,
                    "upstream",
                    kind,
                    dispatch_id=dispatch.id,
                    type=dispatch.type,
                    update_time=format_time(dispatch.update_time),
                    buffered=buffered,
                )
            case DeletedById(dispatch_id=dispatch_id):
                self._append(now, session, "upstream", "deleted", dispatch_id=dispatch_id)
            case Synced(unconvertible=unconvertible):
                self._append(
                    now,
                    session,
                    "upstream",
                    "listed",
                    dispatches=listed,
                    unconvertible=len(unconvertible),
                )
            case LinkChanged(connected=True):
                self._append(now, session, "upstream", "connected")
            case LinkChanged(reason=reason):
                self._append(now, session, "upstream", "disconnected", reason=reason)
        yield

    def request(self, event: str, dispatch_type: str | None, reason: str, now: datetime) -> None:
        """Journal a hold or release (`RequestHandler.on_hold`).

        Args:
            event: `held` or `released`.
            dispatch_type: The type; None: every type.
            reason: The hold's reason.
            now: When.
        """
        self._enqueue(self._request(event, dispatch_type, reason, now, self._session()))

    def _request(
        self, event: str, dispatch_type: str | None, reason: str, now: datetime, session: int
    ) -> Iterator[None]:
        self._append(now, session, "request", event, type=dispatch_type, reason=reason)
        yield

    def outbox(self, out: Outbox) -> None:
        """Journal a step's changes and transitions, after its topics (`on_outbox`).

        Args:
            out: What the step decided (not changed afterwards).
        """
        self._enqueue(self._outcome(out, self._clock(), self._session()))

    def _outcome(self, out: Outbox, now: datetime, session: int) -> Iterator[None]:
        for kind, dispatch, before in out.changes:
            more: dict[str, Any] = {}
            if kind == "updated" and before is not None:
                more["changed"] = changed_fields(before, dispatch)
            self._append(
                now, session, "bridge", kind, dispatch_id=dispatch.id, type=dispatch.type, **more
            )
            yield
            # A change can start or stop a run as well (created while its run goes on,
            # moved, deleted while running): no scheduled transition says so.
            was = before is not None and before.running
            if dispatch.running != was:
                self._run(
                    now,
                    session,
                    dispatch.type,
                    dispatch.id,
                    started=dispatch.running,
                    until=dispatch.until,
                )
                yield
        for transition in out.transitions:
            self._run(
                now,
                session,
                transition.dispatch_type,
                transition.dispatch_id,
                started=transition.started,
                until=transition.until,
            )
            yield

    def _run(
        self,
        now: datetime,
        session: int,
        dispatch_type: str,
        dispatch_id: int,
        *,
        started: bool,
        until: datetime | None,
    ) -> None:
        if started:
            self._append(
                now,
                session,
                "bridge",
                "started",
                dispatch_id=dispatch_id,
                type=dispatch_type,
                until=format_time(until),
            )
        else:
            self._append(
                now, session, "bridge", "stopped", dispatch_id=dispatch_id, type=dispatch_type
            )


class _Parts(Protocol):
    """What the journal needs of a microgrid's pipeline."""

    microgrid_id: int
    service: MicrogridService
    publisher: Publisher
    requests: RequestHandler


def _session_of(publisher: Publisher) -> Callable[[], int]:
    return lambda: publisher.session


def start(
    state_dir: Path, settings: JournalSettings | None, pipelines: Iterable[_Parts]
) -> JournalWriter | None:
    """Open the journal of a bridge and hook it to each microgrid's service.

    A journal that cannot be written is reported in each microgrid's status
    `error` (and logged once) until it can be again; the bridge runs on.

    Args:
        state_dir: The state directory.
        settings: The retention (`files == 0`: no journal; None: the defaults).
        pipelines: The microgrids' pipelines.

    Returns:
        The running writer (close it at the end), or None without a journal.
    """
    settings = settings or JournalSettings()
    if settings.files == 0:
        return None
    loop = asyncio.get_running_loop()
    pipelines = list(pipelines)

    def report(problem: str | None) -> None:
        def change(board: StatusBoard) -> None:
            if problem is None:
                board.resolve("journal")
            else:
                board.report("journal", problem)

        for pipeline in pipelines:
            loop.call_soon_threadsafe(pipeline.publisher.update_status, change)

    writer = JournalWriter(
        journal_path(state_dir),
        max_bytes=settings.max_bytes,
        files=settings.files,
        on_problem=report,
    )
    for pipeline in pipelines:
        journal = BridgeJournal(writer, pipeline.microgrid_id, _session_of(pipeline.publisher))
        pipeline.service.on_upstream = journal.upstream
        pipeline.service.on_outbox = journal.outbox
        pipeline.requests.on_hold = journal.request
    writer.start()
    return writer
