"""OAuthTokenProvider against a real token endpoint on 127.0.0.1 (pytest-httpserver): the form
each grant sends, caching until shortly before expiry, refresh-token rotation, and refusals that
become leadloop errors naming the credentials to check without ever showing a secret."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from leadloop.errors import FatalSourceError, RetriableSourceError
from leadloop.http import make_session
from leadloop.oauth import OAuthTokenProvider

CLIENT_ID = "3MVG9-oauth-test-client"
CLIENT_SECRET = "oauth-test-client-SECRET-9c41"
REFRESH = "5Aep-oauth-test-REFRESH-77b2"
ROTATED = "5Aep-oauth-test-ROTATED-0e3d"
ENVS = {"crm.client_id_env": "SF_CLIENT_ID", "crm.client_secret_env": "SF_CLIENT_SECRET",
        "crm.refresh_token_env": "SF_REFRESH_TOKEN"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TokenEndpoint:
    """Answers the token POSTs in order from `replies`; records each request's form."""

    def __init__(self, server: HTTPServer) -> None:
        self.forms: list[dict[str, str]] = []
        self.replies: list[tuple[int, dict]] = []
        self.issued: list[str] = []
        self.url = server.url_for("/services/oauth2/token")
        server.expect_request("/services/oauth2/token", method="POST").respond_with_handler(self._answer)

    def token(self, **fields: object) -> None:
        access = f"00Dtest!AQ-access-{len(self.replies) + 1:03d}-SECRET"
        self.issued.append(access)
        self.replies.append((200, {"access_token": access, "token_type": "Bearer", **fields}))

    def refuse(self, status: int, body: dict) -> None:
        self.replies.append((status, body))

    def _answer(self, request: Request) -> Response:
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert request.headers["Accept"] == "application/json"
        self.forms.append(dict(request.form))
        status, body = self.replies.pop(0)
        return Response(json.dumps(body), status=status, content_type="application/json")


@pytest.fixture
def endpoint(httpserver: HTTPServer) -> Iterator[TokenEndpoint]:
    yield TokenEndpoint(httpserver)
    httpserver.check_assertions()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def provider(endpoint: TokenEndpoint, clock: Clock, **kwargs: object) -> OAuthTokenProvider:
    args: dict = {"refresh_token": REFRESH, "grant": "refresh_token", **kwargs}
    return OAuthTokenProvider(make_session(retries=1, backoff_factor=0), endpoint.url, CLIENT_ID,
                              CLIENT_SECRET, clock=clock, **args)


def test_refresh_token_grant_sends_the_form_and_caches_until_just_before_expiry(
        endpoint: TokenEndpoint, clock: Clock) -> None:
    endpoint.token(expires_in=3600, instance_url="https://acme.my.salesforce.com", signature="sig")
    endpoint.token(expires_in=3600)
    oauth = provider(endpoint, clock)
    first = oauth.token()
    assert endpoint.forms == [{"grant_type": "refresh_token", "client_id": CLIENT_ID,
                               "client_secret": CLIENT_SECRET, "refresh_token": REFRESH}]
    assert first == endpoint.issued[0]
    assert oauth.extra == {"token_type": "Bearer", "expires_in": 3600,
                           "instance_url": "https://acme.my.salesforce.com"}

    clock.now += 3600 - 61  # still more than a minute left: the cached token
    assert oauth.token() == first and len(endpoint.forms) == 1
    clock.now += 1  # one minute before expiry: a new one
    assert oauth.token() == endpoint.issued[1] != first
    assert len(endpoint.forms) == 2 and oauth.refreshes == 2


def test_client_credentials_grant_sends_no_refresh_token_and_the_extra_fields(
        endpoint: TokenEndpoint, clock: Clock) -> None:
    endpoint.token()  # no expires_in: assumed to live default_lifetime seconds
    endpoint.token()
    oauth = provider(endpoint, clock, refresh_token=None, grant="client_credentials",
                     extra={"scope": "api"}, default_lifetime=600)
    token = oauth.token()
    assert endpoint.forms == [{"grant_type": "client_credentials", "client_id": CLIENT_ID,
                               "client_secret": CLIENT_SECRET, "scope": "api"}]
    clock.now += 600 - 61
    assert oauth.token() == token
    clock.now += 1
    assert oauth.token() != token and len(endpoint.forms) == 2


def test_refresh_token_grant_needs_a_refresh_token() -> None:
    with pytest.raises(ValueError, match="refresh token"):
        OAuthTokenProvider(make_session(), "http://127.0.0.1:1/token", CLIENT_ID, CLIENT_SECRET)


