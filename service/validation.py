"""Parsing and validating a signup request body.

Bodies are JSON (UTF-8, an object) or ``application/x-www-form-urlencoded`` (UTF-8). Usernames
are stored NFKC-normalised (so full-width letters become ordinary ones) with their case kept;
uniqueness compares the NFKC + casefold form of both the username and the email, so no two
accounts differ only by case or Unicode width.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from service.errors import ApiError, InvalidIdempotencyKeyError, ValidationError

USERNAME_MIN, USERNAME_MAX = 3, 32
EMAIL_MAX = 254
#: The longest local part (before the @) of an address (RFC 5321).
_LOCAL_MAX = 64
FIELDS = ("username", "email")
_USERNAME_PUNCTUATION = frozenset("_.-")
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"
#: Valid email domains whose check is remembered (see _cache_domain_checks).
DOMAIN_CACHE_SIZE = 4096


def _cache_domain_checks() -> None:
    """Remember email-validator's verdict on valid domains.

    Checking the domain (IDNA, special-use names) is about 60% of a ``validate_email`` call,
    ~17 us per signup, and it depends on the domain alone, which signups repeat (a few big
    providers). So ``validate_email`` gets a bounded LRU cache of its own domain check. A
    domain that fails raises, which is never cached, so only valid domains are kept, and the
    verdicts are email-validator's own. ``tests/test_validation.py`` fails if a new
    email-validator no longer looks the function up where this replaces it.
    """
    module: Any = sys.modules["email_validator.validate_email"]
    check = module.validate_email_domain_name
    if not hasattr(check, "cache_info"):
        module.validate_email_domain_name = functools.lru_cache(maxsize=DOMAIN_CACHE_SIZE)(check)


_cache_domain_checks()


@dataclass(slots=True)
class SignupFields:
    """A valid signup: the values to store and the normalised forms that must be unique. A
    value, not a frozen dataclass only for the cost of a frozen one's ``__init__``."""

    username: str
    email: str
    username_claim: str
    email_claim: str


def claim_form(value: str) -> str:
    """The form two values are compared in: NFKC, casefolded, NFKC again (NFKC_Casefold).
    ASCII is its own NFKC form, and casefolds to its lowercase."""
    if value.isascii():
        return value.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())


def parse_body(mimetype: str, charset: str | None, body: bytes) -> dict[str, Any]:
    """Decode a request body into a dict of fields, or raise a 400 / 415 :class:`ApiError`."""
    if mimetype not in (JSON_TYPE, FORM_TYPE):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send {JSON_TYPE} or {FORM_TYPE}, not {mimetype or 'no content type'}",
        )
    if charset is not None and charset.lower().replace("-", "") != "utf8":
        raise ApiError(415, "unsupported_media_type", f"the body must be UTF-8, not {charset}")
    if mimetype == JSON_TYPE:
        return _parse_json(body)
    return _parse_form(body)


