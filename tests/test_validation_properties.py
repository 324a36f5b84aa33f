"""Property-based tests (hypothesis) of parsing and validating a signup: whatever arrives, the
answer is a 4xx naming the problem or a signup whose values are safe to store, log, use in
an email header and compare."""

from __future__ import annotations

import os
import unicodedata
from typing import Any

import pytest
from email_validator import validate_email
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.settings import RESERVED_USERNAMES
from service.errors import ApiError, ValidationError
from service.validation import (
    EMAIL_MAX,
    FORM_TYPE,
    JSON_TYPE,
    PLAIN_EMAIL,
    USERNAME_MAX,
    USERNAME_MIN,
    SignupFields,
    claim_form,
    parse_body,
    plain_email,
    reserved_forms,
    validate_signup,
)

#: Each property runs this many generated cases in `make test` (FUZZ_CASES: more).
CASES = int(os.environ.get("FUZZ_CASES", "400"))
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
#: Categories no stored value may hold: controls (CR, LF, NUL, ...), format characters
#: (bidi overrides, zero-width), separators other than the plain space, unassigned, private.
UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
RESERVED = reserved_forms(RESERVED_USERNAMES)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Text biased towards what breaks validators: controls, line breaks, wide and combining
# characters, look-alikes and '@'.
tricky = st.text(
    st.characters(codec="utf-8")
    | st.sampled_from("\r\n\t\x00\x7f\u200b\u202e\u0301\uff41\u0130\u0131\u00df@._- \"'<>"),
    max_size=40,
)


def unsafe_chars(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in UNSAFE]


def accept(data: dict[str, Any]) -> SignupFields | None:
    """The signup, or None after checking the 422 is well formed."""
    try:
        return validate_signup(data, RESERVED)
    except ValidationError as exc:
        assert exc.status == 422
        fields = exc.details["fields"]
        assert fields, "a 422 names at least one field"
        for name, problem in fields.items():
            assert not unsafe_chars(name) and not unsafe_chars(problem), (name, problem)
            assert len(name) <= 64
        return None


@FUZZ
@given(st.dictionaries(st.text(max_size=80), json_values, max_size=5))
def test_any_json_object_is_a_signup_or_a_422(data: dict[str, Any]) -> None:
    accept(data)


@FUZZ
@given(tricky | st.from_regex(r"[A-Za-z0-9_.\-]{3,32}", fullmatch=True))
@example("ａｄｍｉｎ")
@example("Ad.Min")
@example("e\u0301e\u0301e\u0301")
def test_an_accepted_username_is_safe_and_normalised(raw: str) -> None:
    signup = accept({"username": raw, "email": "someone@example.com"})
    if signup is None:
        return
    username = signup.username
    assert USERNAME_MIN <= len(username) <= USERNAME_MAX
    assert not unsafe_chars(username) and " " not in username
    assert username == unicodedata.normalize("NFKC", username)
    assert claim_form(signup.username_claim) == signup.username_claim
    assert signup.username_claim.replace("_", "").replace(".", "").replace("-", "") not in RESERVED


@FUZZ
@given(st.emails() | tricky.map(lambda local: f"{local}@example.com") | tricky)
@example("a@example.com\r\nBcc: victim@example.org")
@example("\u202eevil@example.com")
def test_an_accepted_email_is_safe_in_a_header(raw: str) -> None:
    signup = accept({"username": "someone", "email": raw})
    if signup is None:
        return
    email = signup.email
    assert len(email) <= EMAIL_MAX
    assert not unsafe_chars(email)
    assert not any(c in email for c in ' \r\n\t<>,;:"')
    assert email.count("@") == 1
    assert claim_form(signup.email_claim) == signup.email_claim


@FUZZ
@given(
    st.binary(max_size=200) | json_values.map(lambda v: repr(v).encode()),
    st.sampled_from([JSON_TYPE, FORM_TYPE, "text/plain", "", "application/json; x"]),
    st.sampled_from([None, "utf-8", "UTF8", "latin-1", ""]),
)
def test_any_body_is_parsed_or_refused_with_400_or_415(
    body: bytes, mimetype: str, charset: str | None
) -> None:
    try:
        data = parse_body(mimetype, charset, body)
    except ApiError as exc:
        assert exc.status in (400, 415)
        assert not unsafe_chars(exc.message.replace("\n", " "))
        return
    assert isinstance(data, dict)
    accept(data)


