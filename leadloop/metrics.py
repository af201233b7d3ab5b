"""The daemon's optional health and Prometheus endpoint, on a loopback port (`[health] port`).

- `/healthz`: 200 while the scheduler runs and this daemon holds its lease, else 503; the body
  says which.
- `/metrics`: job durations and outcomes (recorded by the daemon as jobs finish) and the outbox
  by destination and status (read from the store at scrape time, so it is never stale).

Each daemon has its own `CollectorRegistry`, so tests can build several in one process.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import col

from leadloop.store import session_scope
from leadloop.tables import Conversion

log = logging.getLogger("leadloop.metrics")

# Jobs range from a sub-second export to a retrain of many minutes.
_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

Health = Callable[[], tuple[bool, str]]


class _OutboxCollector(Collector):
    """`leadloop_conversions{destination,status}`: a gauge computed from the store per scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "leadloop_conversions",
            "Conversions in the outbox by destination and status.",
            labels=["destination", "status"],
        )
        try:
            with session_scope(self.engine) as session:
                rows = session.execute(
                    select(col(Conversion.destination), col(Conversion.status), func.count())
                    .group_by(Conversion.destination, Conversion.status)
                ).all()
        except Exception as exc:  # a scrape must not crash on a database hiccup
            log.warning("metrics: cannot read the outbox: %s", type(exc).__name__)
            rows = []
        for destination, status, n in rows:
            family.add_metric([destination, str(getattr(status, "value", status))], n)
        yield family


class DaemonMetrics:
    """The daemon's metrics, in a registry of its own."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.job_duration = Histogram(
            "leadloop_job_duration_seconds", "Wall time of each job run.", ["job"],
            buckets=_BUCKETS, registry=self.registry,
        )
        self.job_runs = Counter(
            "leadloop_job_runs", "Job runs by outcome (ok, failed, interrupted, crashed).",
            ["job", "outcome"], registry=self.registry,
        )
        self.job_last_success = Gauge(
            "leadloop_job_last_success_timestamp_seconds",
            "Unix time the job last finished ok.", ["job"], registry=self.registry,
        )
        self.registry.register(_OutboxCollector(engine))

    def observe(self, job: str, outcome: str, seconds: float) -> None:
        self.job_duration.labels(job).observe(seconds)
        self.job_runs.labels(job, outcome).inc()
        if outcome == "ok":
            self.job_last_success.labels(job).set_to_current_time()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A threaded server that serves at most `max_connections` clients at once (a connection
    beyond that is closed at once) and closes any connection older than `deadline` seconds,
    whatever it is doing: a slow or stalled client holds a thread for a bounded time only."""

    daemon_threads = True
    # A deep accept queue: connections beyond the limit are accepted and closed at once,
    # instead of waiting in SYN retries behind socketserver's default queue of 5.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 max_connections: int, deadline: float) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.deadline = deadline
        self.open: dict[Any, float] = {}  # socket -> monotonic time it was accepted
        self.lock = threading.Lock()
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        with self.lock:
            self.open[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self.lock:
            if self.open.pop(request, None) is not None:
                self.slots.release()

    def reap(self) -> None:
        """Shut the sockets of connections past their deadline (their threads then end)."""
        now = time.monotonic()
        with self.lock:
            late = [sock for sock, since in self.open.items() if now - since > self.deadline]
        for sock in late:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class HealthServer:
    """A tiny threaded HTTP server for /healthz and /metrics on a loopback address.

    Bounded: at most `max_connections` at once, `idle_timeout` seconds of silence per read or
    write, `deadline` seconds per connection in all."""

    def __init__(self, host: str, port: int, metrics: DaemonMetrics, health: Health, *,
                 max_connections: int = 16, idle_timeout: float = 5.0,
                 deadline: float = 15.0) -> None:
        self.metrics, self.health = metrics, health
        self.idle_timeout = idle_timeout
        handler = self._handler_class()
        self._httpd = _BoundedHTTPServer((host, port), handler, max_connections=max_connections,
                                         deadline=deadline)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="leadloop-health", daemon=True
        )
        self._reaper = threading.Thread(target=self._reap, name="leadloop-health-reaper",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def connections(self) -> int:
        """Connections being served now."""
        with self._httpd.lock:
            return len(self._httpd.open)

    def start(self) -> HealthServer:
        self._thread.start()
        self._reaper.start()
        log.info("health and metrics on http://%s:%d/healthz and /metrics",
                 self._httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._reaper.join(timeout=5)

    def _reap(self) -> None:
        while not self._stopping.wait(min(1.0, self._httpd.deadline / 4)):
            self._httpd.reap()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = server.idle_timeout  # per read/write: a silent client is dropped

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    ok, detail = server.health()
                    self._send(200 if ok else 503, f"{'ok' if ok else 'unhealthy'}: {detail}\n",
                               "text/plain; charset=utf-8")
                elif path == "/metrics":
                    self._send(200, server.metrics.exposition(), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, "not found\n", "text/plain; charset=utf-8")

            def _send(self, status: int, body: str | bytes, content_type: str) -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health endpoint: " + format, *args)

        return Handler
