"""The one decision about consent: may a row's hashed identities (e-mail, phone) be sent?

Both the platform rules (does the row have an identity to match on?) and every exporter (which
identifiers go into the body?) ask `user_data_allowed`, so a row is never counted as identified
by hashes that the exporter then drops:

- `send_user_data = false` in the destination: never.
- the lead denied `ad_user_data` consent: never, whatever `consent_required` says. With
  `consent_required = true` such a row is held (`consent_denied`); with `false` it is sent on its
  click id alone, or held (`consent_denied`) when the hashes were its only identity.
- consent granted or unknown: yes (unknown is sent without a consent field, and the account's
  default applies).
"""

from __future__ import annotations

from typing import Any


def user_data_allowed(row: Any, send_user_data: bool) -> bool:
    """True when `row`'s hashed e-mail/phone may go to a destination with `send_user_data`."""
    return bool(send_user_data) and row.consent_ad_user_data is not False


def consent_hold(row: Any, consent_required: bool) -> str | None:
    """`consent_denied` when the destination requires consent and the lead denied it."""
    if consent_required and row.consent_ad_user_data is False:
        return "consent_denied"
    return None
