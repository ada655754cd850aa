"""What the admin pages do, as plain functions of the opened App (run under the App lock via
`in_app`). Handlers stay about HTTP; everything here is testable without a server.

Every change leaves an audit entry: the library functions (people, review, erasure) write
their own; console-only changes (consent corrections, uploaded documents) are audited here,
with the admin's username as actor and ids, never a name, in the details.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from plugin import people
from plugin import schema as t
from plugin.app import App
from plugin.consent import is_minor, standing
from plugin.errors import ConsentError
from plugin.export import grant_state, identified_assets
from plugin.models import Consent, Grant, GrantKind, Subject
from plugin.sweep import expiring

VAULT_PREFIX = "vault:"  # document_ref of a quitclaim stored encrypted in the vault
# The service's job ledger (migration 0003), read for its counts only.
_jobs = sa.table("jobs", sa.column("status"))


# -- dashboard ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectorSummary:
    name: str
    kind: str
    statuses: dict[str, int]
    assets: int
    last_scan: str | None
    failures: int


def dashboard(app: App) -> dict[str, Any]:
    now = app.pipeline.clock()
    a = t.assets
    with app.state.engine.connect() as conn:
        by_status = conn.execute(
            sa.select(a.c.connector, a.c.status, sa.func.count())
            .group_by(a.c.connector, a.c.status)).all()
        last = dict(conn.execute(
            sa.select(a.c.connector, sa.func.max(a.c.updated_at)).group_by(a.c.connector)).all())
        failed = conn.execute(
            sa.select(a.c.connector, a.c.asset_id, a.c.name, a.c.last_error, a.c.updated_at)
            .where(a.c.last_error.is_not(None)).order_by(a.c.updated_at.desc()).limit(50)).all()
        queue = conn.execute(sa.select(sa.func.count()).select_from(t.faces)
                             .where(t.faces.c.state == "uncertain")).scalar_one()
        jobs = dict(conn.execute(sa.select(_jobs.c.status, sa.func.count())
                                 .group_by(_jobs.c.status)).all())
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    for connector, status, count in by_status:
        statuses[connector][status or "pending"] += count
    fail_count = Counter(row.connector for row in failed)
    kinds = {raw.get("name"): raw.get("kind", "?") for raw in app.settings.connectors}
    names = sorted(set(app.connectors) | set(statuses))
    connectors = [
        ConnectorSummary(name=n, kind=str(kinds.get(n, "?")), statuses=dict(statuses[n]),
                         assets=sum(statuses[n].values()), last_scan=last.get(n),
                         failures=fail_count[n])
        for n in names
    ]
    subjects = {s.id: s.display_name for s in app.state.subjects()}
    soon = [
        {"subject_id": e.consent.subject_id, "name": subjects.get(e.consent.subject_id, "?"),
         "kind": e.grant.kind.value, "channels": e.grant.channels, "ends": e.ends,
         "assets": e.assets}
        for e in expiring(app.state, now=now, days=30)
    ]
    return {"connectors": connectors, "expiring": soon, "review_queue": queue,
            "failures": failed, "jobs": jobs, "now": now}


# -- people ------------------------------------------------------------------------------


def people_list(app: App, query: str = "") -> list[dict[str, Any]]:
    now = app.pipeline.clock()
    needle = query.strip().casefold()
    consents = app.state.consents_by_subject()
    rows = []
    for s in app.state.subjects():
        if needle and needle not in s.display_name.casefold() and not str(s.id).startswith(needle):
            continue
        st = standing(s, consents.get(s.id, []), now)
        rows.append({"subject": s, "any_active": st.any_active,
                     "biometric": st.biometric_active, "minor": st.minor,
                     "consents": len(consents.get(s.id, []))})
    rows.sort(key=lambda r: r["subject"].display_name.casefold())
    return rows


def add_person(app: App, *, display_name: str, birth_date: str, minor: bool,
               actor: str) -> Subject:
    from datetime import date

    name = display_name.strip()
    if not name:
        raise ConsentError("a name is required")
    born = date.fromisoformat(birth_date) if birth_date.strip() else None
    return people.add_subject(app.state, app.audit,
                              Subject(display_name=name[:200], birth_date=born, minor=minor),
                              actor=actor)


def documents_of(app: App, subject_id: uuid.UUID) -> dict[str, dict[str, Any]]:
    lister = getattr(app.vault, "documents", None)
    if lister is None:
        return {}
    return {d["id"]: d for d in lister(subject_id)}


def person(app: App, subject_id: uuid.UUID) -> dict[str, Any] | None:
    subject = app.state.subject(subject_id)
    if subject is None:
        return None
    now = app.pipeline.clock()
    consents = app.state.consents(subject_id)
    st = standing(subject, consents, now)
    docs = documents_of(app, subject_id)
    rows = []
    for c in consents:
        doc_id = c.document_ref[len(VAULT_PREFIX):] if c.document_ref.startswith(
            VAULT_PREFIX) else None
        rows.append({
            "consent": c, "doc_id": doc_id if doc_id in docs else None,
            "grants": [{"grant": g, "state": grant_state(g, now)} for g in c.grants],
            "open": any(g.withdrawn_at is None and grant_state(g, now) != "expired"
                        for g in c.grants),
        })
    return {"subject": subject, "consents": rows, "standing": st,
            "templates": len(app.vault.templates(subject_id)),
            "assets": identified_assets(app.state, subject_id)}


# -- consents ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsentInput:
    """What the consent form posts, already parsed (dates are aware UTC datetimes)."""

    signed_at: datetime | None
    signed_by: str | None
    guardian: bool
    valid_from: datetime | None
    biometric: bool
    biometric_until: datetime | None
    channels: tuple[str, ...]
    publication_until: datetime | None
    document_ref: str | None = None
    document_sha256: str | None = None


def add_consent(app: App, subject_id: uuid.UUID, data: ConsentInput, *, actor: str,
                upload: tuple[bytes, str, str] | None = None) -> Consent:
    """Record a quitclaim; an uploaded document is stored encrypted under the subject's key."""
    subject = app.state.subject(subject_id)
    if subject is None:
        raise ConsentError("no such subject")
    now = app.pipeline.clock()
    start = data.valid_from or now
    grants = []
    if data.biometric:
        grants.append(Grant(kind=GrantKind.BIOMETRIC, valid_from=start,
                            valid_until=data.biometric_until))
    if data.channels:
        unknown = [c for c in data.channels if c not in app.settings.policy.channels]
        if unknown:
            raise ConsentError(f"unknown channel(s): {', '.join(unknown)}")
        grants.append(Grant(kind=GrantKind.PUBLICATION, channels=data.channels,
                            valid_from=start, valid_until=data.publication_until))
    if not grants:
        raise ConsentError("a consent needs a biometric and/or a publication grant")
    if data.guardian and not data.signed_by:
        raise ConsentError("a guardian's signature must name the guardian")
    if upload is not None:
        ref, digest = VAULT_PREFIX, hashlib.sha256(upload[0]).hexdigest()
    else:
        ref = (data.document_ref or "").strip()
        digest = (data.document_sha256 or "").strip().lower()
        if not ref or len(digest) != 64:
            raise ConsentError("upload the signed document, or give its reference and sha256")
    consent = Consent(subject_id=subject_id, document_ref=ref, document_sha256=digest,
                      signed_at=data.signed_at or now, signed_by=data.signed_by or None,
                      guardian=data.guardian, grants=tuple(grants))
    # Every check before the document is stored: a refused consent leaves no document behind.
    if is_minor(subject, consent.signed_at) and not consent.guardian:
        raise ConsentError("the person is a minor: a parent or guardian must sign")
    if upload is not None:
        content, media_type, filename = upload
        put = getattr(app.vault, "put_document", None)
        if put is None:
            raise ConsentError("this installation cannot store documents yet; give a reference")
        doc_id = put(subject_id, content, media_type=media_type, filename=filename)
        app.audit.append("document.stored", actor=actor, subject_id=subject_id,
                         details={"document": doc_id, "sha256": digest, "size": len(content),
                                  "media_type": media_type})
        consent = consent.model_copy(update={"document_ref": VAULT_PREFIX + doc_id})
    people.add_consent(app.state, app.audit, consent, actor=actor)
    apply_change(app, subject_id, reason="consent added")
    return consent