def _parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, "malformed_body", "the body is empty; send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_body", f"the body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(
            400, "malformed_body", f"the body must be a JSON object, not {_json_type(data)}"
        )
    # orjson keeps the last of a repeated name, where a proxy or WAF may read the first: a
    # repeated name is refused, as in a form. Each member has one ':' outside strings, so a
    # body with no more ':' than names has none repeated (the usual case: nothing re-parsed).
    if body.count(b":") > len(data):
        try:
            members: dict[str, Any] = json.loads(body, object_pairs_hook=_members)
        except RecursionError:  # orjson's depth limit is a little above json's
            raise ApiError(400, "malformed_body", "the body is nested too deeply") from None
        return members
    return data


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A form's fields or a JSON object's members; a name given more than once is kept,
    marked (see _Repeated), so validation can name it."""
    data: dict[str, Any] = {}
    for name, value in pairs:
        if name not in data:
            data[name] = value
        elif isinstance(data[name], _Repeated):
            data[name].append(value)
        else:
            data[name] = _Repeated([data[name], value])
    return data


def _parse_form(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, encoding="utf-8", errors="strict", max_num_fields=16
        )
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_body", "the form is not valid UTF-8") from None
    except ValueError:
        raise ApiError(400, "malformed_body", "the form has too many fields") from None
    return _members(pairs)


class _Repeated(list[Any]):
    """A field given more than once (in a form, or a JSON object)."""


#: The longest Idempotency-Key taken.
IDEMPOTENCY_KEY_MAX = 255


def parse_idempotency_key(raw: str | None) -> str | None:
    """The ``Idempotency-Key`` header's key, or None without one. As the IETF httpapi draft
    has it, a Structured Field string (``"…"``, with ``\\"`` and ``\\\\`` escapes); a bare
    value is taken as it is. Either way 1 to 255 printable ASCII characters, else a 400."""
    if raw is None:
        return None
    key = raw
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        key, escaped = "", False
        for char in raw[1:-1]:
            if escaped and char not in '\\"':
                raise InvalidIdempotencyKeyError("escapes a character other than '\"' or '\\'")
            if escaped or char not in '\\"':
                key, escaped = key + char, False
            elif char == "\\":
                escaped = True
            else:
                raise InvalidIdempotencyKeyError("has an unescaped '\"' in its string")
        if escaped:
            raise InvalidIdempotencyKeyError("ends in a lone '\\'")
    if not key:
        raise InvalidIdempotencyKeyError("is empty")
    if len(key) > IDEMPOTENCY_KEY_MAX:
        raise InvalidIdempotencyKeyError(f"is longer than {IDEMPOTENCY_KEY_MAX} characters")
    if not all(" " <= char <= "~" for char in key):
        raise InvalidIdempotencyKeyError("must be printable ASCII")
    return key


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), "null" if value is None else "a number")


def reserved_form(username: str) -> str:
    """The form reserved names are compared in: the claim form without ``_ . -``, so neither
    ``ADMIN`` nor full-width ``admin`` nor ``ad.min`` gets past ``admin``."""
    return _without_punctuation(claim_form(username))


def _without_punctuation(name: str) -> str:
    """``name`` without ``_ . -`` (three replaces cost a third of a ``str.translate``)."""
    return name.replace("_", "").replace(".", "").replace("-", "")


def reserved_forms(names: Iterable[str]) -> frozenset[str]:
    """The set :func:`validate_signup` checks usernames against."""
    return frozenset(reserved_form(name) for name in names)


def validate_signup(data: dict[str, Any], reserved: frozenset[str] = frozenset()) -> SignupFields:
    """Check the fields of a parsed body; raise :class:`ValidationError` naming each problem.
    ``reserved``: :func:`reserved_forms` of the usernames nobody may take."""
    errors: dict[str, str] = {}
    for name in data:
        if name not in FIELDS:
            errors[_show_name(str(name))] = "unknown field"
    username = _check_username(data.get("username"), errors)
    username_claim = claim_form(username) if username is not None else ""
    if username is not None and _without_punctuation(username_claim) in reserved:
        errors["username"] = "is reserved"
    email = _check_email(data.get("email"), errors)
    if errors or username is None or email is None:
        raise ValidationError(errors)
    return SignupFields(
        username=username,
        email=email,
        username_claim=username_claim,
        email_claim=claim_form(email),
    )


def _show_name(name: str) -> str:
    """An unknown field's name as the 422 names it: at most 64 characters, and none that
    is not printable (shown as U+XXXX), so a name cannot smuggle control characters."""
    shown = ""
    for char in name:
        piece = char if char.isprintable() else _show(char)
        if len(shown) + len(piece) > 64:
            break
        shown += piece
    return shown


def _field_text(value: object, name: str, errors: dict[str, str]) -> str | None:
    if value is None:
        errors[name] = "required"
    elif isinstance(value, _Repeated):
        errors[name] = "given more than once"
    elif not isinstance(value, str):
        errors[name] = f"must be a string, not {_json_type(value)}"
    elif not value.strip():
        errors[name] = "must not be empty"
    else:
        return value
    return None


def _check_username(value: object, errors: dict[str, str]) -> str | None:
    raw = _field_text(value, "username", errors)
    if raw is None:
        return None
    username = unicodedata.normalize("NFKC", raw)
    if not USERNAME_MIN <= len(username) <= USERNAME_MAX:
        errors["username"] = f"must be {USERNAME_MIN} to {USERNAME_MAX} characters long"
        return None
    if _ASCII_USERNAME.fullmatch(username):  # the usual case, decided without a loop
        return username
    for position, char in enumerate(username):
        category = unicodedata.category(char)
        allowed = (
            char in _USERNAME_PUNCTUATION
            or category == "Nd"
            or category[0] == "L"
            or (category[0] == "M" and position > 0)
        )
        if not allowed:
            errors["username"] = (
                f"may hold only letters, digits, '_', '.' and '-' (not {_show(char)})"
            )
            return None
    return username


#: The ASCII usernames the rule below admits: letters, digits (the ASCII ones are all of
#: its categories L and Nd there), ``_ . -``.
_ASCII_USERNAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_email(value: object, errors: dict[str, str]) -> str | None:
    raw = _field_text(value, "email", errors)
    if raw is None:
        return None
    if len(raw) > EMAIL_MAX:
        errors["email"] = f"must be at most {EMAIL_MAX} characters long"
        return None
    email = plain_email(raw)
    if email is None:
        try:
            result = validate_email(raw, check_deliverability=False, allow_smtputf8=True)
        except EmailNotValidError as exc:
            errors["email"] = f"is not a valid address: {exc}"
            return None
        email = result.normalized
    if len(email) > EMAIL_MAX:
        errors["email"] = f"must be at most {EMAIL_MAX} characters long"
        return None
    return email


#: An address as most are written: ASCII letters, digits and ``_ + -`` in dot-separated runs
#: before the @; lowercase ASCII labels after it, ending in a top-level domain of letters.
PLAIN_EMAIL = re.compile(
    r"[A-Za-z0-9_+-]{1,64}(?:\.[A-Za-z0-9_+-]{1,64})*"
    r"@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63})"
)


def plain_email(raw: str) -> str | None:
    """``raw`` itself when it is a plain address that email-validator accepts unchanged;
    None for anything else, which email-validator then judges. The fast path of a signup:
    email-validator costs about 10 us an address, this about 1 (a test checks that the two
    agree on every address the pattern admits)."""
    found = PLAIN_EMAIL.fullmatch(raw)
    if found is None or found.group(1) in SPECIAL_USE_DOMAIN_NAMES:
        return None
    local, _, domain = raw.partition("@")
    if len(local) > _LOCAL_MAX or len(raw) > EMAIL_MAX or "--" in domain:
        return None  # too long, or a label IDNA reserves (xn--…): email-validator decides
    return raw


def _show(char: str) -> str:
    return repr(char) if char.isprintable() else f"U+{ord(char):04X}"
