"""The destination registry: every platform module declares what the engine, the outbox and the
config need, and its rules hold what the platform would refuse (a table per platform)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, get_args

import pytest

from leadloop.config import settings_from_dict
from leadloop.errors import ConfigErrors
from leadloop.export.base import BaseDestination, DestinationSettings, OutRow
from leadloop.export.registry import DESTINATIONS, click_preference

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
ROW_FIELDS = {f.name for f in dataclasses.fields(OutRow)}


def test_the_registry_holds_every_platform() -> None:
    assert set(DESTINATIONS) == {"google_data_manager", "google_ads", "meta", "microsoft",
                                 "linkedin", "csv_files"}


@pytest.mark.parametrize("kind", sorted(DESTINATIONS))
def test_each_destination_declares_its_platform(kind: str) -> None:
    cls = DESTINATIONS[kind]
    assert cls.kind == kind
    assert issubclass(cls.config_model, DestinationSettings)
    assert get_args(cls.config_model.model_fields["kind"].annotation) == (kind,)
    assert cls.config_model().kind == kind  # constructible with defaults alone
    assert cls.click_ids and set(cls.click_ids) <= ROW_FIELDS
    assert click_preference(kind) == cls.click_ids
    assert cls.platform_max >= 1 and cls.window_days >= 1
    assert cls.adjustments <= {"restatement", "retraction"}
    if cls.click_format is not None:
        assert not cls.click_format.match("=HYPERLINK(1)")


def test_the_config_takes_a_platform_s_keys_only() -> None:
    base = {"crm": {"kind": "csv", "csv": {"path": "x.csv", "id_column": "id"}},
            "stages": [{"name": "won", "macro": True, "crm_values": ["won"], "value": 1.0,
                        "currency": "EUR"}]}
    settings = settings_from_dict({**base, "destinations": {
        "meta": {"dataset_id": "1"}, "files": {"kind": "csv_files", "file_platform": "meta"}}})
    assert settings.destination_kind("meta") == "meta"  # kind: the section name by default
    assert type(settings.destinations["files"]) is DESTINATIONS["csv_files"].config_model
    with pytest.raises(ConfigErrors, match=r"destinations\.meta\.output_dir: unknown key"):
        settings_from_dict({**base, "destinations": {"meta": {"output_dir": "x"}}})
    with pytest.raises(ConfigErrors, match=r"destinations\.tiktok: Input tag 'tiktok'"):
        settings_from_dict({**base, "destinations": {"tiktok": {}}})


def row(**kw: Any) -> OutRow:
    base: dict[str, Any] = dict(
        id=1, order_id="o", original_order_id="o", kind="conversion", revision=0, stage="Q",
        conversion_action="a", conversion_time=NOW - timedelta(days=2), value=Decimal("10"),
        currency="EUR", created_at=NOW, crm_id="c", lead_created_at=NOW - timedelta(days=3),
        consent_ad_user_data=True, consent_ad_personalization=True)
    return OutRow(**{**base, **kw})


def dest(kind: str, **cfg: Any) -> BaseDestination:
    cls = DESTINATIONS[kind]
    return cls("d", cls.config_model(**cfg))


OLD = NOW - timedelta(days=10)
LEAD_ID = "123456789012345"
# (kind, config, row fields, the rule that holds it or None)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], str | None]] = [
    ("google_data_manager", {}, {"gclid": "Cj0abc"}, None),
    ("google_data_manager", {}, {"wbraid": "W1"}, None),
    ("google_data_manager", {}, {}, "no_click_id"),
    ("google_data_manager", {}, {"email_google_sha256": "e"}, None),  # enhanced conversions for leads
    ("google_data_manager", {"send_user_data": False}, {"email_google_sha256": "e"}, "no_click_id"),
    ("google_data_manager", {"conversion_window_days": 1}, {"gclid": "Cj0abc"}, "event_too_old"),
    ("google_data_manager", {}, {"gclid": "Cj0abc", "lead_created_at": NOW - timedelta(days=91),
                                 "conversion_time": NOW - timedelta(days=2)}, "click_too_old"),
    ("google_ads", {}, {"kind": "restatement", "conversion_time": NOW - timedelta(hours=2)},
     "adjustment_too_recent"),
    ("google_ads", {}, {"kind": "retraction", "value": None,
                        "conversion_time": NOW - timedelta(days=55),
                        "lead_created_at": NOW - timedelta(days=56)}, "adjustment_window_passed"),
    ("meta", {}, {"meta_lead_id": LEAD_ID}, None),
    ("meta", {}, {"meta_lead_id": "12"}, "no_meta_lead_id"),
    ("meta", {}, {"meta_lead_id": LEAD_ID, "conversion_time": OLD,
                  "lead_created_at": OLD}, "event_too_old"),  # Meta: 7 days
    ("microsoft", {}, {"msclkid": "abcdef"}, None),
    ("microsoft", {}, {"msclkid": "abcdef", "conversion_time": OLD, "lead_created_at": OLD}, None),
    ("microsoft", {}, {}, "no_click_id"),
    ("linkedin", {}, {"li_fat_id": "abc-123"}, None),
    ("linkedin", {}, {"email_sha256": "e"}, None),
    ("linkedin", {}, {}, "no_linkedin_id"),
    ("linkedin", {}, {"email_sha256": "e", "consent_ad_user_data": False}, "consent_denied"),
    ("csv_files", {"file_platform": "google"}, {"gclid": "Cj0abc"}, None),
    ("csv_files", {"file_platform": "google"}, {"wbraid": "W1"}, "no_click_id"),  # no braid column
    ("csv_files", {"file_platform": "google"}, {"gclid": "=cmd|x"}, "invalid_click_id"),
    ("csv_files", {"file_platform": "meta"}, {"meta_lead_id": LEAD_ID, "conversion_time": OLD,
                                              "lead_created_at": OLD}, "event_too_old"),
    ("csv_files", {"file_platform": "linkedin"}, {"li_fat_id": "@SUM(1)"}, "invalid_click_id"),
    # shared rules come first, whatever the platform
    ("meta", {}, {"meta_lead_id": LEAD_ID, "conversion_time": NOW + timedelta(hours=1)},
     "in_future"),
    ("microsoft", {}, {"msclkid": "abcdef", "currency": None}, "no_currency"),
]


@pytest.mark.parametrize(("kind", "cfg", "fields", "rule"), CASES)
def test_platform_rules(kind: str, cfg: dict[str, Any], fields: dict[str, Any],
                        rule: str | None) -> None:
    assert dest(kind, **cfg).hold_rule(row(**fields), NOW) == rule
