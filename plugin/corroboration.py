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
  is `margin` further; one hop only (a vouched face never vouches for another), and never for a
  face of its own photo (one person appears once in a photo).

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
        the quality gates (by face index). Gated and human-decided faces never take part, nor
        faces too far from every reference for any anchor to reach (triangle inequality:
        an anchor is <= `anchor` from a reference, so a face it names is <= anchor + threshold
        from one)."""
        s = self.settings
        reach = s.anchor + s.threshold + 1e-3  # face distances are stored rounded
        for idx, face in enumerate(faces):
            vector = vectors.get(idx)
            if vector is None or face.distance is None:
                continue
            if face.state == FaceState.AUTO and face.distance <= s.anchor \
                    and face.subject_id in self._column:
                col = self._column[face.subject_id]
                if (self._per_subject.get(col, 0) < s.max_anchors_per_subject
                        and len(self._anchors) < s.max_anchors):
                    self._per_subject[col] = self._per_subject.get(col, 0) + 1
                    self._anchors.append((col, (*asset, idx), np.asarray(vector, np.float32)))
            elif face.state in (FaceState.UNCERTAIN, FaceState.UNKNOWN) \
                    and face.distance <= reach:
                if len(self._pending) < s.max_pending:
                    self._pending.append((asset, idx, np.asarray(vector, np.float32)))
                else:
                    self.overflow += 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def resolve(self) -> list[Vouched]:
        """The unnamed faces the run's anchors name; the buffers are dropped either way.

        Faces are resolved `_CHUNK` at a time, so the distance matrices stay small with many
        templates and anchors.
        """
        pending, anchors = self._pending, self._anchors
        self._pending, self._anchors, self._per_subject = [], [], {}
        if self.overflow:
            log.info("corroboration: %d unnamed face(s) beyond the buffer were not held",
                     self.overflow)
        if not pending or not anchors:
            return []
        anchors = sorted(anchors, key=lambda a: a[0])  # grouped by person
        owners = np.array([col for col, _, _ in anchors])
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        ends = np.r_[starts[1:], len(anchors)]
        cols = owners[starts]
        avecs = np.stack([v for _, _, v in anchors]).astype(np.float64)
        a_sq = (avecs * avecs).sum(1)
        photo: dict[tuple[str, str], int] = {}
        anchor_photo = np.array([photo.setdefault(ref[:2], len(photo)) for _, ref, _ in anchors])
        subjects = self.matcher.subjects
        vouched = []
        for lo in range(0, len(pending), _CHUNK):
            chunk = pending[lo:lo + _CHUNK]
            faces = np.stack([v for _, _, v in chunk])
            base = self.matcher.subject_distances(faces).astype(np.float64)
            f64 = faces.astype(np.float64)
            to_anchor = np.sqrt(np.maximum(
                (f64 * f64).sum(1)[:, None] + a_sq[None, :] - 2.0 * f64 @ avecs.T, 0.0))
            face_photo = np.array([photo.get(asset, -1) for asset, _, _ in chunk])
            to_anchor[face_photo[:, None] == anchor_photo[None, :]] = np.inf  # own photo
            by_anchor = np.full(base.shape, np.inf)
            by_anchor[:, cols] = np.minimum.reduceat(to_anchor, starts, axis=1)
            dist = np.minimum(base, by_anchor)
            rows = np.arange(len(chunk))
            best_col = dist.argmin(axis=1)
            best_d = dist[rows, best_col]
            runner = (np.partition(dist, 1, axis=1)[:, 1] if dist.shape[1] > 1
                      else np.full(len(chunk), np.inf))
            named = ((best_d <= self.settings.threshold) & (runner - best_d >= self.margin)
                     # an anchor is the nearest evidence, else the matcher's verdict stands
                     & (by_anchor[rows, best_col] < base[rows, best_col]))
            for i in np.flatnonzero(named):
                g = int(np.searchsorted(cols, best_col[i]))
                a = starts[g] + int(np.argmin(to_anchor[i, starts[g]:ends[g]]))
                asset, idx, _ = chunk[i]
                vouched.append(Vouched(asset, idx, subjects[best_col[i]],
                                       round(float(best_d[i]), 4), anchors[a][1]))
        return vouched


_CHUNK = 64  # faces resolved together: 64 x 100k templates = 25 MB of distances


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
