"""Sending email: over SMTP with aiosmtplib when ``SMTP_URL`` is set, else to the log.

aiosmtplib is imported by the SMTP backend when it is made, in a consumer: the web imports
the welcome email's reaction for its receiver, and with it this module, but never sends.
With tracing on, each SMTP send is a span under the job's."""

from __future__ import annotations

import contextlib
import logging
from email.header import decode_header, make_header
from email.message import Message
from email.utils import parseaddr
from typing import Protocol

from pipeline import tracing
from pipeline.logs import mask_email
from reactions.welcome_email.settings import EmailSettings, SmtpConfig

logger = logging.getLogger(__name__)


class EmailBackend(Protocol):
    """Delivers one message or raises."""

    async def send(self, message: Message) -> None:
        """Deliver ``message``; return once the server (or the log) accepted it."""
        ...


class ConsoleEmailBackend:
    """Logs each message instead of sending it: the default when ``SMTP_URL`` is unset."""

    async def send(self, message: Message) -> None:
        # Addresses are masked at INFO; the whole message, address included, is at DEBUG.
        _, address = parseaddr(str(message["To"]))
        logger.info(
            "email to %s, subject %r (console backend, not sent)",
            mask_email(address),
            str(make_header(decode_header(str(message["Subject"])))),
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("the email to %s:\n%s", message["To"], _plain_text(message))


class SmtpEmailBackend:
    """Sends over SMTP: plain, STARTTLS (required) or implicit TLS, as ``SMTP_URL`` says."""

    def __init__(self, config: SmtpConfig, timeout: float, ca_file: str | None = None) -> None:
        import aiosmtplib  # noqa: F401  (a missing package fails here, at start-up)

        self._config = config
        self._timeout = timeout
        self._ca_file = ca_file
        self._span = {
            "network.protocol.name": "smtp",
            "server.address": config.host,
            "server.port": config.port,
        }

    async def send(self, message: Message) -> None:
        with tracing.span("smtp send", self._span):
            await self._send(message)

    async def _send(self, message: Message) -> None:
        import aiosmtplib  # imported once, by __init__; this is a dictionary look-up

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


def email_backend(settings: EmailSettings) -> EmailBackend:
    """The backend the settings ask for."""
    if settings.smtp is None:
        return ConsoleEmailBackend()
    return SmtpEmailBackend(settings.smtp, settings.smtp_timeout, settings.smtp_ca_file)


def _plain_text(message: Message) -> str:
    """The text/plain part, decoded (for the console backend's log line)."""
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
    return ""
