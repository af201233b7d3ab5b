"""LinkedIn Conversions API: `POST /rest/conversionEvents` as a Rest.li BATCH_CREATE.

Versioned headers (`LinkedIn-Version: YYYYMM`), timestamps in epoch milliseconds, the amount as a
string, users identified by SHA-256 e-mail and/or the first-party ads tracking id (li_fat_id).
The batch answer carries one status per element, so rows succeed or fail individually.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from leadloop.export.base import BaseDestination, BatchRejected, OutRow, RowResult, unix_millis

API_VERSION = "202607"  # newest monthly version seen in the spec sheet; override with api_version


class LinkedInDestination(BaseDestination):
    kind: ClassVar[str] = "linkedin"
    default_base_url: ClassVar[str] = "https://api.linkedin.com"
    platform_max: ClassVar[int] = 5000

    def element(self, row: OutRow) -> dict[str, Any]:
        ids = []
        if self.cfg.send_user_data and row.email_sha256 and row.consent_ad_user_data is not False:
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
        }
        token = self.secret("token_env")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self.post(f"{self.base_url}/rest/conversionEvents", payload, headers)
        self.raise_for_transport(response)
        try:
            body = response.json() or {}
        except ValueError:
            body = {}
        if response.status_code >= 400:
            raise BatchRejected(str(body.get("code") or f"HTTP_{response.status_code}"),
                                str(body.get("message") or "request rejected"))
        elements = body.get("elements") or []
        out = []
        for i, row in enumerate(rows):
            el = elements[i] if i < len(elements) else {"status": 201}
            status = int(el.get("status") or 201)
            err = el.get("error") or {}
            code = str(err.get("code") or f"HTTP_{status}")
            message = err.get("message") or ""
            if status < 300 or status == 409:  # 409: this eventId was already recorded
                out.append(RowResult(row.order_id, "sent", "OK" if status < 300 else code, None))
            elif status == 429 or status >= 500:
                out.append(RowResult(row.order_id, "retry", code, message))
            else:
                out.append(RowResult(row.order_id, "rejected", code, message))
        return out
