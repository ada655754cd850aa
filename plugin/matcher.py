"""Match face encodings against the templates of consented subjects.

A wrong name on a face is a privacy incident, so a face is *identified* only when its nearest
subject is close (distance <= threshold) AND clearly closer than every other subject (runner-up
at least `margin` further). A face close to someone but failing either test is *uncertain*
(goes to human review with its candidates); anything else is *unknown*. Defaults come from
measurement on lfw-dev (README, benchmarks/accuracy.py), never from the demo photos.

Only templates of subjects with an active biometric grant may be passed in: the caller
(pipeline) filters by consent before the matcher sees a single vector.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np

from plugin.models import FaceState


@dataclass(frozen=True, slots=True)
class MatchSettings:
    threshold: float = 0.41
    margin: float = 0.14
    review_threshold: float = 0.6
    # "mean": one averaged vector per subject (less noise than any single reference photo);
    # "nearest": the closest of the subject's reference encodings.
    templates: str = "nearest"


@dataclass(frozen=True, slots=True)
class Match:
    state: FaceState
    subject_id: uuid.UUID | None
    distance: float | None
    candidates: tuple[uuid.UUID, ...] = ()


class Matcher:
    """Vectorised nearest-subject search: one matrix product per batch of faces.

    Cost per face is one pass over the template matrix (128 multiply-adds per template) plus
    a few passes over its distance row; see benchmarks/match.py for 10k-1M templates.
    """

    def __init__(
        self,
        subject_ids: list[uuid.UUID],
        templates: np.ndarray,
        settings: MatchSettings | None = None,
    ) -> None:
        if len(subject_ids) != len(templates):
            raise ValueError("one subject id per template row is required")
        self.settings = settings or MatchSettings()
        if self.settings.templates == "mean" and len(subject_ids):
            subject_ids, templates = _means(subject_ids, np.asarray(templates, dtype=np.float32))
        order = sorted(range(len(subject_ids)), key=lambda i: subject_ids[i].int)
        ids = [subject_ids[i] for i in order]
        self._templates = np.asarray(templates, dtype=np.float32)[order] if order else (
            np.zeros((0, 128), dtype=np.float32)
        )
        self._sq_norms = np.einsum("ij,ij->i", self._templates, self._templates)
        self._subjects: list[uuid.UUID] = []
        starts: list[int] = []
        for i, sid in enumerate(ids):
            if not self._subjects or self._subjects[-1] != sid:
                self._subjects.append(sid)
                starts.append(i)
        self._starts = np.asarray(starts, dtype=np.intp)
        # Subject index of every template row.
        self._owner = np.zeros(len(self._templates), dtype=np.intp)
        if len(starts) > 1:
            self._owner[self._starts[1:]] = 1
            self._owner = np.cumsum(self._owner)

    @property
    def subject_count(self) -> int:
        return len(self._subjects)

    @property
    def subjects(self) -> tuple[uuid.UUID, ...]:
        """Subject ids in the column order of `subject_distances`."""
        return tuple(self._subjects)

    def subject_distances(self, vectors: np.ndarray) -> np.ndarray:
        """(faces, subjects) matrix: distance of each face to each subject's nearest template."""
        return np.sqrt(self._subject_sq_distances(vectors))

    def _subject_sq_distances(self, vectors: np.ndarray) -> np.ndarray:
        sq = self._template_sq_distances(vectors)
        if sq.shape[1] == 0 or len(self._starts) == len(self._templates):
            return sq  # one template per subject (mean templates): nothing to reduce
        return np.minimum.reduceat(sq, self._starts, axis=1)

    def _template_sq_distances(self, vectors: np.ndarray) -> np.ndarray:
        # |v - t|^2 = |v|^2 + |t|^2 - 2 v.t: one matrix product for all faces and templates;
        # the square root is taken later, only of the few distances a verdict needs.
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, 128)
        if not self._subjects:
            return np.zeros((len(vectors), 0), dtype=np.float32)
        if len(vectors) <= _SINGLE:
            # One face: numpy's own SIMD loop, one thread. BLAS would split this memory-bound
            # product over threads that compete with the analysis workers for the same cores
            # (measured 3-4x slower in median while other work runs).
            sq = np.stack([np.einsum("ij,j->i", self._templates, v) for v in vectors])
        else:
            sq = vectors @ self._templates.T
        sq *= -2.0
        sq += self._sq_norms[None, :]
        sq += np.einsum("ij,ij->i", vectors, vectors)[:, None]
        np.maximum(sq, 0.0, out=sq)
        return sq

    def match(self, vectors: np.ndarray) -> list[Match]:
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, 128)
        results: list[Match] = []
        # Faces in chunks: a crowd photo against 1M templates stays at ~64 MB of distances.
        for start in range(0, len(vectors), _CHUNK):
            per_template = self._template_sq_distances(vectors[start:start + _CHUNK])
            results += [self._verdict(row) for row in per_template]
        return results

    def _verdict(self, row: np.ndarray) -> Match:
        """Threshold, margin and review rules on one face's squared template distances.

        Only the templates that can change the verdict are sorted: the nearest one, and those
        closer than the review threshold or than `best + margin` (a subject there is a
        runner-up that breaks the margin). One `min` and one comparison over the row instead
        of a partial sort of all subjects: 1.5 ms less per face at 100k templates.
        """
        s = self.settings
        if row.size == 0:
            return Match(FaceState.UNKNOWN, None, None)
        best_d = math.sqrt(float(row.min()))
        if best_d > s.review_threshold and best_d > s.threshold:
            return Match(FaceState.UNKNOWN, None, best_d)
        # Squared bound, padded so float rounding never leaves out a borderline template.
        reach = max(s.review_threshold, best_d + s.margin)
        near = np.flatnonzero(row <= reach * reach * (1 + 1e-5) + 1e-7)
        near = near[np.argsort(row[near], kind="stable")]
        owners = self._owner[near]
        _, first = np.unique(owners, return_index=True)
        first = np.sort(first)
        subjects = owners[first]
        dist = np.sqrt(row[near[first]].astype(np.float64))
        best, best_d = int(subjects[0]), float(dist[0])
        runner_up = float(dist[1]) if dist.size > 1 else float("inf")
        if best_d <= s.threshold and runner_up - best_d >= s.margin:
            return Match(FaceState.AUTO, self._subjects[best], best_d)
        if best_d <= s.review_threshold:
            close = tuple(self._subjects[int(i)] for i, d in zip(subjects, dist, strict=True)
                          if d <= s.review_threshold)
            return Match(FaceState.UNCERTAIN, None, best_d, close[:_CANDIDATES])
        return Match(FaceState.UNKNOWN, None, best_d)


_CHUNK = 16
_SINGLE = 2
_CANDIDATES = 5


def _means(subject_ids: list[uuid.UUID], templates: np.ndarray
           ) -> tuple[list[uuid.UUID], np.ndarray]:
    order = sorted(range(len(subject_ids)), key=lambda i: subject_ids[i].int)
    ids = [subject_ids[i] for i in order]
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    sums = np.add.reduceat(templates[order].astype(np.float64), starts, axis=0)
    counts = np.diff(np.append(starts, len(ids)))[:, None]
    return [ids[i] for i in starts], (sums / counts).astype(np.float32)
