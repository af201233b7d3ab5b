"""The one place leadloop makes HTTP sessions.

`make_session()` gives a `requests.Session` with default timeouts and urllib3 retries on
connection errors, 429 and 5xx, with exponential backoff that honours `Retry-After`. A
`Retry-After` longer than `max_retry_after` is not slept through: the response is returned so the
caller can stop cleanly and say when to resume (daily quotas). Calls are idempotent by design
(cursor reads, uploads keyed by order id), so POSTs are retried too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from leadloop import __version__
from leadloop.redact import redact_text, redact_url

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds


class _CappedRetry(Retry):
    """urllib3 Retry that refuses to sleep through an over-long Retry-After."""

    max_retry_after: float = 120.0

    def increment(  # type: ignore[override]
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> Retry:
        if response is not None:
            wait = self.parse_retry_after(response.headers.get("Retry-After") or "0")
            if wait > self.max_retry_after:
                # Hand the 429 back to the caller (it says when to resume) instead of sleeping.
                raise MaxRetryError(_pool, url or "", reason=None)
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            return super().parse_retry_after(retry_after)
        except Exception:  # an unparsable header: fall back to our own backoff
            return 0.0

    def new(self, **kw: Any) -> _CappedRetry:
        new = super().new(**kw)
        new.max_retry_after = self.max_retry_after
        return new


class _TimeoutSession(requests.Session):
    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    # Takes requests' keyword arguments as **kwargs (typeshed spells each one out).
    def request(  # type: ignore[override]
        self, method: str, url: str | bytes, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        started = time.monotonic()
        response = super().request(method, url, **kwargs)
        log.debug(
            "%s %s -> %s in %.0f ms",
            method,
            redact_url(str(url)),
            response.status_code,
            (time.monotonic() - started) * 1000,
        )
        return response


def make_session(
    *,
    retries: int = 5,
    backoff_factor: float = 0.5,
    backoff_max: float = 60.0,
    max_retry_after: float = 120.0,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    statuses: frozenset[int] = RETRY_STATUSES,
) -> requests.Session:
    """A Session with timeouts and retry/backoff honouring Retry-After (see module doc)."""
    retry = _CappedRetry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff_factor,
        backoff_max=backoff_max,
        backoff_jitter=0.1 if backoff_factor else 0.0,
        status_forcelist=statuses,
        allowed_methods=None,  # retry POST as well: our writes are idempotent
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    retry.max_retry_after = max_retry_after
    session = _TimeoutSession(timeout)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = f"leadloop/{__version__}"
    return session


def describe_response(response: requests.Response, limit: int = 500) -> str:
    """`403 Forbidden for POST /path: <body excerpt>`, with secrets and e-mails masked."""
    req = response.request
    path = redact_url(req.url or "") if req is not None else ""
    method = req.method if req is not None else ""
    body = response.text[:limit] if response.content else ""
    return redact_text(f"{response.status_code} {response.reason} for {method} {path}: {body}")


def retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class RateLimiter:
    """A token bucket: at most `rate` calls per `per` seconds, smoothly (burst up to `burst`).

    Set from the account's plan so that a sync runs near the allowed rate without drawing 429s.
    Thread-safe; the clock and sleep are injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        per: float = 1.0,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or per <= 0:
            raise ValueError("rate and per must be positive")
        self.per_second = rate / per
        self.capacity = burst if burst is not None else max(1.0, self.per_second)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()
        self.waited = 0.0

    def acquire(self, cost: float = 1.0) -> None:
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(
                    self.capacity, self._tokens + (now - self._last) * self.per_second
                )
                self._last = now
                # a token short by float rounding only is a whole one: a clock that advances by
                # exactly the wait (a fake one; a coarse one) would otherwise spin on 1e-17 s
                if self._tokens >= cost - 1e-9:
                    self._tokens = max(0.0, self._tokens - cost)
                    return
                wait = (cost - self._tokens) / self.per_second
            self.waited += wait
            self._sleep(wait)
