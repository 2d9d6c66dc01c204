"""`dispatch-bridge audit`: read the audit journal, one line per entry.

Reads `<state-dir>/journal/journal.jsonl` and its rotated files, oldest first
(or any journal, such as an actor SDK's, with `--journal FILE`), keeps the
entries that match `--dispatch`, `--microgrid-id` and `--since`, and prints
each as one line for a person, or as its raw JSON line with `--json`. A line
that cannot be read is reported on stderr and skipped.

Exit codes: 0 when the journal was read (even with unreadable lines), 1 when
there is no journal, 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import msgspec

from actor_sdk.journal import CorruptLine, journal_files, read_journal
from bridge.config import DEFAULT_STATE_DIR, ConfigError, SettingsSource, journal_path

__all__ = ["add_arguments", "describe", "parse_since", "run"]

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Fields shown in the line's head; the others follow as key=value.
_HEAD = ("time", "source", "event", "microgrid_id", "session", "dispatch_id", "type")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatch-bridge audit`.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--state-dir",
        metavar="PATH",
        help="the bridge's state directory (env DISPATCH_BRIDGE_STATE_DIR; "
        f"default {DEFAULT_STATE_DIR}); the journal is journal/journal.jsonl in it",
    )
    parser.add_argument(
        "--journal",
        metavar="FILE",
        help="read this journal instead (e.g. an actor SDK's Dispatcher(journal=...))",
    )
    parser.add_argument("--dispatch", metavar="ID", type=int, help="only entries of this dispatch")
    parser.add_argument(
        "--microgrid-id", metavar="N", type=int, help="only entries of this microgrid"
    )
    parser.add_argument(
        "--since",
        metavar="TIME",
        help="only entries from TIME on: RFC 3339 (2026-12-04T06:00:00Z) or a time ago "
        "(90s, 30m, 2h, 7d)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON lines")


def parse_since(text: str, now: datetime) -> datetime:
    """A `--since` value as an instant.

    Args:
        text: RFC 3339 (a time without offset is UTC) or a number with s, m, h or d.
        now: The current instant (for a time ago).

    Returns:
        The instant.

    Raises:
        ValueError: Neither form.
    """
    match = _AGO.match(text.strip())
    if match is not None:
        return now - timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    try:
        instant = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time (2026-12-04T06:00:00Z) nor a time ago (30m, 2h, 7d)"
        ) from None
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


def _entry_time(entry: dict[str, Any]) -> datetime | None:
    value = entry.get("time")
    if not isinstance(value, str):
        return None
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        return None
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


def describe(entry: dict[str, Any]) -> str:
    """One journal entry as a line for a person.

    Args:
        entry: The entry.

    Returns:
        `TIME  SOURCE EVENT  microgrid M  session S  dispatch ID (TYPE)  more`.
    """
    parts = [
        str(entry.get("time", "?")),
        f"{entry.get('source', '?'):<8} {entry.get('event', '?'):<12}",
    ]
    if entry.get("microgrid_id") is not None:
        parts.append(f"microgrid {entry['microgrid_id']}")
    if entry.get("session") is not None:
        parts.append(f"session {entry['session']}")
    if entry.get("dispatch_id") is not None:
        kind = f" ({entry['type']})" if entry.get("type") is not None else ""
        parts.append(f"dispatch {entry['dispatch_id']}{kind}")
    for key, value in entry.items():
        if key in _HEAD or value is None:
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        parts.append(f"{key}: {shown}")
    return "  ".join(parts)


def _matcher(args: argparse.Namespace, since: datetime | None) -> Callable[[dict[str, Any]], bool]:
    def matches(entry: dict[str, Any]) -> bool:
        if args.dispatch is not None and entry.get("dispatch_id") != args.dispatch:
            return False
        if args.microgrid_id is not None and entry.get("microgrid_id") != args.microgrid_id:
            return False
        if since is not None:
            instant = _entry_time(entry)
            return instant is not None and instant >= since
        return True

    return matches


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the matching entries of the journal.

    Args:
        args: The parsed flags.
        out: Where the entries go.
        err: Where problems go.

    Returns:
        0 when the journal was read, 1 when there is none.

    Raises:
        ConfigError: `--since` cannot be read.
    """
    if args.journal is not None:
        path = Path(args.journal)
    else:
        source = SettingsSource.load(vars(args), None)
        state_dir = source.get(
            "state_dir", env="DISPATCH_BRIDGE_STATE_DIR", parse=str, default=DEFAULT_STATE_DIR
        )
        path = journal_path(Path(state_dir))
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since, datetime.now(UTC))
        except ValueError as error:
            raise ConfigError(f"invalid --since: {error}") from None
    if not journal_files(path):
        print(
            f"dispatch-bridge audit: no journal at {path}: is --state-dir the bridge's? "
            "(the bridge keeps one unless run with --journal-files 0)",
            file=err,
        )
        return 1
    matches = _matcher(args, since)
    unreadable = 0
    for entry in read_journal(path):
        if isinstance(entry, CorruptLine):
            unreadable += 1
            print(
                f"dispatch-bridge audit: {entry.file} line {entry.line} cannot be read "
                f"({entry.reason}): skipped",
                file=err,
            )
            continue
        if matches(entry):
            print(msgspec.json.encode(entry).decode() if args.json else describe(entry), file=out)
    if unreadable:
        print(f"dispatch-bridge audit: {unreadable} unreadable lines skipped", file=err)
    return 0