@FUZZ
@given(tricky)
def test_the_claim_form_is_idempotent(text: str) -> None:
    assert claim_form(claim_form(text)) == claim_form(text)


@FUZZ
@given(
    st.sampled_from(RESERVED_USERNAMES),
    st.sampled_from([str.upper, str.title, str.lower]),
    st.booleans(),
    st.integers(min_value=0, max_value=3),
)
def test_reserved_usernames_are_refused_however_written(
    name: str, case: Any, wide: bool, dot_at: int
) -> None:
    written = case(name)
    if wide:  # full-width letters: NFKC makes them ordinary
        written = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in written)
    if 0 < dot_at < len(written):
        written = written[:dot_at] + "." + written[dot_at:]
    with pytest.raises(ValidationError) as caught:
        validate_signup({"username": written, "email": "someone@example.com"}, RESERVED)
    assert caught.value.details["fields"] == {"username": "is reserved"}


@FUZZ
@given(
    st.from_regex(PLAIN_EMAIL, fullmatch=True)
    | st.from_regex(r"[a-z0-9.+_-]{1,70}@[a-z0-9.-]{1,40}", fullmatch=True)
    | tricky
)
@example("alice@example.com")
@example("bob@localhost.test")  # a special-use domain: refused
@example("x@xn--bcher-kva.example")  # punycode: email-validator decodes it
@example("a" * 65 + "@example.com")  # a local part too long
@example("a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 61 + ".com")
def test_the_plain_address_fast_path_agrees_with_email_validator(raw: str) -> None:
    """Whatever the fast path accepts, email-validator accepts too, normalised to the same
    text; what it does not take is left to email-validator."""
    fast = plain_email(raw)
    if fast is None:
        return
    assert validate_email(raw, check_deliverability=False, allow_smtputf8=True).normalized == fast


def test_the_fast_path_takes_plain_addresses() -> None:
    """It is a fast path only if the addresses most people type go through it."""
    for raw in ("alice@example.com", "first.last+tag@mail.example.co.uk", "a_b-c@x1.io"):
        assert plain_email(raw) == raw
    for raw in ("Alice@Example.COM", "user@localhost.test", '"quoted"@example.com'):
        assert plain_email(raw) is None


def _full_claim_form(value: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())


@FUZZ
@given(st.text(st.characters(max_codepoint=127), max_size=40) | tricky)
@example("ADMIN")
@example("Straße")
def test_the_claim_form_fast_path_is_nfkc_casefold(text: str) -> None:
    """ASCII takes a shortcut (its lowercase); it is the same form the full rule gives."""
    assert claim_form(text) == _full_claim_form(text)


def _username_rule(username: str) -> bool:
    """The character rule without the ASCII shortcut: letters, digits, ``_ . -``, marks
    after the first character."""
    return all(
        char in "_.-"
        or unicodedata.category(char) == "Nd"
        or unicodedata.category(char)[0] == "L"
        or (unicodedata.category(char)[0] == "M" and position > 0)
        for position, char in enumerate(username)
    )


@FUZZ
@given(st.text(st.characters(max_codepoint=127), min_size=3, max_size=32) | tricky)
@example("wrk_x_1_12345")
@example("a b")
@example("ab\x00")
def test_the_username_fast_path_agrees_with_the_character_rule(raw: str) -> None:
    """The usual username is decided by one pattern, not a loop over its characters: the
    two accept the same names."""
    try:
        signup = validate_signup({"username": raw, "email": "a@example.com"})
    except ValidationError as exc:
        problem = exc.details["fields"].get("username")
        assert problem is not None
        name = unicodedata.normalize("NFKC", raw)
        if raw.strip() and USERNAME_MIN <= len(name) <= USERNAME_MAX:
            assert not _username_rule(name), problem
        return
    assert _username_rule(signup.username)
