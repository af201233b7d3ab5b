"""Read ahead of the consumer: produce the next item in a background thread.

The sync alternates between waiting on the CRM (HTTP, JSON) and waiting on the database; one
page read ahead lets the two overlap. Order is kept, at most `depth` items wait, and an error
in the producer reaches the consumer after the items produced before it, as if read in line.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has gone


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterator[T], *, depth: int = 1, name: str = "prefetch"
               ) -> Generator[T, None, None]:
    """Yield what `items` yields, producing it in a thread up to `depth` items ahead.

    Close the returned generator (or exhaust it) to stop the thread: `items` is then closed
    in the thread that ran it, so its own cleanup (`finally`, `with`) runs there."""
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    break
        except BaseException as exc:  # handed over to the consumer, raised there
            offer(_Failed(exc))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        offer(_DONE)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
