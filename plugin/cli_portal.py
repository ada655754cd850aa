"""`consentry invite` (issue #9): a signed, single-use consent link for one person.

The link is printed for the admin to copy; with `--email` it is also sent through the SMTP
server in `[mail]` (the address is used once and not stored).
"""

from __future__ import annotations

from typing import Annotated

import typer

from plugin import invitations
from plugin.cli import _guard, app, console, fail, open_app
from plugin.mailer import Mailer


@app.command("invite")
def invite(
    subject: Annotated[str, typer.Argument(help="subject id or exact name")],
    channels: Annotated[str | None, typer.Option(
        help="publication channels to ask for (comma-separated, or 'all') [default: all]")
    ] = None,
    biometric: Annotated[bool, typer.Option(
        "--biometric/--no-biometric", help="also ask for biometric consent and a selfie")
    ] = True,
    days: Annotated[int | None, typer.Option(
        help="duration of the consent asked, days [default: portal.consent_days]")] = None,
    guardian: Annotated[bool, typer.Option(
        help="a guardian signs (always so for a minor)")] = False,
    lang: Annotated[str, typer.Option(help="en | nl")] = "en",
    email: Annotated[str | None, typer.Option(help="send the link to this address")] = None,
) -> None:
    """Create a consent invitation: a signed link that expires and works once."""
    with _guard(), open_app() as a:
        target = a.state.resolve_subject(subject)
        vocab = tuple(a.settings.policy.channels)
        chosen = vocab if channels in (None, "all") else tuple(
            c.strip() for c in (channels or "").split(",") if c.strip())
        created = invitations.create_invitation(
            a, target, channels=chosen, biometric=biometric, valid_days=days,
            guardian=guardian, lang=lang, created_by="cli")
        if email:
            mailer = Mailer(a.settings.mail)
            if not mailer.configured:
                raise fail("--email needs [mail] host and from in the settings file; the link "
                           f"was created anyway: {created.url}")
            created = invitations.send_invitation(a, mailer, created, to=email)
        inv = created.invitation
        console.print(created.url, soft_wrap=True, highlight=False)
        console.print(f"expires {inv.expires_at:%Y-%m-%d %H:%M} UTC; works once"
                      + ("; a guardian signs" if inv.guardian else "")
                      + ("; sent by e-mail" if created.mailed else ""), highlight=False)
        if not created.url.startswith("http"):
            console.print("set console.public_url to print a full link", style="yellow")
