"""Giving the C heap's free pages back to the system once a listing's topics are out.

A listing of 100,000 dispatches fills the C heap with large blocks that live only
as long as the listing: the API's protobuf pages, the tables of the core's diff,
its outbox and the publish queue's backlog. Freed, they stay mapped where they lie
between live blocks (glibc gives back only the top of its heap): about 25 MB at
100k dispatches, 250 bytes of resident memory per dispatch held for nothing.
glibc's `malloc_trim(0)` hands every free page back. Where the C library has no
such call (musl, macOS), nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Awaitable, Callable

__all__ = ["HeapTrim", "trim"]

_logger = logging.getLogger("bridge.heap")


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        function: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return function


_malloc_trim = _find_malloc_trim()


def trim() -> bool:
    """Hand the C heap's free pages back to the system.

    Returns:
        Whether the C library could (glibc).
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class HeapTrim:
    """Trims the C heap after each listing, once the publisher sent what it held."""

    def __init__(self, flushed: Callable[[], Awaitable[None]]) -> None:
        """Create the trimmer; `run()` trims.

        Args:
            flushed: Waits until the publisher sent everything handed over so far.
        """
        self._flushed = flushed
        self._due = asyncio.Event()
        self.trims = 0

    def listed(self, error: str | None) -> None:
        """A listing was applied (error None), or failed.

        Args:
            error: Why the listing failed; None when it was applied.
        """
        if error is None:
            self._due.set()

    async def run(self) -> None:
        """Trim after each listing's topics are out, until cancelled."""
        while True:
            await self._due.wait()
            self._due.clear()
            await self._flushed()
            # Off the event loop: the call walks the whole heap (a few ms at 100k).
            if await asyncio.to_thread(trim):
                self.trims += 1
                _logger.debug("gave the C heap's free pages back to the system")
