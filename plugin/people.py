"""Administering people: subjects, their consents, and enrollment of reference photos.

Each operation checks what GDPR requires before it touches biometric data (no template
without an active biometric grant) and leaves one audit entry naming the subject by id only.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from plugin.audit import AuditLog
from plugin.consent import has_active_biometric, is_minor
from plugin.engine import FaceEngine
from plugin.errors import ConsentError, EnrollmentError, ImageError
from plugin.imaging import decode
from plugin.models import Consent, GrantKind, Subject
from plugin.state import StateStore
from plugin.vault import Vault

log = logging.getLogger(__name__)


def document_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_subject(state: StateStore, audit: AuditLog, subject: Subject, *,
                actor: str = "admin") -> Subject:
    state.add_subject(subject)
    audit.append("subject.added", subject_id=subject.id, actor=actor,
                 details={"minor": subject.minor})
    return subject


def add_consent(state: StateStore, audit: AuditLog, consent: Consent, *,
                actor: str = "admin") -> Consent:
    subject = state.subject(consent.subject_id)
    if subject is None:
        raise ConsentError("no such subject")
    if is_minor(subject, consent.signed_at) and not consent.guardian:
        raise ConsentError("the subject is a minor: the consent must be signed by a guardian "
                           "(--guardian --signed-by NAME)")
    state.add_consent(consent)
    audit.append("consent.added", subject_id=consent.subject_id, actor=actor, details={
        "consent_id": str(consent.id),
        "grants": [{"kind": g.kind.value, "channels": list(g.channels),
                    "valid_from": g.valid_from.isoformat(),
                    "valid_until": g.valid_until.isoformat() if g.valid_until else None}
                   for g in consent.grants],
    })
    return consent


def withdraw_consent(state: StateStore, vault: Vault, audit: AuditLog, consent: Consent, *,
                     at: datetime, now: datetime,
                     kinds: Sequence[GrantKind] | None = None, actor: str = "admin") -> bool:
    """Withdraw grants; destroy templates when no biometric grant stays active.

    Returns True when the subject's templates were destroyed.
    """
    state.withdraw(consent.id, at, kinds)
    audit.append("consent.withdrawn", subject_id=consent.subject_id, actor=actor, details={
        "consent_id": str(consent.id),
        "kinds": [k.value for k in (kinds or GrantKind)],
        "at": at.isoformat(),
    })
    remaining = state.consents(consent.subject_id)
    if has_active_biometric(remaining, max(at, now)):
        return False
    destroyed = vault.erase(consent.subject_id)
    audit.append("templates.destroyed", subject_id=consent.subject_id,
                 details={"reason": "no active biometric grant", "templates": destroyed})
    return True


@dataclass(frozen=True, slots=True)
class EnrollResult:
    subject_id: uuid.UUID
    added: int
    total: int
    marked_for_analysis: int


def enroll(state: StateStore, vault: Vault, audit: AuditLog, engine: FaceEngine,
           subject: Subject, photos: Sequence[Path], *, now: datetime,
           decode_options: dict | None = None, actor: str = "admin") -> EnrollResult:
    """Store templates from reference photos, each holding exactly one face.

    All photos are checked before any template is stored: a refused photo stores nothing.
    """
    if not has_active_biometric(state.consents(subject.id), now):
        raise ConsentError(
            "refused: the subject has no active biometric consent, so no face template may be "
            "stored (record one with `consentry consents add ... --biometric`)"
        )
    vectors = []
    for photo in photos:
        try:
            image = decode(photo, **(decode_options or {}))
        except ImageError as err:
            raise EnrollmentError(f"{photo}: {err.cause}") from err
        faces = engine.detect(image)
        if len(faces) != 1:
            raise EnrollmentError(
                f"{photo}: a reference photo must show exactly one face; found {len(faces)}"
            )
        vectors.append(engine.encode(image, faces))
    total = vault.add_templates(subject.id, np.concatenate(vectors))
    # A new name can appear only where a face is still unknown or uncertain.
    marked = state.mark_for_analysis(state.assets_with_open_faces())
    audit.append("subject.enrolled", subject_id=subject.id, actor=actor,
                 details={"templates_added": len(vectors), "templates_total": total,
                          "assets_marked": marked})
    return EnrollResult(subject.id, len(vectors), total, marked)
