"""The HTTP half every REST CRM connector shares: send, authenticate, classify the answer.

A connector subclasses `RestApi` and declares its API: `vendor`, how it authenticates (a
`TokenAuth` or `OAuthAuth`), its rate limiter, and the few answers that are its own (which 429 or
error code is the daily quota, which 4xx carries a vendor error code). Everything else is decided
here, once, in `error_for()`:

- a refused credential (401, or the statuses in `auth_statuses`) is fatal and names where the
  credential came from (the environment variable, or the OAuth app's), after one refresh of an
  OAuth token;
- the vendor's quota signal (`quota_error()`) stops the sync with `QuotaExhaustedError`, saying
  when it resets;
- a 429 or 5xx that the shared session's retries (`leadloop.http`, honouring Retry-After) did not
  get past is retriable, as is a connection that kept failing;
- any other answer is fatal (`fatal_error()`).

Messages describe the response with secrets and e-mails masked (`describe_response`); a token is
never part of one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol, TypeVar

import requests

from leadloop.config import Settings
from leadloop.errors import FatalSourceError, QuotaExhaustedError, RetriableSourceError
from leadloop.http import RateLimiter, describe_response
from leadloop.oauth import OAuthTokenProvider

log = logging.getLogger(__name__)

Token = TypeVar("Token")
MAX_REPEATS = 3  # a page sent again this often in a row means the server loops


class Auth(Protocol):
    """How a connector authenticates its requests."""

    source: str  # where the credentials come from, for messages: "environment variable X"

    def headers(self) -> dict[str, str]:
        """The headers that carry the credentials (read or renewed as needed)."""
        ...

    def refresh(self, sent: dict[str, str]) -> bool:
        """The API refused `sent`: renew the credentials; False when they cannot be."""
        ...


class TokenAuth:
    """A static token from the environment (config key `key` names the variable `env`), sent
    as `header: <scheme> <token>` (no scheme: the bare token)."""

    def __init__(self, settings: Settings, key: str, env: str | None, *,
                 header: str = "Authorization", scheme: str = "Bearer") -> None:
        self._token = settings.secret(key, env).get_secret_value()
        self._header = header
        self._scheme = scheme
        self.source = f"environment variable {env}"

    def headers(self) -> dict[str, str]:
        return {self._header: f"{self._scheme} {self._token}" if self._scheme else self._token}

    def refresh(self, sent: dict[str, str]) -> bool:
        """A static token cannot be renewed: no second try."""
        return False


class OAuthAuth:
    """An OAuth access token (`leadloop.oauth`), renewed once when the API refuses it early."""

    def __init__(self, provider: OAuthTokenProvider, source: str) -> None:
        self.provider = provider
        self.source = source  # e.g. "the OAuth app in HS_CLIENT_ID/HS_REFRESH_TOKEN"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.provider.token()}"}

    def refresh(self, sent: dict[str, str]) -> bool:
        self.provider.invalidate(sent["Authorization"].removeprefix("Bearer "))
        return True



class RestApi:
    """Authenticated, rate-limited calls to one CRM's REST API (see the module doc).

    Subclasses set `vendor`, `auth_hint`, and override `quota_error`, `fatal_error`,
    `error_code`, `throttle_wait` or `observe` where their API has its own answer."""

    vendor: ClassVar[str]
    auth_hint: ClassVar[str | None] = None  # what to check when the credentials are refused
    auth_statuses: ClassVar[frozenset[int]] = frozenset({401})
    ok_statuses: ClassVar[frozenset[int]] = frozenset({200})
    max_throttled: ClassVar[int] = 5  # short waits (`throttle_wait`) in a row before giving up

    def __init__(self, session: requests.Session, base_url: str, auth: Callable[[], Auth],
                 limiter: RateLimiter | None = None, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.session = session
        self._base_url = base_url.rstrip("/")
        self._make_auth = auth
        self._auth: Auth | None = None
        self.limiter = limiter
        self.sleep = sleep
        self.requests = 0  # responses received
        self.throttled = 0  # short waits taken on the API's request

    @property
    def auth(self) -> Auth:
        """The credentials, read from the environment on first use."""
        if self._auth is None:
            self._auth = self._make_auth()
        return self._auth

    @property
    def base_url(self) -> str:
        return self._base_url

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                body: Any = None, limiter: RateLimiter | None = None) -> Any:
        """Send `method path` (a path under `base_url`) and return the decoded JSON answer, or
        raise the error `error_for()` gives the response."""
        refreshed = False
        throttled = 0
        while True:
            bucket = limiter or self.limiter
            if bucket is not None:
                bucket.acquire()
            credentials = self.auth.headers()
            try:
                response = self.session.request(
                    method, self.base_url + path, params=params, json=body,
                    headers={**credentials, "Accept": "application/json",
                             **self.request_headers()})
            except requests.RequestException as exc:
                raise RetriableSourceError(
                    f"{self.vendor} {method} {path.split('?')[0]} failed after retries: "
                    f"{type(exc).__name__}") from None
            self.requests += 1
            self.observe(response)
            status = response.status_code
            if status in self.ok_statuses:
                return response.json()
            if status in self.auth_statuses and not refreshed and self.auth.refresh(credentials):
                log.info("%s refused the access token (%s); refreshing it once", self.vendor, status)
                refreshed = True
                continue
            wait = None if self.quota_error(response) else self.throttle_wait(response)
            if wait is not None and throttled < self.max_throttled:
                throttled += 1
                self.throttled += 1
                self.sleep(wait)
                continue
            raise self.error_for(response, refreshed=refreshed)

    def error_for(self, response: requests.Response, *, refreshed: bool = False) -> Exception:
        """The one classification of a response that is not a success."""
        quota = self.quota_error(response)
        if quota is not None:
            return quota
        status = response.status_code
        if status in self.auth_statuses:
            code = self.error_code(response)
            return FatalSourceError(
                f"{self.vendor} refused the credentials from {self.auth.source} "
                f"({status}{' ' + code if code else ''})"
                + (" even after a token refresh" if refreshed else ""),
                hint=self.auth_hint)
        if status == 429 or status >= 500:
            return RetriableSourceError(f"{self.vendor} kept failing: {describe_response(response)}")
        return self.fatal_error(response)

    # -- what a connector may declare -------------------------------------------------------

    def request_headers(self) -> dict[str, str]:
        """Headers every request carries besides the credentials."""
        return {}

    def observe(self, response: requests.Response) -> None:
        """See every response (usage headers, pacing) before it is classified."""

    def throttle_wait(self, response: requests.Response) -> float | None:
        """Seconds to wait before sending again, when the API asks for a short pause the
        session's retries do not cover; None: classify the response."""
        return None

    def quota_error(self, response: requests.Response) -> QuotaExhaustedError | None:
        """The error when `response` says the account's quota is used up, else None."""
        return None

    def error_code(self, response: requests.Response) -> str:
        """The vendor's error code or category in the body, for messages ("" when none)."""
        return ""

    def fatal_error(self, response: requests.Response) -> Exception:
        """A refusal that retrying cannot fix."""
        return FatalSourceError(f"{self.vendor} refused a request: {describe_response(response)}")


