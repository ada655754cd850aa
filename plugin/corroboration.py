"""Same-run corroboration: a face named on strong evidence vouches for the person's other faces.

Why: a person's photos of one event share light, make-up and age, so they sit closer to each
other than to reference photos taken years apart. dlib's model puts the demo's gala photos of
one person 0.43-0.49 from his references but 0.38-0.41 from his portrait in the same library.

The rule (measured on lfw-dev by `benchmarks/corroborate.py`, README "Accuracy"):
- an *anchor* is a face the matcher named (threshold and margin met) at a distance <= `anchor`
  (0.36: below the closest pair of different people on lfw-dev, 0.357, so no lfw-dev run ever
  made a wrong name an anchor);
- a face the matcher left unnamed is named after the run when, with each person's anchors
  counted as extra templates, its nearest person is within `threshold` (0.43) and the runner-up
  is `margin` further; one hop only (a vouched face never vouches for another).

Privacy: anchors are faces of people with an active biometric grant (only their templates reach
the matcher). The vectors of unnamed faces are held in memory until the end of the run, never
written, at most `max_pending` of them; what does not fit simply stays unnamed. Every vouched
face records its anchor, so a reviewer rejecting the anchor takes the vouched names back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plugin.matcher import Matcher
from plugin.models import FaceRecord, FaceState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CorroborationSettings:
    anchor: float = 0.36
    threshold: float = 0.43
    max_anchors_per_subject: int = 32
    max_anchors: int = 20_000
    max_pending: int = 20_000  # 128 float32 each: ~10 MB at most


@dataclass(frozen=True, slots=True)
class Vouched:
    """An unnamed face of `asset` that anchor `anchor` (connector, asset id, face index) names."""

    asset: tuple[str, str]
    idx: int
    subject_id: uuid.UUID
    distance: float
    anchor: tuple[str, str, int]


class RunCorroboration:
    """Collects anchors and unnamed faces during one scan run; `resolve` at its end."""

    def __init__(self, matcher: Matcher, margin: float,
                 settings: CorroborationSettings | None = None) -> None:
        self.matcher = matcher
        self.margin = margin
        self.settings = settings or CorroborationSettings()
        self._column = {sid: i for i, sid in enumerate(matcher.subjects)}
        self._anchors: list[tuple[int, tuple[str, str, int], np.ndarray]] = []
        self._per_subject: dict[int, int] = {}
        self._pending: list[tuple[tuple[str, str], int, np.ndarray]] = []
        self.overflow = 0

    def observe(self, asset: tuple[str, str], faces: Sequence[FaceRecord],
                vectors: dict[int, np.ndarray]) -> None:
        """One analysed asset: its final face records and the vectors of the faces that passed
        the quality gates (by face index). Gated and human-decided faces never take part."""
        s = self.settings
        for idx, face in enumerate(faces):
            vector = vectors.get(idx)
            if vector is None:
                continue
            if face.state == FaceState.AUTO and face.distance is not None \
                    and face.distance <= s.anchor and face.subject_id in self._column:
                col = self._column[face.subject_id]
                if (self._per_subject.get(col, 0) < s.max_anchors_per_subject
                        and len(self._anchors) < s.max_anchors):
                    self._per_subject[col] = self._per_subject.get(col, 0) + 1
                    self._anchors.append((col, (*asset, idx), np.asarray(vector, np.float32)))
            elif face.state in (FaceState.UNCERTAIN, FaceState.UNKNOWN):
                if len(self._pending) < s.max_pending:
                    self._pending.append((asset, idx, np.asarray(vector, np.float32)))
                else:
                    self.overflow += 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def resolve(self) -> list[Vouched]:
        """The unnamed faces the run's anchors name; the buffers are dropped either way."""
        pending, anchors = self._pending, self._anchors
        self._pending, self._anchors, self._per_subject = [], [], {}
        if self.overflow:
            log.info("corroboration: %d unnamed face(s) beyond the buffer were not held",
                     self.overflow)
        if not pending or not anchors:
            return []
        faces = np.stack([v for _, _, v in pending])
        base = self.matcher.subject_distances(faces).astype(np.float64)
        owners = np.array([col for col, _, _ in anchors])
        avecs = np.stack([v for _, _, v in anchors]).astype(np.float64)
        f64 = faces.astype(np.float64)
        to_anchor = np.sqrt(np.maximum(
            (f64 * f64).sum(1)[:, None] + (avecs * avecs).sum(1)[None, :]
            - 2.0 * f64 @ avecs.T, 0.0))
        dist = base.copy()
        nearest_anchor = np.full(base.shape, -1, dtype=np.intp)
        for col in np.unique(owners):
            cols = np.flatnonzero(owners == col)
            best = cols[np.argmin(to_anchor[:, cols], axis=1)]
            d = to_anchor[np.arange(len(faces)), best]
            closer = d < dist[:, col]
            dist[closer, col] = d[closer]
            nearest_anchor[closer, col] = best[closer]
        order = np.argsort(dist, axis=1, kind="stable")
        rows = np.arange(len(faces))
        best_col = order[:, 0]
        best_d = dist[rows, best_col]
        runner = dist[rows, order[:, 1]] if dist.shape[1] > 1 else np.full(len(faces), np.inf)
        vouched = []
        subjects = self.matcher.subjects
        for i in np.flatnonzero((best_d <= self.settings.threshold)
                                & (runner - best_d >= self.margin)):
            a = nearest_anchor[i, best_col[i]]
            if a < 0:  # nearest by a template after all: the matcher's own verdict stands
                continue
            asset, idx, _ = pending[i]
            vouched.append(Vouched(asset, idx, subjects[best_col[i]],
                                   round(float(best_d[i]), 4), anchors[a][1]))
        return vouched


def vouched_state(face: FaceRecord, vouch: Vouched) -> FaceRecord | None:
    """The face record after the vouch, or None when it changed meanwhile (a reviewer decided)."""
    if face.state not in (FaceState.UNCERTAIN, FaceState.UNKNOWN):
        return None
    return face.model_copy(update={"state": FaceState.AUTO, "subject_id": vouch.subject_id,
                                   "distance": vouch.distance, "candidates": (),
                                   "vouched_by": anchor_ref(vouch.anchor)})


def anchor_ref(anchor: tuple[str, str, int]) -> str:
    """The review module's face reference, `<connector>:<asset id>#<index>`."""
    connector, asset_id, idx = anchor
    return f"{connector}:{asset_id}#{idx}"
