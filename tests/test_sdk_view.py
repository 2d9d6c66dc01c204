"""Unit tests of the SDK's view of the topics, the connection settings and the backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actor_sdk import Created, Deleted, Updated, wire
from actor_sdk._bridge_clock import CONVERGED_AFTER, BridgeClock
from actor_sdk._view import BridgeView, is_newer

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MG = 3


def wire_dispatch(dispatch_id: int, *, payload: dict[str, int] | None = None) -> wire.Dispatch:
    return wire.Dispatch(
        id=dispatch_id,
        type="T",
        start_time=NOW,
        duration=60,
        target=wire.Target(ids=(1,)),
        active=True,
        dry_run=False,
        payload=payload or {},
        create_time=NOW,
        update_time=NOW,
        end_time=None,
        running=True,
        until=NOW + timedelta(seconds=60),
        next_run=None,
    )


def snapshot(*ids: int, session: int = 1, seq: int = 1, type_: str = "T", mg: int = MG) -> bytes:
    return wire.encode(
        wire.RunningSnapshot(
            microgrid_id=mg,
            type=type_,
            running=tuple(wire_dispatch(i) for i in ids),
            next_change=None,
            as_of=NOW,
            session=session,
            seq=seq,
        )
    )


def status(state: str = "online", session: int = 1, status_interval: int = 0) -> bytes:
    return wire.encode(
        wire.BridgeStatus(
            state=state,  # type: ignore[arg-type]
            upstream="connected",
            synced_at=None,
            session=session,
            bridge="b",
            version="1",
            dispatches=0,
            status_interval=status_interval,
        )
    )


def running_ids(view: BridgeView) -> list[int]:
    return [int(d.id) for d in view.running("T")]


@pytest.mark.parametrize(
    ("session", "seq", "last", "online", "expected"),
    [
        (1, 1, None, None, True),
        (1, 2, (1, 1), None, True),
        (1, 1, (1, 1), None, False),
        (1, 0, (1, 1), None, False),
        (2, 0, (1, 9), None, True),
        (1, 50, (2, 1), None, False),
        (1, 50, (2, 1), 1, True),  # the bridge restarted counting: its online status says so
    ],
)
def test_snapshot_ordering(
    session: int, seq: int, last: tuple[int, int] | None, online: int | None, expected: bool
) -> None:
    assert is_newer(session, seq, last, online) is expected


LIVE = {"retained": False, "arrived": NOW}
REPLAY = {"retained": True, "arrived": NOW}


def test_view_is_live_only_in_sync_with_an_online_bridge() -> None:
    view = BridgeView(MG)
    view.begin_sync()
    view.apply_status(status("online"), **LIVE)
    assert not view.is_live(NOW)
    view.end_sync()
    assert view.is_live(NOW)
    view.apply_status(status("offline"), **LIVE)
    assert not view.is_live(NOW)
    view.apply_status(status("online", session=2), **LIVE)
    view.lost_connection()
    assert not view.is_live(NOW)


def test_a_retained_online_status_is_not_live_until_one_arrives_live() -> None:
    # A broker restored from its autosave replays the `online` of a dead bridge.
    view = BridgeView(MG)
    view.begin_sync()
    view.apply_status(status("online"), **REPLAY)
    view.end_sync()
    assert view.status is not None and view.status.state == "online"
    assert not view.is_live(NOW)
    view.apply_status(status("online"), retained=False, arrived=NOW + timedelta(seconds=1))
    assert view.is_live(NOW + timedelta(seconds=1))


def test_liveness_lasts_two_status_intervals_after_the_latest_live_status() -> None:
    view = BridgeView(MG)
    view.begin_sync()
    view.end_sync()
    view.apply_status(status("online", status_interval=3), **LIVE)
    assert view.live_until == NOW + timedelta(seconds=6)
    assert view.is_live(NOW + timedelta(seconds=5.9))
    assert not view.is_live(NOW + timedelta(seconds=6))
    view.apply_status(status("online"), **LIVE)  # 0 (an older bridge): 5 s assumed
    assert view.live_until == NOW + timedelta(seconds=10)


def test_syncing_or_an_unreadable_status_is_not_live() -> None:
    view = BridgeView(MG)
    view.begin_sync()
    view.end_sync()
    view.apply_status(status("online"), **LIVE)
    assert view.is_live(NOW)
    view.apply_status(status("syncing"), **LIVE)
    assert not view.is_live(NOW)
    view.apply_status(status("online"), **LIVE)
    newer = msgspec.json.encode({**msgspec.json.decode(status("online")), "state": "vouching"})
    with pytest.raises(wire.WireError):
        view.apply_status(newer, **LIVE)
    assert view.status is None
    assert not view.is_live(NOW)


def test_a_snapshot_of_an_older_session_is_unconfirmed_until_republished() -> None:
    view = BridgeView(MG)
    view.apply_status(status("online", session=1), **LIVE)
    view.apply_running("T", snapshot(1, session=1, seq=9))
    assert view.confirmed("T")
    view.apply_status(status("online", session=2), **LIVE)
    assert not view.confirmed("T")
    assert view.confirmed("U")  # no snapshot: nothing to confirm
    view.apply_running("T", snapshot(1, session=2, seq=1))
    assert view.confirmed("T")


def test_a_stale_offline_will_is_ignored() -> None:
    view = BridgeView(MG)
    view.apply_status(status("online", session=4), **LIVE)
    assert not view.apply_status(status("offline", session=3), **LIVE)
    assert view.status is not None and view.status.state == "online"


def test_old_snapshots_are_ignored_and_a_clearing_empties_the_type() -> None:
    view = BridgeView(MG)
    assert view.apply_running("T", snapshot(1, seq=5)) is not None
    assert view.apply_running("T", snapshot(seq=4)) is None
    assert view.apply_running("T", snapshot(seq=5)) is None
    assert running_ids(view) == [1]
    assert view.apply_running("T", b"") is None
    assert running_ids(view) == []
    assert view.apply_running("T", snapshot(2, seq=6)) is not None
    assert running_ids(view) == [2]


def test_snapshot_of_another_type_or_microgrid_is_garbage() -> None:
    view = BridgeView(MG)
    with pytest.raises(wire.WireError):
        view.apply_running("T", snapshot(1, type_="U"))
    with pytest.raises(wire.WireError):
        view.apply_running("T", snapshot(1, mg=MG + 1))
    with pytest.raises(wire.WireError):
        view.apply_running("T", b"\xff garbage")


def test_a_resync_deletes_dispatches_not_delivered_again_and_keeps_snapshots() -> None:
    view = BridgeView(MG)
    view.begin_sync()
    view.apply_status(status("online"), **REPLAY)
    view.apply_running("T", snapshot(1))
    view.apply_dispatch("T", 1, wire.encode(wire_dispatch(1)))
    view.apply_dispatch("T", 2, wire.encode(wire_dispatch(2)))
    view.end_sync()
    view.lost_connection()
    view.begin_sync()
    view.apply_dispatch("T", 1, wire.encode(wire_dispatch(1)))
    view.apply_status(status("online"), **REPLAY)
    view.apply_running("T", snapshot(1))
    events = view.end_sync()
    assert [(type(e), int(e.dispatch.id)) for e in events] == [(Deleted, 2)]
    # The bridge never clears a running topic: a missing one was lost by the broker.
    assert running_ids(view) == [1]


def test_no_deletions_are_concluded_from_a_resync_without_an_online_bridge() -> None:
    view = BridgeView(MG)
    view.apply_dispatch("T", 1, wire.encode(wire_dispatch(1)))
    view.begin_sync()
    assert view.end_sync() == []
    assert view.dispatch("T", 1) is not None


def test_lifecycle_events_follow_the_definition_not_the_computed_state() -> None:
    view = BridgeView(MG)
    [created] = view.apply_dispatch("T", 1, wire.encode(wire_dispatch(1)))
    assert isinstance(created, Created)
    same = wire_dispatch(1)
    assert (
        view.apply_dispatch("T", 1, wire.encode(msgspec.structs.replace(same, running=False))) == []
    )
    [updated] = view.apply_dispatch("T", 1, wire.encode(wire_dispatch(1, payload={"a": 1})))
    assert isinstance(updated, Updated)
    [deleted] = view.apply_dispatch("T", 1, b"")
    assert isinstance(deleted, Deleted) and deleted.dispatch.deleted
    assert view.apply_dispatch("T", 1, b"") == []
    with pytest.raises(wire.WireError):
        view.apply_dispatch("T", 5, wire.encode(wire_dispatch(1)))


def test_bridge_clock_uses_the_local_clock_until_converged_then_the_minimum_offset() -> None:
    clock = BridgeClock()
    skew = timedelta(seconds=5)  # local clock 5 s ahead of the bridge's
    lines = []
    for n in range(CONVERGED_AFTER):  # one a second, as statuses come
        assert clock.offset == timedelta(0)
        delay = timedelta(milliseconds=30 - n)  # network and queueing, never negative
        made = NOW + timedelta(seconds=n)
        lines.append(clock.observe(made, made + skew + delay))
    assert clock.converged
    assert clock.offset == skew + timedelta(milliseconds=30 - CONVERGED_AFTER + 1)
    assert [line for line in lines if line] == [lines[-1]]
    assert lines[-1] is not None and "5.0 s ahead" in lines[-1]
    assert clock.to_local(NOW) == NOW + clock.offset
    assert clock.to_bridge(NOW + clock.offset) == NOW


def test_bridge_clock_is_not_moved_by_queueing_behind_a_burst() -> None:
    clock = BridgeClock()
    for n in range(CONVERGED_AFTER):
        made = NOW + timedelta(seconds=n)
        clock.observe(made, made + timedelta(milliseconds=2))
    settled = clock.offset
    later = NOW + timedelta(seconds=10)
    # Live messages stuck 4-12 s behind a retained burst (as measured before the filter).
    for delay_s in (12, 9, 7, 4, 11):
        assert clock.observe(later, later + timedelta(seconds=delay_s)) is None
        assert clock.offset == settled
    clock.observe(later, later + timedelta(milliseconds=1))  # a quicker one refines it
    assert clock.offset == timedelta(milliseconds=1)


def test_bridge_clock_does_not_converge_on_one_burst() -> None:
    """A freshly started SDK may get its first live messages all at once, late.

    Four samples of one second converged the estimate: 2.9 s "ahead" with no skew, and
    a run whose `until` had passed was started. Convergence needs four seconds.
    """
    clock = BridgeClock()
    for n in range(10):  # made over 3 s, all arriving at once
        made = NOW - timedelta(seconds=3) + timedelta(milliseconds=300 * n)
        assert clock.observe(made, NOW + timedelta(milliseconds=n)) is None
    assert not clock.converged and clock.offset == timedelta(0)
    for n in range(1, CONVERGED_AFTER):  # then statuses on time, one a second
        made = NOW + timedelta(seconds=n)
        clock.observe(made, made + timedelta(milliseconds=2))
    assert clock.converged and clock.offset == timedelta(milliseconds=2)


def test_bridge_clock_is_not_moved_by_a_burst_of_delayed_live_messages() -> None:
    """A healed partition flushes what the bridge published meanwhile, all at once.

    Those messages arrive live (retain 0) with `as_of` seconds old: more of them than
    the window held pushed every good sample out, and the estimate jumped by seconds
    for a moment (a chaos run logged "3.2 s ahead" with no skew at all).
    """
    clock = BridgeClock()
    for n in range(CONVERGED_AFTER):  # one status a second, 2 ms on the way
        clock.observe(NOW + timedelta(seconds=n), NOW + timedelta(seconds=n, milliseconds=2))
    settled = clock.offset
    healed = NOW + timedelta(seconds=30)
    for n in range(50):  # made during the 7 s partition, all arriving within 50 ms
        made = healed - timedelta(seconds=7) + timedelta(milliseconds=140 * n)
        assert clock.observe(made, healed + timedelta(milliseconds=n)) is None
    assert clock.offset == settled