def json_body(response: requests.Response) -> Any:
    """The response's JSON body, or None when it has none."""
    try:
        return response.json()
    except ValueError:
        return None


def follow_pages(fetch: Callable[[Token | None], Any], next_token: Callable[[Any], Token | None],
                 *, vendor: str, what: str, same_records: Callable[[Any], Any] | None = None
                 ) -> Iterator[tuple[Any, Token | None]]:
    """Yield (answer, next token) for each page: `fetch(None)` first, then `fetch(token)` until
    `next_token` gives None. A page the server sends again (its own token back, or the same
    records as the page before, by `same_records`) is read again, never yielded twice; sent
    again more than MAX_REPEATS times in a row, the sync fails as retriable."""
    token: Token | None = None
    previous: Any = None
    repeats = 0
    while True:
        data = fetch(token)
        nxt = next_token(data)
        records = same_records(data) if same_records is not None else None
        if (token is not None and nxt == token) or (previous and records == previous):
            repeats += 1
            if repeats > MAX_REPEATS:
                raise RetriableSourceError(f"{vendor} kept repeating the {what} page after {token}")
            log.warning("%s repeated a %s page (after=%s); reading it again", vendor, what, token)
            continue
        repeats, previous = 0, records
        yield data, nxt
        if not nxt:
            return
        token = nxt
