"""Keep secrets and clear PII out of logs, errors, reports and stored payloads.

Every secret read through `Settings.secret()` is registered here, and the logging filter in
`leadloop.logs` replaces registered values wherever they appear. URLs lose credential-bearing
query parameters before they are logged.
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_PARAMS = {
    "access_token",
    "api_token",
    "api_key",
    "apikey",
    "key",
    "token",
    "client_secret",
    "refresh_token",
    "password",
    "hapikey",
    "assertion",
    "code",
}
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-~+/=]+")
_PII_KEYS = {"email", "phone", "mobilephone", "firstname", "lastname", "name", "emails", "phones"}
_MASK = "***"

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a secret so that it is masked wherever it would be written."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact_text(text: str) -> str:
    """Mask registered secrets, bearer tokens and e-mail addresses in free text."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, _MASK)
    text = _BEARER.sub(rf"\g<1>{_MASK}", text)
    return _EMAIL.sub("<email>", text)


def redact_url(url: str) -> str:
    """Drop the values of credential-bearing query parameters from a URL."""
    parts = urlsplit(url)
    if not parts.query:
        return redact_text(url)
    query = [
        (k, _MASK if k.lower() in _SECRET_PARAMS else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return redact_text(urlunsplit(parts._replace(query=urlencode(query, safe="*"))))


def scrub_payload(payload: Any) -> Any:
    """A copy of a record with clear-PII fields removed, for `rejected_record.payload`."""
    if isinstance(payload, dict):
        return {
            k: ("<removed>" if k.lower() in _PII_KEYS else scrub_payload(v))
            for k, v in payload.items()
        }
    if isinstance(payload, list):
        return [scrub_payload(v) for v in payload]
    if isinstance(payload, str):
        return redact_text(payload)
    return payload
