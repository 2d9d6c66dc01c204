"""The pure parts of the interactive `dispatch-bridge watch`: state, liveness, rows, lines."""

from __future__ import annotations

import doctest
from datetime import datetime, timedelta

import msgspec
import pytest

from actor_sdk import wire
from bridge import watch_state, watch_text, watch_view
from bridge.watch_state import Liveness, WatchState, liveness
from bridge.watch_view import (
    NO_ACTOR_GRACE,
    actor_rows,
    bridge_line,
    detail_lines,
    dispatch_rows,
    event_lines,
    matches,
    running_rows,
    timeline_lines,
    type_cycle,
)
from tests.test_watch import LAYOUT, MINUTELY, NOW, make_dispatch, sample_state

ACTORS = "microgrid/1/actors/"


def status(state: str = "online", **fields: object) -> bytes:
    return wire.encode(
        wire.BridgeStatus(
            state=state,  # type: ignore[arg-type]
            upstream="connected",
            synced_at=NOW,
            session=3,
            bridge="edge",
            version="0.1.0",
            dispatches=2,
            **fields,  # type: ignore[arg-type]
        )
    )


def actor(state: str, runs: dict[str, tuple[int, ...]], error: str | None = None) -> bytes:
    return wire.encode_actor_status(
        wire.ActorStatus(
            state=state,  # type: ignore[arg-type]
            types={
                t: wire.ActorTypeStatus(state="running" if ids else "idle", dispatches=ids)
                for t, ids in runs.items()
            },
            since=NOW - timedelta(minutes=3),
            as_of=NOW,
            host="host-a",
            error=error,
            version="0.1.0",
        )
    )


def upcoming(dispatch_type: str, *runs: tuple[int, datetime, datetime | None]) -> bytes:
    return wire.encode(
        wire.UpcomingRuns(
            microgrid_id=1,
            type=dispatch_type,
            runs=tuple(wire.UpcomingRun(id=i, start=s, end=e) for i, s, e in runs),
            as_of=NOW,
            until=NOW + timedelta(hours=24),
        )
    )


def running_snapshot(*dispatches: wire.Dispatch) -> wire.RunningSnapshot:
    return wire.RunningSnapshot(
        microgrid_id=1,
        type=dispatches[0].type,
        running=dispatches,
        next_change=None,
        as_of=NOW,
        session=1,
        seq=1,
    )


def state_with_actors() -> WatchState:
    state = sample_state()
    state.microgrid_id = 1
    return state


# --- The liveness rule --------------------------------------------------------------


def test_a_retained_online_is_not_live_until_a_live_status_arrives() -> None:
    state = WatchState(LAYOUT)
    state.apply(LAYOUT.status, status(status_interval=2), NOW, retained=True)

    assert liveness(state, NOW)[0] is Liveness.UNCONFIRMED

    state.apply(LAYOUT.status, status(status_interval=2), NOW, retained=False)

    assert liveness(state, NOW + timedelta(seconds=3.9)) == (Liveness.LIVE, "LIVE")
    verdict, line = liveness(state, NOW + timedelta(seconds=4))
    assert verdict is Liveness.STALE
    assert "no live status for 4s" in line


def test_syncing_offline_and_unreadable_statuses_are_not_live() -> None:
    state = WatchState(LAYOUT)
    state.apply(LAYOUT.status, status(), NOW, retained=False)
    state.apply(LAYOUT.status, status("syncing", error="API unreachable"), NOW, retained=False)
    assert liveness(state, NOW) == (
        Liveness.SYNCING,
        "SYNCING (not vouching for the tree): API unreachable",
    )

    state.apply(LAYOUT.status, status("offline"), NOW, retained=False)
    assert liveness(state, NOW)[0] is Liveness.OFFLINE

    state.apply(LAYOUT.status, status(), NOW, retained=False)
    state.apply(LAYOUT.status, b'{"state": "rebooting"}', NOW, retained=False)
    verdict, line = liveness(state, NOW)
    assert verdict is Liveness.UNKNOWN
    assert line.startswith("status unreadable: ")
    # Without any status the default interval (5 s) is not even considered.
    assert liveness(WatchState(LAYOUT), NOW)[0] is Liveness.UNKNOWN


