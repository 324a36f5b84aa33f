"""How a setting is declared and read: the machinery both :mod:`pipeline.settings` and the
reactions' own settings use, and the parsers they share.

A group of settings is a frozen dataclass whose fields are made by :func:`setting`: each
names its environment variable, its parser, its default and what it means, once. :func:`read`
builds the group from an environment; the docs' settings table and ``.env.example`` are generated
from the same declarations (see ``devtools.docs``). A bad value raises
:class:`SettingsError` naming the variable, the value (masked or redacted when secret) and
the problem. Nothing here imports a reaction or the registry.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any, Literal, TypeVar
from urllib.parse import SplitResult, urlsplit

from pipeline.errors import SettingsError

T = TypeVar("T")

#: Which process reads a setting: both, one of them, or a tool around them.
ReadBy = Literal["both", "web", "consumers", "dashboard", "Procfile", "make run, tests"]
_SETTING = "setting"


@dataclass(frozen=True, slots=True)
class Setting:
    """The declaration of one environment variable: its name, how it is parsed, what it
    means, who reads it and how its default is shown."""

    env: str
    kind: str
    read_by: ReadBy
    doc: str
    default: str
    parse: Callable[[str], Any] | None = None
    #: How a bad value is shown in the error: masked (a secret), or redacted (a URL).
    show: Callable[[str], str] | None = None
    #: The consumer flag overriding it, if any.
    flag: str | None = None


def setting(
    env: str,
    parse: Callable[[str], T],
    default: Any,
    *,
    kind: str,
    read_by: ReadBy,
    doc: str,
    shown: str | None = None,
    factory: Callable[[], Any] | None = None,
    show: Callable[[str], str] | None = None,
    flag: str | None = None,
) -> Any:
    """A dataclass field read from ``env``: the one place a setting is declared.
    ``default`` is the field's default (``factory`` makes it instead when given); ``shown``
    is how the docs and ``.env.example`` show it, when ``default`` would not say it.
    ``show=masked`` marks a secret: never in a repr or an error."""
    declared = Setting(
        env, kind, read_by, doc, _shown(default) if shown is None else shown, parse, show, flag
    )
    metadata = {_SETTING: declared}
    secret = show is masked
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


def declared(group: type) -> dict[str, Setting]:
    """Field name -> declaration, for every setting the dataclass ``group`` declares."""
    return {
        f.name: f.metadata[_SETTING] for f in dataclasses.fields(group) if _SETTING in f.metadata
    }


def parse_env(group: type, environ: Mapping[str, str]) -> dict[str, Any]:
    """The values of ``group``'s settings that ``environ`` sets (not blank), parsed, by
    field name; the rest are left to their defaults. A bad value raises
    :class:`SettingsError` naming it."""
    values: dict[str, Any] = {}
    for name, decl in declared(group).items():
        raw = environ.get(decl.env)
        if raw is None or raw.strip() == "" or decl.parse is None:
            continue
        try:
            values[name] = decl.parse(raw.strip())
        except ValueError as exc:
            shown = decl.show(raw) if decl.show else raw
            raise SettingsError(decl.env, shown, str(exc)) from None
    return values


def read(group: type[T], environ: Mapping[str, str]) -> T:
    """The dataclass ``group`` built from ``environ`` (see :func:`parse_env`)."""
    return group(**parse_env(group, environ))


def _shown(default: Any) -> str:
    if default is None or default == ():
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


# --- how values are shown -------------------------------------------------------------------


def masked(raw: str) -> str:
    """A secret, as errors show it."""
    return "***"


def redact_url(url: str) -> str:
    """``url`` with the password in it (if any) shown as ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not sep or not at or not colon:
        return url
    return f"{scheme}://{user}:***@{hosts}{slash}{path}"


# --- parsers: each takes the raw text and returns the value or raises ValueError -------------


def seconds(low: float, high: float) -> Callable[[str], float]:
    """A parser of a number of seconds from ``low`` to ``high``."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not low <= value <= high:
            raise ValueError(f"expected seconds between {low:g} and {high:g}")
        return value

    return parse


def integer(low: int, high: int) -> Callable[[str], int]:
    """A parser of a whole number from ``low`` to ``high``."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS.update({"0": False, "false": False, "no": False, "off": False})


def boolean(raw: str) -> bool:
    """``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``."""
    try:
        return _BOOLEANS[raw.lower()]
    except KeyError:
        raise ValueError("expected true or false (1/0, yes/no, on/off)") from None


def readable_file(raw: str) -> str:
    """The path of a file this process can read."""
    if not os.path.isfile(raw) or not os.access(raw, os.R_OK):
        raise ValueError("no readable file at that path")
    return raw


def host_port(parts: SplitResult) -> tuple[str, int | None]:
    """The host and port (None: not given) a parsed URL names, or ValueError saying what is
    wrong with them."""
    if not parts.hostname:
        raise ValueError("the URL names no host")
    try:
        return parts.hostname, parts.port
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None


def url(*schemes: str) -> Callable[[str], str]:
    """A parser of a URL with one of ``schemes`` that names a host (and a valid port)."""

    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes:
            raise ValueError(f"expected a {' or '.join(f'{s}://' for s in schemes)} URL")
        host_port(parts)
        return raw

    return parse


def address(raw: str) -> str:
    """An email address, with or without a display name: ``Name <me@example.com>``."""
    _, found = parseaddr(raw)
    if "@" not in found or any(ch in raw for ch in "\r\n"):
        raise ValueError("expected an email address such as 'Name <me@example.com>'")
    return raw