def test_invalidate_refetches_once_for_the_token_that_saw_the_401(
        endpoint: TokenEndpoint, clock: Clock) -> None:
    endpoint.token(expires_in=3600)
    endpoint.token(expires_in=3600)
    oauth = provider(endpoint, clock)
    stale = oauth.token()
    oauth.invalidate(stale)
    fresh = oauth.token()
    oauth.invalidate(stale)  # a second thread that saw the same 401: no second refresh
    assert oauth.token() == fresh != stale
    assert len(endpoint.forms) == 2


def test_a_rotated_refresh_token_is_used_for_the_next_refresh(
        endpoint: TokenEndpoint, clock: Clock) -> None:
    endpoint.token(expires_in=120, refresh_token=ROTATED)
    endpoint.token(expires_in=120)
    oauth = provider(endpoint, clock)
    oauth.token()
    clock.now += 120
    oauth.token()
    assert [f["refresh_token"] for f in endpoint.forms] == [REFRESH, ROTATED]
    assert "refresh_token" not in oauth.extra


def _secrets(endpoint: TokenEndpoint) -> list[str]:
    return [CLIENT_SECRET, REFRESH, ROTATED, *endpoint.issued]


@pytest.mark.parametrize(("status", "body", "names"), [
    (400, {"error": "invalid_grant", "error_description": f"expired access/refresh token {REFRESH}"},
     ["crm.refresh_token_env", "SF_REFRESH_TOKEN"]),
    (401, {"error": "invalid_client", "error_description": f"invalid client secret {CLIENT_SECRET}"},
     ["crm.client_id_env", "SF_CLIENT_ID", "crm.client_secret_env", "SF_CLIENT_SECRET"]),
])
def test_a_refused_grant_is_a_fatal_error_naming_the_credentials_without_showing_them(
        endpoint: TokenEndpoint, clock: Clock, caplog: pytest.LogCaptureFixture,
        status: int, body: dict, names: list[str]) -> None:
    endpoint.refuse(status, body)
    oauth = provider(endpoint, clock, secret_envs=ENVS)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FatalSourceError) as caught:
        oauth.token()
    err = caught.value
    assert f"OAuth refresh_token grant refused by {endpoint.url}: {status} {body['error']}" in err.message
    assert "***" in err.message  # the secret the server echoed is masked
    assert err.hint is not None and all(n in err.hint for n in names)
    assert len(endpoint.forms) == 1  # a refusal is not retried
    shown = [str(err), err.hint] + [r.getMessage() for r in caplog.records]
    assert not [s for s in _secrets(endpoint) for text in shown if s in text]


def test_without_env_names_the_hint_still_says_which_credentials_to_check(
        endpoint: TokenEndpoint, clock: Clock) -> None:
    endpoint.refuse(400, {"error": "invalid_grant", "error_description": "expired"})
    with pytest.raises(FatalSourceError) as caught:
        provider(endpoint, clock).token()
    assert "refresh token" in (caught.value.hint or "")


@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_token_endpoint_is_retried_then_a_retriable_error(
        endpoint: TokenEndpoint, clock: Clock, status: int) -> None:
    endpoint.refuse(status, {"error": "temporarily_unavailable"})
    endpoint.refuse(status, {"error": "temporarily_unavailable"})
    with pytest.raises(RetriableSourceError, match=f"answered {status}; try again later"):
        provider(endpoint, clock).token()
    assert len(endpoint.forms) == 2  # make_session retried once


def test_an_unreachable_token_endpoint_is_a_retriable_error(clock: Clock) -> None:
    oauth = OAuthTokenProvider(make_session(retries=0), "http://127.0.0.1:1/token", CLIENT_ID,
                               CLIENT_SECRET, REFRESH, clock=clock)
    with pytest.raises(RetriableSourceError, match="cannot reach the OAuth token endpoint") as caught:
        oauth.token()
    assert CLIENT_SECRET not in str(caught.value) and REFRESH not in str(caught.value)


def test_successful_refreshes_log_no_secret(endpoint: TokenEndpoint, clock: Clock,
                                            caplog: pytest.LogCaptureFixture) -> None:
    endpoint.token(expires_in=100, refresh_token=ROTATED)
    endpoint.token(expires_in=100)
    oauth = provider(endpoint, clock)
    caplog.set_level(logging.DEBUG)
    oauth.token()
    clock.now += 100
    oauth.token()
    messages = [r.getMessage() for r in caplog.records]
    assert any("OAuth refresh_token grant: new access token (valid 100 s)" in m for m in messages)
    assert not [s for s in _secrets(endpoint) for m in messages if s in m]