def consent_of(app: App, subject_id: uuid.UUID, consent_id: uuid.UUID) -> Consent | None:
    """The consent, only when it belongs to this subject (URLs carry both)."""
    for c in app.state.consents(subject_id):
        if c.id == consent_id:
            return c
    return None


def edit_consent(app: App, consent: Consent, *, actor: str,
                 ends: dict[GrantKind, datetime | None],
                 channels: tuple[str, ...] | None) -> int:
    """Correct the end dates (and publication channels) of a consent's open grants.

    A correction of what was typed from the signed paper; a new paper is a new consent.
    Returns the number of grants changed.
    """
    changed = []
    with app.state.begin() as conn:
        for g in consent.grants:
            if g.withdrawn_at is not None:
                continue
            values: dict[str, Any] = {}
            if g.kind in ends and ends[g.kind] != g.valid_until:
                end = ends[g.kind]
                if end is not None and end <= g.valid_from:
                    raise ConsentError("an end date must be after the start date")
                values["valid_until"] = end.astimezone(UTC).isoformat() if end else None
            if g.kind is GrantKind.PUBLICATION and channels is not None \
                    and tuple(channels) != g.channels:
                unknown = [c for c in channels if c not in app.settings.policy.channels]
                if unknown or not channels:
                    raise ConsentError("choose at least one known channel")
                values["channels"] = list(channels)
            if values:
                conn.execute(t.grants.update().where(t.grants.c.id == str(g.id)).values(**values))
                changed.append({"grant_id": str(g.id), "kind": g.kind.value, **values})
        if changed:
            app.audit.append("consent.corrected", actor=actor, subject_id=consent.subject_id,
                             details={"consent_id": str(consent.id), "grants": changed},
                             conn=conn)
    app.audit.sync_head()
    if changed:
        apply_change(app, consent.subject_id, reason="consent corrected")
    return len(changed)


