"""Destination credentials that expire: Microsoft (identity platform) and LinkedIn access tokens
are refreshed from a refresh token, a 401 on an expired token refreshes once, and `status` warns
before credentials or a LinkedIn-Version die."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from leadloop.export.engine import run_export
from leadloop.export.linkedin import API_VERSION, sunset
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.status import collect_status
from leadloop.tables import ConversionStatus
from tests.export_helpers import NOW, full_lead
from tests.test_export_outbox import make_ctx, rows

CLOCK = [NOW]


@pytest.fixture(scope="module")
def _servers() -> Iterator[FakePlatforms]:
    with FakePlatforms(now=lambda: CLOCK[0]) as platforms:
        yield platforms


@pytest.fixture
def fakes(_servers: FakePlatforms, monkeypatch: pytest.MonkeyPatch) -> FakePlatforms:
    _servers.reset()
    CLOCK[0] = NOW
    monkeypatch.setenv("LL_TEST_CLIENT_ID", "client-id-123")
    monkeypatch.setenv("LL_TEST_CLIENT_SECRET", "client-SECRET-456")
    monkeypatch.setenv("LL_TEST_REFRESH", "refresh-TOKEN-789")
    return _servers


def _oauth(fakes: FakePlatforms, kind: str, path: str) -> dict[str, str]:
    return {"client_id_env": "LL_TEST_CLIENT_ID", "client_secret_env": "LL_TEST_CLIENT_SECRET",
            "refresh_token_env": "LL_TEST_REFRESH", "token_url": fakes.urls[kind] + path}


def test_microsoft_refreshes_its_access_token_and_again_after_a_401(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    for i in range(3):
        full_lead(sqlite_engine, i)
    fakes.oauth("microsoft", lifetime=3600)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("msads",), msads={
        "batch_size": 1, **_oauth(fakes, "microsoft", "/common/oauth2/v2.0/token")})
    original = ctx.http_factory

    def factory(**kw: Any) -> Any:  # the token expires at the platform after the first upload
        session = original(**kw)
        post = session.post

        def later(url: str, *a: Any, **k: Any) -> Any:
            response = post(url, *a, **k)
            if "OfflineConversions" in url:
                CLOCK[0] = NOW + timedelta(hours=2)
            return response

        session.post = later  # type: ignore[method-assign]
        return session

    ctx.http_factory = factory
    result = run_export(ctx)
    assert result["sent"] == 3
    grants = fakes.token_requests["microsoft"]
    assert len(grants) == 2  # the first token, then one refresh after the 401
    assert grants[0]["grant_type"] == "refresh_token"
    assert grants[0]["scope"] == "https://ads.microsoft.com/msads.manage offline_access"
    assert grants[0]["client_id"] == "client-id-123"
    assert all((r.header("authorization") or "").startswith("Bearer microsoft-access-")
               for r in fakes.received("microsoft"))
    assert all("refresh-TOKEN-789" not in (r.last_error or "") for r in rows(sqlite_engine))


def test_microsoft_without_refresh_token_pauses_when_its_token_expired(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path, monkeypatch: Any) -> None:
    full_lead(sqlite_engine, 1)
    fakes.oauth("microsoft")
    monkeypatch.setenv("LL_TEST_MS_TOKEN", "an-old-access-token")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("msads",),
                   msads={"token_env": "LL_TEST_MS_TOKEN"})
    from leadloop.errors import FatalDestinationError

    with pytest.raises(FatalDestinationError, match="AuthenticationTokenExpired"):
        run_export(ctx)
    assert rows(sqlite_engine)[0].status == ConversionStatus.pending


def test_linkedin_refreshes_and_status_warns_before_the_refresh_token_dies(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1)
    fakes.oauth("linkedin", lifetime=60 * 86400, refresh_lifetime=10 * 86400)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",),
                   li=_oauth(fakes, "linkedin", "/oauth/v2/accessToken"))
    assert run_export(ctx)["sent"] == 1
    assert fakes.token_requests["linkedin"][0]["client_secret"] == "client-SECRET-456"
    (alert,) = collect_status(ctx)["destination_alerts"]
    assert alert["code"] == "TOKEN_EXPIRY" and (NOW + timedelta(days=10)).date().isoformat() in \
        alert["message"]


def test_status_warns_when_a_configured_token_expiry_is_near(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    soon = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",),
                    li={"token_expires_on": (NOW + timedelta(days=5)).date().isoformat()})
    assert [a["code"] for a in collect_status(soon)["destination_alerts"]] == ["TOKEN_EXPIRY"]
    far = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",),
                   li={"token_expires_on": (NOW + timedelta(days=50)).date().isoformat()})
    assert collect_status(far)["destination_alerts"] == []


def test_linkedin_version_sunsets_and_status_warns_60_days_ahead(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    assert sunset("202511") == date(2026, 11, 16)  # published
    assert sunset("202607") == date(2027, 7, 15)  # a year after release
    assert sunset("2026-07") is None
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",))
    assert collect_status(ctx)["destination_alerts"] == []  # the default, API_VERSION
    assert (sunset(API_VERSION) - NOW.date()).days > 60  # type: ignore[operator]
    old = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",), li={"api_version": "202601"})
    (alert,) = collect_status(old)["destination_alerts"]
    assert alert["code"] == "LINKEDIN_VERSION" and "2027-01-15" in alert["message"]
    full_lead(sqlite_engine, 1)
    assert run_export(old)["sent"] == 1
    assert fakes.received("linkedin")[0].header("linkedin-version") == "202601"
