"""Shared fixtures: a real database (SQLite always, PostgreSQL when configured) and settings.

PostgreSQL: set LEADLOOP_TEST_POSTGRES_URL (`.ci/run` starts a server and sets it). Under
CI=true a missing PostgreSQL is a failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from leadloop.config import Settings, settings_from_dict
from leadloop.context import Context
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import make_engine
from tests.export_helpers import NOW

# CI replays the same fuzz examples every run (a red run must mean a change broke something);
# developers' runs explore new ones, and hypothesis keeps what it finds in .hypothesis/.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    hypothesis_settings.load_profile("ci")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POSTGRES_URL = os.environ.get("LEADLOOP_TEST_POSTGRES_URL")


def _postgres_or_skip() -> str:
    if POSTGRES_URL:
        return POSTGRES_URL
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but LEADLOOP_TEST_POSTGRES_URL is not set: PostgreSQL tests must run")
    pytest.skip("LEADLOOP_TEST_POSTGRES_URL not set")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'leadloop.db'}"
        return
    url = _postgres_or_skip()
    _empty_postgres(url)
    yield url
    _empty_postgres(url)


def _empty_postgres(url: str) -> None:
    """Drop leadloop's tables and the schema revision, whatever state a test left them in."""
    engine = make_engine(url, check_schema=False)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def _servers() -> Iterator[FakePlatforms]:
    """Fake ad platforms on loopback, one set per test module, at the export tests' `NOW`."""
    with FakePlatforms(now=lambda: NOW) as platforms:
        yield platforms


@pytest.fixture
def fakes(_servers: FakePlatforms) -> FakePlatforms:
    """The module's fake platforms with nothing received yet."""
    _servers.reset()
    return _servers


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'leadloop.db'}")
    yield eng
    eng.dispose()


BASE_CONFIG: dict[str, Any] = {
    "crm": {"kind": "hubspot", "base_url": "http://127.0.0.1:1", "token_env": "LEADLOOP_TEST_TOKEN"},
    "stages": [
        {"name": "Lead", "crm_values": ["lead"], "field": "lifecyclestage", "value": 0.0,
         "currency": "EUR"},
        {"name": "Qualified", "crm_values": ["salesqualifiedlead"], "field": "lifecyclestage",
         "value": 100.0, "currency": "EUR", "macro": True},
        {"name": "Won", "crm_values": ["closedwon"], "field": "dealstage",
         "value": "deal_amount", "currency": "EUR"},
    ],
}


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings from BASE_CONFIG with sections replaced by keyword (e.g. crm={...})."""

    def build(**sections: Any) -> Settings:
        data = {**BASE_CONFIG, **sections}
        data.setdefault("model", {"dir": str(tmp_path / "models")})
        return settings_from_dict(data, base_dir=tmp_path)

    return build


@pytest.fixture
def make_context(make_settings: Callable[..., Settings]) -> Callable[..., Context]:
    def build(engine: Engine, **sections: Any) -> Context:
        return Context(settings=make_settings(**sections), engine=engine)

    return build
