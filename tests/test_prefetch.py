from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from leadloop.prefetch import prefetched


def test_items_arrive_in_order_and_the_producer_runs_ahead():
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(5):
            produced.append(i)
            yield i

    got = []
    for item in prefetched(items(), depth=1):
        # While the consumer holds this item, the producer reads ahead: one item waits in the
        # queue and at most one more is in the producer's hands.
        deadline = time.monotonic() + 5
        while len(produced) < min(item + 2, 5) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.02)
        assert min(item + 2, 5) <= len(produced) <= min(item + 3, 5)
        got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_an_error_in_the_producer_comes_after_the_items_before_it():
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ConnectionError("page 3 failed")

    got = []
    with pytest.raises(ConnectionError, match="page 3 failed"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [1, 2]


def test_stopping_early_closes_the_source_in_its_own_thread_and_ends_the_thread():
    closed_in: list[str] = []
    before = threading.active_count()

    def items() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed_in.append(threading.current_thread().name)

    pages = prefetched(items(), name="prefetch-test")
    assert next(pages) == 0
    pages.close()
    assert closed_in == ["prefetch-test"]
    assert threading.active_count() == before


def test_an_error_in_the_consumer_stops_the_producer():
    stopped = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            stopped.set()

    def consume() -> None:
        for item in prefetched(items()):
            if item == 3:
                raise ValueError("bad page")

    with pytest.raises(ValueError):
        consume()
    assert stopped.wait(2)
