"""The consent policy (DESIGN §5), case by case: pure functions, no I/O."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest

from plugin.consent import asset_verdict, has_active_biometric
from plugin.models import (
    DEFAULT_CHANNELS,
    Consent,
    FaceBox,
    FaceRecord,
    FaceState,
    Grant,
    GrantKind,
    ModelRelease,
    Status,
    Subject,
)

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)
DAY = timedelta(days=1)
BOX = FaceBox(top=10, right=60, bottom=60, left=10)
BOX2 = FaceBox(top=10, right=160, bottom=60, left=110)


def grant(kind, *, start=-30, end=None, withdrawn=None, channels=()):
    return Grant(kind=kind, channels=tuple(channels), valid_from=NOW + start * DAY,
                 valid_until=None if end is None else NOW + end * DAY,
                 withdrawn_at=None if withdrawn is None else NOW + withdrawn * DAY)


def bio(**kw):
    return grant(GrantKind.BIOMETRIC, **kw)


def pub(channels=DEFAULT_CHANNELS, **kw):
    return grant(GrantKind.PUBLICATION, channels=channels, **kw)


def person(name="Jane Doe", *grants, **subject_kw):
    subject = Subject(display_name=name, **subject_kw)
    consents = [Consent(subject_id=subject.id, document_ref="q.pdf", document_sha256="0" * 64,
                        signed_at=NOW - 30 * DAY, grants=tuple(grants))] if grants else []
    return subject, consents


def verdict(faces, *people_):
    subjects = {s.id: s for s, _ in people_}
    consents = {s.id: c for s, c in people_}
    return asset_verdict(faces, subjects, consents, NOW)


def face(subject=None, state=FaceState.AUTO, box=BOX):
    return FaceRecord(box=box, state=state, subject_id=subject.id if subject else None)


def test_no_faces_is_not_applicable():
    v = verdict([])
    assert (v.status, v.model_release) == (Status.NO_FACES, ModelRelease.NOT_APPLICABLE)


def test_full_consent_clears_every_channel_and_names():
    jane = person("Jane Doe", bio(end=700), pub(end=700))
    v = verdict([face(jane[0])], jane)
    assert v.status == Status.CLEARED and v.model_release == ModelRelease.UNLIMITED
    assert v.names == ("Jane Doe",) and v.channels == DEFAULT_CHANNELS
    assert v.valid_until == NOW + 700 * DAY
    assert v.consent_ids == (jane[1][0].id,) and v.unidentified == 0


def test_limited_channels():
    jane = person("Jane Doe", bio(), pub(channels=("internal", "intranet")))
    v = verdict([face(jane[0])], jane)
    assert v.status == Status.LIMITED and v.model_release == ModelRelease.LIMITED
    assert v.channels == ("internal", "intranet")


def test_expired_publication_keeps_name_while_biometric_runs():
    jane = person("Jane Doe", bio(end=700), pub(start=-400, end=-10))
    v = verdict([face(jane[0])], jane)
    assert v.status == Status.EXPIRED and v.names == ("Jane Doe",)
    assert v.model_release == ModelRelease.NONE and v.channels == ()


def test_withdrawn_publication():
    jane = person("Jane Doe", bio(), pub(withdrawn=-1))
    assert verdict([face(jane[0])], jane).status == Status.WITHDRAWN


def test_last_publication_grant_decides_between_expired_and_withdrawn():
    jane = person("Jane Doe", bio(), pub(start=-400, end=-200), pub(start=-100, withdrawn=-5))
    assert verdict([face(jane[0])], jane).status == Status.WITHDRAWN
    john = person("John Roe", bio(), pub(start=-400, withdrawn=-200), pub(start=-100, end=-5))
    assert verdict([face(john[0])], john).status == Status.EXPIRED


def test_never_a_publication_grant_is_missing():
    jane = person("Jane Doe", bio())
    v = verdict([face(jane[0])], jane)
    assert v.status == Status.MISSING and v.names == ("Jane Doe",)


def test_not_yet_started_publication_is_missing():
    jane = person("Jane Doe", bio(), pub(start=5))
    assert verdict([face(jane[0])], jane).status == Status.MISSING


def test_name_removed_when_no_grant_is_active():
    jane = person("Jane Doe", bio(withdrawn=-1), pub(withdrawn=-1))
    v = verdict([face(jane[0])], jane)
    assert v.status == Status.WITHDRAWN and v.names == ()
    assert v.faces[0].subject_id is None


def test_erased_subject_face_reads_as_unknown():
    jane = person("Jane Doe", bio(), pub())
    v = verdict([face(jane[0])])  # subject no longer exists
    assert v.status == Status.MISSING and v.names == () and v.unidentified == 1


def test_bystander_without_consent_makes_photo_missing():
    jane = person("Jane Doe", bio(), pub())
    v = verdict([face(jane[0]), face(None, FaceState.UNKNOWN, BOX2)], jane)
    assert v.status == Status.MISSING
    assert v.model_release == ModelRelease.LIMITED  # some, not all faces covered
    assert v.names == ("Jane Doe",) and v.channels == () and v.unidentified == 1


def test_uncertain_face_is_review_without_name():
    v = verdict([face(None, FaceState.UNCERTAIN)])
    assert v.status == Status.REVIEW and v.names == () and v.model_release == ModelRelease.NONE


def test_rejected_face_is_missing():
    jane = person("Jane Doe", bio(), pub())
    v = verdict([face(jane[0], FaceState.REJECTED)], jane)
    assert v.status == Status.MISSING and v.names == ()


def test_confirmed_face_named_with_publication_only():
    laura = person("Laura Bush", pub())
    v = verdict([face(laura[0], FaceState.CONFIRMED)], laura)
    assert v.status == Status.CLEARED and v.names == ("Laura Bush",)


def test_channels_intersect_and_expiry_is_earliest():
    a = person("A", bio(), pub(channels=("internal", "website", "print"), end=100))
    b = person("B", bio(), pub(channels=("internal", "print", "social"), end=50))
    v = verdict([face(a[0]), face(b[0], box=BOX2)], a, b)
    assert v.status == Status.LIMITED and v.channels == ("internal", "print")
    assert v.valid_until == NOW + 50 * DAY


def test_worst_face_wins_in_severity_order():
    order = [Status.WITHDRAWN, Status.EXPIRED, Status.MISSING, Status.REVIEW, Status.LIMITED,
             Status.CLEARED]
    makers = {
        Status.WITHDRAWN: lambda: person("W", bio(), pub(withdrawn=-1)),
        Status.EXPIRED: lambda: person("E", bio(), pub(end=-1)),
        Status.MISSING: lambda: person("M", bio()),
        Status.LIMITED: lambda: person("L", bio(), pub(channels=("internal",))),
        Status.CLEARED: lambda: person("C", bio(), pub()),
    }
    for a, b in itertools.combinations(order, 2):
        faces, people_ = [], []
        for i, status in enumerate((a, b)):
            box = FaceBox(top=0, right=10 + 100 * i + 5, bottom=10, left=100 * i)
            if status == Status.REVIEW:
                faces.append(FaceRecord(box=box, state=FaceState.UNCERTAIN))
            else:
                p = makers[status]()
                people_.append(p)
                faces.append(FaceRecord(box=box, state=FaceState.AUTO, subject_id=p[0].id))
        assert verdict(faces, *people_).status == a, (a, b)


def test_grant_activity_bounds():
    g = bio(start=0, end=10)
    assert g.active_at(NOW) and not g.active_at(NOW - timedelta(seconds=1))
    assert not g.active_at(NOW + 10 * DAY) and g.active_at(NOW + 10 * DAY - timedelta(seconds=1))
    w = bio(start=-1, withdrawn=0)
    assert not w.active_at(NOW)
    assert has_active_biometric(person("x", bio())[1], NOW)
    assert not has_active_biometric(person("x", pub())[1], NOW)


def test_minor_flag_from_birth_date():
    kid = person("Kid", bio(), pub(), birth_date=date(2015, 1, 1))
    assert verdict([face(kid[0])], kid).minor
    adult = person("Adult", bio(), pub(), birth_date=date(1990, 1, 1))
    assert not verdict([face(adult[0])], adult).minor


def test_guardian_consent_must_name_the_guardian():
    with pytest.raises(ValueError, match="guardian"):
        Consent(subject_id=uuid.uuid4(), document_ref="q", document_sha256="0" * 64,
                signed_at=NOW, guardian=True, grants=(pub(),))


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="timezone"):
        Grant(kind=GrantKind.BIOMETRIC, valid_from=datetime(2026, 1, 1))
