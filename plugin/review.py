"""The review queue (DESIGN §5): a human decides the faces the matcher was not sure of.

A face is addressed by a stable reference, `<connector>:<asset id>#<index>`, the index being the
face's position in its asset's stored records. A decision rewrites that record only:

- **confirm** sets state `confirmed` and the subject. It needs the subject to hold at least one
  active grant of any kind: a human may name a face of someone with only a publication grant
  (automatic naming never happens without a biometric one), but a person with no active consent
  at all could not be named anyway, so recording it would only store a link without a basis.
- **reject** sets state `rejected` and keeps the rejected subject in `subject_id`, so a rescan
  (`pipeline.carry_decisions`) never proposes that match for that face again.

A face that vouched for other faces of its run (plugin/corroboration.py) takes those names back
when a reviewer rejects it or names someone else: they return to review, with the person they
were given as the candidate.

With `matching.learn_from_review` on, a confirmed face of a person with an active biometric
grant also becomes one more of their templates (plugin/learning.py).

Each decision is one audit entry (subject id, asset, face reference; never a name) in the same
transaction as the change, and the asset is re-labelled at once from its stored face records:
no download, no detection.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from plugin import schema as t
from plugin.errors import ConsentError
from plugin.learning import Learned, learn_confirmed_face
from plugin.models import FaceBox, FaceState, Subject
from plugin.pipeline import AssetResult, Pipeline
from plugin.state import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FaceRef:
    """`<connector>:<asset id>#<index>`; the asset id may itself hold ':' or '#'."""

    connector: str
    asset_id: str
    idx: int

    @classmethod
    def parse(cls, text: str) -> FaceRef:
        head, sep, index = text.rpartition("#")
        connector, colon, asset_id = head.partition(":")
        if not (sep and colon and connector and asset_id and index.isdigit()):
            raise ConsentError(
                f"{text!r} is not a face reference: expected CONNECTOR:ASSET#INDEX "
                "(see `consentry review list`)"
            )
        return cls(connector, asset_id, int(index))

    @property
    def asset(self) -> str:
        return f"{self.connector}:{self.asset_id}"

    def __str__(self) -> str:
        return f"{self.asset}#{self.idx}"


@dataclass(frozen=True, slots=True)
class Candidate:
    id: uuid.UUID
    name: str


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """One face waiting for a human: box in displayed pixels, css order (top, right, bottom,
    left); `distance` to the nearest candidate (Euclidean, face-encoding space)."""

    ref: FaceRef
    asset_name: str
    box: FaceBox
    state: FaceState
    distance: float | None
    candidates: tuple[Candidate, ...]
    vouched_by: str | None = None  # named by corroboration: the face that vouched

    def as_json(self) -> dict[str, object]:
        return {
            "face": str(self.ref),
            "connector": self.ref.connector,
            "asset_id": self.ref.asset_id,
            "index": self.ref.idx,
            "asset": self.asset_name,
            "state": self.state.value,
            "box": {"top": self.box.top, "right": self.box.right,
                    "bottom": self.box.bottom, "left": self.box.left},
            "distance": self.distance,
            "candidates": [{"id": str(c.id), "name": c.name} for c in self.candidates],
            "vouched_by": self.vouched_by,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    ref: FaceRef
    state: FaceState
    subject_id: uuid.UUID
    previous_state: FaceState
    relabel: AssetResult | None
    learned: Learned | None = None  # confirm with learning on: what happened to the template


def queue(state: StateStore, *, include_unknown: bool = False,
          include_vouched: bool = False) -> list[ReviewItem]:
    """Uncertain faces (and, on request, unknown ones and those named by same-run
    corroboration, with the name as their candidate), in asset and face order.

    Candidates that no longer exist as subjects (erased) are left out.
    """
    wanted = [FaceState.UNCERTAIN.value]
    if include_unknown:
        wanted.append(FaceState.UNKNOWN.value)
    f, a = t.faces, t.assets
    which = f.c.state.in_(wanted)
    if include_vouched:
        which = sa.or_(which, sa.and_(f.c.state == FaceState.AUTO.value,
                                      f.c.vouched_by.is_not(None)))
    query = (
        sa.select(f, a.c.name.label("asset_name"))
        .join(a, sa.and_(a.c.connector == f.c.connector, a.c.asset_id == f.c.asset_id))
        .where(which)
        .order_by(f.c.connector, f.c.asset_id, f.c.idx)
    )
    names = {s.id: s.display_name for s in state.subjects()}
    with state.engine.connect() as conn:
        rows = conn.execute(query).all()
    items = []
    for r in rows:
        proposed = [r.subject_id] if r.vouched_by and r.subject_id else r.candidates or ()
        candidates = tuple(
            Candidate(cid, names[cid])
            for cid in (uuid.UUID(c) for c in proposed)
            if cid in names
        )
        items.append(ReviewItem(
            ref=FaceRef(r.connector, r.asset_id, r.idx), asset_name=r.asset_name,
            box=FaceBox(top=r.top, right=r.right, bottom=r.bottom, left=r.left),
            state=FaceState(r.state), distance=r.distance, candidates=candidates,
            vouched_by=r.vouched_by,
        ))
    return items


def confirm(pipeline: Pipeline, ref: FaceRef, subject: Subject, *,
            actor: str = "admin", learn: bool = False) -> Decision:
    """Name the face as `subject` (any active grant suffices) and re-label its asset; with
    `learn`, also keep the face as a template of the subject (plugin/learning.py)."""
    now = pipeline.clock()
    if not _any_grant_active(pipeline.state, subject.id, now):
        raise ConsentError(
            f"refused: subject {subject.id} has no active consent (biometric or publication), "
            "so the face could not carry the name; record a consent first "
            "(`consentry consents add`)"
        )
    decision = _decide(pipeline, ref, FaceState.CONFIRMED, subject.id,
                       reason="review confirmed", actor=actor)
    if not learn:
        return decision
    row = _face_row(pipeline.state, ref)
    learned = learn_confirmed_face(
        pipeline, ref.connector, ref.asset_id,
        FaceBox(top=row.top, right=row.right, bottom=row.bottom, left=row.left), subject,
        actor=actor)
    return dataclasses.replace(decision, learned=learned)


def reject(pipeline: Pipeline, ref: FaceRef, subject: Subject | None = None, *,
           actor: str = "admin") -> Decision:
    """Record that the face is not `subject` (default: its proposed subject or first
    candidate); rescans never propose that match for the face again."""
    row = _face_row(pipeline.state, ref)
    named = row.state in (FaceState.AUTO.value, FaceState.CONFIRMED.value)
    if subject is not None:
        if named and row.subject_id != str(subject.id):
            # Rejecting someone else would silently drop the face's current match.
            raise ConsentError(
                f"{ref} is matched to subject {row.subject_id}, not the one given: reject "
                "that match (omit SUBJECT) or confirm the right subject"
            )
        rejected = subject.id
    else:
        proposed = [row.subject_id] if row.subject_id else list(row.candidates or ())
        if not proposed:
            raise ConsentError(
                f"{ref} has no proposed subject to reject: name the subject "
                "(`consentry review reject FACE SUBJECT`)"
            )
        rejected = uuid.UUID(proposed[0])
    return _decide(pipeline, ref, FaceState.REJECTED, rejected, reason="review rejected",
                   actor=actor)


def _decide(pipeline: Pipeline, ref: FaceRef, new_state: FaceState, subject_id: uuid.UUID,
            *, reason: str, actor: str) -> Decision:
    state, audit = pipeline.state, pipeline.audit
    with state.begin() as conn:
        row = _face_row(state, ref, conn=conn)
        conn.execute(
            t.faces.update().where(*_where(ref))
            .values(state=new_state.value, subject_id=str(subject_id), candidates=[],
                    vouched_by=None)
        )
        audit.append(
            f"review.{new_state.value}", actor=actor, subject_id=subject_id, asset=ref.asset,
            details={"face": str(ref), "previous_state": row.state,
                     "previous_subject_id": row.subject_id},
            conn=conn,
        )
        withdrawn = []
        if new_state == FaceState.REJECTED or row.subject_id != str(subject_id):
            withdrawn = _withdraw_vouches(ref, conn, audit, actor=actor)
    audit.sync_head()
    log.info("review: %s %s", new_state.value, ref)
    if withdrawn:
        log.info("review: %d name(s) vouched for by %s back to review", len(withdrawn), ref)
    assets = [(ref.connector, ref.asset_id)]
    assets += sorted({(v.connector, v.asset_id) for v in withdrawn} - set(assets))
    results = [r for r in pipeline.reevaluate(assets=assets, reason=reason)
               if (r.ref.connector, r.ref.id) == assets[0]]
    return Decision(ref=ref, state=new_state, subject_id=subject_id,
                    previous_state=FaceState(row.state),
                    relabel=results[0] if results else None)


def _withdraw_vouches(anchor: FaceRef, conn: sa.Connection, audit, *, actor: str
                      ) -> list[FaceRef]:
    """Faces named because `anchor` vouched for them go back to review (same transaction)."""
    f = t.faces
    rows = conn.execute(f.select().where(f.c.vouched_by == str(anchor),
                                         f.c.state == FaceState.AUTO.value)).all()
    refs = []
    for r in rows:
        ref = FaceRef(r.connector, r.asset_id, r.idx)
        conn.execute(f.update().where(*_where(ref)).values(
            state=FaceState.UNCERTAIN.value, subject_id=None,
            candidates=[r.subject_id] if r.subject_id else [], vouched_by=None))
        audit.append("face.vouch_withdrawn", actor=actor,
                     subject_id=uuid.UUID(r.subject_id) if r.subject_id else None,
                     asset=ref.asset, details={"face": str(ref), "vouched_by": str(anchor)},
                     conn=conn)
        refs.append(ref)
    return refs


def _where(ref: FaceRef) -> tuple[sa.ColumnElement[bool], ...]:
    return (t.faces.c.connector == ref.connector, t.faces.c.asset_id == ref.asset_id,
            t.faces.c.idx == ref.idx)


def _face_row(state: StateStore, ref: FaceRef, *, conn: sa.Connection | None = None) -> sa.Row:
    query = t.faces.select().where(*_where(ref))
    if conn is not None:
        row = conn.execute(query).first()
    else:
        with state.engine.connect() as own:
            row = own.execute(query).first()
    if row is None:
        raise ConsentError(f"no face {ref} (see `consentry review list`)")
    return row


def _any_grant_active(state: StateStore, subject_id: uuid.UUID, now: datetime) -> bool:
    return any(g.active_at(now) for c in state.consents(subject_id) for g in c.grants)
