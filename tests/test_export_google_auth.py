"""Google credentials: the refresh-token exchange goes to the configured token URL, once."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import pytest

from leadloop.errors import FatalDestinationError
from leadloop.export.google_data_manager import DataManagerDestination, DataManagerSettings
from leadloop.sandbox.server import LocalServer, Reply, Request


def _dest(token_url: str, env: dict[str, str]) -> DataManagerDestination:
    cfg = DataManagerSettings(token_url=token_url,
                            client_id_env="G_ID", client_secret_env="G_SECRET",
                            refresh_token_env="G_REFRESH")
    return DataManagerDestination("gdm", cfg, secret=lambda key, name: env[name])


def test_refresh_token_exchange_and_reuse() -> None:
    seen: list[dict[str, list[str]]] = []

    def token(req: Request) -> Reply:
        seen.append(parse_qs(req.body.decode()))
        return Reply(200, {"access_token": "ya29.fresh-token", "expires_in": 3599,
                           "token_type": "Bearer", "scope": "https://www.googleapis.com/auth/datamanager"})

    with LocalServer() as server:
        server.route("POST", "/token", token)
        dest = _dest(f"{server.base_url}/token", {"G_ID": "cid", "G_SECRET": "csecret",
                                                  "G_REFRESH": "1//refresh"})
        assert dest.has_credentials
        assert dest.token.header() == {"Authorization": "Bearer ya29.fresh-token"}
        assert dest.token.header() == {"Authorization": "Bearer ya29.fresh-token"}
    assert len(seen) == 1  # a valid token is reused
    assert seen[0]["grant_type"] == ["refresh_token"]
    assert seen[0]["refresh_token"] == ["1//refresh"] and seen[0]["client_id"] == ["cid"]


def test_refused_refresh_is_a_fatal_error_without_the_secret() -> None:
    def token(req: Request) -> Reply:
        return Reply(400, {"error": "invalid_grant", "error_description": "Bad Request"})

    with LocalServer() as server:
        server.route("POST", "/token", token)
        dest = _dest(f"{server.base_url}/token", {"G_ID": "cid", "G_SECRET": "csecret",
                                                  "G_REFRESH": "1//refresh-secret"})
        with pytest.raises(FatalDestinationError) as exc:
            dest.token.header()
    assert "refresh-secret" not in str(exc.value) and "csecret" not in str(exc.value)


def test_no_credentials_sends_no_header(monkeypatch: Any) -> None:
    dest = DataManagerDestination("gdm", DataManagerSettings())
    assert not dest.has_credentials and dest.token.header() == {}
