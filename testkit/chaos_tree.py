"""The chaos run's audit of the retained tree against what the Dispatch API holds; pure.

The driver pauses its changes and faults, lists the API, and reads every retained
topic of the microgrid (a read waits for 2 s of quiet, so it spans a few seconds).
`check_retained` compares the two: the status, the set of `dispatches/ID` topics and
their definitions, and each type's `running` snapshot against the oracle
(`testkit.chaos_oracle`, the client library's own schedule).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from frequenz.client.dispatch.types import Dispatch

from actor_sdk import wire
from bridge import convert
from testkit.chaos_oracle import running_ids

_STATE = {"running": False, "until": None, "next_run": None}


def _definition(dispatch: wire.Dispatch) -> wire.Dispatch:
    """The dispatch without the state the bridge computes."""
    return msgspec.structs.replace(dispatch, **_STATE)


def _parse_tree(
    retained: dict[str, bytes], layout: wire.TopicLayout, problems: list[str]
) -> tuple[dict[int, wire.Dispatch], dict[str, wire.RunningSnapshot]]:
    published: dict[int, wire.Dispatch] = {}
    snapshots: dict[str, wire.RunningSnapshot] = {}
    for topic, payload in retained.items():
        try:
            ref = layout.parse(topic)
            if ref.kind is wire.TopicKind.DISPATCH and payload:
                assert ref.dispatch_id is not None
                published[ref.dispatch_id] = wire.decode_dispatch(payload)
                if topic != layout.dispatch(published[ref.dispatch_id].type, ref.dispatch_id):
                    problems.append(f"{topic}: dispatch on the wrong topic")
            elif ref.kind is wire.TopicKind.RUNNING and payload:
                assert ref.dispatch_type is not None
                snapshots[ref.dispatch_type] = wire.decode_running(payload)
        except wire.WireError as error:
            problems.append(f"{topic}: {error}")
    return published, snapshots


def check_retained(
    retained: dict[str, bytes],
    held: dict[int, Dispatch],
    read: tuple[float, float],
    tol: float,
    *,
    layout: wire.TopicLayout,
    types: Iterable[str],
) -> list[str]:
    """Compare the retained tree, read from `read[0]` to `read[1]`, with what the API holds.

    The `running` snapshot of each type must list what runs by the oracle at its
    `as_of`, and be current: equal to the oracle at the read's start (or `tol`
    before it, for a change at that instant) or at its end, or made during the read
    (a change between the read's start and its end: the broker hands over what it
    holds when the subscription arrives, and another change may come before the
    read ends).

    Args:
        retained: Topic → payload, every retained topic of the microgrid.
        held: What the API lists, by id, as the client library returns it.
        read: When the read began and ended (unix seconds).
        tol: The run's tolerance, seconds.
        layout: The microgrid's topics.
        types: The dispatch types of the run.

    Returns:
        One line per difference; empty when the tree equals the truth.
    """
    read_at, read_end = read
    retained = dict(retained)
    problems: list[str] = []
    status_payload = retained.pop(layout.status, b"")
    try:
        status = wire.decode_status(status_payload)
        if status.state != "online" or status.dispatches != len(held):
            problems.append(
                f"status {status.state}, {status.dispatches} dispatches (want {len(held)})"
            )
    except wire.WireError as error:
        problems.append(f"status: {error}")
    published, snapshots = _parse_tree(retained, layout, problems)
    if set(published) != set(held):
        extra, missing = set(published) - set(held), set(held) - set(published)
        problems.append(f"dispatch topics: stale {sorted(extra)}, missing {sorted(missing)}")
    for dispatch_id in set(published) & set(held):
        if _definition(published[dispatch_id]) != _definition(
            convert.from_client(held[dispatch_id])
        ):
            problems.append(f"dispatch {dispatch_id}: published definition differs from the API")
    for dispatch_type in types:
        of_type = [d for d in held.values() if d.type == dispatch_type]
        snapshot = snapshots.get(dispatch_type)
        got = [] if snapshot is None else [d.id for d in snapshot.running]
        made = None if snapshot is None else snapshot.as_of.timestamp()
        right_when_made = made is None or got == running_ids(of_type, made)
        made_during_read = made is not None and read_at - tol <= made <= read_end
        now, before = running_ids(of_type, read_at), running_ids(of_type, read_at - tol)
        current = got in (now, before, running_ids(of_type, read_end))
        if not current and not (made_during_read and right_when_made):
            problems.append(
                f"{dispatch_type}/running lists {got}, the oracle says {now} at the read"
            )
        if not right_when_made:
            problems.append(f"{dispatch_type}/running differs from the oracle at its as_of")
    return problems
