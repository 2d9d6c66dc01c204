"""Give the C heap's free memory back to the operating system after a sync.

A listing of 100,000 dispatches passes through about 100 MB of protobuf messages
and converted structs that are freed once the core holds the dispatches. CPython
returns its own small-object arenas when they empty, but the C allocator keeps
most of what larger objects freed, and the bridge's resident memory stayed at the
start-up peak. glibc's `malloc_trim` hands those free pages back. On a C library
without it (musl), nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable

__all__ = ["return_free_memory"]

_logger = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def return_free_memory() -> None:
    """Return the C heap's free pages to the operating system, when the C library can."""
    if _MALLOC_TRIM is None:
        return
    began = time.perf_counter()
    _MALLOC_TRIM(0)
    _logger.debug(
        "returned the heap's free memory to the system in %.1f ms",
        (time.perf_counter() - began) * 1000,
    )
