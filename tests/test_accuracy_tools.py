"""Pure parts of benchmarks/accuracy.py: pairs parsing, TAR/FAR, k-fold threshold selection,
the matching-rule copy used for the identification grid. No face engine, runs in milliseconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import (
    Decisions,
    assign_boxes,
    best_threshold,
    build_parser,
    choose_face,
    choose_point,
    count_decisions,
    decisions_from_distances,
    default_cache,
    fmr_threshold,
    grid_counts,
    iou,
    kfold_accuracy,
    make_setup,
    parse_pairs,
    partition_setups,
    safe_points,
    subject_distances,
    tar_far,
    threshold_grid,
)

HEADER = "# LFW View 2 pairs.txt, folds 1-5 only: 'name n1 n2' / 'name1 n1 name2 n2'"


def _pairs_lines(folds: int, half: int) -> list[str]:
    lines = [HEADER]
    for f in range(folds):
        lines += [f"P{f}_{i}\t1\t{i + 2}" for i in range(half)]
        lines += [f"A{f}_{i}\t{i + 1}\tB{f}_{i}\t3" for i in range(half)]
    return lines


def test_parse_pairs_header_folds_and_paths():
    pairs = parse_pairs(_pairs_lines(folds=2, half=2), fold_half=2)
    assert len(pairs) == 8
    assert [p.fold for p in pairs] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [p.same for p in pairs] == [True, True, False, False] * 2
    assert pairs[0].a == "P0_0/P0_0_0001.jpg"
    assert pairs[1].b == "P0_1/P0_1_0003.jpg"
    assert pairs[2].a == "A0_0/A0_0_0001.jpg"
    assert pairs[2].b == "B0_0/B0_0_0003.jpg"


def test_parse_pairs_space_separated_and_blank_lines():
    pairs = parse_pairs(["# header", "", "Zico 1 2", "A 1 B 12", ""], fold_half=1)
    assert [(p.same, p.a, p.b) for p in pairs] == [
        (True, "Zico/Zico_0001.jpg", "Zico/Zico_0002.jpg"),
        (False, "A/A_0001.jpg", "B/B_0012.jpg"),
    ]


def test_parse_pairs_header_is_not_a_pair():
    # Without skipping the header, its 20+ fields would be a malformed line.
    pairs = parse_pairs(_pairs_lines(1, 1), fold_half=1)
    assert len(pairs) == 2


@pytest.mark.parametrize(
    "lines, message",
    [
        (["A 1 B 2", "C 1 2"], "expected a same-person line"),
        (["A 1 2", "C 1 2"], "expected a different-person line"),
        (["A 1 2", "A 1 B"], "line 2"),
        (["A 1 2 3 4"], "3 or 4 fields"),
        (["A 1 2"], "whole number of folds"),
        (["# only a header"], "no pairs"),
    ],
)
def test_parse_pairs_rejects_bad_files(lines, message):
    with pytest.raises(ValueError, match=message):
        parse_pairs(lines, fold_half=1)


def test_real_lfw_dev_pairs_file_if_present():
    path = Path(__file__).resolve().parents[2] / "shared/testdata/lfw-dev/pairs.txt"
    if not path.is_file():
        pytest.skip("lfw-dev not available")
    pairs = parse_pairs(path.read_text(encoding="utf-8").splitlines())
    assert len(pairs) == 3000
    assert sorted({p.fold for p in pairs}) == [1, 2, 3, 4, 5]
    assert sum(p.same for p in pairs) == 1500


def test_threshold_grid_is_exact():
    grid = threshold_grid(0.30, 0.65)
    assert len(grid) == 36
    assert grid[0] == 0.30 and grid[-1] == 0.65
    assert 0.45 in grid.tolist()


def test_tar_far_counts_inclusive_threshold():
    dist = np.array([0.2, 0.4, 0.5, 0.6, 0.3, 0.5, 0.7, 0.9])
    same = np.array([True] * 4 + [False] * 4)
    tar, far = tar_far(dist, same, np.array([0.1, 0.4, 0.5, 1.0]))
    np.testing.assert_allclose(tar, [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(far, [0.0, 0.25, 0.5, 1.0])


def test_best_threshold_prefers_lowest_on_ties():
    # same <= 0.4, different >= 0.6: every threshold in [0.4, 0.59] is perfect.
    dist = np.array([0.3, 0.4, 0.6, 0.7])
    same = np.array([True, True, False, False])
    grid = threshold_grid(0.30, 0.65)
    assert best_threshold(dist, same, grid) == pytest.approx(0.40)


def test_kfold_picks_threshold_on_other_folds():
    easy_same, hard_same, diff = [0.30, 0.35, 0.40], [0.50, 0.52, 0.55], [0.60, 0.70]
    dist = np.array([*easy_same, *diff, *easy_same, *diff, *hard_same, *diff])
    same = np.array(([True] * 3 + [False] * 2) * 3)
    folds = np.repeat([1, 2, 3], 5)
    res = kfold_accuracy(dist, same, folds, threshold_grid(0.30, 0.65))
    assert [r.fold for r in res] == [1, 2, 3]
    # folds 1 and 2 are tested with a threshold learnt with fold 3 in training: 0.55..0.59
    # are all perfect there, the lowest wins.
    assert [r.threshold for r in res[:2]] == [pytest.approx(0.55)] * 2
    assert [r.accuracy for r in res[:2]] == [1.0, 1.0]
    # fold 3 never sees its own distances: threshold 0.40 from folds 1-2, only its 2
    # different pairs are right.
    assert res[2].threshold == pytest.approx(0.40)
    assert res[2].accuracy == pytest.approx(2 / 5)


def test_choose_face_prefers_centre_then_nearest():
    # css boxes (top, right, bottom, left) in a 100 x 100 image
    big_corner = (0, 40, 40, 0)
    small_centre = (45, 55, 55, 45)
    assert choose_face([big_corner, small_centre], 100, 100) == 1
    both_centre = [(40, 60, 60, 40), (30, 70, 70, 30)]
    assert choose_face(both_centre, 100, 100) == 1
    assert choose_face([(0, 20, 20, 0), (60, 80, 80, 60)], 100, 100) == 1


def test_matching_rule_counts():
    # 3 subjects; probes: right, swap, stranger named, stranger close (uncertain), far.
    per_subject = np.array([
        [0.30, 0.60, 0.70],   # subject 0, named correctly
        [0.35, 0.70, 0.80],   # truth 1, named 0: swap
        [0.70, 0.38, 0.90],   # stranger named 1
        [0.45, 0.47, 0.90],   # stranger: close to two, margin fails -> uncertain
        [0.80, 0.85, 0.90],   # stranger far -> unknown
    ], dtype=np.float32)
    truth = np.array([0, 1, -1, -1, -1])
    dec = decisions_from_distances(per_subject, truth)
    assert dec.best.tolist() == [0, 0, 1, 0, 0]
    c = count_decisions(dec, threshold=0.5, margin=0.05, review_threshold=0.6)
    assert (c.correct, c.wrong_swap, c.wrong_stranger, c.uncertain, c.unknown) == (1, 1, 1, 1, 1)
    assert c.wrong == 2
    c = count_decisions(dec, threshold=0.32, margin=0.05, review_threshold=0.6)
    assert (c.correct, c.wrong, c.uncertain, c.unknown) == (1, 0, 3, 1)


def test_matching_rule_agrees_with_matcher():
    pytest.importorskip("plugin.matcher")
    import uuid

    from plugin.matcher import Matcher, MatchSettings
    from plugin.models import FaceState

    rng = np.random.default_rng(3)
    templates = rng.normal(0, 0.05, (6, 128)).astype(np.float32)
    ids = [uuid.UUID(int=i // 2 + 1) for i in range(6)]  # 3 subjects x 2 templates
    probes = (templates[rng.integers(0, 6, 40)] + rng.normal(0, 0.03, (40, 128))).astype(
        np.float32)
    matcher = Matcher(ids, templates, MatchSettings(0.45, 0.04, 0.6))
    dec = decisions_from_distances(matcher.subject_distances(probes), np.zeros(40, int))
    named = (dec.best_d <= 0.45) & (dec.gap >= 0.04)
    got = matcher.match(probes)
    assert [m.state == FaceState.AUTO for m in got] == named.tolist()
    assert [m.subject_id.int - 1 for m, n in zip(got, named) if n] == dec.best[named].tolist()


def test_safe_points_buffer():
    wrong = np.zeros((5, 4), dtype=int)
    wrong[4, 0] = 1  # loosest threshold, no margin
    ok = safe_points(wrong, buffer_t=1, buffer_m=1)
    assert not ok[4, 0] and not ok[3, 1] and not ok[3, 0] and not ok[4, 1]
    assert ok[2, 0] and ok[4, 2] and ok[0, 3]


def test_make_setup_enrolls_k_and_keeps_strangers_out():
    people = {
        "A": ["a1", "a2", "a3"],
        "B": ["b1", "b2"],
        "C": ["c1"],
    }
    s = make_setup(people, k=2, draw=0)
    assert s.subjects == ["A"]
    assert s.ref_keys == {"A": ["a1", "a2"]}
    # B has only k images: a stranger, never enrolled; A's probe is its 3rd image
    assert sorted(zip(s.probes, s.truth.tolist())) == [
        ("a3", 0), ("b1", -1), ("b2", -1), ("c1", -1)]
    s1 = make_setup(people, k=1, draw=0)
    assert s1.subjects == ["A", "B"]
    assert all(p not in s1.ref_keys["A"] for p, t in zip(s1.probes, s1.truth) if t == 0)


def test_iou_and_box_assignment():
    a = (0, 10, 10, 0)
    assert iou(a, a) == 1.0
    assert iou(a, (0, 20, 10, 10)) == 0.0
    assert iou(a, (0, 10, 10, 5)) == pytest.approx(0.5)
    dets = [(0, 10, 10, 0), (100, 110, 110, 100), (50, 60, 60, 50)]
    truth = [(101, 111, 111, 101), (1, 11, 11, 1)]
    assert assign_boxes(dets, truth, 0.4) == {0: 1, 1: 0}


def test_decisions_single_subject_has_infinite_gap():
    dec = decisions_from_distances(np.array([[0.3], [0.7]], dtype=np.float32), np.array([0, -1]))
    assert isinstance(dec, Decisions)
    assert np.isinf(dec.gap).all()
    c = count_decisions(dec, 0.5, 0.15, 0.6)
    assert (c.correct, c.wrong, c.unknown) == (1, 0, 1)


def test_grid_counts_equals_the_rule_point_by_point():
    rng = np.random.default_rng(11)
    per_subject = rng.uniform(0.25, 0.7, (300, 6)).astype(np.float32)
    truth = rng.integers(-1, 6, 300)
    dec = decisions_from_distances(per_subject, truth)
    t_grid, m_grid = threshold_grid(0.30, 0.60), threshold_grid(0.0, 0.10)
    wrong, correct = grid_counts([dec, dec], t_grid, m_grid)
    for i in (0, 7, 15, 30):
        for j in (0, 3, 10):
            c = count_decisions(dec, t_grid[i], m_grid[j], 0.6)
            assert wrong[i, j] == 2 * c.wrong
            assert correct[i, j] == pytest.approx(c.correct / c.enrolled_probes)


def test_choose_point_safe_best_and_margin_tolerance():
    t_grid, m_grid = np.array([0.3, 0.4, 0.5]), np.array([0.0, 0.05, 0.1])
    correct = np.array([[0.10, 0.10, 0.09],
                        [0.40, 0.398, 0.30],
                        [0.60, 0.55, 0.50]])
    safe = np.array([[True, True, True],
                     [True, True, True],
                     [False, False, False]])  # the best correct rate is not safe
    assert choose_point(safe, correct, t_grid, m_grid) == (0.4, 0.0)
    # within 0.5 points of the best: the larger margin wins
    assert choose_point(safe, correct, t_grid, m_grid, tolerance=0.005) == (0.4, 0.05)
    assert choose_point(np.zeros_like(safe), correct, t_grid, m_grid) is None


def test_partition_enrolls_everyone_once_and_others_are_strangers():
    people = {f"P{i}": [f"p{i}_{j}" for j in range(3)] for i in range(7)}
    people["S"] = ["s_0"]
    groups = partition_setups(people, k=2, draw=0, size=3)
    enrolled = [n for g in groups for n in g.subjects]
    assert sorted(enrolled) == [f"P{i}" for i in range(7)]
    assert [len(g.subjects) for g in groups] == [3, 3, 1]
    for g in groups:
        for probe, t in zip(g.probes, g.truth.tolist()):
            owner = "S" if probe == "s_0" else f"P{probe[1]}"
            if owner in g.subjects:
                assert t == g.subjects.index(owner)
                assert probe not in g.ref_keys[owner]
            else:
                assert t == -1  # not enrolled here: all of their images are strangers
        assert len(g.probes) == 1 + 3 * 7 - 2 * len(g.subjects)


def test_reference_draws_do_not_depend_on_other_people():
    a = {"A": [f"a{i}" for i in range(6)], "B": [f"b{i}" for i in range(6)]}
    b = {"A": a["A"], "C": [f"c{i}" for i in range(9)]}
    assert make_setup(a, 2, draw=3).ref_keys["A"] == make_setup(b, 2, draw=3).ref_keys["A"]
    assert make_setup(a, 2, draw=0).ref_keys["A"] == ["a0", "a1"]


def test_cache_file_and_engine_version_depend_on_jitters():
    assert default_cache(1).name == "encodings.npz"
    assert default_cache(10).name == "encodings_j10.npz"
    args = build_parser().parse_args(["--identify", "--jitters", "10", "--templates", "mean"])
    assert (args.jitters, args.templates, args.cache) == (10, "mean", None)
    pytest.importorskip("dlib")
    from benchmarks.accuracy import engine_version

    assert engine_version(1).endswith("/j1") and engine_version(10).endswith("/j10")


def test_fmr_threshold_is_last_point_under_the_rate():
    rows = [(0.34, 0, 1_000_000), (0.35, 1, 1_000_000), (0.36, 2, 1_000_000),
            (0.37, 1, 1_000_000)]
    assert fmr_threshold(rows, 1e-6) == 0.35
    assert fmr_threshold(rows, 0.0) == 0.34
    assert fmr_threshold(rows[1:], 0.0) is None
    assert fmr_threshold(rows, 1e-5) == 0.37


def test_mean_template_distances_use_the_average_reference():
    pytest.importorskip("plugin.matcher")
    rng = np.random.default_rng(7)
    vecs = {f"{n}{i}": rng.normal(0, 0.1, 128).astype(np.float32) for n in "AB" for i in range(3)}
    vecs["C0"] = rng.normal(0, 0.1, 128).astype(np.float32)
    people = {"A": ["A0", "A1", "A2"], "B": ["B0", "B1", "B2"], "C": ["C0"]}
    setup = make_setup(people, k=2, draw=0)
    got = subject_distances(setup, vecs, "mean-template")
    for i, probe in enumerate(setup.probes):
        for j, name in enumerate(setup.subjects):
            mean = np.mean([vecs[r] for r in setup.ref_keys[name]], axis=0)
            assert got[i, j] == pytest.approx(np.linalg.norm(vecs[probe] - mean), abs=1e-5)
    nearest = subject_distances(setup, vecs, "min")
    assert not np.allclose(got, nearest)