def withdraw(app: App, consent: Consent, kinds: list[GrantKind] | None, *, actor: str) -> bool:
    now = app.pipeline.clock()
    destroyed = people.withdraw_consent(app.state, app.vault, app.audit, consent, at=now,
                                        now=now, kinds=kinds, actor=actor)
    apply_change(app, consent.subject_id, reason="consent withdrawn")
    subject = app.state.subject(consent.subject_id)
    if subject and not standing(subject, app.state.consents(subject.id), now).any_active:
        # No grant left: platforms that keep person records drop the name too (as the CLI).
        app.pipeline.forget_on_platforms(subject.id, reason="consent withdrawn")
    return destroyed


def apply_change(app: App, subject_id: uuid.UUID, *, reason: str) -> int:
    """Re-label the subject's analysed photos from stored faces at once (no detection)."""
    return len(app.pipeline.reevaluate(subject_ids=[subject_id], reason=reason))


# -- audit -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditFilter:
    action: str = ""
    subject_id: str = ""
    asset: str = ""
    actor: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def match(self, e: dict[str, Any]) -> bool:
        if self.action and not e["action"].startswith(self.action):
            return False
        if self.subject_id and (e["subject_id"] or "") != self.subject_id:
            return False
        if self.asset and self.asset not in (e["asset"] or ""):
            return False
        if self.actor and e["actor"] != self.actor:
            return False
        return self.until is None or e["at"] < self.until.astimezone(UTC).isoformat(
            timespec="microseconds")


def audit_entries(app: App, flt: AuditFilter, *, limit: int | None = 500) -> list[dict[str, Any]]:
    """Matching entries, newest first (at most `limit`)."""
    found = [e for e in app.audit.entries(since=flt.since) if flt.match(e)]
    found.reverse()
    return found[:limit] if limit else found


def default_since(now: datetime) -> datetime:
    return now - timedelta(days=30)
