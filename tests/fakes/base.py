"""What the stateful CRM fakes share: a loopback `LocalServer` with its lifecycle, the clock, an
id counter and a lock, and the injectable faults that are used up as they are served."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import datetime

from leadloop.sandbox.server import LocalServer, Reply


class FakeServer:
    """Base of a fake vendor API. Subclasses register their routes on `self.server` and say
    what a server error looks like in `_server_error()`."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        # faults, each used up as served
        self.server_errors = 0
        self.dropped_connections = 0
        self.repeated_pages = 0
        self.server = LocalServer()

    def start(self) -> str:
        return self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def _server_error(self) -> Reply:
        raise NotImplementedError

    def _take_fault(self) -> Reply | None:
        """The next injected fault to answer with (a dropped connection first), or None."""
        with self._lock:
            if self.dropped_connections:
                self.dropped_connections -= 1
                return Reply(drop_connection=True)
            if self.server_errors:
                self.server_errors -= 1
                return self._server_error()
        return None
