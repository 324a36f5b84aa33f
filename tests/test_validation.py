from __future__ import annotations

from typing import Any

import pytest

from service.errors import ApiError, ValidationError
from service.validation import claim_form, parse_body, validate_signup


def fields_error(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        validate_signup(data)
    assert caught.value.status == 422
    fields: dict[str, str] = caught.value.details["fields"]
    return fields


def test_valid_signup_is_normalised() -> None:
    fields = validate_signup({"username": "ＡＬＩＣＥ_1", "email": "Alice@Example.COM"})
    assert fields.username == "ALICE_1"  # NFKC: full width becomes ordinary, case kept
    assert fields.email == "Alice@example.com"  # the domain is lower-cased
    assert fields.username_claim == "alice_1"
    assert fields.email_claim == "alice@example.com"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("alice", "ALICE"),
        ("alice", "ａｌｉｃｅ"),
        ("straße", "STRASSE"),
        ("ﬁne", "fine"),
    ],
)
def test_claims_ignore_case_and_width(first: str, second: str) -> None:
    assert claim_form(first) == claim_form(second)


@pytest.mark.parametrize(
    "username",
    [
        "ab",
        "a" * 33,
        "has space",
        "semi;colon",
        "emoji😀",
        "new\nline",
        "tab\t",
        "\u0301abc",
        "a/b",
    ],
)
def test_bad_usernames(username: str) -> None:
    assert "username" in fields_error({"username": username, "email": "a@example.com"})


@pytest.mark.parametrize(
    "username", ["abc", "a" * 32, "jo.smith-2_x", "Zoë", "ユーザー名", "δοκιμή"]
)
def test_good_usernames(username: str) -> None:
    assert validate_signup({"username": username, "email": "a@example.com"}).username


@pytest.mark.parametrize(
    "email",
    [
        "nope",
        "a@b",
        "a@localhost",
        "a\r\nBcc: x@example.com",
        "a b@example.com",
        "x" * 250 + "@example.com",
        "a@foo.test",
    ],
)
def test_bad_emails(email: str) -> None:
    assert "email" in fields_error({"username": "alice", "email": email})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, {"username": "required", "email": "required"}),
        (
            {"username": 5, "email": None},
            {"username": "must be a string, not a number", "email": "required"},
        ),
        (
            {"username": ["a"], "email": {"x": 1}},
            {
                "username": "must be a string, not an array",
                "email": "must be a string, not an object",
            },
        ),
        (
            {"username": True, "email": 1.5},
            {
                "username": "must be a string, not a boolean",
                "email": "must be a string, not a number",
            },
        ),
        ({"username": "   ", "email": "a@example.com"}, {"username": "must not be empty"}),
        (
            {"username": "abc", "email": "a@example.com", "username ": 1},
            {"username ": "unknown field"},
        ),
    ],
)
def test_field_types(data: dict[str, Any], expected: dict[str, str]) -> None:
    errors = fields_error(data)
    assert errors == expected


def test_unknown_fields_are_named() -> None:
    errors = fields_error({"username": "alice", "email": "a@example.com", "password": "x"})
    assert errors == {"password": "unknown field"}


def test_repeated_form_field_is_named() -> None:
    data = parse_body(
        "application/x-www-form-urlencoded", None, b"username=a1b&username=c2d&email=a@example.com"
    )
    assert fields_error(data) == {"username": "given more than once"}


@pytest.mark.parametrize(
    ("mimetype", "charset", "body", "status"),
    [
        ("application/json", None, b"{bad json", 400),
        ("application/json", None, b"", 400),
        ("application/json", None, b"[1, 2]", 400),
        ("application/json", None, b'"a string"', 400),
        ("application/json", None, b'{"username": "\xff\xfe"}', 400),
        ("application/json", None, b"[" * 5000 + b"]" * 5000, 400),
        ("application/x-www-form-urlencoded", None, b"username=%ff%fe", 400),
        (
            "application/x-www-form-urlencoded",
            None,
            b"&".join(b"f%d=1" % i for i in range(40)),
            400,
        ),
        ("text/plain", None, b"hello", 415),
        ("", None, b"{}", 415),
        ("multipart/form-data", None, b"--x--", 415),
        ("application/json", "latin-1", b"{}", 415),
    ],
)
def test_malformed_bodies(mimetype: str, charset: str | None, body: bytes, status: int) -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(mimetype, charset, body)
    assert caught.value.status == status
    assert caught.value.message


def test_form_body_is_parsed() -> None:
    data = parse_body(
        "application/x-www-form-urlencoded", "utf-8", b"username=Zo%C3%AB&email=z%40example.com"
    )
    assert data == {"username": "Zoë", "email": "z@example.com"}


def test_email_domain_checks_are_cached_with_email_validators_own_verdicts() -> None:
    import sys

    from email_validator import EmailNotValidError, validate_email

    from service.validation import validate_signup

    module = sys.modules["email_validator.validate_email"]
    cached = module.validate_email_domain_name
    assert hasattr(cached, "cache_info"), "email-validator no longer uses the cached check"
    uncached = cached.__wrapped__
    for address in ["a@Example.COM", "b@bücher.de", "c@xn--bcher-kva.de", "d@sub.example.org"]:
        domain = address.rpartition("@")[2]
        expected = uncached(domain, test_environment=False, globally_deliverable=True)
        for _ in range(2):  # the first computes, the second is remembered
            fields = validate_signup({"username": "alice", "email": address})
            assert fields.email == address.partition("@")[0] + "@" + expected["domain"]
    before = cached.cache_info().currsize
    for bad in ["x@localhost", "x@nodot", "x@-bad-.com", "x@example.123"]:
        with pytest.raises(EmailNotValidError):
            validate_email(bad, check_deliverability=False)
        with pytest.raises(ValidationError):
            validate_signup({"username": "alice", "email": bad})
    assert cached.cache_info().currsize == before  # invalid domains are never kept
