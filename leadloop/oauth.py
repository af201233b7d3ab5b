"""A small OAuth 2 access-token provider (refresh-token and client-credentials grants).

Used by connectors whose API wants a short-lived Bearer token (Salesforce, HubSpot public apps)
and by the ad platforms that issue them (Microsoft identity platform, LinkedIn). The provider
keeps the current token and its expiry from `expires_in`, refreshes a little before expiry, and
refreshes once on demand after a 401 (`invalidate()`). Every token it sees is registered with
`leadloop.redact`, so it is masked in logs and error messages. Extra fields of the token response
(Salesforce's `instance_url`) are kept in `extra`; LinkedIn's `refresh_token_expires_in` becomes
`refresh_token_expires_at` (epoch seconds), so `leadloop status` can warn before the refresh
token itself dies. Destinations pass their own error classes (`retriable`, `fatal`), so a refused
grant pauses the destination like any other credential problem.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import requests

from leadloop.errors import FatalSourceError, LeadloopError, RetriableSourceError
from leadloop.redact import redact_text, register_secret

log = logging.getLogger(__name__)

Grant = Literal["refresh_token", "client_credentials"]

# Refresh this long before the announced expiry, so a request never carries a token that dies
# in flight. Salesforce does not send `expires_in`; its tokens live for the session timeout.
_EARLY_SECONDS = 60.0
_DEFAULT_LIFETIME = 15 * 60.0


class OAuthTokenProvider:
    """Hands out a valid access token, fetching a new one from `token_url` when needed.

    Args:
        session: the HTTP session (from `leadloop.http.make_session`).
        token_url: the authorisation server's token endpoint.
        client_id, client_secret: the app's credentials (from the environment); an empty
            secret is left out of the form (public clients, e.g. a Microsoft desktop app).
        refresh_token: required for the refresh-token grant.
        grant: "refresh_token" or "client_credentials".
        extra: more form fields sent with each token request (e.g. `scope`).
        default_lifetime: seconds a token is assumed to live when the server omits `expires_in`.
        clock: monotonic seconds, injectable for tests.
        secret_envs: config key -> environment variable of each credential (e.g.
            `{"crm.client_secret_env": "SF_CLIENT_SECRET"}`), named in the hint when the grant
            is refused, so the message says what to fix.
        retriable, fatal: the error classes raised for a transient failure and for a refusal.
        wall_clock: seconds since the epoch, for `refresh_token_expires_at`.
    """

    def __init__(
        self,
        session: requests.Session,
        token_url: str,
        client_id: str,
        client_secret: str,
        refresh_token: str | None = None,
        grant: Grant = "refresh_token",
        extra: Mapping[str, str] | None = None,
        *,
        default_lifetime: float = _DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
        secret_envs: Mapping[str, str] | None = None,
        retriable: type[LeadloopError] = RetriableSourceError,
        fatal: type[LeadloopError] = FatalSourceError,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if grant == "refresh_token" and not refresh_token:
            raise ValueError("the refresh_token grant needs a refresh token")
        self._session = session
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._refresh_token = refresh_token
        self.grant: Grant = grant
        self._extra = dict(extra or {})
        self._default_lifetime = default_lifetime
        self._clock = clock
        self._secret_envs = dict(secret_envs or {})
        self._retriable, self._fatal, self._wall_clock = retriable, fatal, wall_clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self.extra: dict[str, Any] = {}  # non-secret fields of the last token response
        self.refreshes = 0
        for secret in (client_secret, refresh_token):
            if secret:
                register_secret(secret)

    def token(self) -> str:
        """A token valid for at least the next minute (fetching one if needed)."""
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at - _EARLY_SECONDS:
                self._fetch()
            assert self._token is not None
            return self._token

    def invalidate(self, token: str | None = None) -> None:
        """Forget the token (after a 401). With `token`, only if it is still the current one,
        so two threads that saw the same 401 cause one refresh, not two."""
        with self._lock:
            if token is None or token == self._token:
                self._token = None

    def _fetch(self) -> None:
        form = {"grant_type": self.grant, "client_id": self._client_id, **self._extra}
        if self._client_secret:
            form["client_secret"] = self._client_secret
        if self.grant == "refresh_token":
            form["refresh_token"] = self._refresh_token or ""
        try:
            response = self._session.post(self.token_url, data=form,
                                          headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            raise self._retriable(
                f"cannot reach the OAuth token endpoint {self.token_url}: {type(exc).__name__}"
            ) from None
        body: Any
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 500 or response.status_code == 429:
            raise self._retriable(
                f"OAuth token endpoint answered {response.status_code}; try again later")
        if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
            # RFC 6749 §5.2: {"error": "invalid_grant", "error_description": "..."}
            code = body.get("error", "") if isinstance(body, dict) else ""
            desc = body.get("error_description", "") if isinstance(body, dict) else ""
            raise self._fatal(
                redact_text(f"OAuth {self.grant} grant refused by {self.token_url}: "
                            f"{response.status_code} {code} {desc}".rstrip()),
                hint=self._refusal_hint(),
            )
        token = str(body["access_token"])
        register_secret(token)
        if body.get("refresh_token"):  # rotation: the old refresh token is now dead
            self._refresh_token = str(body["refresh_token"])
            register_secret(self._refresh_token)
        try:
            lifetime = float(body.get("expires_in") or self._default_lifetime)
        except (TypeError, ValueError):
            lifetime = self._default_lifetime
        self._token = token
        self._expires_at = self._clock() + lifetime
        self.extra = {k: v for k, v in body.items()
                      if k not in ("access_token", "refresh_token", "id_token", "signature")}
        try:
            if body.get("refresh_token_expires_in"):
                self.extra["refresh_token_expires_at"] = (
                    self._wall_clock() + float(body["refresh_token_expires_in"]))
        except (TypeError, ValueError):
            pass
        self.refreshes += 1
        log.info("OAuth %s grant: new access token (valid %.0f s)", self.grant, lifetime)

    def _refusal_hint(self) -> str:
        if not self._secret_envs:
            return "check the client id/secret (and refresh token) environment variables"
        names = ", ".join(f"{key} ({env})" for key, env in self._secret_envs.items())
        return f"check the credentials in {names}"
