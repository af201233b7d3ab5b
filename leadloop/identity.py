"""Normalisation and SHA-256 hashing of e-mail and phone, per platform rule.

Hashing happens once, at ingestion; clear values are never stored. The platforms disagree, so
one lead carries up to four hashes (see `tables.Lead`):

- Google (Data Manager, Ads API): e-mail trimmed and lower-cased, and for gmail.com /
  googlemail.com only, the `+tag` dropped and dots removed from the local part; phone in E.164
  *with* the `+`.
- Meta, LinkedIn, Microsoft: e-mail trimmed and lower-cased; Meta's phone is E.164 digits
  *without* the `+`. Microsoft's rule is unpublished; we send its phone as Google's E.164.

Phones are parsed with `phonenumbers` (Google's libphonenumber) using the configured default
region for numbers written without a country code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import phonenumbers

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WHITESPACE = re.compile(r"\s")
_GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


class IdentityError(ValueError):
    """A value that cannot be normalised (the message never contains the value itself)."""


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_sha256_hex(value: str) -> bool:
    return bool(_HEX64.match(value))


def normalise_email(raw: str) -> str:
    """Trim and lower-case; refuse values that are not a single address."""
    email = raw.strip().lower()
    if not email or _WHITESPACE.search(email):
        raise IdentityError("e-mail contains whitespace or is empty")
    local, sep, domain = email.rpartition("@")
    if not sep or not local or "." not in domain or domain.startswith(".") or "@" in local:
        raise IdentityError("e-mail is not of the form local@domain.tld")
    return email


def google_email(raw: str) -> str:
    """Google's canonical form: Gmail addresses lose the +tag and the dots of the local part."""
    return _google_form(normalise_email(raw))


def _google_form(email: str) -> str:
    local, _, domain = email.rpartition("@")
    if domain in _GMAIL_DOMAINS:
        local = local.split("+", 1)[0].replace(".", "")
        if not local:
            raise IdentityError("gmail address has an empty local part")
    return f"{local}@{domain}"


def e164(raw: str, default_region: str = "US") -> str:
    """Parse a phone number into E.164 (`+16505551212`)."""
    text = raw.strip()
    if not text:
        raise IdentityError("phone is empty")
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else default_region)
    except phonenumbers.NumberParseException as exc:
        # phonenumbers' message names the problem, never the number itself
        problem = str(exc).split(") ", 1)[-1]  # "(1) The string supplied did not seem to be ..."
        raise IdentityError(f"phone cannot be parsed: {problem}") from None
    if not phonenumbers.is_possible_number(number):
        raise IdentityError("phone is not a possible number for its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@dataclass(frozen=True, slots=True)
class HashedIdentity:
    email_sha256: str | None = None
    email_google_sha256: str | None = None
    phone_e164_sha256: str | None = None
    phone_digits_sha256: str | None = None

    def as_columns(self) -> dict[str, str | None]:
        return {
            "email_sha256": self.email_sha256,
            "email_google_sha256": self.email_google_sha256,
            "phone_e164_sha256": self.phone_e164_sha256,
            "phone_digits_sha256": self.phone_digits_sha256,
        }


def hash_email(raw: str) -> tuple[str, str]:
    """(plain hash, Google hash) of an e-mail; a value that is already a SHA-256 passes through."""
    value = raw.strip().lower()
    if is_sha256_hex(value):
        return value, value
    email = normalise_email(raw)
    return sha256_hex(email), sha256_hex(_google_form(email))


def hash_phone(raw: str, default_region: str = "US") -> tuple[str, str]:
    """(E.164-with-plus hash, digits-only hash) of a phone number."""
    value = raw.strip().lower()
    if is_sha256_hex(value):
        return value, value
    number = e164(raw, default_region)
    return sha256_hex(number), sha256_hex(number.removeprefix("+"))


def hash_identity(
    email: str | None, phone: str | None, default_region: str = "US"
) -> tuple[HashedIdentity, list[str]]:
    """Hash what can be hashed; return the identity and the reasons for what could not.

    A bad phone must not cost us a good e-mail, so problems are returned, not raised.
    """
    problems: list[str] = []
    em = emg = ph = phd = None
    if email and email.strip():
        try:
            em, emg = hash_email(email)
        except IdentityError as exc:
            problems.append(f"email: {exc}")
    if phone and phone.strip():
        try:
            ph, phd = hash_phone(phone, default_region)
        except IdentityError as exc:
            problems.append(f"phone: {exc}")
    return HashedIdentity(em, emg, ph, phd), problems


# -- identity in columns leadloop does not know ---------------------------------------------

PiiKind = Literal["email", "phone", "name", "contains_email"]
_EMAIL_VALUE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]{2,}$")
_EMAIL_INSIDE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_PHONE_VALUE = re.compile(r"^(\+|00)\d[\d\s().\-/]{6,22}$")  # written with a country code
_EMAIL_COLUMN = re.compile(r"e[\s_-]?mail")
_PHONE_COLUMN = re.compile(r"phone|mobile|\btel\b|telephone|\bfax\b|whatsapp|\bcell\b|\bsms\b")
_NAME_WORDS = frozenset({"name", "firstname", "lastname", "fullname", "surname", "forename",
                         "givenname", "familyname", "middlename", "maidenname", "username"})
_NOT_A_PERSON = frozenset({
    "company", "account", "campaign", "product", "source", "stage", "utm", "org",
    "organisation", "organization", "business", "domain", "file", "page", "form", "event",
    "list", "pipeline", "deal", "city", "country", "region", "state", "brand", "host", "ad",
    "adset", "group", "plan", "package", "course", "specialization", "industry", "tag",
    "segment", "medium", "channel", "site", "website", "team", "department", "job", "role",
    "category", "template", "property", "field", "column", "object", "record", "opportunity",
    "store", "shop", "seller", "branch", "location", "asset", "creative", "keyword",
})


def _column_words(column: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", column)  # firstName -> first Name
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


@lru_cache(maxsize=4096)
def _column_kind(column: str) -> PiiKind | None:
    """What a column's name says it holds: an e-mail, a phone, a person's name, or nothing."""
    words = _column_words(column)
    joined = " ".join(words)
    if _EMAIL_COLUMN.search(joined) or "email" in words:
        return "email"
    if _PHONE_COLUMN.search(joined):
        return "phone"
    squashed = {"".join(words[i:i + 2]) for i in range(len(words))} | set(words)
    if squashed & _NAME_WORDS and not set(words) & _NOT_A_PERSON:
        return "name"
    return None


def identity_kind(column: str, value: object) -> PiiKind | None:
    """Whether an attribute (a column leadloop does not map) holds identity in clear: an
    e-mail or phone column or value, a person's name by its column name, or free text with an
    e-mail address in it. None for anything else."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    by_name = _column_kind(column)
    text = value.strip() if isinstance(value, str) else str(value)
    # By column name, when the value could be one: a `Do Not Email` flag is not an address.
    if by_name == "email" and "@" in text:
        return "email"
    if by_name == "phone" and sum(c.isdigit() for c in text) >= 7:
        return "phone"
    if by_name == "name" and any(c.isalpha() for c in text):
        return "name"
    if not isinstance(value, str) or not text:
        return None
    if "@" in text:
        if _EMAIL_VALUE.match(text):
            return "email"
        if _EMAIL_INSIDE.search(text):
            return "contains_email"
    elif text[0] in "+0" and _PHONE_VALUE.match(text) and sum(c.isdigit() for c in text) >= 8:
        return "phone"
    return None
