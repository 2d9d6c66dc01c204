"""`bridge.heap.return_free_memory`: freed heap memory leaves the process's RSS."""

from __future__ import annotations

import os

from bridge.heap import return_free_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_freed_between_live_objects_goes_back_to_the_system() -> None:
    # Objects over 512 bytes come from the C allocator, as a listing's do; keeping one in
    # twenty alive leaves holes that freeing alone never gives back.
    blocks = [bytes(2000) + index.to_bytes(4, "big") for index in range(20_000)]
    kept = blocks[::20]
    freed = sum(map(len, blocks)) - sum(map(len, kept))
    del blocks
    before = resident_bytes()
    return_free_memory()
    after = resident_bytes()
    assert before - after > freed / 2, (before, after, freed)
    assert len(kept) == 1000
