"""Time-driven consent changes: the daily sweep and the list of consents about to expire.

A grant's active state changes with time alone (it starts, it runs out) or with a withdrawal.
`sweep` finds the subjects whose grants changed state since the last sweep, destroys templates
that lost their last active biometric grant, and re-labels only those subjects' photos from the
stored face records — never a download, never a detection. Safe to run from cron or the
service: a second run with nothing new changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa

from plugin import schema as t
from plugin.consent import has_active_biometric
from plugin.models import Consent, FaceState, Grant
from plugin.pipeline import AssetResult, Pipeline
from plugin.state import StateStore

if TYPE_CHECKING:
    from plugin.alerts import ExpiryAlerts

log = logging.getLogger(__name__)

LAST_SWEEP = "sweep.last"


@dataclass(frozen=True, slots=True)
class SweepResult:
    since: datetime | None
    now: datetime
    subjects_changed: tuple[uuid.UUID, ...]
    templates_destroyed: tuple[uuid.UUID, ...]
    results: tuple[AssetResult, ...]
    alerts_sent: int = 0


def changed_subjects(consents: dict[uuid.UUID, list[Consent]], since: datetime | None,
                     now: datetime) -> list[uuid.UUID]:
    """Subjects with a grant whose active state differs between `since` and `now`."""
    changed = []
    for sid, items in consents.items():
        grants = [g for c in items for g in c.grants]
        if since is None or any(g.active_at(since) != g.active_at(now) for g in grants):
            changed.append(sid)
    return changed


def sweep(pipeline: Pipeline, *, alerts: ExpiryAlerts | None = None) -> SweepResult:
    """`alerts` (plugin/alerts.py): report consents expiring soon, once each, to the admin."""
    state, vault, audit = pipeline.state, pipeline.vault, pipeline.audit
    now = pipeline.clock()
    raw = state.get_meta(LAST_SWEEP)
    since = datetime.fromisoformat(raw) if raw else None
    consents = state.consents_by_subject()
    destroyed = []
    for sid in vault.subjects():
        if not has_active_biometric(consents.get(sid, []), now):
            count = vault.erase(sid)
            destroyed.append(sid)
            audit.append("templates.destroyed", subject_id=sid, at=now,
                         details={"reason": "no active biometric grant", "templates": count})
    changed = changed_subjects(consents, since, now)
    results = pipeline.reevaluate(subject_ids=changed, reason="sweep") if changed else []
    state.set_meta(LAST_SWEEP, now.isoformat())
    audit.append("sweep", at=now, details={
        "since": since.isoformat() if since else None,
        "subjects_changed": len(changed),
        "templates_destroyed": len(destroyed),
        "assets_relabelled": sum(1 for r in results if r.outcome == "processed"),
    })
    sent = len(alerts.run(now).new) if alerts is not None else 0
    return SweepResult(since, now, tuple(changed), tuple(destroyed), tuple(results), sent)


@dataclass(frozen=True, slots=True)
class Expiring:
    consent: Consent
    grant: Grant
    ends: datetime
    assets: int


def assets_per_subject(state: StateStore, subject_ids: Sequence[uuid.UUID]) -> dict[str, int]:
    """Number of assets where each subject is identified (auto or confirmed)."""
    if not subject_ids:
        return {}
    faces = t.faces
    query = (
        sa.select(faces.c.subject_id,
                  sa.func.count(sa.distinct(faces.c.connector + "\x1f" + faces.c.asset_id)))
        .where(faces.c.subject_id.in_([str(s) for s in subject_ids]))
        .where(faces.c.state.in_([FaceState.AUTO.value, FaceState.CONFIRMED.value]))
        .group_by(faces.c.subject_id)
    )
    with state.engine.connect() as conn:
        return {row[0]: row[1] for row in conn.execute(query)}


def expiring(state: StateStore, *, now: datetime, days: int) -> list[Expiring]:
    """Grants active now whose validity ends within `days` days, soonest first."""
    horizon = now + timedelta(days=days)
    found = [
        (c, g) for c in state.consents() for g in c.grants
        if g.active_at(now) and g.valid_until is not None and g.valid_until <= horizon
    ]
    counts = assets_per_subject(state, list({c.subject_id for c, _ in found}))
    items = [Expiring(c, g, g.valid_until, counts.get(str(c.subject_id), 0))
             for c, g in found if g.valid_until is not None]
    return sorted(items, key=lambda e: e.ends)
