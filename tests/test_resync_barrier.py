"""The end of a resync from the tree's own counts, in whatever order a broker sends it.

Pure parts only: `wire.TypeTally` and `wire.TypeDigest`, the bridge core's counts in
its running snapshots, the SDK's `BridgeView.missing`, and the bridge's `RetainedScan`.
The same on a real NATS server: tests/test_nats_resync.py.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import aiomqtt
import msgspec
import pytest

from actor_sdk import wire
from actor_sdk._event import Deleted
from actor_sdk._view import BridgeView
from bridge.core import ScheduleCore
from bridge.stale_scan import RetainedScan, finish_scan
from tests.fixtures.sdk import wire_dispatch

MG = 7
LAYOUT = wire.TopicLayout.for_microgrid(MG)
T0 = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)


def dispatch(dispatch_id: int, dispatch_type: str = "T", *, updated: int = 0) -> wire.Dispatch:
    made = wire_dispatch(dispatch_id, dispatch_type, running=False)
    return msgspec.structs.replace(made, update_time=T0 + timedelta(seconds=updated))


def tally_of(*dispatches: wire.Dispatch) -> wire.TypeTally:
    tally = wire.TypeTally()
    for item in dispatches:
        tally.put(item.id, item.update_time)
    return tally


def snapshot(
    dispatch_type: str, held: list[wire.Dispatch], *, session: int = 1, seq: int = 1
) -> bytes:
    tally = tally_of(*held)
    return wire.encode(
        wire.RunningSnapshot(
            microgrid_id=MG,
            type=dispatch_type,
            running=(),
            next_change=None,
            as_of=T0,
            session=session,
            seq=seq,
            dispatches=len(tally),
            digest=tally.digest,
        )
    )


def status(dispatches: int, *, state: str = "online", counts: bool = True) -> bytes:
    return msgspec.json.encode(
        {
            "state": state,
            "upstream": "connected",
            "synced_at": "2026-12-04T06:00:00Z",
            "session": 1,
            "bridge": "test",
            "version": "0",
            "dispatches": dispatches,
            "tree_counts": counts,
        }
    )


# --- the tally -------------------------------------------------------------------------


def test_the_digest_does_not_depend_on_order_and_follows_versions_and_removals() -> None:
    items = [dispatch(i, updated=i) for i in range(1, 50)]
    shuffled = list(items)
    random.Random(4).shuffle(shuffled)
    assert tally_of(*items).digest == tally_of(*shuffled).digest
    assert len(tally_of(*items).digest) == 16

    tally = tally_of(*items)
    tally.put(3, T0 + timedelta(seconds=999))  # a newer version of 3
    assert tally.digest != tally_of(*items).digest and len(tally) == len(items)
    tally.put(3, items[2].update_time)
    assert tally.digest == tally_of(*items).digest
    tally.remove(3)
    tally.remove(3)  # twice: no effect
    assert tally.digest == tally_of(*(items[:2] + items[3:])).digest
    assert wire.TypeTally().digest == "0" * 16


def test_a_digest_told_each_version_it_replaces_equals_the_tally() -> None:
    """`TypeDigest` (the bridge core's, nothing kept per topic) and `TypeTally` agree."""
    rng = random.Random(3)
    tally, digest = wire.TypeTally(), wire.TypeDigest()
    versions: dict[int, datetime] = {}
    for step in range(2000):
        dispatch_id = rng.randrange(50)
        held = versions.get(dispatch_id)
        if held is not None and rng.random() < 0.3:
            tally.remove(dispatch_id)
            digest.discard(dispatch_id, held)
            del versions[dispatch_id]
        else:
            version = T0 + timedelta(seconds=step)
            tally.put(dispatch_id, version)
            if held is not None:
                digest.discard(dispatch_id, held)
            digest.add(dispatch_id, version)
            versions[dispatch_id] = version
        assert (len(digest), digest.digest) == (len(tally), tally.digest)
    assert len(digest) == len(versions) > 0


def test_an_older_snapshot_without_counts_still_decodes_and_always_matches() -> None:
    old = (
        b'{"microgrid_id":7,"type":"T","running":[],"next_change":null,'
        b'"as_of":"2026-12-04T06:00:00Z","session":1,"seq":1}'
    )
    decoded = wire.decode_running(old)
    assert decoded.dispatches is None and decoded.digest is None
    assert tally_of(dispatch(1)).matches(decoded)
    assert b"dispatches" not in wire.encode(decoded)  # left out when unknown
    assert wire.decode_status(status(0, counts=False)).tree_counts is False


# --- the bridge's core --------------------------------------------------------------


def test_each_running_snapshot_counts_the_dispatch_topics_of_its_type() -> None:
    core = ScheduleCore(MG, LAYOUT)
    out = core.sync([dispatch(1), dispatch(2), dispatch(3, "U")], T0, events=False)
    out.retained.update(
        core.apply("updated", dispatch(2, updated=5), T0, only_newer=False).retained
    )
    out.retained.update(core.apply("deleted", dispatch(1), T0, only_newer=False).retained)
    out.retained.update(core.apply("created", dispatch(4, "U"), T0, only_newer=False).retained)
    snapshots = {
        value.type: value
        for value in out.retained.values()
        if isinstance(value, wire.RunningSnapshot)
    }
    assert snapshots["T"].dispatches == 1
    assert snapshots["T"].digest == tally_of(dispatch(2, updated=5)).digest
    assert snapshots["U"].digest == tally_of(dispatch(3, "U"), dispatch(4, "U")).digest


# --- the SDK's view ---------------------------------------------------------------------


def tree(types: dict[str, int]) -> list[tuple[str, str, int | None, bytes]]:
    """(kind, type, id, payload) of a consistent tree with these many dispatches per type."""
    items: list[tuple[str, str, int | None, bytes]] = []
    next_id = 1
    for dispatch_type, count in types.items():
        held = [dispatch(next_id + i, dispatch_type) for i in range(count)]
        next_id += count
        items += [("dispatch", dispatch_type, d.id, wire.encode(d)) for d in held]
        items.append(("running", dispatch_type, None, snapshot(dispatch_type, held)))
    items.append(("status", "", None, status(next_id - 1)))
    return items


def feed(view: BridgeView, item: tuple[str, str, int | None, bytes]) -> None:
    kind, dispatch_type, dispatch_id, payload = item
    if kind == "status":
        view.apply_status(payload, retained=True, arrived=T0)
    elif kind == "running":
        view.apply_running(dispatch_type, payload)
    else:
        assert dispatch_id is not None
        view.apply_dispatch(dispatch_type, dispatch_id, payload)


@pytest.mark.parametrize("seed", range(20))
def test_the_view_is_complete_only_once_everything_arrived_in_any_order(seed: int) -> None:
    # (A type left without dispatches is not waited for: its snapshot runs nothing.)
    items = tree({"A": 5, "C%2E1": 3})
    random.Random(seed).shuffle(items)
    view = BridgeView(MG)
    view.begin_sync()
    for index, item in enumerate(items):
        assert view.missing(), f"complete after {index} of {len(items)} messages"
        feed(view, item)
    assert view.missing() == []


def test_the_view_says_what_is_missing() -> None:
    view = BridgeView(MG)
    view.begin_sync()
    assert view.missing() == ["the bridge status"]
    held = [dispatch(1), dispatch(2)]
    view.apply_status(status(3), retained=True, arrived=T0)
    assert view.missing() == ["0 of the 3 dispatch topics the status counts"]
    view.apply_dispatch("T", 1, wire.encode(held[0]))
    view.apply_dispatch("T", 2, wire.encode(held[1]))
    view.apply_dispatch("U", 3, wire.encode(dispatch(3, "U")))
    assert view.missing() == [
        "the running snapshot of type 'T'",
        "the running snapshot of type 'U'",
    ]
    view.apply_running("T", snapshot("T", [held[0], dispatch(2, updated=9)], seq=2))
    view.apply_running("U", snapshot("U", [dispatch(3, "U")]))
    assert view.missing() == [
        "type 'T': 2 dispatch topics arrived, its running snapshot counts 2 "
        "(same count, other versions)"
    ]
    view.apply_dispatch("T", 2, wire.encode(dispatch(2, updated=9)))  # the newer version
    assert view.missing() == []


def test_a_bridge_without_counts_is_complete_at_its_status_as_before() -> None:
    view = BridgeView(MG)
    view.begin_sync()
    view.apply_dispatch("T", 1, wire.encode(dispatch(1)))
    old = wire.RunningSnapshot(
        microgrid_id=MG, type="T", running=(), next_change=None, as_of=T0, session=1, seq=1
    )
    view.apply_running("T", wire.encode(old))
    assert view.missing() == ["the bridge status"]
    # Its count is not the tree's: not checked.
    view.apply_status(status(0, counts=False), retained=True, arrived=T0)
    assert view.missing() == []


def test_a_sync_ended_by_its_timeout_concludes_deletions_only_in_complete_types() -> None:
    view = BridgeView(MG)
    view.begin_sync()
    for item in tree({"A": 2, "B": 2}):
        feed(view, item)
    assert view.end_sync() == []
    view.lost_connection()
    view.begin_sync()
    # Again, the bridge having deleted 1 (A) and 3 (B); B's snapshot does not come.
    view.apply_status(status(2), retained=True, arrived=T0)
    view.apply_dispatch("A", 2, wire.encode(dispatch(2, "A")))
    view.apply_running("A", snapshot("A", [dispatch(2, "A")], seq=2))
    view.apply_dispatch("B", 4, wire.encode(dispatch(4, "B")))
    assert view.missing() == ["the running snapshot of type 'B'"]
    events = view.end_sync()
    assert [(type(e), int(e.dispatch.id)) for e in events] == [(Deleted, 1)]
    assert set(view.dispatches("B")) == {3, 4}


# --- the bridge's stale-topic scan ----------------------------------------------------


def message(topic: str, payload: bytes, *, retain: bool = True) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos=1, retain=retain, mid=1, properties=None)


