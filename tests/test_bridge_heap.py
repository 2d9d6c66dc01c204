"""`bridge.heap`: the C heap's free pages go back to the system after a listing."""

from __future__ import annotations

import asyncio
import os

import pytest

from bridge.heap import HeapTrim, trim
from testkit.processes import async_wait_until

BLOCK = 64 * 1024
"""Below glibc's mmap threshold: such blocks come from the heap itself."""


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_free_pages_between_live_blocks_go_back_to_the_system() -> None:
    # A listing's short-lived blocks, with a long-lived one every tenth: freed, the
    # heap cannot shrink from its top, and the 36 MB stay resident until trimmed.
    blocks = [b"x" * BLOCK for _ in range(640)]
    kept = blocks[::10]
    del blocks
    before = resident_bytes()
    assert trim()
    assert before - resident_bytes() > 20 * 1024 * 1024
    assert len(kept) == 64


async def test_a_listing_is_trimmed_after_its_topics_are_out() -> None:
    sent = asyncio.Event()
    flushing = asyncio.Event()

    async def flushed() -> None:
        flushing.set()
        await sent.wait()

    heap = HeapTrim(flushed)
    task = asyncio.create_task(heap.run())
    try:
        heap.listed("UNAVAILABLE: no listing")
        heap.listed(None)
        await flushing.wait()
        assert heap.trims == 0  # the topics of the listing are still going out
        sent.set()
        await async_wait_until(lambda: heap.trims == 1, 10, "the trim")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
