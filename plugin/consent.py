"""Consent policy, DESIGN §5: pure functions from face records, consents and a time to a verdict.

No I/O here: the same inputs always give the same verdict, which is what makes re-evaluation
from stored face records (no download, no detection) trustworthy.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from plugin.models import (
    DEFAULT_CHANNELS,
    SEVERITY,
    AssetVerdict,
    Consent,
    FaceRecord,
    FaceState,
    FaceVerdict,
    Grant,
    GrantKind,
    ModelRelease,
    Status,
    Subject,
)

# Bumped whenever a rule below changes: it is part of every asset's processing key.
POLICY_VERSION = "1"

_IDENTIFIED = (FaceState.AUTO, FaceState.CONFIRMED)


@dataclass(frozen=True, slots=True)
class SubjectStanding:
    """What one subject's consents allow at a given time."""

    subject: Subject
    any_active: bool
    biometric_active: bool
    publication: tuple[tuple[Consent, Grant], ...]
    ended_status: Status | None
    minor: bool


def grants_of(consents: Iterable[Consent], kind: GrantKind) -> list[tuple[Consent, Grant]]:
    return [(c, g) for c in consents for g in c.grants if g.kind == kind]


def has_active_biometric(consents: Iterable[Consent], now: datetime) -> bool:
    """Recognition is allowed only while this holds (DESIGN §5 "Recognition")."""
    return any(g.active_at(now) for _, g in grants_of(consents, GrantKind.BIOMETRIC))


def is_minor(subject: Subject, now: datetime) -> bool:
    """Flagged a minor, or under 18 at `now` by birth date."""
    if subject.minor:
        return True
    if subject.birth_date is None:
        return False
    today: date = now.date()
    b = subject.birth_date
    age = today.year - b.year - ((today.month, today.day) < (b.month, b.day))
    return age < 18


def standing(subject: Subject, consents: Sequence[Consent], now: datetime) -> SubjectStanding:
    all_grants = [g for c in consents for g in c.grants]
    publication = grants_of(consents, GrantKind.PUBLICATION)
    active_pub = tuple((c, g) for c, g in publication if g.active_at(now))
    ended_status = None
    if not active_pub:
        # "The last one": the publication grant that ended most recently decides.
        ended = [g for _, g in publication if g.valid_from <= now and (g.end() or now) <= now]
        if ended:
            last = max(ended, key=lambda g: g.end() or now)
            ended_status = Status.WITHDRAWN if last.ended_by_withdrawal() else Status.EXPIRED
    return SubjectStanding(
        subject=subject,
        any_active=any(g.active_at(now) for g in all_grants),
        biometric_active=has_active_biometric(consents, now),
        publication=active_pub,
        ended_status=ended_status,
        minor=is_minor(subject, now),
    )


def face_verdict(
    face: FaceRecord,
    standing_of: Mapping[uuid.UUID, SubjectStanding],
    channels: Sequence[str],
) -> FaceVerdict:
    if face.state == FaceState.UNCERTAIN:
        return FaceVerdict(box=face.box, status=Status.REVIEW)
    st = standing_of.get(face.subject_id) if face.subject_id else None
    if face.state not in _IDENTIFIED or st is None:
        # Unknown, rejected, or a subject that no longer exists (erased).
        return FaceVerdict(box=face.box, status=Status.MISSING)
    name_allowed = st.any_active
    named = {
        "subject_id": st.subject.id if name_allowed else None,
        "name": st.subject.display_name if name_allowed else None,
        "minor": st.minor,
    }
    if not st.publication:
        return FaceVerdict(box=face.box, status=st.ended_status or Status.MISSING, **named)
    covered = {ch for _, g in st.publication for ch in g.channels if ch in channels}
    status = Status.CLEARED if covered >= set(channels) else Status.LIMITED
    ends = [g.end() for _, g in st.publication]
    valid_until = None if any(e is None for e in ends) else max(e for e in ends if e)
    return FaceVerdict(
        box=face.box,
        status=status,
        channels=tuple(ch for ch in channels if ch in covered),
        consent_ids=tuple(sorted({c.id for c, _ in st.publication}, key=str)),
        valid_until=valid_until,
        **named,
    )


def asset_verdict(
    faces: Sequence[FaceRecord],
    subjects: Mapping[uuid.UUID, Subject],
    consents: Mapping[uuid.UUID, Sequence[Consent]],
    now: datetime,
    *,
    channels: Sequence[str] = DEFAULT_CHANNELS,
) -> AssetVerdict:
    """The verdict of one asset at time `now` (DESIGN §5 "Per asset")."""
    if not faces:
        return AssetVerdict(status=Status.NO_FACES, model_release=ModelRelease.NOT_APPLICABLE)
    wanted = {f.subject_id for f in faces if f.subject_id is not None}
    standing_of = {
        sid: standing(subjects[sid], consents.get(sid, ()), now)
        for sid in wanted
        if sid in subjects
    }
    verdicts = tuple(face_verdict(f, standing_of, channels) for f in faces)
    status = min((v.status for v in verdicts), key=SEVERITY.index)
    covered = [v for v in verdicts if v.status in (Status.CLEARED, Status.LIMITED)]
    if len(covered) == len(verdicts):
        common = set(channels)
        for v in covered:
            common &= set(v.channels)
        asset_channels = tuple(ch for ch in channels if ch in common)
    else:
        asset_channels = ()
    ends = [v.valid_until for v in covered if v.valid_until is not None]
    if status == Status.CLEARED:
        release = ModelRelease.UNLIMITED
    elif covered:
        release = ModelRelease.LIMITED
    else:
        release = ModelRelease.NONE
    return AssetVerdict(
        status=status,
        model_release=release,
        channels=asset_channels,
        valid_until=min(ends) if ends else None,
        consent_ids=tuple(sorted({cid for v in verdicts for cid in v.consent_ids}, key=str)),
        faces=verdicts,
        unidentified=sum(
            1 for f in faces
            if f.state not in _IDENTIFIED or f.subject_id not in standing_of
        ),
        minor=any(v.minor for v in verdicts),
    )
