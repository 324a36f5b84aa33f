"""Sending email: over SMTP with aiosmtplib when ``SMTP_URL`` is set, else to the log."""

from __future__ import annotations

import contextlib
import html
import logging
from email.message import EmailMessage
from typing import Protocol

import aiosmtplib

from pipeline.settings import Settings, SmtpConfig

logger = logging.getLogger(__name__)


class EmailBackend(Protocol):
    """Delivers one message or raises."""

    async def send(self, message: EmailMessage) -> None:
        """Deliver ``message``; return once the server (or the log) accepted it."""
        ...


class ConsoleEmailBackend:
    """Logs each message instead of sending it: the default when ``SMTP_URL`` is unset."""

    async def send(self, message: EmailMessage) -> None:
        body = message.get_body(("plain",))
        text = body.get_content() if body is not None else ""
        logger.info(
            "email to %s, subject %r (console backend, not sent):\n%s",
            message["To"],
            message["Subject"],
            text,
        )


class SmtpEmailBackend:
    """Sends over SMTP: plain, STARTTLS (required) or implicit TLS, as ``SMTP_URL`` says."""

    def __init__(self, config: SmtpConfig, timeout: float, ca_file: str | None = None) -> None:
        self._config = config
        self._timeout = timeout
        self._ca_file = ca_file

    async def send(self, message: EmailMessage) -> None:
        config = self._config
        client = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            username=config.username,
            password=config.password,
            use_tls=config.security == "tls",
            start_tls=config.security == "starttls",
            timeout=self._timeout,
            cert_bundle=self._ca_file,
        )
        await client.connect()
        try:
            await client.send_message(message)
        except BaseException:
            # Failed or cancelled (shutdown): drop the connection at once. aiosmtplib's own
            # context manager would wait for a polite QUIT first, holding up the shutdown.
            client.close()
            raise
        with contextlib.suppress(aiosmtplib.SMTPException):
            await client.quit()


def email_backend(settings: Settings) -> EmailBackend:
    """The backend the settings ask for."""
    if settings.smtp is None:
        return ConsoleEmailBackend()
    return SmtpEmailBackend(settings.smtp, settings.smtp_timeout, settings.smtp_ca_file)


def welcome_email(sender: str, to: str, username: str) -> EmailMessage:
    """The welcome email: a plain-text part and an HTML alternative, both naming the user."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = f"Welcome, {username}!"
    message.set_content(
        f"Hello {username},\n\nThanks for signing up. Your account is ready.\n\n-- The team\n"
    )
    name = html.escape(username)
    message.add_alternative(
        "<!doctype html>\n<html><body>\n"
        f"<p>Hello <strong>{name}</strong>,</p>\n"
        "<p>Thanks for signing up. Your account is ready.</p>\n"
        "<p>&mdash; The team</p>\n"
        "</body></html>\n",
        subtype="html",
    )
    return message
