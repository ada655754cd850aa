"""`consentry console`: the web console (admin pages and the data-subject portal).

`consentry console` (or `console serve`) runs it on [console] bind:port, 127.0.0.1 by default:
put a TLS reverse proxy in front (README "Admin console"). `console create-admin` adds an
administrator; the password is prompted for (or read from stdin), never taken as an argument,
so it does not show in the process list or the shell history.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Annotated

import typer

from plugin.cli import _guard, _state, app, console, err_console, fail, open_app

log = logging.getLogger(__name__)

console_app = typer.Typer(help="The web console: admin pages and the data-subject portal.")
app.add_typer(console_app, name="console")


@console_app.callback(invoke_without_command=True)
def _default(ctx: typer.Context) -> None:
    """Without a sub-command: serve."""
    if ctx.invoked_subcommand is None:
        serve(bind=None, port=None)


@console_app.command("serve")
def serve(
    bind: Annotated[str | None, typer.Option(help="address [default: [console] bind]")] = None,
    port: Annotated[int | None, typer.Option(help="port [default: [console] port]")] = None,
) -> None:
    """Run the console until interrupted (Ctrl-C)."""
    import uvicorn

    from plugin.web.app import create_console_app

    with _guard(), open_app() as a:
        cfg = a.settings.console
        host, number = bind or cfg.bind, port or cfg.port
        if not _loopback(host) and not cfg.secure_cookies:
            err_console.print("[yellow]warning:[/yellow] the console listens beyond this "
                              "machine without secure_cookies; serve it through HTTPS only")
        if not _has_admin(a):
            err_console.print("no administrator yet: run `consentry console create-admin NAME`")
        web = create_console_app(a.settings, config_file=_state.config, app=a)
        console.print(f"console on http://{host}:{number}/admin/ (Ctrl-C stops)")
        # Behind the proxy, the client address comes from X-Forwarded-For, trusted only from
        # the proxy on this machine (the login rate limit counts per client address).
        uvicorn.run(web, host=host, port=number, proxy_headers=True,
                    forwarded_allow_ips="127.0.0.1", log_level="warning", access_log=False)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _has_admin(a) -> bool:  # type: ignore[no-untyped-def]
    from plugin.web.accounts import Accounts

    return bool(Accounts(a.state).usernames())


@console_app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Argument(help="login name: 2-64 of a-z 0-9 . _ -")],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="read the password from the first line of stdin")] = False,
    replace: Annotated[bool, typer.Option(
        "--replace", help="set a new password for an existing admin (ends its sessions)")
    ] = False,
) -> None:
    """Add a console administrator (password stored as an argon2id hash only)."""
    from plugin.web.accounts import AccountError, Accounts

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    with _guard(), open_app() as a:
        try:
            Accounts(a.state).create(username, password, replace=replace)
        except AccountError as err:
            raise fail(str(err)) from err
        a.audit.append("console.admin_created" if not replace else "console.admin_password",
                       actor="cli", details={"admin": username.strip().lower()})
    console.print(f"admin {username.strip().lower()} ready")
