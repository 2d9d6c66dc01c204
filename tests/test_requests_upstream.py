"""`Upstream.resync()`, in-process, against the real API server: list again now, no gap."""

from __future__ import annotations

import asyncio
import contextlib

from actor_sdk.mqtt import Backoff
from bridge.service import LinkChanged
from bridge.upstream import Upstream, UpstreamSettings
from testkit.api_server import ApiServerHandle
from testkit.processes import async_wait_until
from tests.test_bridge_upstream import MICROGRID, Recorder, create, server_ids, upstream


def losses(sink: Recorder) -> int:
    return sum(isinstance(i, LinkChanged) and not i.connected for i in sink.items)


async def test_a_resync_while_streaming_lists_again_without_losing_a_change(
    api_server: ApiServerHandle,
) -> None:
    await create(api_server, 5)
    sink = Recorder()
    async with upstream(api_server, sink) as feed:
        await async_wait_until(lambda: sink.syncs() == 1, 10, "the first sync")
        # Changes race the new stream and its listing: none may be lost.
        creator = asyncio.create_task(create(api_server, 30))
        await asyncio.sleep(0.05)
        feed.resync()
        await creator
        expected = await server_ids(api_server)
        await async_wait_until(lambda: sink.ids() == expected, 10, "every dispatch")
        await async_wait_until(lambda: sink.syncs() == 2, 10, "the second listing")
        assert losses(sink) == 0  # a resync is not reported as a lost link
        # Resyncs asked while a listing is under way are answered by it.
        feed.resync()
        feed.resync()
        await async_wait_until(lambda: sink.syncs() >= 3, 10, "the third listing")
        await asyncio.sleep(0.5)
        assert sink.syncs() <= 4


async def test_a_resync_while_waiting_to_reconnect_tries_at_once(
    api_server: ApiServerHandle,
) -> None:
    sink = Recorder()
    settings = UpstreamSettings(api_server.url, api_server.key or "", api_server.secret)
    # Reconnect waits of 30-60 s: only a resync brings the next attempt within seconds.
    feed = Upstream(settings, MICROGRID, sink, backoff=Backoff(initial=60, cap=60))
    api_server.stop()
    task = asyncio.create_task(feed.run())
    try:
        await async_wait_until(lambda: losses(sink) == 1, 10, "the failed first attempt")
        feed.resync()
        await async_wait_until(lambda: losses(sink) == 2, 5, "a second attempt at once")
        api_server.start()

        def listed() -> bool:
            # gRPC may refuse the first attempts after a restart (its own connect
            # backoff, shared by channels): each resync is one more attempt.
            feed.resync()
            return sink.syncs() == 1

        await async_wait_until(listed, 15, "the listing once back", interval=0.5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
