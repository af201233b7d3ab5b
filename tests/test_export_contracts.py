"""Every payload we build, parsed strictly by the vendors' own SDK types (offline).

Google: proto-plus `from_json(..., ignore_unknown_fields=False)` rejects unknown fields, bad enums,
wrong types and oneof clashes; a round trip to canonical JSON catches snake_case keys and numbers
as strings. Meta: our event equals facebook-business `EventRequest.get_params()` for the same
inputs. Microsoft: the item keys must be `OfflineConversion`'s (msads is not a test dependency:
its wheel declares enum34 and friends as runtime requirements, which break a clean install, so the
key set is written out from the spec sheet and msads is used only when present).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from leadloop.export.base import BaseDestination, DestinationSettings, OutRow
from leadloop.export.csv_files import CsvFilesDestination
from leadloop.export.google_ads import GoogleAdsDestination
from leadloop.export.google_data_manager import DataManagerDestination
from leadloop.export.linkedin import LinkedInDestination
from leadloop.export.meta import MetaDestination
from leadloop.export.microsoft import MicrosoftDestination
from leadloop.identity import hash_email, hash_phone

T0 = datetime(2026, 11, 18, 13, 5, 7, tzinfo=UTC)
EM, EMG = hash_email(" Jane.Doe+x@Gmail.com ")
PH, PHD = hash_phone("+44 20 7946 0018")


def row(i: int = 0, **kw: Any) -> OutRow:
    base: dict[str, Any] = dict(
        id=i + 1, order_id=f"{i:032x}", original_order_id=f"{i:032x}", kind="conversion",
        revision=0, stage="Qualified", conversion_action="7001", conversion_time=T0,
        value=Decimal("1250.50"), currency="EUR", created_at=T0 + timedelta(days=2),
        crm_id=str(1000 + i), lead_created_at=T0 - timedelta(days=1), gclid=f"Cj0KCQiA{i}",
        msclkid=f"ms{i}", li_fat_id=f"li-{i}", meta_lead_id="1234567890123456",
        email_sha256=EM, email_google_sha256=EMG, phone_e164_sha256=PH, phone_digits_sha256=PHD,
        consent_ad_user_data=True, consent_ad_personalization=False)
    base.update(kw)
    return OutRow(**base)


VARIANTS = [
    row(0),
    row(1, gclid=None, gbraid="GBRAID1"),
    row(2, gclid=None, wbraid="WBRAID2", value=None, currency=None),
    row(3, gclid=None, consent_ad_user_data=None, consent_ad_personalization=None),  # EC for leads
    row(4, email_google_sha256=None, email_sha256=None, consent_ad_user_data=False),
    row(5, conversion_action="7003"),
]


def cfg(cls: type[BaseDestination], **kw: Any) -> DestinationSettings:
    return cls.config_model(**kw)


def canonical_problems(message_type: Any, body: dict[str, Any]) -> list[str]:
    msg = message_type.from_json(json.dumps(body), ignore_unknown_fields=False)
    canon = json.loads(message_type.to_json(msg, use_integers_for_enums=False,
                                            always_print_fields_with_no_presence=False, indent=None))
    return [] if canon == body else [f"not canonical: {canon} != {body}"]


# -- Google Data Manager ----------------------------------------------------------------------


def dm() -> DataManagerDestination:
    return DataManagerDestination("gdm", cfg(DataManagerDestination, operating_account_id="123-456-7890",
                                             login_account_id="987-654-3210"))


def test_data_manager_body_parses_strictly_and_canonically() -> None:
    from google.ads import datamanager_v1

    body = dm().build_payload(VARIANTS)
    assert canonical_problems(datamanager_v1.IngestEventsRequest, body) == []
    validate = dm().validate_payload(body)
    assert canonical_problems(datamanager_v1.IngestEventsRequest, validate) == []
    assert validate["validateOnly"] is True
    assert body["encoding"] == "HEX"
    assert len(body["destinations"]) == 2  # two conversion actions, referenced per event
    for ev in body["events"]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ev["eventTimestamp"])
        assert len(ev.get("adIdentifiers", {})) <= 1
        assert ev["destinationReferences"][0] in {d["reference"] for d in body["destinations"]}
    assert body["events"][0]["transactionId"] == VARIANTS[0].order_id
    assert body["events"][3]["userData"]["userIdentifiers"] == [{"emailAddress": EMG},
                                                                {"phoneNumber": PH}]
    assert "userData" not in body["events"][4]  # consent denied: no user data
    assert body["events"][4]["consent"]["adUserData"] == "CONSENT_DENIED"


def test_data_manager_restatement_parses_and_reuses_the_transaction_id() -> None:
    from google.ads import datamanager_v1

    restated = row(7, kind="restatement", revision=1, order_id="f" * 32,
                   original_order_id="a" * 32, value=Decimal("1500"))
    body = dm().build_payload([restated])
    assert canonical_problems(datamanager_v1.IngestEventsRequest, body) == []
    (ev,) = body["events"]
    assert ev["transactionId"] == "a" * 32 and ev["conversionValue"] == 1500.0
    assert ev["lastUpdatedTimestamp"] == "2026-11-20T13:05:07Z"


def test_data_manager_error_names_are_the_sdks() -> None:
    from google.ads import datamanager_v1

    from leadloop.export import google_data_manager as gdm

    reasons = {m.name for m in datamanager_v1.ErrorReason}
    assert set(gdm.SETUP) <= reasons, set(gdm.SETUP) - reasons
    processing = {m.name for m in datamanager_v1.ProcessingErrorReason}
    used = set(gdm.ASYNC_SETUP) | gdm._DUPLICATE | set(gdm._RETRY)
    assert used <= processing, used - processing


def test_google_ads_error_names_are_the_sdks() -> None:
    from google.ads.googleads.v26.errors.types import (
        authorization_error,
        conversion_adjustment_upload_error,
        conversion_upload_error,
        database_error,
        internal_error,
        not_allowlisted_error,
    )

    from leadloop.export import google_ads

    enums = [conversion_upload_error.ConversionUploadErrorEnum.ConversionUploadError,
             conversion_adjustment_upload_error.ConversionAdjustmentUploadErrorEnum
             .ConversionAdjustmentUploadError,
             authorization_error.AuthorizationErrorEnum.AuthorizationError,
             not_allowlisted_error.NotAllowlistedErrorEnum.NotAllowlistedError,
             database_error.DatabaseErrorEnum.DatabaseError,
             internal_error.InternalErrorEnum.InternalError]
    names = {m.name for enum in enums for m in enum}
    used = set(google_ads.SETUP) | set(google_ads.RETRY_AFTER) | google_ads.DUPLICATE
    assert used <= names, used - names
    assert "CLICK_NOT_FOUND" not in google_ads.RETRY_AFTER  # final, not retried to death


def test_data_manager_single_action_has_no_references() -> None:
    body = dm().build_payload(VARIANTS[:2])
    assert "reference" not in body["destinations"][0]
    assert body["destinations"][0] == {
        "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
        "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": "9876543210"},
        "productDestinationId": "7001"}


def test_data_manager_batches_limit_events_and_destinations() -> None:
    rows = [row(i, conversion_action=str(7000 + i % 12)) for i in range(30)]
    batches = list(dm().batches(rows))
    assert all(len({r.conversion_action for r in b}) <= 10 for b in batches)
    assert sum(len(b) for b in batches) == 30


def test_fake_data_manager_status_parses_as_vendor_type() -> None:
    from google.ads import datamanager_v1

    from leadloop.sandbox.fake_platforms import FakePlatforms

    with FakePlatforms(now=lambda: T0 + timedelta(days=1)) as fakes:
        import requests

        body = dm().build_payload(VARIANTS[:2])
        fakes.reject("google_data_manager", VARIANTS[0].order_id,
                     "PROCESSING_ERROR_REASON_CLICK_NOT_FOUND")
        url = fakes.urls["google_data_manager"]
        rid = requests.post(f"{url}/v1/events:ingest", json=body, timeout=5).json()["requestId"]
        status = requests.get(f"{url}/v1/requestStatus:retrieve", params={"requestId": rid},
                              timeout=5).json()
        msg = datamanager_v1.RetrieveRequestStatusResponse.from_json(
            json.dumps(status), ignore_unknown_fields=False)
        per = msg.request_status_per_destination[0]
        assert per.request_status.name == "PARTIAL_SUCCESS"
        assert per.error_info.error_counts[0].reason.name == "PROCESSING_ERROR_REASON_CLICK_NOT_FOUND"


# -- Google Ads API v26 -------------------------------------------------------------------------


def gads() -> GoogleAdsDestination:
    return GoogleAdsDestination("gads", cfg(GoogleAdsDestination, customer_id="123-456-7890"))


ADS_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")


def test_google_ads_click_conversions_parse_strictly() -> None:
    from google.ads.googleads.v26.services.types.conversion_upload_service import (
        UploadClickConversionsRequest,
    )

    body = gads().build_payload(VARIANTS)
    assert canonical_problems(UploadClickConversionsRequest, body) == []
    assert canonical_problems(UploadClickConversionsRequest, gads().validate_payload(body)) == []
    assert body["partialFailure"] is True and 1 <= len(body["conversions"]) <= 2000
    for c in body["conversions"]:
        assert ADS_TIME.match(c["conversionDateTime"])
        assert re.fullmatch(r"customers/1234567890/conversionActions/\d+", c["conversionAction"])
        assert sum(k in c for k in ("gclid", "gbraid", "wbraid")) <= 1
        assert c["orderId"]
    assert body["conversions"][0]["conversionDateTime"] == "2026-11-18 13:05:07+00:00"
    assert body["conversions"][3]["userIdentifiers"] == [{"hashedEmail": EMG},
                                                         {"hashedPhoneNumber": PH}]


def test_google_ads_adjustments_parse_strictly() -> None:
    from google.ads.googleads.v26.services.types.conversion_adjustment_upload_service import (
        UploadConversionAdjustmentsRequest,
    )

    rows = [row(0, kind="restatement", revision=1, order_id="f" * 32, value=Decimal("99")),
            row(1, kind="retraction", revision=2, order_id="e" * 32, value=None, currency=None)]
    body = gads().build_payload(rows)
    assert canonical_problems(UploadConversionAdjustmentsRequest, body) == []
    restate, retract = body["conversionAdjustments"]
    assert restate["orderId"] == rows[0].original_order_id  # refers to revision 0
    assert restate["restatementValue"] == {"adjustedValue": 99.0, "currencyCode": "EUR"}
    assert retract["adjustmentType"] == "RETRACTION" and "restatementValue" not in retract
    assert ADS_TIME.match(retract["adjustmentDateTime"])


def test_fake_google_ads_partial_failure_parses_as_vendor_type() -> None:
    import requests
    from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
    from google.ads.googleads.v26.services.types.conversion_upload_service import (
        UploadClickConversionsResponse,
    )

    from leadloop.sandbox.fake_platforms import FakePlatforms

    with FakePlatforms(now=lambda: T0 + timedelta(days=1)) as fakes:
        fakes.reject("google_ads", VARIANTS[1].order_id, "EVENT_NOT_FOUND")
        body = gads().build_payload(VARIANTS[:3])
        answer = requests.post(f"{fakes.urls['google_ads']}/v26/customers/1234567890:"
                               "uploadClickConversions", json=body, timeout=5).json()
    detail = answer["partialFailureError"]["details"][0]
    payload = {k: v for k, v in detail.items() if k != "@type"}
    failure = GoogleAdsFailure.from_json(json.dumps(payload), ignore_unknown_fields=False)
    assert failure.errors[0].error_code.conversion_upload_error.name == "EVENT_NOT_FOUND"
    assert failure.errors[0].location.field_path_elements[0].index == 1
    rest = {k: v for k, v in answer.items() if k != "partialFailureError"}
    parsed = UploadClickConversionsResponse.from_json(json.dumps(rest), ignore_unknown_fields=False)
    assert len(parsed.results) == 3


# -- Meta -----------------------------------------------------------------------------------


def test_meta_event_equals_facebook_business_sdk_output() -> None:
    from facebook_business.adobjects.serverside.action_source import ActionSource
    from facebook_business.adobjects.serverside.custom_data import CustomData
    from facebook_business.adobjects.serverside.event import Event
    from facebook_business.adobjects.serverside.event_request import EventRequest
    from facebook_business.adobjects.serverside.user_data import UserData

    dest = MetaDestination("meta", cfg(MetaDestination, dataset_id="1", lead_event_source="leadloop"))
    r = row(0, email_sha256=hash_email(" Jane.Doe@Example.com ")[0],
            phone_digits_sha256=hash_phone("+44 20 7946 0018")[1])
    ours = dest.build_payload([r])["data"][0]
    sdk_event = Event(
        event_name="7001", event_time=int(T0.timestamp()), event_id=r.order_id,
        action_source=ActionSource.SYSTEM_GENERATED,
        user_data=UserData(emails=[" Jane.Doe@Example.com "], phones=["+44 20 7946 0018"],
                           lead_id=1234567890123456),
        custom_data=CustomData(value=1250.5, currency="EUR",
                               custom_properties={"event_source": "crm",
                                                  "lead_event_source": "leadloop"}))
    sdk = json.loads(EventRequest(pixel_id="0", events=[sdk_event]).get_params()["data"][0])
    assert ours == sdk
    assert isinstance(ours["user_data"]["lead_id"], int)


def test_meta_batch_and_no_token_in_body() -> None:
    dest = MetaDestination("meta", cfg(MetaDestination, dataset_id="1", token_env="X_TOKEN"))
    assert dest.max_batch_size == 1000
    body = dest.build_payload(VARIANTS)
    assert set(body) == {"data"} and "access_token" not in json.dumps(body)


# -- Microsoft ------------------------------------------------------------------------------

MS_KEYS = {"MicrosoftClickId", "ConversionName", "ConversionTime", "ConversionValue",
           "ConversionCurrencyCode", "ExternalAttributionCredit", "ExternalAttributionModel",
           "HashedEmailAddress", "HashedPhoneNumber"}
MS_ADJ_KEYS = {"MicrosoftClickId", "ConversionName", "ConversionTime", "AdjustmentTime",
               "AdjustmentType", "AdjustmentValue", "AdjustmentCurrencyCode",
               "HashedEmailAddress", "HashedPhoneNumber"}


def test_microsoft_items_use_only_offline_conversion_keys() -> None:
    dest = MicrosoftDestination("ms", cfg(MicrosoftDestination))
    body = dest.build_payload(VARIANTS)
    assert set(body) == {"OfflineConversions"} and len(body["OfflineConversions"]) <= 1000
    for item in body["OfflineConversions"]:
        assert set(item) <= MS_KEYS
        assert item["ConversionTime"].endswith("Z")
    adj = dest.build_payload([row(0, kind="retraction", value=None, currency=None)])
    assert set(adj["OfflineConversionAdjustments"][0]) <= MS_ADJ_KEYS
    assert adj["OfflineConversionAdjustments"][0]["AdjustmentType"] == "Retract"


def test_microsoft_items_validate_with_msads_models_when_installed() -> None:
    models = pytest.importorskip("openapi_client.models.campaign.offline_conversion")
    adj_models = pytest.importorskip("openapi_client.models.campaign.offline_conversion_adjustment")
    dest = MicrosoftDestination("ms", cfg(MicrosoftDestination))
    allowed = {f.alias for f in models.OfflineConversion.model_fields.values()}
    assert allowed == MS_KEYS
    for item in dest.build_payload(VARIANTS)["OfflineConversions"]:
        assert set(item) <= allowed
        models.OfflineConversion.model_validate(item)
    item = dest.build_payload([row(0, kind="restatement")])["OfflineConversionAdjustments"][0]
    assert set(item) <= {f.alias for f in adj_models.OfflineConversionAdjustment.model_fields.values()}
    adj_models.OfflineConversionAdjustment.model_validate(item)


# -- LinkedIn -------------------------------------------------------------------------------


def test_linkedin_elements_follow_the_conversion_events_schema() -> None:
    dest = LinkedInDestination("li", cfg(LinkedInDestination, api_version="202607"))
    body = dest.build_payload(VARIANTS[:3])
    el = body["elements"][0]
    assert set(el) == {"conversion", "conversionHappenedAt", "conversionValue", "eventId", "user"}
    assert el["conversion"] == "urn:lla:llaPartnerConversion:7001"
    assert el["conversionHappenedAt"] == int(T0.timestamp()) * 1000
    assert el["conversionValue"] == {"currencyCode": "EUR", "amount": "1250.5"}
    assert el["user"]["userIds"] == [
        {"idType": "SHA256_EMAIL", "idValue": EM},
        {"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": "li-0"}]
    assert "conversionValue" not in body["elements"][2]


# -- Files ----------------------------------------------------------------------------------


def test_google_csv_file_has_the_import_template(tmp_path: Path) -> None:
    settings = cfg(CsvFilesDestination, output_dir=str(tmp_path), timezone="Europe/Amsterdam")
    dest = CsvFilesDestination("files", settings, clock=lambda: T0)
    payload = dest.build_payload([row(0), row(1, gclid="Cj0other", value=None, currency=None)])
    results = dest.send(payload, [row(0), row(1)])
    assert {r.platform_code for r in results} == {"file"}
    text = next(tmp_path.glob("files-*.csv")).read_text()
    lines = text.splitlines()
    assert lines[0] == "Parameters:TimeZone=Europe/Amsterdam"
    assert lines[1] == ("Google Click ID,Conversion Name,Conversion Time,Conversion Value,"
                        "Conversion Currency")
    assert next(csv.reader(io.StringIO(lines[2]))) == [
        "Cj0KCQiA0", "7001", "2026-11-18 14:05:07", "1250.50", "EUR"]
    assert lines[3] == "Cj0other,7001,2026-11-18 14:05:07,,"
    assert "@" not in text


@pytest.mark.parametrize("platform", ["meta", "microsoft", "linkedin"])
def test_other_csv_templates(tmp_path: Path, platform: str) -> None:
    settings = cfg(CsvFilesDestination, output_dir=str(tmp_path), file_platform=platform)
    dest = CsvFilesDestination("files", settings, clock=lambda: T0)
    payload = dest.build_payload([row(0)])
    dest.send(payload, [row(0)])
    rows = list(csv.reader(next(tmp_path.glob("*.csv")).open()))
    header = rows[1] if rows[0][0].startswith("Parameters:") else rows[0]
    assert len(header) == len(rows[-1])
    if platform == "meta":
        assert rows[-1][:2] == ["1234567890123456", "7001"]
    if platform == "linkedin":
        assert rows[-1][0] == EM and len(hashlib.sha256().hexdigest()) == len(EM)
