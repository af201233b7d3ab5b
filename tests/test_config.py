from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from leadloop.config import load_settings, parse_schedule, settings_from_dict
from leadloop.errors import ConfigErrors, MissingSecretError

from .conftest import BASE_CONFIG

REPO = Path(__file__).resolve().parents[1]


def _errors(data: dict) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        settings_from_dict(data)
    return [e.message for e in info.value.errors]


def test_every_bad_key_is_named_once():
    bad = {
        "crm": {"kind": "hubspot", "tokn_env": "X"},
        "stages": [{"name": "a", "crm_values": [], "value": -1, "currency": "EURO"}],
        "schedule": {"sync": "every 5"},
    }
    assert _errors(bad) == [
        "config key crm.tokn_env: unknown key (check the spelling against config/leadloop.example.toml)",
        "config key stages[0].crm_values: List should have at least 1 item after validation, not 0",
        "config key stages[0].value: must be >= 0, 'deal_amount' or 'predicted'",
        "config key stages[0].currency: must be a 3-letter ISO 4217 code such as EUR",
        "config key schedule.sync: 'every 5' is neither an interval like '15m' nor a 5-field cron "
        "expression",
    ]


def test_a_secret_value_in_the_env_key_is_refused():
    data = {**BASE_CONFIG, "crm": {"kind": "hubspot", "token_env": "pat-na1-1234-abcd"}}
    assert _errors(data) == [
        "config key crm.token_env: must be the NAME of an environment variable (letters, digits, _), "
        "not the secret"
    ]


def test_cross_checks_name_the_stage_and_destination():
    data = {**BASE_CONFIG, "stages": [{**BASE_CONFIG["stages"][1], "destinations": {"meta": "Q"}}]}
    (message,) = _errors(data)
    assert "stages[0].destinations names 'meta'" in message
    data = {**BASE_CONFIG, "stages": [{**BASE_CONFIG["stages"][0]}]}
    assert "macro = true" in _errors(data)[0]


def test_secrets_come_from_the_environment(monkeypatch):
    settings = settings_from_dict(BASE_CONFIG)
    monkeypatch.delenv("LEADLOOP_TEST_TOKEN", raising=False)
    with pytest.raises(MissingSecretError, match="LEADLOOP_TEST_TOKEN is not set"):
        settings.secret("crm.token_env", settings.crm.token_env)
    monkeypatch.setenv("LEADLOOP_TEST_TOKEN", "s3cr3t-value")
    assert settings.secret("crm.token_env", settings.crm.token_env).get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(settings.secret("crm.token_env", settings.crm.token_env))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("6h", timedelta(hours=6)),
     ("1d", timedelta(days=1)), ("0 3 * * 1", "0 3 * * 1"), ("*/5 * * * *", "*/5 * * * *")],
)
def test_schedules(text, expected):
    assert parse_schedule(text) == expected


def test_unreadable_and_invalid_toml_files(tmp_path):
    with pytest.raises(ConfigErrors, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[crm\nkind = 1")
    with pytest.raises(ConfigErrors, match="not valid TOML"):
        load_settings(bad)


@pytest.mark.parametrize("name", ["leadloop.example.toml", "demo.toml"])
def test_shipped_configs_load(name):
    settings = load_settings(REPO / "config" / name)
    assert settings.macro_stage.macro
