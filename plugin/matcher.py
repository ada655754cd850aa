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
    """Vectorised nearest-subject search: one matrix product per batch of faces."""

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

    @property
    def subject_count(self) -> int:
        return len(self._subjects)

    def subject_distances(self, vectors: np.ndarray) -> np.ndarray:
        """(faces, subjects) matrix: distance of each face to each subject's nearest template."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, 128)
        if not self._subjects:
            return np.zeros((len(vectors), 0), dtype=np.float32)
        sq = (
            np.einsum("ij,ij->i", vectors, vectors)[:, None]
            + self._sq_norms[None, :]
            - 2.0 * vectors @ self._templates.T
        )
        dist = np.sqrt(np.maximum(sq, 0.0))
        return np.minimum.reduceat(dist, self._starts, axis=1)

    def match(self, vectors: np.ndarray) -> list[Match]:
        per_subject = self.subject_distances(vectors)
        s = self.settings
        results = []
        for row in per_subject:
            if row.size == 0:
                results.append(Match(FaceState.UNKNOWN, None, None))
                continue
            ranked = np.argsort(row)
            best = int(ranked[0])
            best_d = float(row[best])
            runner_up = float(row[ranked[1]]) if row.size > 1 else float("inf")
            if best_d <= s.threshold and runner_up - best_d >= s.margin:
                results.append(Match(FaceState.AUTO, self._subjects[best], best_d))
            elif best_d <= s.review_threshold:
                close = tuple(self._subjects[int(i)] for i in ranked
                              if row[int(i)] <= s.review_threshold)
                results.append(Match(FaceState.UNCERTAIN, None, best_d, close[:5]))
            else:
                results.append(Match(FaceState.UNKNOWN, None, best_d))
        return results


def _means(subject_ids: list[uuid.UUID], templates: np.ndarray
           ) -> tuple[list[uuid.UUID], np.ndarray]:
    unique = sorted(set(subject_ids), key=lambda u: u.int)
    rows = [templates[[i for i, s in enumerate(subject_ids) if s == u]].mean(axis=0)
            for u in unique]
    return unique, np.asarray(rows, dtype=np.float32)
