"""Templates learned from faces a reviewer confirmed (opt-in: `matching.learn_from_review`).

A face a human confirmed is the best evidence there is of how that person looks in this
library's photos, and the faces left to review are exactly the ones the reference photos did
not cover. With the setting on, the confirmed face's encoding joins the person's templates in
the vault (under the person's own key: erased with them, destroyed when the biometric grant
ends), up to `MAX_TEMPLATES` in all: the matching defaults were calibrated on lfw-dev with 1-3
templates per person (README "Accuracy"; at the shipped point 3 templates name 51 % of a
person's faces against 43 % with 2, with no wrong name in either). Nothing is learned for a
person without an active biometric grant: a reviewer may name them (publication consent), but
no template may exist for them.

The face is analysed again from the platform's file (a template is never kept from a scan:
no vector is stored for a face that was not named), with the scan's own engine and quality
gates; a face the gates send to review is not learned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from plugin.consent import has_active_biometric
from plugin.errors import ConsentryError
from plugin.models import FaceBox, Subject
from plugin.pipeline import Pipeline, preview_scale
from plugin.workers import detect_and_encode

log = logging.getLogger(__name__)

MAX_TEMPLATES = 3
# The confirmed face is found again among the detections by its box.
SAME_FACE_IOU = 0.5
# A face confirmed twice (or a library copy of a reference photo) adds nothing new.
SAME_VECTOR = 1e-3


@dataclass(frozen=True, slots=True)
class Learned:
    stored: bool
    reason: str  # why nothing was stored, or "stored"
    templates: int  # the person's templates afterwards


def learn_confirmed_face(pipeline: Pipeline, connector: str, asset_id: str, box: FaceBox,
                         subject: Subject, *, actor: str = "admin") -> Learned:
    """Store the encoding of the confirmed face at `box` as one more template of `subject`.

    Refusals (no biometric grant, enough templates, face not found again or failing the
    gates, the platform unreachable) store nothing and say why; the confirmation stands.
    """
    state, vault, audit = pipeline.state, pipeline.vault, pipeline.audit
    if not has_active_biometric(state.consents(subject.id), pipeline.clock()):
        return Learned(False, "no active biometric consent: no template may exist", 0)
    current = vault.templates(subject.id)
    held = len(current)
    if held >= MAX_TEMPLATES:
        return Learned(False, f"the person already has {held} templates", held)
    try:
        vector = _encode_face(pipeline, connector, asset_id, box)
    except ConsentryError as err:
        log.warning("learning from %s:%s refused: %s", connector, asset_id, err)
        return Learned(False, f"the photo could not be analysed again: {err}", held)
    if vector is None:
        return Learned(False, "the face was not found again, or fails the quality gates", held)
    if held and float(np.linalg.norm(current - vector, axis=1).min()) < SAME_VECTOR:
        return Learned(False, "this face is already one of the person's templates", held)
    total = vault.add_templates(subject.id, vector[None, :])
    # A new template can name faces that are still unknown or uncertain: analyse them again.
    marked = state.mark_for_analysis(state.assets_with_open_faces())
    audit.append("subject.template_learned", subject_id=subject.id, actor=actor,
                 asset=f"{connector}:{asset_id}",
                 details={"templates_total": total, "assets_marked": marked})
    return Learned(True, "stored", total)


def _encode_face(pipeline: Pipeline, connector: str, asset_id: str, box: FaceBox
                 ) -> np.ndarray | None:
    row = pipeline.state.asset(connector, asset_id)
    source = pipeline.connectors.get(connector)
    if row is None or source is None:
        raise ConsentryError(f"asset {connector}:{asset_id} is not known to this configuration")
    fetched = source.fetch(row.ref, "analysis")
    raw = detect_and_encode(pipeline.engine, fetched.path, asset=row.name,
                            decode_options=pipeline.decode_options)
    to_original = preview_scale(raw.geometry, fetched.original or raw.geometry)
    passing = [d for d, why in zip(raw.detections, raw.gates or (None,) * len(raw.detections),
                                   strict=True) if why is None]
    overlap = [to_original(d.box).iou(box) for d in passing]
    if not overlap or max(overlap) < SAME_FACE_IOU:
        return None
    return np.asarray(raw.vectors[int(np.argmax(overlap))], dtype=np.float32)
