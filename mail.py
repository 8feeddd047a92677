"""Mail as it goes out: a message built with the standard library's `email` package, and sent over
SMTP with aiosmtplib where MAIL_URL says (`smtp://`, `smtp+starttls://`, `smtps://`), or written
to the log (`log:`, the default, for development: tokens included)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from urllib.parse import unquote, urlsplit

import aiosmtplib

logger = logging.getLogger("users.mail")

SMTP_TIMEOUT = 30.0  # seconds for any one SMTP command: well within MAIL_CLAIM_LEASE
SCHEMES = {"smtp": (False, False), "smtp+starttls": (False, True), "smtps": (True, False)}  # (TLS first, STARTTLS)


@dataclass(frozen=True)
class Transport:
    """Where mail goes: the log, or an SMTP server (with its TLS and credentials)."""

    host: str | None = None  # None: the log
    port: int = 25
    tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Transport:
        """MAIL_URL, parsed; a ValueError that names the setting, never its value (it may hold a password)."""
        if url == "log:":
            return cls()
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError("MAIL_URL must be log:, or smtp://, smtp+starttls:// or smtps:// with a host")
        tls, starttls = SCHEMES[parts.scheme]
        try:
            port = parts.port or (465 if tls else 587 if starttls else 25)
        except ValueError:
            raise ValueError("MAIL_URL has a port that is not a number") from None
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, tls, starttls, username, password)

    @property
    def logs(self) -> bool:
        return self.host is None


def new_message_id(sender: str) -> str:
    """A Message-ID on the sender's domain: the same on every try, so that a mail sent twice (an
    answer lost after DATA) is recognisably one."""
    return make_msgid(domain=sender.rpartition("@")[2] or "localhost")


def build(message_id: str, sender: str, recipient: str, subject: str, body: str, created: datetime) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = format_datetime(created)
    message["Message-ID"] = message_id
    message.set_content(body)  # text/plain, UTF-8
    return message


def permanent(error: Exception) -> bool:
    """A refusal that another try would meet again (a 5xx reply to the message or its recipient):
    the message fails at once. A refused login is the operator's to fix, and worth retrying."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        return all(refused.code >= 500 for refused in error.recipients)
    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        return False
    return isinstance(error, aiosmtplib.SMTPResponseException) and error.code >= 500


async def deliver(transport: Transport, messages: list[EmailMessage]) -> list[Exception | None]:
    """Send the messages over one connection, in order: for each, None if sent, or why not. A
    connection that fails leaves the rest unsent, with its error."""
    if transport.logs:
        for message in messages:
            text = message.get_content()  # decoded: a link in it reads as it would in a mail reader
            logger.info("mail (MAIL_URL is log:, not delivered) to %s: %s\n%s", message["To"], message["Subject"], text)
        return [None] * len(messages)
    smtp = aiosmtplib.SMTP(
        hostname=transport.host, port=transport.port, use_tls=transport.tls, start_tls=transport.starttls,
        username=transport.username, password=transport.password, timeout=SMTP_TIMEOUT,
    )  # fmt: skip
    outcomes: list[Exception | None] = []
    try:
        await smtp.connect()
        for message in messages:
            try:
                await smtp.send_message(message)
                outcomes.append(None)
            except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as error:
                outcomes.append(error)  # this message: the connection goes on
    except (aiosmtplib.SMTPException, OSError) as error:
        outcomes += [error] * (len(messages) - len(outcomes))
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
    return outcomes