def old_tree(stale: int) -> list[aiomqtt.Message]:
    """An earlier session's retained tree: types A and B with `stale` dispatches each."""
    messages = []
    for dispatch_type, first in (("A", 1), ("B", 1000)):
        held = [dispatch(first + i, dispatch_type) for i in range(stale)]
        messages += [message(LAYOUT.dispatch(dispatch_type, d.id), wire.encode(d)) for d in held]
        payload = snapshot(dispatch_type, held, session=4)
        messages.append(message(LAYOUT.running(dispatch_type), payload))
    return messages


@pytest.mark.parametrize("seed", range(10))
def test_the_scan_ends_when_the_tree_it_counts_has_come_whatever_the_order(seed: int) -> None:
    scan = RetainedScan(LAYOUT.status)
    ours = message(LAYOUT.status, status(0).replace(b'"session":1', b'"session":5'))
    messages = old_tree(30)
    random.Random(seed).shuffle(messages)
    # Our status early, once a topic of each type came: the old end marker stopped there.
    first_of_each = max(
        next(i for i, m in enumerate(messages) if f"/{level}/" in m.topic.value)
        for level in ("A", "B")
    )
    messages.insert(first_of_each + 1, ours)
    for index, item in enumerate(messages):
        assert not scan.done.is_set(), f"done after {index} of {len(messages)} messages"
        scan.feed(item)
    assert scan.done.is_set() and scan.missing() == []
    assert len(scan.topics) == 62


