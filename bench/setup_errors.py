"""Benchmark: requests spent and rows rejected while an ad account is not set up.

Two accounts that refuse every request for their setup, not for a row:

- Google Data Manager answering INVALID_CONVERSION_ACTION_ID (the stage maps to a conversion
  action id the account does not have), 2,000 conversions by default;
- Microsoft Advertising answering every request with a 400 AdApiFaultDetail (UserIsNotAuthorized,
  code 106: the user has no access to the account), 1,000 conversions by default.

Prints, per destination, the requests the export made and the rows it rejected, then what the
outbox holds. Usage:

    .venv/bin/python bench/setup_errors.py [--gdm 2000] [--microsoft 1000]

The Microsoft fault comes from a plain loopback server in this script, so the same script
measures any version of leadloop (e.g. an older checkout on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.errors import LeadloopError
from leadloop.export.engine import run_export
from leadloop.identity import sha256_hex
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.sandbox.server import LocalServer, Reply
from leadloop.store import insert_ignore, make_engine, session_scope
from leadloop.tables import Conversion, Lead, RejectedRecord, StageChange

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def load(engine: object, n: int) -> None:
    leads = [{"source": "hubspot", "crm_id": str(10_000 + i), "created_at": NOW - timedelta(days=3),
              "email_google_sha256": sha256_hex(f"p{i}@example.com"),
              "gclid": f"Cj0KCQiA{i:08d}", "msclkid": f"ms{i:010d}",
              "consent_ad_user_data": True, "consent_ad_personalization": True, "attributes": {}}
             for i in range(n)]
    with session_scope(engine) as session:  # type: ignore[arg-type]
        insert_ignore(session, Lead, leads, conflict=("source", "crm_id"))
    with session_scope(engine) as session:  # type: ignore[arg-type]
        ids = session.execute(select(Lead.id)).scalars().all()  # type: ignore[call-overload]
        insert_ignore(session, StageChange, [
            {"lead_id": i, "field": "lifecyclestage", "value": "salesqualifiedlead",
             "entered_at": NOW - timedelta(days=2), "deal_id": "", "is_lost": False} for i in ids],
            conflict=("lead_id", "field", "value", "deal_id"))


def measure(name: str, dest: dict, action: str, n: int, count_requests: object) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="leadloop-bench-setup-"))
    engine = make_engine(f"sqlite:///{tmp / 'bench.db'}")
    load(engine, n)
    settings = settings_from_dict({
        "crm": {"kind": "hubspot", "base_url": "http://127.0.0.1:1", "token_env": "X"},
        "destinations": {name: dest},
        "stages": [{"name": "Qualified", "crm_values": ["salesqualifiedlead"],
                    "field": "lifecyclestage", "value": 100.0, "currency": "EUR", "macro": True,
                    "destinations": {name: action}}],
    }, base_dir=tmp)
    ctx = Context(settings=settings, engine=engine, now=lambda: NOW)
    try:
        run_export(ctx)
        outcome = "ok"
    except LeadloopError as exc:
        outcome = exc.message.splitlines()[0][:100]
    with session_scope(engine) as session:
        statuses = Counter(str(s.value) for s in session.execute(
            select(Conversion.status)).scalars())  # type: ignore[call-overload]
        rejected = len(session.execute(select(RejectedRecord.id)).all())  # type: ignore[call-overload]
    print(f"{name:<10} {n:>6} conversions  requests {count_requests():>5}  rejected {rejected:>5}  "  # type: ignore[operator]
          f"outbox {dict(statuses)}  export: {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gdm", type=int, default=2000)
    parser.add_argument("--microsoft", type=int, default=1000)
    args = parser.parse_args()
    with FakePlatforms(now=lambda: NOW) as fakes:
        measure("gdm", {"kind": "google_data_manager", "operating_account_id": "1234567890",
                        "base_url": fakes.urls["google_data_manager"],
                        "requests_per_minute": 100_000},
                "not-a-conversion-action", args.gdm,
                lambda: len(fakes.received("google_data_manager")))
    with LocalServer() as ms:
        ms.route("POST", r"/CampaignManagement/v13/OfflineConversions/Apply", lambda req: Reply(
            400, {"TrackingId": "bench", "Type": "AdApiFaultDetail", "Errors": [{
                "Code": 106, "ErrorCode": "UserIsNotAuthorized", "Detail": None,
                "Message": "The user is not authorized to perform this action."}]}))
        measure("microsoft", {"kind": "microsoft", "customer_id": "42", "account_id": "4242",
                              "base_url": ms.base_url},
                "Qualified lead", args.microsoft,
                lambda: sum(r.method == "POST" for r in ms.received))


if __name__ == "__main__":
    main()
