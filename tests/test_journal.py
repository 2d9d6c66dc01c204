"""The journals: the rotating JSONL writer (`actor_sdk.journal`), the bridge's entries
(`bridge.journal`), and `dispatch-bridge audit` reading them back."""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from frequenz.channels import Receiver

from actor_sdk import DispatchInfo
from actor_sdk._actor_set import ActorSet
from actor_sdk._dispatch_model import from_wire
from actor_sdk.journal import (
    ActorJournal,
    CorruptLine,
    JournalWriter,
    journal_files,
    payload_digest,
    read_journal,
)
from bridge import audit_command
from bridge.journal import BridgeJournal, changed_fields
from bridge.service import (
    LinkChanged,
    Listed,
    MicrogridService,
    ScheduleCore,
    StreamEvent,
    Synced,
)
from testkit.processes import async_wait_until, wait_until
from tests.fixtures.sdk import wire_dispatch
from tests.test_bridge_service import LAYOUT, T0, FakeSink, dispatch


def entries(path: Path) -> list[dict[str, Any]]:
    read = list(read_journal(path))
    assert not [e for e in read if isinstance(e, CorruptLine)]
    return [e for e in read if isinstance(e, dict)]


def test_entries_come_back_in_order_across_rotations_and_only_files_are_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j" / "journal.jsonl"
    writer = JournalWriter(path, max_bytes=200, files=3, thread=False)
    for number in range(40):
        writer.append({"n": number, "pad": "x" * 20})
        writer.flush()  # one entry per write: rotations at every ~6 entries
    assert [p.name for p in journal_files(path)] == [
        "journal.jsonl.2",
        "journal.jsonl.1",
        "journal.jsonl",
    ]
    assert all(p.stat().st_size <= 200 for p in journal_files(path))
    numbers = [e["n"] for e in entries(path)]
    assert numbers == list(range(numbers[0], 40))  # the newest, in order, none lost inside
    assert len(numbers) > 6


def test_one_large_batch_is_spread_over_files_of_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    writer = JournalWriter(path, max_bytes=200, files=3, thread=False)
    for number in range(40):
        writer.append({"n": number, "pad": "x" * 20})
    writer.flush()  # one write of everything
    assert len(journal_files(path)) == 3
    assert all(p.stat().st_size <= 200 for p in journal_files(path))
    numbers = [e["n"] for e in entries(path)]
    assert numbers == list(range(40 - len(numbers), 40))