def test_the_scan_says_what_is_missing_and_ignores_live_and_garbage_messages() -> None:
    scan = RetainedScan(LAYOUT.status)
    assert scan.missing() == ["our status, retained"]
    tree_messages = old_tree(2)
    for item in tree_messages[:-1]:  # B's snapshot never comes
        scan.feed(item)
    scan.feed(message(LAYOUT.status, status(0), retain=False))  # live: not the marker
    assert not scan.done.is_set()
    scan.feed(message(LAYOUT.status, status(0).replace(b'"session":1', b'"session":5')))
    scan.feed(message(LAYOUT.dispatch("A", 77), b"\xff garbage"))
    assert scan.missing() == ["the running snapshot of 'B'"]
    assert not scan.done.is_set()
    assert LAYOUT.dispatch("A", 77) in scan.topics  # stale garbage is cleared too


class _Subscriber:
    """Stands in for the scan's client: `finish_scan` only subscribes on it.

    Each subscribe is acknowledged once `acknowledged` is set: Mosquitto acknowledges
    the status subscription only after the whole tree it sends first.
    """

    def __init__(self, *, acknowledged: bool = True) -> None:
        self.subscribed: list[str] = []
        self.asked = asyncio.Event()
        self.acknowledged = asyncio.Event()
        if acknowledged:
            self.acknowledged.set()

    async def subscribe(self, topic: str, qos: int, **options: object) -> None:
        self.subscribed.append(topic)
        self.asked.set()
        await self.acknowledged.wait()


def start_finish_scan(
    client: _Subscriber, scan: RetainedScan, lost: asyncio.Future[None] | None
) -> tuple[asyncio.Task[set[str] | None], asyncio.Task[None]]:
    stopper = asyncio.create_task(asyncio.Event().wait())
    scanning = asyncio.create_task(
        finish_scan(
            client,  # type: ignore[arg-type]
            scan,
            LAYOUT,
            qos=0,
            quiet_timeout=60,
            watched=[],
            stopper=stopper,
            lost=lost,
            microgrid_id=1,
        )
    )
    return scanning, stopper


async def test_the_scan_ends_with_the_tree_before_its_status_subscription_is_acknowledged() -> None:
    # A tree of 100k topics takes seconds, and the status subscription's acknowledgement
    # comes after it: the scan ends with the tree, not with the client's time limit.
    scan = RetainedScan(LAYOUT.status)
    client = _Subscriber(acknowledged=False)
    scanning, stopper = start_finish_scan(client, scan, None)
    await client.asked.wait()
    for item in old_tree(2):
        scan.feed(item)
    scan.feed(message(LAYOUT.status, status(0).replace(b'"session":1', b'"session":5')))
    seen = await asyncio.wait_for(scanning, 5)
    stopper.cancel()
    assert client.subscribed == [LAYOUT.status] and not client.acknowledged.is_set()
    assert seen is not None and len(seen) == 6


async def test_a_scan_whose_reader_connection_is_lost_ends_with_what_it_saw(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scan = RetainedScan(LAYOUT.status)
    for item in old_tree(2)[:3]:  # A's two topics and snapshot; B's never come
        scan.feed(item)
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    client = _Subscriber()
    scanning, stopper = start_finish_scan(client, scan, lost)
    await client.asked.wait()
    assert client.subscribed == [LAYOUT.status] and not scanning.done()
    lost.set_exception(ConnectionResetError("reset by peer"))
    seen = await asyncio.wait_for(scanning, 5)  # not the 60 s quiet timeout
    stopper.cancel()
    assert seen == {LAYOUT.dispatch("A", 1), LAYOUT.dispatch("A", 2), LAYOUT.running("A")}
    assert "lost the connection reading the tree" in caplog.text
    assert "our status, retained" in caplog.text  # what it still waited for
