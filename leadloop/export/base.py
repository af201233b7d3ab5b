"""The destination contract shared by every exporter.

A destination turns a batch of due outbox rows into ONE request body (`build_payload`, pure: no
clock, no network, same rows in -> same body out) and sends it (`send`), answering one
`RowResult` per row. A failure of the whole request is raised instead:

- `BatchRejected`: the platform refused the request for one row's content (a fast-fail 400).
  When the platform names the offending row (`row_index`), that row is rejected and the rest
  re-sent; only a 400 that names no reason at all is bisected to isolate the bad row(s).
- `RetriableDestinationError` (429, 5xx, network): every row is retried later with backoff.
- `DestinationPaused` (a `FatalDestinationError`: credentials, account or setup — terms not
  signed, unknown conversion action, no permission): the destination pauses for this run after
  that one request. Its rows stay due, nothing is rejected, `leadloop status` names the fix, and
  the next run tries again. A per-row answer that is really about the account (every row gets
  it) is a `RowResult` with outcome "paused" and has the same effect.

Each vendor module classifies its own documented error enums into those outcomes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import requests
from pydantic import BaseModel, ConfigDict, Field

from leadloop.envnames import CheckedEnvName
from leadloop.errors import DestinationError, FatalDestinationError, RetriableDestinationError
from leadloop.export.rules import check, window
from leadloop.http import describe_response, retry_after_seconds
from leadloop.redact import redact_text

Outcome = Literal["sent", "rejected", "retry", "paused"]


@dataclass(slots=True)
class OutRow:
    """A due conversion joined with what its lead contributes to a payload (hashes, ids, consent).

    `original_order_id` is the order id of revision 0: adjustments refer to the conversion by it.
    Read-only by convention, not `frozen`: the outbox builds one per conversion to decide its
    platform rules, and a frozen dataclass of 25 fields costs 2.6 µs to make against 0.4 µs
    (0.5 s of a 100,000-lead build).
    """

    id: int
    order_id: str
    original_order_id: str
    kind: str  # conversion | restatement | retraction
    revision: int
    stage: str
    conversion_action: str
    conversion_time: datetime
    value: Decimal | None
    currency: str | None
    created_at: datetime  # when this revision was derived (adjustment time)
    crm_id: str
    lead_created_at: datetime
    gclid: str | None = None
    gbraid: str | None = None
    wbraid: str | None = None
    msclkid: str | None = None
    li_fat_id: str | None = None
    meta_lead_id: str | None = None
    email_sha256: str | None = None
    email_google_sha256: str | None = None
    phone_e164_sha256: str | None = None
    phone_digits_sha256: str | None = None
    consent_ad_user_data: bool | None = None
    consent_ad_personalization: bool | None = None


@dataclass(frozen=True, slots=True)
class RowResult:
    order_id: str
    outcome: Outcome
    platform_code: str | None = None
    message: str | None = None
    retry_after: float | None = None  # seconds; None = the engine's backoff
    response: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a platform's later report on a sent request (`diagnose`) means for its rows:
    "sent" (kept; `message` marks a partial success), "rejected", "retry" (after `retry_after`
    seconds) or "paused" (back to due; `message` is the fix)."""

    outcome: Outcome
    code: str
    message: str | None = None
    retry_after: float | None = None


def classify_row(
    order_id: str, code: str, message: str, *, duplicate: frozenset[str], retry_after: dict[str, float],
    setup: dict[str, str] | None = None,
) -> RowResult:
    """A platform's per-row error code as our outcome: "already there" counts as sent, known
    transient codes are retried after their wait, account/setup codes pause the destination
    (the row stays due; `message` becomes the fix), anything else is a permanent rejection."""
    if code in duplicate:
        return RowResult(order_id, "sent", code, message)
    if code in retry_after:
        return RowResult(order_id, "retry", code, message, retry_after[code])
    if setup and code in setup:
        return RowResult(order_id, "paused", code, setup[code])
    return RowResult(order_id, "rejected", code, message)


