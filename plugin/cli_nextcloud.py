"""`consentry nextcloud …`: platform commands of the Nextcloud connector. Registered on the app
of plugin.cli when this module is imported.
"""

from __future__ import annotations

from typing import Annotated

import typer

from plugin.cli import _guard, app, console, fail, open_app

nextcloud_app = typer.Typer(no_args_is_help=True, help="Nextcloud: webhooks.")
app.add_typer(nextcloud_app, name="nextcloud")


@nextcloud_app.command("register-webhooks")
def register_webhooks(
    url: Annotated[str, typer.Option(help="address Nextcloud calls (Consentry's webhook URL)")],
    connector: Annotated[str | None, typer.Option(
        help="connector name [default: the only nextcloud connector]")] = None,
) -> None:
    """Register the created/written/renamed/deleted file webhooks (idempotent; admin user)."""
    if not url.startswith(("https://", "http://")):
        raise fail("--url must be an http(s) address")
    with _guard(), open_app() as a:
        from connectors.nextcloud import NextcloudConnector

        found = {n: c for n, c in a.connectors.items() if isinstance(c, NextcloudConnector)}
        if connector is not None:
            found = {n: c for n, c in found.items() if n == connector}
        if len(found) != 1:
            raise fail(f"{'no' if not found else 'more than one'} nextcloud connector"
                       f"{f' named {connector!r}' if connector else ''}: use --connector")
        (name, nc), = found.items()
        created, existing = nc.register_webhooks(url)
    console.print(f"{name}: {created} webhook(s) registered, {existing} already present")
