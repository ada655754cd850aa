"""Login and logout: argon2 check, rate limit per IP+username, audit of both."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugin.web import security
from plugin.web.app import console, in_app, redirect, render


def _safe_next(value: str | None, default: str) -> str:
    # Only a local path: `next` must not become an open redirect.
    if value and value.startswith("/admin") and "//" not in value and "\\" not in value:
        return value
    return default


async def login(request: Request) -> Response:
    if security.session_admin(request):
        return redirect(request.url_for("admin:dashboard").path)
    return render(request, "admin/login.html", {"next": request.query_params.get("next", "")})


async def login_post(request: Request) -> Response:
    form = await security.checked_form(request)
    username = str(form.get("username", "")).strip().lower()[:64]
    password = str(form.get("password", ""))
    con = console(request)
    ip = security.client_ip(request)
    wait = con.limiter.retry_after(ip, username)
    if wait:
        return render(request, "admin/login.html", {"error": "admin.login.limited",
                                                    "next": form.get("next", "")},
                      status_code=429, headers={"Retry-After": str(wait)})
    verified = await in_app(request, lambda _app: con.accounts.verify(username, password))
    if verified is None:
        con.limiter.failed(ip, username)
        await in_app(request, _audit, "console.login_failed", {"ip": ip})
        return render(request, "admin/login.html", {"error": "admin.login.failed",
                                                    "next": form.get("next", "")},
                      status_code=401)
    con.limiter.succeeded(ip, username)
    security.start_admin_session(request, verified)
    await in_app(request, _audit, "console.login", {"ip": ip}, actor=verified)
    default = request.url_for("admin:dashboard").path
    return redirect(_safe_next(str(form.get("next", "")), default))


@security.admin_only
async def logout(request: Request) -> Response:
    admin = request.state.admin
    con = console(request)
    await in_app(request, lambda _app: con.accounts.end_sessions(admin))
    await in_app(request, _audit, "console.logout", {}, actor=admin)
    security.end_session(request)
    return redirect(request.url_for("admin:login").path)


def _audit(app, action: str, details: dict, *, actor: str = "console") -> None:  # type: ignore[no-untyped-def]
    app.audit.append(action, actor=actor, details=details)


routes = [
    Route("/login", login, methods=["GET"], name="login"),
    Route("/login", login_post, methods=["POST"], name="login_post"),
    Route("/logout", logout, methods=["POST"], name="logout"),
]