def test_the_bridge_line_adds_the_status_details_but_not_the_wills_counts() -> None:
    state = WatchState(LAYOUT)
    assert bridge_line(state, NOW)[2] == ""

    state.apply(LAYOUT.status, status(), NOW, retained=False)
    assert bridge_line(state, NOW) == (
        Liveness.LIVE,
        "LIVE",
        "upstream connected, synced 07:03:20Z, session 3, 2 dispatches",
    )
    state.apply(LAYOUT.status, status("offline"), NOW, retained=False)
    assert bridge_line(state, NOW)[2] == "session 3"


def test_a_status_without_interval_is_live_for_ten_seconds() -> None:
    state = WatchState(LAYOUT)
    state.apply(LAYOUT.status, status(), NOW, retained=False)

    assert liveness(state, NOW + timedelta(seconds=9))[0] is Liveness.LIVE
    assert liveness(state, NOW + timedelta(seconds=10))[0] is Liveness.STALE


# --- Actors --------------------------------------------------------------------------


def test_a_running_dispatch_no_actor_reports_is_flagged_after_a_grace() -> None:
    state = state_with_actors()

    (row,) = running_rows(state, NOW)
    assert (row.dispatch_type, row.dispatch_id, row.flag) == ("EXAMPLE_TYPE", 1, None)
    assert row.left == "until 07:13:20Z, 10m00s left"
    assert row.target == "ids 7,8"

    (row,) = running_rows(state, NOW + NO_ACTOR_GRACE)
    assert row.flag == "no actor reports it"
    assert row.actors == "-"


def test_the_actors_that_report_running_a_dispatch_are_shown_and_offline_ones_are_not() -> None:
    state = state_with_actors()
    state.apply(ACTORS + "pv-1", actor("running", {"EXAMPLE_TYPE": (1,)}), NOW)
    state.apply(ACTORS + "pv-2", actor("running", {"EXAMPLE_TYPE": (1,), "SET.POWER": ()}), NOW)
    state.apply(ACTORS + "pv-3", actor("offline", {"EXAMPLE_TYPE": (1,)}), NOW)
    later = NOW + timedelta(minutes=1)

    (row,) = running_rows(state, later)
    assert (row.actors, row.flag) == ("pv-1, pv-2", None)
    assert "actors:     pv-1, pv-2" in detail_lines(state, "EXAMPLE_TYPE", 1, later)

    rows = {r.actor_id: r for r in actor_rows(state, later)}
    assert rows["pv-2"].runs == "EXAMPLE_TYPE: #1; SET.POWER: idle"
    assert rows["pv-2"].host == "host-a (0.1.0)"
    assert rows["pv-2"].since == "07:00:20Z (4m00s ago)"
    assert rows["pv-3"].state == "offline"
    # Filtered by type: only the actors managing it, only that type's runs.
    assert [(r.actor_id, r.runs) for r in actor_rows(state, later, "set.")] == [
        ("pv-2", "SET.POWER: idle")
    ]

    # A cleared topic removes the actor.
    state.apply(ACTORS + "pv-1", b"", later)
    state.apply(ACTORS + "pv-2", b"", later)
    assert running_rows(state, later)[0].flag == "no actor reports it"


def test_bad_actor_topics_and_payloads_become_warnings() -> None:
    state = state_with_actors()
    state.apply(ACTORS + "pv-1", b"{not json", NOW)
    state.apply("microgrid/2/actors/pv-1", actor("running", {}), NOW)
    state.apply(ACTORS + "bad.id", actor("running", {}), NOW)

    assert state.actors == {}
    assert len(state.warnings) == 3
    assert all(line.startswith("! ") for line in event_lines(state, NOW))


# --- The filter, the lists and the details ---------------------------------------------


