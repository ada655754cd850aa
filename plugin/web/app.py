"""The console's ASGI app: admin pages under /admin, the data-subject portal under /p.

One `Console` object (at `request.app.state.console`) owns the opened `App` (key, vault,
state, audit, connectors). The App is not thread-safe (the vault is one sqlite3 connection),
so every use goes through `Console.lock`: handlers call `await in_app(request, fn, ...)`,
which runs `fn(app, ...)` in the thread pool holding the lock, keeping the event loop free.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from plugin.app import App
from plugin.settings import Settings
from plugin.web import i18n, security
from plugin.web.accounts import Accounts

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
T = TypeVar("T")

MAX_UPLOAD = 20 * 1024 * 1024  # a scanned, signed quitclaim; larger is refused


class Console:
    """State shared by all requests of one console process."""

    def __init__(self, settings: Settings, *, config_file: Path, app: App | None = None,
                 app_factory: Callable[[], App] | None = None) -> None:
        self.settings = settings
        self.config_file = config_file
        self.lock = threading.RLock()
        self._owns_app = app is None
        factory = app_factory or (lambda: App(settings, config_file=config_file))
        self.app = app if app is not None else factory()
        self.accounts = Accounts(self.app.state)
        self.limiter = security.LoginLimiter(attempts=settings.console.login_attempts,
                                             window=settings.console.login_window)
        self.max_upload = MAX_UPLOAD
        self.jinja = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(("html", "xml")),
            trim_blocks=True, lstrip_blocks=True,
        )

    @contextmanager
    def using(self) -> Iterator[App]:
        """The App, held exclusively (blocking: call from a worker thread, see `in_app`)."""
        with self.lock:
            yield self.app

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(self.app, *args, **kwargs)

    def close(self) -> None:
        if self._owns_app:
            self.app.close()


def console(request: Request) -> Console:
    return request.app.state.console


async def in_app(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(app, *args, **kwargs)` in the thread pool with the App lock held."""
    return await run_in_threadpool(console(request).call, fn, *args, **kwargs)


# -- rendering ---------------------------------------------------------------------------


def request_lang(request: Request) -> str:
    return i18n.negotiate(request.query_params.get("lang"), request.session.get("lang"),
                          request.headers.get("accept-language"))


def render(request: Request, template: str, context: dict[str, Any] | None = None, *,
           status_code: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """Render a template with the common context: lang, t(), csrf, admin, url_for, request.

    A `?lang=` choice is remembered in the session, so the language switch needs no script.
    """
    lang = request_lang(request)
    if request.query_params.get("lang") in i18n.LANGS:
        request.session["lang"] = lang
    base = {
        "request": request,
        "lang": lang,
        "t": lambda key, **values: i18n.t(lang, key, **values),
        "csrf": security.csrf_token(request),
        "csrf_field": security.CSRF_FIELD,
        "admin": getattr(request.state, "admin", None),
        "url_for": request.url_for,
        "path_with_lang": lambda code: _with_lang(request, code),
        "langs": i18n.LANGS,
        "has_route": lambda name: _has_route(request, name),
        "try_url": lambda name, **params: _try_url(request, name, **params),
    }
    flash = request.session.pop("flash", None)
    if isinstance(flash, list) and flash:
        base["flash"] = i18n.t(lang, flash[0], **(flash[1] if len(flash) > 1 else {}))
    html = console(request).jinja.get_template(template).render({**base, **(context or {})})
    return HTMLResponse(html, status_code=status_code, headers=headers)


def _with_lang(request: Request, code: str) -> str:
    # Keep the other query parameters: a portal page may carry its invitation token there.
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "lang"]
    return f"{request.url.path}?{urlencode([*params, ('lang', code)])}"


def _has_route(request: Request, name: str) -> bool:
    return _try_url(request, name) is not None


def _try_url(request: Request, name: str, **params: Any) -> str | None:
    """The path of a route, or None when it is not mounted (the portal is optional)."""
    try:
        return request.url_for(name, **params).path
    except Exception:  # NoMatchFound, or missing path parameters
        return None


def flash(request: Request, key: str, **values: str | int) -> None:
    """A message for the next page (post/redirect/get); the session is signed, not
    encrypted, so `values` must hold no name: counts and ids only."""
    request.session["flash"] = [key, values]


def redirect(url: str) -> RedirectResponse:
    """303 See Other: the browser follows a POST with a GET (post/redirect/get)."""
    return RedirectResponse(url, status_code=303)


# -- errors ------------------------------------------------------------------------------


async def _login_required(request: Request, exc: Exception) -> Response:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return redirect(f"{request.url_for('admin:login').path}?next={_quote(target)}")


def _quote(value: str) -> str:
    return quote(value, safe="")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    try:
        return render(request, "error.html", {"status": exc.status_code},
                      status_code=exc.status_code, headers=headers)
    except Exception:  # the error page must never fail itself
        log.exception("cannot render the error page")
        return HTMLResponse(str(exc.status_code), status_code=exc.status_code, headers=headers)


# -- the app -----------------------------------------------------------------------------


def portal_routes() -> list[BaseRoute]:
    """The portal's routes (plugin/web/portal.py), when that module exists."""
    try:
        portal = importlib.import_module("plugin.web.portal")
    except ModuleNotFoundError as err:
        if err.name != "plugin.web.portal":
            raise
        return []
    return list(portal.routes)


def create_console_app(settings: Settings, *, config_file: Path, app: App | None = None,
                       secret: str | None = None, portal: bool = True) -> Starlette:
    """Build the console. Pass `app` to reuse an opened App (tests, the service process);
    otherwise one is opened here and closed at shutdown."""
    from plugin.web import admin

    con = Console(settings, config_file=config_file, app=app)
    secret = secret or security.load_secret(settings)

    @asynccontextmanager
    async def lifespan(_app: Starlette):  # type: ignore[no-untyped-def]
        yield
        con.close()

    routes: list[BaseRoute] = [
        Route("/", lambda request: redirect(request.url_for("admin:dashboard").path),
              name="root"),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        Mount("/admin", routes=admin.routes, name="admin"),
    ]
    extra = portal_routes() if portal else []
    if extra:
        routes.append(Mount("/p", routes=extra, name="portal"))
    web = Starlette(
        routes=routes,
        middleware=[
            Middleware(security.SecurityHeaders),
            Middleware(SessionMiddleware, secret_key=secret,
                       session_cookie=security.SESSION_COOKIE,
                       max_age=settings.console.session_hours * 3600,
                       same_site="lax", https_only=settings.console.secure_cookies),
        ],
        exception_handlers={security.LoginRequired: _login_required,
                            HTTPException: _http_error},
        lifespan=lifespan,
    )
    web.state.console = con
    return web
