"""Matching rules: threshold AND margin to name, review when close, unknown otherwise."""

from __future__ import annotations

import uuid

import numpy as np

from plugin.matcher import Matcher, MatchSettings
from plugin.models import FaceState

A, B = uuid.UUID(int=1), uuid.UUID(int=2)
SETTINGS = MatchSettings(threshold=0.5, margin=0.06, review_threshold=0.6)


def unit(i: int) -> np.ndarray:
    v = np.zeros(128, dtype=np.float32)
    v[i] = 1.0
    return v


def at_distance(base: np.ndarray, d: float, axis: int) -> np.ndarray:
    v = base.copy()
    v[axis] += d
    return v


def test_identified_when_close_and_clearly_nearest():
    m = Matcher([A, B], np.stack([unit(0), unit(1)]), SETTINGS)
    [match] = m.match(at_distance(unit(0), 0.3, 5)[None])
    assert match.state == FaceState.AUTO and match.subject_id == A
    assert abs(match.distance - 0.3) < 1e-5


def test_uncertain_when_runner_up_is_too_close():
    # Two subjects 0.08 apart; a face between them is near both.
    a, b = unit(0), at_distance(unit(0), 0.08, 1)
    m = Matcher([A, B], np.stack([a, b]), SETTINGS)
    [match] = m.match(at_distance(a, 0.3, 5)[None])
    assert match.state == FaceState.UNCERTAIN and match.subject_id is None
    assert set(match.candidates) == {A, B}


def test_uncertain_between_threshold_and_review_threshold():
    m = Matcher([A], unit(0)[None], SETTINGS)
    [match] = m.match(at_distance(unit(0), 0.55, 5)[None])
    assert match.state == FaceState.UNCERTAIN and match.candidates == (A,)


def test_unknown_when_far_from_everyone():
    m = Matcher([A, B], np.stack([unit(0), unit(1)]), SETTINGS)
    [match] = m.match(unit(7)[None])
    assert match.state == FaceState.UNKNOWN and match.subject_id is None


def test_nearest_template_of_a_subject_counts():
    m = Matcher([A, A, B], np.stack([unit(3), unit(0), unit(1)]), SETTINGS)
    [match] = m.match(at_distance(unit(0), 0.2, 5)[None])
    assert match.subject_id == A


def test_no_templates_means_unknown():
    m = Matcher([], np.zeros((0, 128), dtype=np.float32), SETTINGS)
    assert [r.state for r in m.match(np.stack([unit(0), unit(1)]))] == [FaceState.UNKNOWN] * 2


def test_vectorised_matches_brute_force():
    rng = np.random.default_rng(7)
    ids = [uuid.UUID(int=int(i)) for i in rng.integers(1, 50, size=400)]
    templates = rng.normal(size=(400, 128)).astype(np.float32) * 0.05
    faces = rng.normal(size=(20, 128)).astype(np.float32) * 0.05
    got = Matcher(ids, templates, SETTINGS).subject_distances(faces)
    subjects = sorted(set(ids), key=lambda u: u.int)
    for fi, f in enumerate(faces):
        for si, s in enumerate(subjects):
            rows = templates[[i for i, x in enumerate(ids) if x == s]]
            assert abs(got[fi, si] - np.linalg.norm(rows - f, axis=1).min()) < 1e-4


def test_mean_templates_average_each_subjects_references():
    a1, a2 = unit(0), at_distance(unit(0), 0.4, 1)
    m = Matcher([A, A, B], np.stack([a1, a2, unit(2)]),
                MatchSettings(threshold=0.25, margin=0.06, review_threshold=0.6,
                              templates="mean"))
    assert m.subject_count == 2
    # The mean of A's references sits 0.2 from each; nearest-template would see 0.0.
    [match] = m.match(a1[None])
    assert match.state == FaceState.AUTO and abs(match.distance - 0.2) < 1e-5


def brute_force(ids, templates, face, s: MatchSettings):
    """The rule written plainly: per-subject minimum distance, sorted."""
    subjects = sorted(set(ids), key=lambda u: u.int)
    d = {u: min(float(np.linalg.norm(t - face)) for i, t in zip(ids, templates) if i == u)
         for u in subjects}
    ranked = sorted(subjects, key=lambda u: d[u])
    best = ranked[0]
    runner = d[ranked[1]] if len(ranked) > 1 else float("inf")
    if d[best] <= s.threshold and runner - d[best] >= s.margin:
        return FaceState.AUTO, best, ()
    if d[best] <= s.review_threshold:
        return FaceState.UNCERTAIN, None, tuple(u for u in ranked if d[u] <= s.review_threshold)[:5]
    return FaceState.UNKNOWN, None, ()


def test_partial_sort_gives_the_verdicts_of_the_plain_rule():
    # Uneven template counts per subject (1-4), faces near templates and far from all.
    rng = np.random.default_rng(11)
    ids = [uuid.UUID(int=int(i)) for i in rng.integers(1, 60, size=150)]
    templates = rng.normal(size=(150, 128)).astype(np.float32) * 0.04
    templates[100:120] = templates[:20] + 0.005  # look-alikes under other ids: margin cases
    noise = rng.uniform(0.005, 0.05, size=(40, 1)).astype(np.float32)
    faces = np.concatenate([templates[:40] + rng.normal(size=(40, 128)).astype(np.float32)
                            * noise, rng.normal(size=(10, 128)).astype(np.float32)])
    settings = MatchSettings(threshold=0.3, margin=0.05, review_threshold=0.45)
    states = {m.state for m in Matcher(ids, templates, settings).match(faces)}
    assert states == {FaceState.AUTO, FaceState.UNCERTAIN, FaceState.UNKNOWN}
    for batch in (faces[:1], faces[1:3], faces):  # one-face path and matrix-product path
        for face, got in zip(batch, Matcher(ids, templates, settings).match(batch)):
            state, subject, candidates = brute_force(ids, templates, face, settings)
            assert (got.state, got.subject_id) == (state, subject)
            assert got.candidates == candidates


def test_mean_templates_for_many_subjects_match_a_plain_mean():
    rng = np.random.default_rng(3)
    ids = [uuid.UUID(int=int(i)) for i in rng.integers(1, 30, size=90)]
    templates = rng.normal(size=(90, 128)).astype(np.float32)
    m = Matcher(ids, templates, MatchSettings(templates="mean"))
    subjects = sorted(set(ids), key=lambda u: u.int)
    means = np.stack([templates[[i for i, x in enumerate(ids) if x == s]].mean(axis=0)
                      for s in subjects])
    face = rng.normal(size=(1, 128)).astype(np.float32)
    expected = np.linalg.norm(means - face, axis=1)
    assert np.allclose(m.subject_distances(face)[0], expected, atol=1e-3)
