"""LinkedIn Conversions API: `POST /rest/conversionEvents` as a Rest.li BATCH_CREATE.

Versioned headers (`LinkedIn-Version: YYYYMM`, the destination's `api_version`, default
`API_VERSION`), timestamps in epoch milliseconds, the amount as a string, users identified by
SHA-256 e-mail and/or the first-party ads tracking id (li_fat_id). The batch answer carries one
status per element, so rows succeed or fail individually; an element refused for access (403) or
an unknown conversion rule (404) is about the setup, not the row, and pauses the destination.

Each monthly version is served for about a year: `sunset(version)` is LinkedIn's published date
where known (migrations page), else the 15th of the same month a year later; `leadloop status`
warns 60 days ahead. Access tokens live 60 days: with `refresh_token_env` they are refreshed
(programmatic refresh tokens), and `token_expires_on` (or the refresh token's announced expiry)
makes `status` warn before the credentials die.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any, ClassVar, Literal

from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    DestinationSettings,
    OutRow,
    RowResult,
    unix_millis,
)
from leadloop.export.consent import user_data_allowed
from leadloop.export.rules import no_identity

VERSION_WARN_DAYS = 60  # `leadloop status` warns this long before a version's sunset
API_VERSION = "202607"  # the newest version the spec sheet saw; override with api_version
TOKEN_URL = "https://www.linkedin.com/oauth/v2/accessToken"
VERSION = re.compile(r"^(20\d\d)(0[1-9]|1[0-2])$")
LI_FAT_ID = re.compile(r"^[A-Za-z0-9\-]{6,128}$")  # the first-party tracking UUID
# Sunset dates published on https://learn.microsoft.com/linkedin/marketing/integrations/migrations
SUNSETS = {
    "202407": date(2025, 7, 22), "202408": date(2025, 8, 18), "202409": date(2025, 9, 15),
    "202410": date(2025, 10, 15), "202411": date(2025, 11, 17), "202510": date(2026, 10, 15),
    "202511": date(2026, 11, 16), "202601": date(2027, 1, 15), "202602": date(2027, 2, 15),
    "202603": date(2027, 3, 16),
}
_CREDENTIALS = "renew the access token named by token_env of [destinations.{name}] (or set refresh_token_env)"
SETUP = {
    401: _CREDENTIALS,
    403: "grant the app rw_conversions and the token's member access to the ad account of "
         "[destinations.{name}]",
    404: "map destination {name} in [[stages]] to existing conversion rule ids",
    426: "set api_version of [destinations.{name}] to an active LinkedIn-Version (YYYYMM)",
}


def sunset(version: str) -> date | None:
    """When LinkedIn stops serving `version` (None for a malformed version)."""
    m = VERSION.match(version)
    if not m:
        return None
    return SUNSETS.get(version) or date(int(m.group(1)) + 1, int(m.group(2)), 15)


class LinkedInSettings(DestinationSettings):
    kind: Literal["linkedin"] = "linkedin"
    account_id: str | None = None


def linkedin_rule(row: OutRow, now: datetime, user_data: bool, window: timedelta) -> str | None:
    """A conversion needs li_fat_id or a hashed e-mail that may be sent; at most 90 days old."""
    if not row.li_fat_id and not (user_data and row.email_sha256):
        return no_identity(row, ("email_sha256",), user_data, "no_linkedin_id")
    if now - row.conversion_time > window:
        return "event_too_old"
    return None


class LinkedInDestination(BaseDestination):
    kind: ClassVar[str] = "linkedin"
    config_model: ClassVar[type[DestinationSettings]] = LinkedInSettings
    default_base_url: ClassVar[str] = "https://api.linkedin.com"
    platform_max: ClassVar[int] = 5000
    click_ids: ClassVar[tuple[str, ...]] = ("li_fat_id",)
    click_format: ClassVar[re.Pattern[str] | None] = LI_FAT_ID
    window_days: ClassVar[int] = 90
    rule = staticmethod(linkedin_rule)

    @classmethod
    def setup_warnings(cls, name: str, cfg: Any, today: date) -> list[tuple[str, str]]:
        """The LinkedIn-Version in use, when it is malformed or within 60 days of its sunset."""
        version = cfg.api_version or API_VERSION
        ends = sunset(version)
        if ends is None:
            return [("LINKEDIN_VERSION", f"api_version {version!r} is not a LinkedIn-Version (YYYYMM)")]
        if (ends - today).days <= VERSION_WARN_DAYS:
            return [("LINKEDIN_VERSION", f"LinkedIn-Version {version} is sunset on {ends.isoformat()}: "
                                         f"set api_version of [destinations.{name}] to a newer one")]
        return []

    def element(self, row: OutRow) -> dict[str, Any]:
        ids = []
        if row.email_sha256 and user_data_allowed(row, self.cfg.send_user_data):
            ids.append({"idType": "SHA256_EMAIL", "idValue": row.email_sha256})
        if row.li_fat_id:
            ids.append({"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": row.li_fat_id})
        action = row.conversion_action
        el: dict[str, Any] = {
            "conversion": action if action.startswith("urn:") else f"urn:lla:llaPartnerConversion:{action}",
            "conversionHappenedAt": unix_millis(row.conversion_time),
        }
        if row.value is not None:
            el["conversionValue"] = {"currencyCode": row.currency, "amount": f"{float(row.value)}"}
        el["eventId"] = row.order_id
        el["user"] = {"userIds": ids}
        return el

    def build_payload(self, rows: Sequence[OutRow]) -> dict[str, Any]:
        return {"elements": [self.element(r) for r in rows]}

    def send(self, payload: dict[str, Any], rows: Sequence[OutRow]) -> list[RowResult]:
        headers = {
            "LinkedIn-Version": self.cfg.api_version or API_VERSION,
            "X-Restli-Protocol-Version": "2.0.0",
            "X-RestLi-Method": "BATCH_CREATE",
            **self.bearer(TOKEN_URL),
        }
        response = self.post(f"{self.base_url}/rest/conversionEvents", payload, headers)
        try:
            body = response.json() or {}
        except ValueError:
            body = {}
        status = response.status_code
        if not isinstance(body, dict):
            body = {}
        code, message = str(body.get("code") or f"HTTP_{status}"), str(body.get("message") or "")
        if status in SETUP:
            raise self.paused(code, SETUP[status], message)
        self.raise_for_transport(response)
        if status >= 400:
            if body.get("code"):  # a named request-level error is not about one row
                raise self.paused(code, "the request, not one conversion, was refused: check "
                                  "[destinations.{name}]", message)
            raise BatchRejected(code, message or "request rejected with no error named")
        elements = body.get("elements") or []
        out = []
        for i, row in enumerate(rows):
            el: dict[str, Any] = elements[i] if i < len(elements) else {"status": 201}
            status = int(el.get("status") or 201)
            err = el.get("error") or {}
            code = str(err.get("code") or f"HTTP_{status}")
            message = err.get("message") or ""
            if status < 300 or status == 409:  # 409: this eventId was already recorded
                out.append(RowResult(row.order_id, "sent", "OK" if status < 300 else code, None))
            elif status in (403, 404):
                out.append(RowResult(row.order_id, "paused", code,
                                     SETUP[status].format(name=self.name)))
            elif status == 429 or status >= 500:
                out.append(RowResult(row.order_id, "retry", code, message))
            else:
                out.append(RowResult(row.order_id, "rejected", code, message))
        return out