class BatchRejected(DestinationError):
    """The platform refused the whole request for a row's content (no per-row partial failure).

    `row_index` names the row when the platform did; without it the batch is bisected."""

    def __init__(self, code: str, message: str, *, row_index: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message
        self.row_index = row_index


class DestinationPaused(FatalDestinationError):
    """The platform refused the request because of the account or its setup, not a row.

    `fix` is one sentence saying what to change (shown by `leadloop status`); `code` is the
    vendor's documented error name."""

    def __init__(self, destination: str, code: str, fix: str, detail: str = "") -> None:
        text = f"destination {destination} paused by the platform: {code}"
        super().__init__(redact_text(f"{text} ({detail})" if detail else text),
                         hint=f"{fix}; the next run retries")
        self.destination = destination
        self.code = code
        self.fix = fix


class RetryLater(RetriableDestinationError):
    """A transient failure of the whole request; `retry_after` seconds if the platform said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DestinationSettings(BaseModel):
    """`[destinations.<name>]`: the keys every platform takes. Each destination module extends
    it with its platform's own keys (`config_model` of its class); `kind` says which platform
    (default: the section name), and a key the platform does not take is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    enabled: bool = True
    base_url: str | None = None
    dry_run: bool = False
    # credentials: env var names only
    token_env: CheckedEnvName | None = None
    client_id_env: CheckedEnvName | None = None
    client_secret_env: CheckedEnvName | None = None
    refresh_token_env: CheckedEnvName | None = None
    token_url: str | None = None
    api_version: str | None = Field(
        None, description="the platform's API version; linkedin: LinkedIn-Version YYYYMM (default in "
        "leadloop/export/linkedin.py; `status` warns 60 days before its sunset)")
    token_expires_on: date | None = Field(
        None, description="when the access (or refresh) token expires; `status` warns 14 days before")
    conversion_window_days: int | None = Field(
        None, ge=1, description="upload conversions at most this many days old (default and "
        "maximum: the platform's window)")
    batch_size: int | None = Field(None, ge=1)
    max_attempts: int = Field(8, ge=1)
    retry_horizon_hours: float = Field(72.0, gt=0)
    consent_required: bool = True
    send_user_data: bool = True

    def anchored(self, against: Callable[[str], str]) -> DestinationSettings:
        """These settings with their relative paths made absolute by `against`."""
        return self

    def file_dirs(self) -> list[str]:
        """Folders this destination writes files to (erasure rewrites them)."""
        return []


class BaseDestination:
    """A platform: what it declares (class variables, `rule`, `build_payload`, `send`, and
    `diagnose`/`settle` when it reports on requests afterwards), and the shared plumbing
    (batching, the HTTP session, time formats, whole-request error mapping).

    A subclass with a `kind` is a destination: the registry finds it and the config accepts
    `kind = "<its kind>"` with its `config_model`."""

    kind: ClassVar[str] = ""  # the config's `kind`; empty for a base that is not a destination
    config_model: ClassVar[type[DestinationSettings]] = DestinationSettings
    default_base_url: ClassVar[str] = ""
    platform_max: ClassVar[int] = 1000  # most rows one request may carry
    adjustments: ClassVar[frozenset[str]] = frozenset()  # restatement and/or retraction
    has_validate_only: ClassVar[bool] = False
    # The lead's click ids the platform matches on, preferred first; the outbox stores the first
    # one a lead has, and a manual-import file checks the first against `click_format`.
    click_ids: ClassVar[tuple[str, ...]] = ()
    click_format: ClassVar[re.Pattern[str] | None] = None
    window_days: ClassVar[int] = 90  # oldest conversion the platform takes (days at send time)
    has_diagnostics: ClassVar[bool] = False  # whether `diagnose` reports on sent requests

    def __init__(
        self,
        name: str,
        cfg: Any,
        *,
        session_factory: Callable[..., requests.Session] | None = None,
        secret: Callable[[str, str | None], str | None] | None = None,
        resolve_path: Callable[[str], Any] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.base_url = (cfg.base_url or self.default_base_url).rstrip("/")
        self.max_batch_size = min(cfg.batch_size or self.platform_max, self.platform_max)
        self._session_factory = session_factory
        self._session: requests.Session | None = None
        self._secret = secret or (lambda key, env: None)
        self._resolve = resolve_path or Path
        self._clock = clock or (lambda: datetime.now(UTC))
        self._oauth: Any = None

    # -- the request ------------------------------------------------------------------------

    def build_payload(self, rows: Sequence[OutRow]) -> dict[str, Any]:
        """ONE request body for `rows` (pure: no clock, no network)."""
        raise NotImplementedError

    def send(self, payload: dict[str, Any], rows: Sequence[OutRow]) -> list[RowResult]:
        """Send the body; one `RowResult` per row, or raise for the whole request (module
        docstring)."""
        raise NotImplementedError

    # -- platform rules --------------------------------------------------------------------

    @staticmethod
    def rule(row: OutRow, now: datetime, user_data: bool, window: timedelta) -> str | None:
        """The platform's own hold rule for `row` (see `rules.py`): `user_data` says whether its
        hashed identities may be sent, `window` is how old a conversion may be."""
        return None

    @cached_property
    def max_age(self) -> timedelta:
        """How old a conversion this destination may send (its platform's window, narrowed by
        `conversion_window_days`); worked out once, as the rules ask for it on every row."""
        return window(self.window_days, self.cfg.conversion_window_days)

    def platform_hold(self, row: OutRow, now: datetime, user_data: bool) -> str | None:
        return self.rule(row, now, user_data, self.max_age)

    def hold_rule(self, row: OutRow, now: datetime) -> str | None:
        """The first rule `row` breaks now (shared ones first), or None when it may be sent."""
        return check(row, now, self.platform_hold, consent_required=self.cfg.consent_required,
                     send_user_data=self.cfg.send_user_data)

    @classmethod
    def setup_warnings(cls, name: str, cfg: Any, today: date) -> list[tuple[str, str]]:
        """(code, message) of what in this destination's setup will stop working soon, for
        `leadloop status` (credential expiry is checked for every destination there)."""
        return []

    # -- asynchronous diagnostics (platforms with `has_diagnostics`) -------------------------

    def diagnose(self, request_id: str) -> dict[str, Any] | None:
        """The platform's report on a sent request, or None while it has none."""
        return None

    def settle(self, diagnostics: dict[str, Any]) -> Settlement:
        """What a request's `diagnose` report means for its rows."""
        raise NotImplementedError(f"{self.kind} reports no diagnostics")

    # -- batching --------------------------------------------------------------------------

    def group_key(self, row: OutRow) -> str:
        return "adjustment" if row.kind != "conversion" else "conversion"

    def batches(self, rows: Sequence[OutRow]) -> Iterator[list[OutRow]]:
        """Vendor-sized batches, one group key per batch, in the order rows came."""
        groups: dict[str, list[OutRow]] = {}
        for row in rows:
            groups.setdefault(self.group_key(row), []).append(row)
        for group in groups.values():
            for i in range(0, len(group), self.max_batch_size):
                yield group[i : i + self.max_batch_size]

    def min_requests(self, n: int) -> int:
        return math.ceil(n / self.max_batch_size) if n else 0

    # -- credentials / http ----------------------------------------------------------------

    @property
    def has_credentials(self) -> bool:
        return bool(self.cfg.token_env or self.cfg.refresh_token_env)

    def bearer(self, token_url: str, scope: str | None = None) -> dict[str, str]:
        """`Authorization: Bearer ...` from the OAuth refresh-token grant when the config names a
        refresh token (refreshed before it expires), else from `token_env`, else nothing."""
        if self.cfg.refresh_token_env:
            if self._oauth is None:
                from leadloop.oauth import OAuthTokenProvider

                self._oauth = OAuthTokenProvider(
                    self.http, self.cfg.token_url or token_url,
                    client_id=self.secret("client_id_env") or "",
                    client_secret=self.secret("client_secret_env") or "",
                    refresh_token=self.secret("refresh_token_env"),
                    extra={"scope": scope} if scope else None,
                    secret_envs={f"destinations.{self.name}.{k}": getattr(self.cfg, k) for k in
                                 ("client_id_env", "client_secret_env", "refresh_token_env")
                                 if getattr(self.cfg, k)},
                    retriable=RetryLater, fatal=FatalDestinationError,
                    wall_clock=lambda: self._clock().timestamp(),
                )
            return {"Authorization": f"Bearer {self._oauth.token()}"}
        token = self.secret("token_env")
        return {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def refresh_token_expires_at(self) -> datetime | None:
        """When the refresh token dies, if the token endpoint said (LinkedIn does)."""
        at = self._oauth.extra.get("refresh_token_expires_at") if self._oauth else None
        return datetime.fromtimestamp(at, UTC) if at else None

    def secret(self, attr: str) -> str | None:
        """The secret named by config key `attr`, or None when the config names none."""
        env = getattr(self.cfg, attr)
        if not env:
            return None
        return self._secret(f"destinations.{self.name}.{attr}", env)

    @property
    def http(self) -> requests.Session:
        if self._session is None:
            if self._session_factory is None:
                from leadloop.http import make_session

                self._session = make_session()
            else:
                self._session = self._session_factory()
        return self._session

    def validate_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    def post(self, url: str, payload: dict[str, Any], headers: dict[str, str],
             params: dict[str, str] | None = None) -> requests.Response:
        """POST `payload` as JSON. A 401 on an OAuth-refreshed token (expired early, revoked)
        refreshes it once and sends again."""
        try:
            response = self.http.post(url, data=json.dumps(payload), params=params,
                                      headers={"Content-Type": "application/json", **headers})
            if response.status_code == 401 and self._oauth is not None:
                self._oauth.invalidate()
                headers = {**headers, "Authorization": f"Bearer {self._oauth.token()}"}
                response = self.http.post(url, data=json.dumps(payload), params=params,
                                          headers={"Content-Type": "application/json", **headers})
            return response
        except requests.RequestException as exc:
            raise RetryLater(f"destination {self.name}: {type(exc).__name__} reaching the platform"
                             ) from None

    def raise_for_transport(self, response: requests.Response) -> None:
        """429/5xx -> RetryLater, 401/403/404 -> DestinationPaused; other codes pass."""
        status = response.status_code
        if status == 429 or status >= 500:
            raise RetryLater(f"destination {self.name}: {describe_response(response)}",
                             retry_after_seconds(response))
        if status in (401, 403, 404):
            raise DestinationPaused(
                self.name, f"HTTP_{status}",
                f"check the credentials and account ids of [destinations.{self.name}]",
                describe_response(response, limit=200))

    def paused(self, code: str, fix: str, detail: str = "") -> DestinationPaused:
        """A pause of this destination; `fix` may name `{name}` (the destination)."""
        return DestinationPaused(self.name, code, fix.format(name=self.name), detail)


def json_value(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC)


def rfc3339(dt: datetime) -> str:
    """`2026-11-20T13:05:00Z` (UTC, whole seconds): what Data Manager re-serialises to."""
    return utc(dt).strftime("%Y-%m-%dT%H:%M:%SZ")


def google_ads_time(dt: datetime) -> str:
    """Google Ads API: `yyyy-mm-dd hh:mm:ss+00:00` (the zone offset is mandatory)."""
    return utc(dt).strftime("%Y-%m-%d %H:%M:%S+00:00")


def unix_seconds(dt: datetime) -> int:
    return int(utc(dt).timestamp())


def unix_millis(dt: datetime) -> int:
    return int(utc(dt).timestamp() * 1000)
