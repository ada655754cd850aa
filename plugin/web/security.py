"""Sessions, CSRF, admin access and login rate limiting for the console and the portal.

Sessions are Starlette's signed cookie (itsdangerous): signed, NOT encrypted, so a session holds
ids and tokens only, never a name or an e-mail address. Cookies are HttpOnly, SameSite=Lax
(an invitation link opened from a mail client must keep an existing session) and Secure when
`[console] secure_cookies` is on.

CSRF: one random token per session (`csrf_token`), rendered as a hidden `csrf` field in every
form and checked on every unsafe request (`check_csrf` / `checked_form`); a missing or wrong
token is a 403. SameSite already stops most cross-site posts; the token covers the rest
(sibling subdomains, old browsers).

Admin access: `admin_only` wraps a handler; a session without a valid admin login is sent to
the login page (GET) or refused with 403 (anything else). A logout ends every session of that
admin (`admin_users.sessions_after`), because a signed cookie cannot be revoked one by one.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plugin.errors import ConfigError
from plugin.settings import Settings

log = logging.getLogger(__name__)

SESSION_COOKIE = "consentry_session"
CSRF_FIELD = "csrf"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRequired(Exception):
    """Raised by `require_admin` on a GET without an admin session: redirect to the login."""


# -- the signing secret ------------------------------------------------------------------


def load_secret(settings: Settings, env: dict[str, str] | None = None) -> str:
    """The session signing secret: from `session_secret_env`, or a generated 0600 file."""
    env = dict(os.environ) if env is None else env
    cfg = settings.console
    if cfg.session_secret_env:
        value = env.get(cfg.session_secret_env, "")
        if len(value) < 32:
            raise ConfigError(
                f"environment variable {cfg.session_secret_env} must hold at least 32 characters",
                key="console.session_secret_env",
            )
        return value
    path = settings.resolve(cfg.secret_file)
    return _secret_file(path)


def _secret_file(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(value + "\n")
    return value


# -- CSRF --------------------------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """This session's CSRF token (created on first use); put it in every form as `csrf`."""
    token = request.session.get(CSRF_FIELD)
    if not token:
        token = secrets.token_urlsafe(32)
        request.session[CSRF_FIELD] = token
    return token


def check_csrf(request: Request, form: FormData | dict[str, Any]) -> None:
    """403 unless the form's `csrf` field equals the session's token."""
    expected = request.session.get(CSRF_FIELD)
    given = form.get(CSRF_FIELD)
    if not expected or not isinstance(given, str) or not hmac.compare_digest(expected, given):
        raise HTTPException(403, "csrf")


async def checked_form(request: Request, *, max_files: int = 4,
                       max_part_size: int = 1024 * 1024) -> FormData:
    """Parse the form of an unsafe request and check its CSRF token (403 otherwise)."""
    form = await request.form(max_files=max_files, max_part_size=max_part_size)
    check_csrf(request, form)
    return form


# -- admin sessions ----------------------------------------------------------------------


def client_ip(request: Request) -> str:
    # Behind the reverse proxy uvicorn's proxy-headers support (trusted 127.0.0.1 only)
    # already put the real client address here.
    return request.client.host if request.client else "-"


def start_admin_session(request: Request, username: str) -> None:
    """Fresh session after a successful login (new CSRF token: no fixation)."""
    lang = request.session.get("lang")
    request.session.clear()
    request.session.update({"admin": username, "login_at": time.time(),
                            CSRF_FIELD: secrets.token_urlsafe(32)})
    if lang:
        request.session["lang"] = lang


def end_session(request: Request) -> None:
    request.session.clear()


def session_admin(request: Request) -> str | None:
    """The admin logged in on this request, after checking lifetime and revocation."""
    username = request.session.get("admin")
    login_at = request.session.get("login_at")
    if not isinstance(username, str) or not isinstance(login_at, (int, float)):
        return None
    console = request.app.state.console
    if time.time() - login_at > console.settings.console.session_hours * 3600:
        return None
    if not console.accounts.session_valid(username, login_at):
        return None
    return username


def require_admin(request: Request) -> str:
    username = session_admin(request)
    if username is None:
        if request.method in _SAFE_METHODS:
            raise LoginRequired()
        raise HTTPException(403, "admin")
    return username


Handler = Callable[[Request], Awaitable[Response]]


def admin_only(handler: Handler) -> Handler:
    """Route decorator: an admin session is required; unsafe methods also need the CSRF token
    (checked here, so a handler cannot forget it; the parsed form is `request.state.form`)."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        request.state.admin = require_admin(request)
        if request.method not in _SAFE_METHODS:
            limit = request.app.state.console.max_upload
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit + 65536:
                raise HTTPException(413)
            request.state.form = await checked_form(request)
        return await handler(request)

    wrapped.admin_only = True  # type: ignore[attr-defined]
    return wrapped


# -- login rate limiting ---------------------------------------------------------------


class LoginLimiter:
    """At most `attempts` failed logins per (IP, username) within `window` seconds.

    In memory: one console process is the deployment; a restart forgets, which is acceptable
    for a guard against online guessing (argon2 makes each guess slow anyway).
    """

    _MAX_KEYS = 10_000

    def __init__(self, *, attempts: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    def retry_after(self, ip: str, username: str) -> int:
        """Seconds until the next attempt is allowed; 0 when allowed now."""
        key = (ip, username.lower())
        with self._lock:
            now = self._clock()
            times = self._recent(key, now)
            if len(times) < self.attempts:
                return 0
            return max(1, int(self.window - (now - times[0])) + 1)

    def failed(self, ip: str, username: str) -> None:
        key = (ip, username.lower())
        with self._lock:
            now = self._clock()
            if len(self._failures) >= self._MAX_KEYS:
                self._failures = {k: v for k, v in self._failures.items()
                                  if v and now - v[-1] < self.window}
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times

    def succeeded(self, ip: str, username: str) -> None:
        with self._lock:
            self._failures.pop((ip, username.lower()), None)


# -- response headers --------------------------------------------------------------------

_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Strict headers on every response: no framing, no inline script/style, nothing cached
    (pages show personal data), no referrer (URLs may carry invitation tokens)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _HEADERS if k not in present]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)
