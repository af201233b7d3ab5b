"""Normalisation and hashing against the vendors' published test vectors (spec sheet §2, §6, §8)."""

from __future__ import annotations

import pytest

from leadloop.identity import (
    IdentityError,
    e164,
    google_email,
    hash_email,
    hash_identity,
    hash_phone,
    normalise_email,
    sha256_hex,
)


def test_google_email_vector() -> None:
    assert hash_email("John_Smith@gmail.com")[1] == (
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f")


def test_gmail_rule_only_for_gmail_domains() -> None:
    assert google_email(" Cloudy.SanFrancisco+shopping@Gmail.com ") == "cloudysanfrancisco@gmail.com"
    assert google_email("a.b+c@googlemail.com") == "ab@googlemail.com"
    assert google_email("user.name+NYC@Example.com") == "user.name+nyc@example.com"


def test_google_phone_vector_keeps_the_plus() -> None:
    assert e164("+1 (650)555-1212") == "+16505551212"
    google, meta = hash_phone("+1 (650)555-1212")
    assert google == "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"
    assert meta == "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"


def test_meta_vectors() -> None:
    assert hash_email("John_Smith@gmail.com")[0] == (
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f")
    assert hash_email(" John.Doe+x@Gmail.com ")[0] == (
        "86500804d4aa2249bdf6687587eb061a86264d1e81d5a5c4750c88b2ec2d9093")
    assert hash_phone("+1 (650) 555-1234")[1] == (
        "6069d14bf122fdfd931dc7beb58e5dfbba395b1faf05bdcd42d12358d63d8599")
    assert hash_phone("(650)555-1212", "US")[1] == (
        "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176")
    assert sha256_hex("mary") == "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"


def test_international_prefix_and_default_region() -> None:
    assert e164("0044 20 7946 0018") == "+442079460018"
    assert e164("020 7946 0018", "GB") == "+442079460018"


def test_already_hashed_values_pass_through() -> None:
    h = "a" * 64
    assert hash_email(h.upper()) == (h, h)
    assert hash_phone(h) == (h, h)


@pytest.mark.parametrize("bad", ["", "no-at-sign", "two words@example.com", "x@localhost"])
def test_bad_emails_are_refused_without_echoing_the_value(bad: str) -> None:
    with pytest.raises(IdentityError) as exc:
        normalise_email(bad)
    assert bad.strip() == "" or bad not in str(exc.value)


def test_a_bad_phone_does_not_cost_the_email() -> None:
    identity, problems = hash_identity("Jane@Example.com", "12")
    assert identity.email_sha256 == sha256_hex("jane@example.com")
    assert identity.phone_e164_sha256 is None and problems and "12" not in problems[0]


def test_an_unparsable_phone_is_an_identity_error_without_the_number():
    from leadloop.identity import IdentityError, e164

    with pytest.raises(IdentityError, match="did not seem to be a phone number") as info:
        e164("+", "US")
    assert "+" not in str(info.value).replace("phone cannot be parsed:", "")
