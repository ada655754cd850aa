"""FakeSmtpServer: a minimal SMTP sink on 127.0.0.1, port 0, in a thread (socketserver).

Speaks enough of RFC 5321 for smtplib: EHLO/HELO, AUTH PLAIN (recorded), MAIL, RCPT, DATA,
RSET, NOOP, QUIT. No STARTTLS: tests set `mail.starttls = false`. Received messages are parsed
with the email package into `messages`. Knob: `refuse` (an SMTP reply such as
"554 5.7.1 rejected" given to DATA instead of accepting).
"""

from __future__ import annotations

import base64
import email
import email.policy
import socketserver
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage


@dataclass
class Received:
    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def body(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        return part.get_content() if part is not None else ""


@dataclass
class _State:
    messages: list[Received] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    refuse: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(socketserver.StreamRequestHandler):
    state: _State

    def reply(self, line: str) -> None:
        self.wfile.write((line + "\r\n").encode())

    def handle(self) -> None:
        self.reply("220 fake-smtp ready")
        sender, recipients = "", []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb == "EHLO":
                self.reply("250-fake-smtp")
                self.reply("250-AUTH PLAIN")
                self.reply("250 8BITMIME")
            elif verb == "HELO":
                self.reply("250 fake-smtp")
            elif verb == "AUTH":
                parts = line.split()
                decoded = base64.b64decode(parts[2]).split(b"\0") if len(parts) > 2 else []
                if len(decoded) == 3:
                    with self.state.lock:
                        self.state.logins.append((decoded[1].decode(), decoded[2].decode()))
                    self.reply("235 2.7.0 accepted")
                else:
                    self.reply("501 5.5.2 need AUTH PLAIN with an initial response")
            elif verb == "MAIL":
                sender, recipients = line.split(":", 1)[1].strip().strip("<>"), []
                self.reply("250 ok")
            elif verb == "RCPT":
                recipients.append(line.split(":", 1)[1].strip().strip("<>"))
                self.reply("250 ok")
            elif verb == "DATA":
                if self.state.refuse:
                    self.reply(self.state.refuse)
                    continue
                self.reply("354 end with <CRLF>.<CRLF>")
                chunks = []
                while True:
                    data = self.rfile.readline()
                    if not data or data in (b".\r\n", b".\n"):
                        break
                    chunks.append(data[1:] if data.startswith(b"..") else data)
                message = email.message_from_bytes(b"".join(chunks), policy=email.policy.default)
                with self.state.lock:
                    self.state.messages.append(Received(sender, recipients, message))
                self.reply("250 ok queued")
            elif verb == "RSET":
                sender, recipients = "", []
                self.reply("250 ok")
            elif verb == "NOOP":
                self.reply("250 ok")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 5.5.2 not implemented")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class FakeSmtpServer:
    def __init__(self) -> None:
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = _Server(("127.0.0.1", 0), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def messages(self) -> list[Received]:
        with self.state.lock:
            return list(self.state.messages)

    @property
    def logins(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.logins)

    def refuse(self, reply: str | None) -> None:
        self.state.refuse = reply

    def __enter__(self) -> FakeSmtpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