def test_a_single_file_journal_starts_over_when_full(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    writer = JournalWriter(path, max_bytes=100, files=1, thread=False)
    for number in range(10):
        writer.append({"n": number, "pad": "x" * 30})
        writer.flush()
    assert journal_files(path) == [path]
    assert path.stat().st_size <= 100
    assert [e["n"] for e in entries(path)] == [8, 9]  # 44 bytes each


def test_the_thread_writes_what_was_appended_and_close_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    writer = JournalWriter(path, flush_interval=0.01)
    writer.append({"n": 1})  # starts the thread
    wait_until(lambda: writer.written == 1, timeout=5, what="the thread's write")
    assert [e["n"] for e in entries(path)] == [1]
    writer.append({"n": 2})
    writer.close()
    assert [e["n"] for e in entries(path)] == [1, 2]


def test_an_unwritable_journal_is_reported_once_and_writing_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the journal's directory should be")
    problems: list[str | None] = []
    writer = JournalWriter(
        blocker / "journal" / "journal.jsonl", on_problem=problems.append, thread=False
    )
    for number in range(3):
        writer.append({"n": number})
        writer.flush()  # never raises
    assert writer.dropped == 3
    assert len([r for r in caplog.records if "cannot write the journal" in r.message]) == 1
    assert problems and all(p is not None and "cannot write the journal" in p for p in problems)
    assert writer.problem is not None
    blocker.unlink()
    writer.append({"n": 3})
    writer.flush()
    assert problems[-1] is None and writer.problem is None
    assert [e["n"] for e in entries(blocker / "journal" / "journal.jsonl")] == [3]


def test_too_many_queued_entries_are_dropped_and_counted(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "journal.jsonl", max_queued=5, thread=False)
    for number in range(8):
        writer.append({"n": number})
    assert writer.dropped == 3
    writer.flush()
    assert [e["n"] for e in entries(tmp_path / "journal.jsonl")] == [0, 1, 2, 3, 4]


def test_corrupt_lines_are_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": \n[1, 2]\n\n\xff\xfe\n{"n": 2}\n')
    read = list(read_journal(path))
    assert [e["n"] for e in read if isinstance(e, dict)] == [1, 2]
    assert [e.line for e in read if isinstance(e, CorruptLine)] == [2, 3, 5]


def test_the_actor_journal_keeps_a_digest_of_the_payload_not_the_payload(tmp_path: Path) -> None:
    path = tmp_path / "sdk.jsonl"
    writer = JournalWriter(path)
    journal = ActorJournal(writer, 5, clock=lambda: T0)
    secret = {"setpoint_w": 5000, "token": "do-not-log"}
    journal.record("T", "started", dispatch(7, payload=secret))
    writer.close()
    [entry] = entries(path)
    assert entry["event"] == "started" and entry["dispatch_id"] == 7
    assert entry["time"] == "2026-11-28T06:00:00Z"
    # The same payload in any key order, numbers as the API's doubles: the same digest.
    assert entry["payload_digest"] == payload_digest({"token": "do-not-log", "setpoint_w": 5e3})
    assert entry["payload_digest"] != payload_digest({"setpoint_w": 5001, "token": "do-not-log"})
    assert "do-not-log" not in path.read_text()


def test_changed_fields_name_what_the_api_changed_not_the_computed_state() -> None:
    before = dispatch(1)
    after = dispatch(1, duration=120, payload={"p": 1}, updated=T0)
    assert changed_fields(before, after) == ["duration", "payload"]
    assert changed_fields(before, before) == []


def _service_with_journal(tmp_path: Path) -> tuple[MicrogridService, JournalWriter, Path]:
    path = tmp_path / "journal.jsonl"
    writer = JournalWriter(path, thread=False)
    service = MicrogridService(ScheduleCore(5, LAYOUT), FakeSink(), clock=lambda: T0)
    journal = BridgeJournal(writer, 5, lambda: 3, clock=lambda: T0)
    service.on_upstream = journal.upstream
    service.on_outbox = journal.outbox
    return service, writer, path


def test_the_bridge_journals_changes_runs_and_upstream_events_but_no_republish(
    tmp_path: Path,
) -> None:
    service, writer, path = _service_with_journal(tmp_path)
    service.start()
    service.put(LinkChanged(True))
    service.put(Synced([dispatch(1, start=T0 + timedelta(seconds=10))]))
    service.put(StreamEvent("created", dispatch(2, start=T0 - timedelta(seconds=5))))
    service.put(StreamEvent("updated", dispatch(1, start=T0 + timedelta(seconds=10), duration=30)))
    service.step(T0)
    service.step(T0 + timedelta(seconds=10))  # 1 starts
    service.put(StreamEvent("updated", dispatch(1, start=T0 + timedelta(seconds=10), duration=30)))
    service.step(T0 + timedelta(seconds=11))  # the same again: no change
    service.start(T0 + timedelta(seconds=12))  # a full republish: no change either
    service.put(StreamEvent("deleted", dispatch(1)))
    service.step(T0 + timedelta(seconds=13))
    writer.flush()
    got = [(e["source"], e["event"], e.get("dispatch_id")) for e in entries(path)]
    assert got == [
        ("upstream", "connected", None),
        ("upstream", "listed", None),
        ("upstream", "created", 2),
        ("bridge", "created", 2),
        ("bridge", "started", 2),  # created while its run goes on
        ("upstream", "updated", 1),
        ("bridge", "updated", 1),
        ("bridge", "started", 1),
        ("upstream", "updated", 1),
        ("upstream", "deleted", 1),
        ("bridge", "deleted", 1),
        ("bridge", "stopped", 1),
    ]
    updated = [e for e in entries(path) if e["source"] == "bridge" and e["event"] == "updated"]
    assert updated[0]["changed"] == ["duration"]
    assert {e["session"] for e in entries(path)} == {3}
    assert {e["microgrid_id"] for e in entries(path)} == {5}


async def test_a_large_outcome_is_journaled_in_slices_after_the_step_and_in_order(
    tmp_path: Path,
) -> None:
    service, writer, path = _service_with_journal(tmp_path)
    for number in range(1, 1001):
        service.put(StreamEvent("created", dispatch(number, start=T0 + timedelta(hours=1))))
    service.step(T0)
    service.put(StreamEvent("deleted", dispatch(1)))
    service.step(T0)
    assert writer.queued == 0  # nothing during the steps
    seen: set[int] = set()
    while writer.queued < 2002:  # 1000 upstream and 1000 bridge entries, then 2 more
        await asyncio.sleep(0.001)
        seen.add(writer.queued)
    assert len(seen - {0, 2002}) >= 2  # the loop ran between slices
    writer.flush()
    got = [(e["source"], e["event"], e["dispatch_id"]) for e in entries(path)]
    assert got[:2] == [("upstream", "created", 1), ("bridge", "created", 1)]
    assert got[-2:] == [("upstream", "deleted", 1), ("bridge", "deleted", 1)]


async def test_a_listing_in_parts_is_journaled_as_one_entry_counting_every_part(
    tmp_path: Path,
) -> None:
    # Made after the step, which empties the listed lists as it applies them: the
    # entry said "dispatches": 0 for every listing of a running bridge.
    service, writer, path = _service_with_journal(tmp_path)
    service.put(Listed([dispatch(1), dispatch(2)]))
    service.put(Synced([dispatch(3)], listed_before={1, 2}))
    service.step(T0)
    await async_wait_until(lambda: writer.queued == 1, 5, "the entry")
    writer.flush()
    [entry] = entries(path)
    assert (entry["event"], entry["dispatches"], entry["unconvertible"]) == ("listed", 3, 0)


def _audit(tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    audit_command.add_arguments(parser)
    args = parser.parse_args(["--state-dir", str(tmp_path), *extra])
    out, err = io.StringIO(), io.StringIO()
    code = audit_command.run(args, out, err)
    return code, out.getvalue(), err.getvalue()


def test_audit_filters_by_dispatch_microgrid_and_time_and_skips_corrupt_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal" / "journal.jsonl"
    path.parent.mkdir()
    lines = [
        {"time": "2026-11-28T06:00:00Z", "source": "bridge", "event": "created",
         "microgrid_id": 5, "session": 1, "dispatch_id": 1, "type": "T"},
        {"time": "2026-11-28T06:01:00Z", "source": "bridge", "event": "updated",
         "microgrid_id": 5, "session": 1, "dispatch_id": 1, "type": "T",
         "changed": ["duration", "payload"]},
        {"time": "2026-11-28T06:02:00Z", "source": "bridge", "event": "created",
         "microgrid_id": 6, "session": 1, "dispatch_id": 2, "type": "T"},
    ]  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines)
    path.write_text(text.replace("\n", "\nnot json\n", 1) + "\n")
    code, out, err = _audit(tmp_path, "--dispatch", "1")
    assert code == 0
    assert out.splitlines() == [
        "2026-11-28T06:00:00Z  bridge   created       microgrid 5  session 1  dispatch 1 (T)",
        "2026-11-28T06:01:00Z  bridge   updated       microgrid 5  session 1  dispatch 1 (T)"
        "  changed: duration, payload",
    ]
    assert "line 2 cannot be read" in err
    code, out, _ = _audit(tmp_path, "--since", "2026-11-28T06:00:30Z", "--json")
    assert [json.loads(line)["dispatch_id"] for line in out.splitlines()] == [1, 2]
    code, out, _ = _audit(tmp_path, "--microgrid-id", "6")
    assert [line.split()[1:3] for line in out.splitlines()] == [["bridge", "created"]]


def test_audit_without_a_journal_says_where_it_looked(tmp_path: Path) -> None:
    code, out, err = _audit(tmp_path)
    assert code == 1 and out == ""
    assert str(tmp_path / "journal" / "journal.jsonl") in err


def test_since_takes_a_time_or_a_time_ago() -> None:
    now = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)
    assert audit_command.parse_since("30m", now) == now - timedelta(minutes=30)
    assert audit_command.parse_since("2026-12-04T05:00:00", now) == now - timedelta(hours=1)
    with pytest.raises(ValueError, match="neither"):
        audit_command.parse_since("yesterday", now)


