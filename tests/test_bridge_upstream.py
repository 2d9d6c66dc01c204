"""The bridge's Dispatch API side (`bridge.upstream`), in-process, against the real API server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import TargetIds

from actor_sdk import wire
from actor_sdk.mqtt import Backoff
from bridge import convert
from bridge.service import (
    LinkChanged,
    Listed,
    ScheduleCore,
    StreamEvent,
    Synced,
    UpstreamItem,
)
from bridge.upstream import Upstream, UpstreamError, UpstreamSettings
from testkit.api_server import ApiServerHandle
from testkit.processes import async_wait_until

MICROGRID = 21
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Recorder:
    """A sink that applies what the upstream delivers to a schedule core, as the service does."""

    def __init__(self) -> None:
        self.items: list[UpstreamItem] = []
        self.core = ScheduleCore(MICROGRID, wire.TopicLayout.for_microgrid(MICROGRID))

    def __call__(self, item: UpstreamItem) -> None:
        self.items.append(item)
        match item:
            case Listed(dispatches=dispatches):
                self.core.put_listed(dispatches, NOW, events=True)
            case Synced(dispatches=dispatches, listed_before=before):
                self.core.sync(dispatches, NOW, events=True, listed_before=before)
            case StreamEvent(kind=kind, dispatch=dispatch, buffered=buffered):
                self.core.apply(kind, dispatch, NOW, only_newer=buffered)

    def ids(self) -> set[int]:
        return {d.id for d in self.core.dispatches()}

    def syncs(self) -> int:
        return sum(isinstance(i, Synced) for i in self.items)


@contextlib.asynccontextmanager
async def upstream(
    server: ApiServerHandle, sink: Callable[[UpstreamItem], None], page_size: int | None = None
) -> AsyncIterator[Upstream]:
    settings = UpstreamSettings(server.url, server.key or "", server.secret)
    paging = {} if page_size is None else {"page_size": page_size}
    feed = Upstream(settings, MICROGRID, sink, backoff=Backoff(initial=0.1, cap=0.5), **paging)
    task = asyncio.create_task(feed.run())
    try:
        yield feed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _ListingStub:
    """The client's stub, with its list calls going through `list_page(stub, ...)` first."""

    def __init__(self, stub: Any, list_page: Callable[..., Any]) -> None:
        self._stub = stub
        self._list_page = list_page

    def ListMicrogridDispatches(self, *args: Any, **kwargs: Any) -> Any:
        return self._list_page(self._stub, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


def intercept_listing(monkeypatch: pytest.MonkeyPatch, list_page: Callable[..., Any]) -> None:
    """Route every list page call of the API client through `list_page(stub, ...)`."""
    real_stub = DispatchApiClient.stub
    monkeypatch.setattr(
        DispatchApiClient,
        "stub",
        property(lambda client: _ListingStub(real_stub.fget(client), list_page)),
    )


async def server_ids(server: ApiServerHandle) -> set[int]:
    async with server.client() as client:
        return {
            int(d.id)
            async for page in client.list(microgrid_id=MicrogridId(MICROGRID))
            for d in page
        }


async def create(server: ApiServerHandle, count: int) -> None:
    async with server.client() as client:
        for index in range(count):
            await client.create(
                microgrid_id=MicrogridId(MICROGRID),
                type="GAP",
                start_time=datetime.now(UTC) + timedelta(hours=1),
                duration=timedelta(seconds=60),
                target=TargetIds(index),
            )


async def test_dispatches_created_while_connecting_are_never_lost(
    api_server: ApiServerHandle,
) -> None:
    await create(api_server, 20)
    sink = Recorder()
    # Creations race the stream's opening and the list.
    creator = asyncio.create_task(create(api_server, 40))
    async with upstream(api_server, sink):
        await creator
        expected = await server_ids(api_server)
        assert len(expected) == 60
        await async_wait_until(lambda: sink.ids() == expected, 10, "every dispatch")
        assert isinstance(sink.items[0], LinkChanged) and sink.items[0].connected
        assert sink.syncs() == 1


async def test_a_killed_server_is_listed_again_and_deletes_missed_meanwhile_apply(
    api_server: ApiServerHandle,
) -> None:
    await create(api_server, 3)
    sink = Recorder()
    async with upstream(api_server, sink):
        await async_wait_until(lambda: len(sink.ids()) == 3, 10, "the first sync")
        victim = min(sink.ids())
        api_server.kill9()
        await async_wait_until(
            lambda: any(isinstance(i, LinkChanged) and not i.connected for i in sink.items),
            10,
            "the loss of the stream",
        )
        # Deleted while the server is down: only a new list can tell.
        with sqlite3.connect(api_server.db_path) as db:
            db.execute("DELETE FROM dispatches WHERE id = ?", (victim,))
        api_server.start()
        await async_wait_until(lambda: victim not in sink.ids(), 15, "the missed delete")
        assert sink.syncs() >= 2
        assert len(sink.ids()) == 2


async def test_a_list_page_over_the_grpc_message_limit_is_listed_again_in_smaller_pages(
    api_server: ApiServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    # 100 dispatches of 45 KB payload: one page of all of them exceeds gRPC's
    # default 4 MB receive limit (RESOURCE_EXHAUSTED on the client side).
    async with api_server.client() as client:
        for index in range(100):
            await client.create(
                microgrid_id=MicrogridId(MICROGRID),
                type="BIG",
                start_time=datetime.now(UTC) + timedelta(hours=1),
                duration=timedelta(seconds=60),
                target=TargetIds(index),
                payload={"blob": "x" * 45_000},
            )
    sink = Recorder()
    async with upstream(api_server, sink):
        await async_wait_until(lambda: len(sink.ids()) == 100, 30, "all 100 large dispatches")
    assert sink.syncs() == 1
    assert "a list page was too large" in caplog.text


async def test_the_listing_is_not_kept_once_handed_over(api_server: ApiServerHandle) -> None:
    # The service keeps what it needs of a listing; the upstream must not keep the
    # whole list alive for the rest of its session (a second struct per dispatch).
    await create(api_server, 30)
    handed: list[list[wire.Dispatch]] = []

    def keep_the_list(item: UpstreamItem) -> None:
        if isinstance(item, Synced):
            handed.append(item.dispatches)

    settings = UpstreamSettings(api_server.url, api_server.key or "", api_server.secret)
    feed = Upstream(settings, MICROGRID, keep_the_list, backoff=Backoff(initial=0.1, cap=0.5))
    task = asyncio.create_task(feed.run())
    try:
        await async_wait_until(lambda: [len(h) for h in handed] == [30], 10, "the first sync")
        gc.collect()
        references = sys.getrefcount(handed[0])
        # Held by `handed` alone (and getrefcount's argument), not by the upstream.
        assert references == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Conversions:
    """Counts a listing's conversions, and what a running ticker saw between turns."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.most_between_turns = 0
        convert_one = convert.ListingConverter.convert

        def counting(converter: convert.ListingConverter, pb: Any) -> wire.Dispatch:
            self.count += 1
            return convert_one(converter, pb)

        monkeypatch.setattr(convert.ListingConverter, "convert", counting)

    async def tick(self) -> None:
        while True:
            seen = self.count
            await asyncio.sleep(0)
            self.most_between_turns = max(self.most_between_turns, self.count - seen)


async def test_a_listing_gives_the_event_loop_a_turn_every_few_hundred_dispatches(
    api_server: ApiServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A page of 5,000 converted in one go held the loop (scheduled changes, the
    # publisher) for a quarter second.
    await create(api_server, 1200)
    conversions = _Conversions(monkeypatch)
    ticker = asyncio.ensure_future(conversions.tick())
    sink = Recorder()
    try:
        async with upstream(api_server, sink):
            await async_wait_until(lambda: sink.syncs() == 1, 30, "the listing")
    finally:
        ticker.cancel()
    assert conversions.count >= 1200
    assert conversions.most_between_turns <= 500


async def test_a_listing_converts_each_distinct_rule_once(
    api_server: ApiServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Converting the rules was a third of the 100k listing's conversion time.
    await create(api_server, 30)  # 30 targets, one rule (none)
    rules = 0
    convert_rule = convert._pb_recurrence

    def counting(rule: Any) -> wire.Recurrence | None:
        nonlocal rules
        rules += 1
        return convert_rule(rule)

    monkeypatch.setattr(convert, "_pb_recurrence", counting)
    sink = Recorder()
    async with upstream(api_server, sink):
        await async_wait_until(lambda: sink.syncs() == 1, 10, "the listing")
    assert len(sink.ids()) == 30
    assert rules == 1


async def test_the_next_list_page_is_asked_for_before_this_one_is_converted(
    api_server: ApiServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server makes the next page while this process converts the last one.
    await create(api_server, 30)
    conversions = _Conversions(monkeypatch)
    asked_after: list[int] = []

    def count_then_list(stub: Any, *args: Any, **kwargs: Any) -> Any:
        asked_after.append(conversions.count)
        return stub.ListMicrogridDispatches(*args, **kwargs)

    intercept_listing(monkeypatch, count_then_list)
    sink = Recorder()
    async with upstream(api_server, sink, page_size=10):
        await async_wait_until(lambda: sink.syncs() == 1, 10, "the listing")
    # Pages 1-3 of 10 (no fourth: the third has no next token): page 2 is asked for
    # before page 1's dispatches are converted, page 3 before page 2's.
    assert asked_after[:3] == [0, 0, 10]


async def test_each_page_but_the_last_is_handed_over_before_the_next_is_converted(
    api_server: ApiServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service publishes a page while the next is converted: at 100k the first
    # topics went out after the whole listing and its first schedule (4 s).
    await create(api_server, 30)
    conversions = _Conversions(monkeypatch)
    handed: list[tuple[str, int, int]] = []  # what, how many, conversions made by then
    sink = Recorder()

    def record(item: UpstreamItem) -> None:
        if isinstance(item, Listed | Synced):
            handed.append((type(item).__name__, len(item.dispatches), conversions.count))
        if isinstance(item, Synced):
            assert len(item.listed_before) == 20
        sink(item)

    async with upstream(api_server, record, page_size=10):
        await async_wait_until(lambda: sink.syncs() == 1, 10, "the listing")
    assert handed == [("Listed", 10, 10), ("Listed", 10, 20), ("Synced", 10, 30)]
    assert sink.ids() == await server_ids(api_server)


async def test_a_dispatch_deleted_during_a_listing_in_parts_is_deleted(
    api_server: ApiServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Listed in the first page, deleted before the last: the stream's deletion, replayed
    # after the listing, removes what the first part published.
    await create(api_server, 30)
    [first, *_] = sorted(await server_ids(api_server))
    pages = 0

    async def delete_then_list(stub: Any, *args: Any, **kwargs: Any) -> Any:
        async with api_server.client() as client:
            await client.delete(microgrid_id=MicrogridId(MICROGRID), dispatch_id=first)
        return await stub.ListMicrogridDispatches(*args, **kwargs)

    def list_page(stub: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        pages += 1
        if pages == 3:
            return asyncio.ensure_future(delete_then_list(stub, *args, **kwargs))
        return stub.ListMicrogridDispatches(*args, **kwargs)

    intercept_listing(monkeypatch, list_page)
    sink = Recorder()
    async with upstream(api_server, sink, page_size=10):
        await async_wait_until(lambda: first not in sink.ids() and sink.syncs() == 1, 10, "gone")
    assert sink.ids() == await server_ids(api_server)
    assert len(sink.ids()) == 29


async def test_a_stop_that_comes_with_the_sessions_error_stops_the_upstream() -> None:
    """SIGTERM while the API shut down: the session's error must not swallow the cancel.

    Seen in CI: the bridge logged "signal received", then "the server is shutting down;
    reconnecting" and went on reconnecting until it was killed 10 s later.
    """
    upstream = Upstream(UpstreamSettings("grpc://127.0.0.1:9", "key", None), 1, lambda item: None)
    failing = asyncio.Event()

    async def session() -> None:
        await failing.wait()
        raise UpstreamError("UNAVAILABLE: the server is shutting down")

    upstream._session = session  # type: ignore[method-assign]
    task = asyncio.create_task(upstream.run())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    failing.set()  # the session fails ...
    await asyncio.sleep(0)  # ... and its error wakes the upstream's wait
    task.cancel()  # the stop arrives in the same turn
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
