"""The welcome email's own settings: where it is sent from and through which SMTP server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

from pipeline.config import address, host_port, readable_file, redact_url, seconds, setting

SmtpSecurity = Literal["none", "starttls", "tls"]

_SMTP_SCHEMES: dict[str, tuple[SmtpSecurity, int]] = {
    "smtp": ("none", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where welcome emails go: parsed from ``SMTP_URL``."""

    host: str
    port: int
    security: SmtpSecurity
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_smtp_url(raw: str) -> SmtpConfig:
    """``smtp://``, ``smtp+starttls://`` or ``smtps://`` ``[user:pass@]host[:port]``."""
    parts = urlsplit(raw)
    if parts.scheme not in _SMTP_SCHEMES:
        raise ValueError("expected smtp://, smtp+starttls:// or smtps:// [user:pass@]host[:port]")
    host, port = host_port(parts)
    security, default_port = _SMTP_SCHEMES[parts.scheme]
    return SmtpConfig(
        host=host,
        port=port or default_port,
        security=security,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True, slots=True)
class EmailSettings:
    """``SMTP_URL``, ``EMAIL_FROM``, ``SMTP_TIMEOUT``, ``SMTP_CA_FILE``."""

    smtp: SmtpConfig | None = setting(
        "SMTP_URL",
        parse_smtp_url,
        None,
        kind="URL",
        read_by="consumers",
        show=redact_url,
        doc="`smtp://[user:pass@]host[:port]` (plain, port 25), `smtp+starttls://…` "
        "(STARTTLS required, 587) or `smtps://…` (implicit TLS, 465). Unset: emails go to "
        "the worker's log",
    )
    email_from: str = setting(
        "EMAIL_FROM",
        address,
        "Signup <no-reply@localhost>",
        kind="address",
        read_by="consumers",
        doc="the welcome email's sender",
    )
    smtp_timeout: float = setting(
        "SMTP_TIMEOUT",
        seconds(0.1, 300),
        10.0,
        kind="seconds",
        read_by="consumers",
        doc="seconds for each SMTP operation",
    )
    smtp_ca_file: str | None = setting(
        "SMTP_CA_FILE",
        readable_file,
        None,
        kind="path",
        read_by="consumers",
        doc="CA bundle to verify the SMTP server's certificate with (default: the system's)",
    )