async def test_the_actor_set_journals_start_update_stop_and_failure(tmp_path: Path) -> None:
    path = tmp_path / "actors.jsonl"
    writer = JournalWriter(path, thread=False)
    journal = ActorJournal(writer, 5, clock=lambda: T0)
    calls = 0

    async def factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> _Idle:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("no inverter")
        return _Idle(updates)

    actors = ActorSet(
        "T",
        factory=factory,
        identity=lambda d: d.type,  # one actor for the type: a new dispatch is an update
        retry_interval=timedelta(0),
        clock=lambda: T0,
        record=functools.partial(journal.record, "T"),
    )
    first = from_wire(wire_dispatch(1, "T", payload={"p": 1}))
    await actors.apply([first], reason="")
    await async_wait_until(lambda: actors.next_retry is not None, 5, "the failure")
    await actors.retry(T0)
    await async_wait_until(lambda: actors.running_ids == (1,), 5, "the start")
    await actors.apply([from_wire(wire_dispatch(2, "T", payload={"p": 2}))], reason="")
    await actors.stop_all("shutting down")
    writer.flush()
    got = [(e["event"], e["dispatch_id"], e.get("reason")) for e in entries(path)]
    assert got == [
        ("failed", 1, "failed"),
        ("started", 1, None),
        ("updated", 2, None),
        ("stopped", 2, "shutting down"),
    ]
    assert entries(path)[2]["payload_digest"] == payload_digest({"p": 2})


class _Idle:
    def __init__(self, updates: Receiver[DispatchInfo]) -> None:
        self.updates = updates  # an actor keeps its updates (the SDK's channel needs a reader)

    def start(self) -> None:
        pass

    async def stop(self, msg: str | None = None) -> None:
        pass
