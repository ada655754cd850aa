"""Outgoing mail through the SMTP server in `[mail]`: invitation links and expiry alerts.

One small class around `smtplib`, so the rest of Consentry never talks SMTP. The password comes
from the environment variable that `mail.password_env` names, never from the settings file.
An empty `mail.host` switches mail off: the console then shows links to copy instead.

SMTP failures become `MailError` (a `ConsentryError`, so the CLI turns it into a clear message);
a message never names the recipient in a log line (an address is personal data).
"""

from __future__ import annotations

import logging
import os
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from email.utils import make_msgid

from plugin.errors import ConsentryError
from plugin.settings import MailSettings

log = logging.getLogger(__name__)


class MailError(ConsentryError):
    """The SMTP server could not be reached or refused the message."""


class Mailer:
    def __init__(self, settings: MailSettings, *, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._env = os.environ if env is None else env

    @property
    def configured(self) -> bool:
        return bool(self.settings.host and self.settings.from_)

    def _password(self) -> str | None:
        name = self.settings.password_env
        if not name:
            return None
        value = self._env.get(name)
        if not value:
            raise MailError(f"mail.password_env names {name}, but that variable is empty")
        return value

    def send(self, to: Sequence[str] | str, subject: str, body: str) -> str:
        """Send one plain-text message; returns its Message-ID. Raises MailError."""
        if not self.configured:
            raise MailError("mail is off: set mail.host and mail.from in the settings file")
        recipients = [to] if isinstance(to, str) else list(to)
        if not recipients:
            raise MailError("no recipient")
        s = self.settings
        message = EmailMessage()
        message["From"] = s.from_
        message["To"] = ", ".join(recipients)
        message["Subject"] = subject
        message["Message-ID"] = make_msgid(domain=s.from_.rpartition("@")[2] or None)
        message.set_content(body)
        try:
            with smtplib.SMTP(s.host, s.port, timeout=s.timeout) as smtp:
                smtp.ehlo()
                if s.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if s.user:
                    smtp.login(s.user, self._password() or "")
                smtp.send_message(message)
        except smtplib.SMTPException as err:
            raise MailError(f"SMTP server {s.host}:{s.port} refused the message: "
                            f"{type(err).__name__}") from err
        except OSError as err:  # includes timeouts
            raise MailError(f"SMTP server {s.host}:{s.port} unreachable: {err}") from err
        log.info("mail sent to %d recipient(s)", len(recipients))
        return message["Message-ID"]