def test_the_filter_matches_a_type_part_or_an_id() -> None:
    assert matches("", "ANY", 1)
    assert matches("power", "SET.POWER", 4)
    assert matches("#4", "SET.POWER", 4) and matches("4", "OTHER", 4)
    assert not matches("#4", "SET.POWER", 5) and not matches("power", "EXAMPLE_TYPE", 4)
    assert type_cycle(["A", "B"], "") == "A"
    assert type_cycle(["A", "B"], "B") == ""
    assert type_cycle([], "x") == ""


def test_the_dispatch_list_filters_by_type_or_id_and_says_when_each_runs() -> None:
    state = sample_state()
    state.apply(
        LAYOUT.upcoming("SET.POWER"),
        upcoming(
            "SET.POWER",
            (4, NOW + timedelta(minutes=30), NOW + timedelta(minutes=90)),
            (5, NOW + timedelta(minutes=50), NOW + timedelta(minutes=80)),
        ),
        NOW,
    )

    rows, total = dispatch_rows(state, NOW)
    assert total == 5
    assert [(r.dispatch_type, r.dispatch_id, r.when, r.rule) for r in rows] == [
        ("EXAMPLE_TYPE", 1, "RUNNING", "once"),
        ("EXAMPLE_TYPE", 2, "no run ahead", "every minute"),
        ("EXAMPLE_TYPE", 3, "no run ahead", "once"),
        ("SET.POWER", 4, "next 07:33:20Z", "once"),
        ("SET.POWER", 5, "next 07:53:20Z", "once"),
    ]
    assert [r.dispatch_id for r in dispatch_rows(state, NOW, "set.power")[0]] == [4, 5]
    assert [r.dispatch_id for r in dispatch_rows(state, NOW, "#2")[0]] == [2]
    assert dispatch_rows(state, NOW, "NO_SUCH") == ([], 0)


def test_the_details_show_payload_target_recurrence_and_coming_runs() -> None:
    state = sample_state()
    rule = wire.Recurrence(
        frequency="WEEKLY",
        interval=2,
        byweekdays=("MONDAY", "FRIDAY"),
        end=wire.EndCriteria(count=10),
    )
    dispatch = make_dispatch(7, NOW + timedelta(hours=1), None, recurrence=rule)
    state.apply(LAYOUT.dispatch("EXAMPLE_TYPE", 7), wire.encode(dispatch), NOW)
    start = NOW + timedelta(hours=1)
    state.apply(LAYOUT.upcoming("EXAMPLE_TYPE"), upcoming("EXAMPLE_TYPE", (7, start, None)), NOW)

    text = "\n".join(detail_lines(state, "EXAMPLE_TYPE", 7, NOW))

    assert "#7 EXAMPLE_TYPE (active)" in text
    assert "duration:   until changed" in text
    assert "recurrence: every 2 weeks, weekdays MONDAY,FRIDAY, ends after 10 runs" in text
    assert "target:     ids 7,8" in text
    assert '"power_w": 5000' in text
    assert "coming:     08:03:20Z-..." in text
    assert "now:        not running" in text
    assert "actors:     none reports it" in text
    assert detail_lines(state, "EXAMPLE_TYPE", 99, NOW) == [
        "#99 EXAMPLE_TYPE: no longer published (deleted, or its type changed)"
    ]


def test_hostile_payload_text_cannot_reach_the_terminal() -> None:
    state = WatchState(LAYOUT)
    dispatch = make_dispatch(3, NOW, 60)
    hostile = msgspec.structs.replace(dispatch, payload={"k\x07": "\x1b[2J"})
    state.apply(LAYOUT.dispatch(hostile.type, 3), wire.encode(hostile), NOW)

    text = "\n".join(detail_lines(state, hostile.type, 3, NOW))

    assert "\x1b" not in text and "\x07" not in text
    evil = make_dispatch(4, NOW, 60, dispatch_type="EVIL\x1b[2J")
    state.apply(LAYOUT.dispatch(evil.type, 4), wire.encode(evil), NOW)
    state.apply(LAYOUT.running(evil.type), wire.encode(running_snapshot(evil)), NOW)
    labels = [row.type_label for row in dispatch_rows(state, NOW)[0]]
    assert labels == ["EVIL?[2J", "EXAMPLE_TYPE"]
    assert running_rows(state, NOW)[0].dispatch_type == "EVIL?[2J"
    assert detail_lines(state, evil.type, 4, NOW)[0].startswith("#4 EVIL?[2J ")


