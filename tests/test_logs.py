"""Secrets and clear PII never reach the logs or `job_run.error`, in either log format."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from leadloop import jobs
from leadloop.context import Context
from leadloop.errors import FatalSourceError
from leadloop.logs import setup_logging
from leadloop.store import session_scope
from leadloop.tables import JobRun

SECRET = "pat-na1-7f3c9e11-SECRET-4b2a"
EMAIL = "jane.doe@example.com"
log = logging.getLogger("leadloop.crm.fake")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def leaky_sync(ctx: Context) -> dict[str, Any]:
    """A connector on a bad day: logs its URL, its headers, a person, and a traceback."""
    token = ctx.settings.secret("crm.token_env", "LEADLOOP_TEST_TOKEN").get_secret_value()
    log.info("GET https://api.hubapi.test/crm/v3/objects/contacts?hapikey=%s for %s", token, EMAIL)
    log.debug("request headers: {'Authorization': 'Bearer %s'}", token)
    try:
        raise ConnectionError(f"connection reset while sending token {token} for {EMAIL}")
    except ConnectionError:
        log.exception("request failed, will retry")
    log.info("page done", extra={"counts": {"contact": EMAIL}})
    raise FatalSourceError(f"401 Unauthorized for token {token} (contact {EMAIL})")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_run_that_used_secrets_logs_none_of_them(
    fmt: str, sqlite_engine: Engine, make_context: Callable[..., Context],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None,
) -> None:
    monkeypatch.setenv("LEADLOOP_TEST_TOKEN", SECRET)
    monkeypatch.setitem(jobs.JOBS, "sync", leaky_sync)
    setup_logging("DEBUG", fmt)  # type: ignore[arg-type]
    result = jobs.run_job(make_context(sqlite_engine), "sync")
    err = capsys.readouterr().err
    assert not result.ok
    assert SECRET not in err and "7f3c9e11" not in err
    assert EMAIL not in err and "jane.doe" not in err
    assert "hapikey=***" in err and "Bearer ***" in err and "<email>" in err
    assert "ConnectionError: connection reset while sending token ***" in err  # traceback kept
    assert "job sync failed: 401 Unauthorized for token ***" in err
    if fmt == "json":
        entries = [json.loads(line) for line in err.splitlines()]
        assert {e["level"] for e in entries} >= {"info", "debug", "error"}
        assert any("exc" in e for e in entries)
    with session_scope(sqlite_engine) as session:
        (run,) = session.exec(select(JobRun))
    assert run.error == "401 Unauthorized for token *** (contact <email>)"
