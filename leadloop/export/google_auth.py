"""Access tokens for Google's APIs: OAuth refresh token, service account, or a fixed token.

google-auth does the token exchange (and the JWT signing a service account needs); its HTTP goes
through our session, so timeouts, retries and the loopback fakes apply. `token_url` in the
destination's config overrides the token endpoint (tests, proxies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKEN_URI = "https://oauth2.googleapis.com/token"


class GoogleToken:
    """Gives a valid access token for `scope`, refreshing it when it expires."""

    def __init__(self, dest: Any, scope: str) -> None:
        self._dest = dest
        self._scope = scope
        self._creds: Any = None
        self._fixed: str | None = None

    @property
    def configured(self) -> bool:
        cfg = self._dest.cfg
        return bool(cfg.refresh_token_env or cfg.service_account_file_env or cfg.token_env)

    def _build(self) -> Any:
        cfg, dest = self._dest.cfg, self._dest
        token_uri = cfg.token_url or TOKEN_URI
        if cfg.refresh_token_env:
            from google.oauth2.credentials import Credentials

            return Credentials(
                token=None, refresh_token=dest.secret("refresh_token_env"),
                client_id=dest.secret("client_id_env"), client_secret=dest.secret("client_secret_env"),
                token_uri=token_uri, scopes=[self._scope],
            )
        if cfg.service_account_file_env:
            from google.oauth2 import service_account

            path = dest.secret("service_account_file_env")
            try:
                info = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise dest.paused("KEY_FILE_UNREADABLE", "make the key file named by "
                                  "service_account_file_env of [destinations.{name}] readable",
                                  type(exc).__name__) from None
            if cfg.token_url:
                info["token_uri"] = cfg.token_url
            return service_account.Credentials.from_service_account_info(info, scopes=[self._scope])
        return None

    def header(self) -> dict[str, str]:
        """`Authorization: Bearer ...`, or nothing when no credentials are configured."""
        cfg = self._dest.cfg
        if not self.configured:
            return {}
        if cfg.token_env and not (cfg.refresh_token_env or cfg.service_account_file_env):
            self._fixed = self._fixed or self._dest.secret("token_env")
            return {"Authorization": f"Bearer {self._fixed}"}
        if self._creds is None:
            self._creds = self._build()
        if not self._creds.valid:
            from google.auth.exceptions import RefreshError, TransportError
            from google.auth.transport.requests import Request

            try:
                self._creds.refresh(Request(session=self._dest.http))
            except (RefreshError, TransportError) as exc:
                raise self._dest.paused(
                    "TOKEN_REFRESH_FAILED", "check the client id/secret, refresh token or service "
                    "account key of [destinations.{name}]", type(exc).__name__) from None
        from leadloop.redact import register_secret

        register_secret(self._creds.token)
        return {"Authorization": f"Bearer {self._creds.token}"}
