"""A finished job gives the memory it freed back to the system."""

from __future__ import annotations

import sys

import pytest

from leadloop import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_goes_back_to_the_system_after_a_big_allocation():
    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    memory.release_freed_memory()
    before = rss_kb()
    chunks = [bytes(1000) + b"x" for _ in range(200_000)]  # ~200 MB on the C heap
    pinned = bytes(2000) + b"y"  # allocated last: the heap's top cannot shrink past it
    del chunks
    assert rss_kb() - before > 150_000  # freed, but still held by the allocator
    assert memory.release_freed_memory()
    assert rss_kb() - before < 50_000
    assert pinned
