"""Expiry alerts: the sweep tells the admin, once per consent, what runs out soon.

A consent is "due" when one of its grants is active now and ends within `portal.alert_days`
(the same rule as `consentry consents expiring`, plugin/sweep.expiring). Each due consent gets
one row in `expiry_alerts` the first time it is reported, so a daily sweep mails it once; the
console's dashboard lists every due consent with the date it was reported.

The e-mail carries ids, grants, end dates and photo counts, never a name: mail passes through
servers Consentry does not control, and the admin sees the names after logging in to the
console (the link is in the message). When the mail server fails, nothing is recorded and the
next sweep tries again; when mail is off, the dashboard is the only channel.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from plugin.mailer import Mailer, MailError
from plugin.models import GrantKind
from plugin.sweep import Expiring, expiring

log = logging.getLogger(__name__)

_metadata = sa.MetaData()
expiry_alerts = sa.Table(
    "expiry_alerts",
    _metadata,
    sa.Column("consent_id", sa.String(36), primary_key=True),
    sa.Column("sent_at", sa.String(32), nullable=False),
    sa.Column("ends_at", sa.String(32)),
    sa.Column("mailed", sa.Boolean, nullable=False),
)


@dataclass(frozen=True, slots=True)
class DueConsent:
    """One consent with grants ending soon, as the dashboard lists it."""

    consent_id: uuid.UUID
    subject_id: uuid.UUID
    grants: tuple[tuple[GrantKind, tuple[str, ...], datetime], ...]  # kind, channels, ends
    ends: datetime                                                   # the earliest of them
    assets: int
    alerted_at: datetime | None = None
    mailed: bool = False


@dataclass(frozen=True, slots=True)
class AlertRun:
    new: tuple[DueConsent, ...]
    mailed: bool
    error: str | None = None


def _group(items: Sequence[Expiring]) -> list[DueConsent]:
    by_consent: dict[uuid.UUID, list[Expiring]] = {}
    for e in items:
        by_consent.setdefault(e.consent.id, []).append(e)
    due = [
        DueConsent(
            consent_id=cid, subject_id=es[0].consent.subject_id,
            grants=tuple((e.grant.kind, e.grant.channels, e.ends) for e in es),
            ends=min(e.ends for e in es), assets=es[0].assets,
        )
        for cid, es in by_consent.items()
    ]
    return sorted(due, key=lambda d: d.ends)


def _recorded(state) -> dict[str, sa.Row]:
    with state.engine.connect() as conn:
        return {r.consent_id: r for r in conn.execute(expiry_alerts.select())}


def due(state, *, now: datetime, days: int) -> list[DueConsent]:
    """Every consent with a grant ending within `days`, with when it was reported (dashboard)."""
    seen = _recorded(state)
    out = []
    for d in _group(expiring(state, now=now, days=days)):
        row = seen.get(str(d.consent_id))
        if row is not None:
            d = DueConsent(d.consent_id, d.subject_id, d.grants, d.ends, d.assets,
                           alerted_at=datetime.fromisoformat(row.sent_at),
                           mailed=bool(row.mailed))
        out.append(d)
    return out


class ExpiryAlerts:
    """What the sweep calls: report each newly due consent once (mail + dashboard)."""

    def __init__(self, state, audit, mailer: Mailer | None, *, days: int,
                 to: Sequence[str] = (), console_url: str = "") -> None:
        self.state, self.audit, self.mailer = state, audit, mailer
        self.days, self.to, self.console_url = days, tuple(to), console_url

    @classmethod
    def from_app(cls, a) -> ExpiryAlerts:
        s = a.settings
        console = getattr(s, "console", None)
        return cls(a.state, a.audit, Mailer(s.mail), days=s.portal.alert_days,
                   to=s.mail.alerts_to, console_url=getattr(console, "public_url", "") or "")

    @property
    def can_mail(self) -> bool:
        return bool(self.mailer is not None and self.mailer.configured and self.to)

    def run(self, now: datetime) -> AlertRun:
        new = tuple(d for d in due(self.state, now=now, days=self.days) if d.alerted_at is None)
        if not new:
            return AlertRun((), mailed=False)
        mailed, error = False, None
        if self.can_mail:
            assert self.mailer is not None
            try:
                self.mailer.send(self.to, self.subject(new), self.body(new, now))
                mailed = True
            except MailError as err:
                # Not recorded: the next sweep tries again.
                log.warning("expiry alert not sent: %s", err)
                return AlertRun((), mailed=False, error=str(err))
        with self.state.begin() as conn:
            for d in new:
                conn.execute(expiry_alerts.insert().values(
                    consent_id=str(d.consent_id), sent_at=now.astimezone(UTC).isoformat(),
                    ends_at=d.ends.astimezone(UTC).isoformat(), mailed=mailed))
        self.audit.append("consents.expiry_alert", at=now, details={
            "consent_ids": [str(d.consent_id) for d in new], "mailed": mailed,
            "days": self.days})
        return AlertRun(new, mailed=mailed, error=error)

    def subject(self, new: Sequence[DueConsent]) -> str:
        return f"Consentry: {len(new)} consent(s) expire within {self.days} days"

    def body(self, new: Sequence[DueConsent], now: datetime) -> str:
        lines = [
            f"These consents have a grant that ends within {self.days} days "
            f"(checked {now.astimezone(UTC):%Y-%m-%d %H:%M} UTC).",
            "Names are not sent by e-mail; open the console to see who it is and to send a",
            "renewal invitation (or run `consentry consents expiring`).",
            "",
        ]
        for d in new:
            grants = "; ".join(
                f"{kind.value}{' (' + ','.join(ch) + ')' if ch else ''} ends {ends:%Y-%m-%d}"
                for kind, ch, ends in d.grants)
            lines.append(f"- consent {d.consent_id}: {grants}; identified in {d.assets} "
                         f"photo(s)")
        if self.console_url:
            lines += ["", f"Console: {self.console_url.rstrip('/')}/"]
        lines += ["", "You get this message once per consent."]
        return "\n".join(lines) + "\n"