# --- The timeline -------------------------------------------------------------------------


def test_the_timeline_draws_the_upcoming_runs_per_type_with_their_union() -> None:
    state = sample_state()
    state.apply(
        LAYOUT.upcoming("SET.POWER"),
        upcoming(
            "SET.POWER",
            (4, NOW + timedelta(minutes=30), NOW + timedelta(minutes=90)),
            (5, NOW + timedelta(minutes=50), NOW + timedelta(minutes=80)),
            # Past runs and runs beyond the window draw nothing.
            (6, NOW - timedelta(hours=2), NOW - timedelta(hours=1)),
            (8, NOW + timedelta(hours=5), None),
        ),
        NOW,
    )
    state.apply(
        LAYOUT.upcoming("EXAMPLE_TYPE"),
        upcoming("EXAMPLE_TYPE", (2, NOW - timedelta(hours=5), None)),
        NOW,
    )

    lines = timeline_lines(state, NOW, 41, timedelta(hours=3))

    # 41 columns: labels of 4, " |", 36 cells of 5 minutes.
    assert lines[0] == "next 3h00m: # runs, + runs part of the time"
    assert lines[1].startswith("     ^now")
    assert lines[2:] == [
        "EXAMPLE_TYPE",
        " #2 |" + "#" * 36,
        "SET.POWER",
        " #4 |" + "." * 6 + "#" * 12 + "." * 18,
        " #5 |" + "." * 10 + "#" * 6 + "." * 20,
        "any |" + "." * 6 + "#" * 12 + "." * 18,
    ]
    assert timeline_lines(state, NOW, 41, timedelta(hours=3), "example")[2:] == [
        "EXAMPLE_TYPE",
        " #2 |" + "#" * 36,
    ]
    assert timeline_lines(WatchState(LAYOUT), NOW, 41, timedelta(hours=3)) == [
        "no upcoming runs published (bridge run with --upcoming-hours 0?)"
    ]


def test_events_are_filtered_by_type_and_an_empty_list_says_so() -> None:
    state = sample_state()
    created = make_dispatch(9, NOW, 60, dispatch_type="SET.POWER")
    event = wire.DispatchEvent(event="created", dispatch=created, as_of=NOW)
    state.apply(LAYOUT.events("SET.POWER"), wire.encode(event), NOW)

    assert event_lines(state, NOW) == ["07:03:20Z created #9 SET.POWER"]
    assert event_lines(state, NOW, "example") == ["no events since watch connected"]


def test_minutely_dispatches_show_every_run_of_the_window() -> None:
    state = WatchState(LAYOUT)
    dispatch = make_dispatch(2, NOW - timedelta(hours=1), 20, recurrence=MINUTELY)
    state.apply(LAYOUT.dispatch(dispatch.type, 2), wire.encode(dispatch), NOW)
    runs = [
        (2, NOW + timedelta(minutes=m), NOW + timedelta(minutes=m, seconds=20)) for m in range(3)
    ]
    state.apply(LAYOUT.upcoming(dispatch.type), upcoming(dispatch.type, *runs), NOW)

    lines = timeline_lines(state, NOW, 23, timedelta(minutes=3))

    # 18 cells of 10 s: the 20 s of each minute fill two.
    assert lines[3] == " #2 |##....##....##...."
    assert dispatch_rows(state, NOW)[0][0].when == "next 07:04:20Z"
    details = detail_lines(state, dispatch.type, 2, NOW)
    coming = details.index("coming:     07:03:20Z-07:03:40Z")
    assert details[coming + 1 : coming + 3] == [
        "            07:04:20Z-07:04:40Z",
        "            07:05:20Z-07:05:40Z",
    ]


@pytest.mark.parametrize("module", [watch_state, watch_text, watch_view])
def test_the_docstring_examples_hold(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]

    assert result.attempted > 0 and result.failed == 0
