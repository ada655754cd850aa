"""Normalised scores on top of dlib's 128-d embeddings: does a learned transform or a cohort
score normalisation make open-set identification safer than plain euclidean distance?

Reads the j1 encodings cache of `accuracy.py` (benchmarks/out/encodings.npz, keyed by path);
nothing on lfw-dev is re-encoded. The demo (final check only, never used for tuning) is encoded
once with accuracy.py's engine and cached in benchmarks/out/demo_encodings_j1.npz.

Variants (all evaluated with the selection rule of accuracy.py --identify):
  raw        euclidean distance, nearest of the k references (Matcher as shipped)
  center     x - mean, L2-normalised (a 128-d mean vector)
  wccn       within-class covariance normalisation: x -> W^T (x - mean), W = Sw^-1/2 with
             shrinkage (Sw + lambda*I*tr/128), then L2-normalised; a 128x128 matrix + mean
  lda<d>     wccn followed by the top-d between-class directions (LDA), L2-normalised
  +znorm     cohort score normalisation, probe side: s = d * c / mu_p, mu_p the mean distance of
             the probe to its `--cohort-k` nearest cohort faces, c the median mu of the cohort
  +snorm     symmetric: s = d * c / sqrt(mu_p * mu_t) (template side too)
  +dnorm     symmetric, subtractive: s = d - (mu_p + mu_t) / 2 + c
  +mean      one mean template per person (Matcher(templates="mean"))
  @kmN       (after +znorm/+snorm) cohort = <= N k-means centroids of per-person means, each
             the average of >= --min-people people (aggregate statistics)
  @gmmN      cohort = synthetic vectors sampled from a Gaussian mixture (the @kmN clusters'
             means and covariances), as many as training faces; --synth-min-dist D rejects
             samples within D of any real training face. Shippable: no real person's vector.
The cohort is always built from training-half faces (never test people). Every transformed space is
scaled so that the median same-person distance of the TRAINING people equals the raw one, so
thresholds and the +/-0.01 safety buffer keep roughly the same meaning as in accuracy.py.

Protocol: the lfw-dev people are split at random (seed --seed) into two halves; the transform and
the cohort are fitted on one half and identification is measured on the other (k = 1, 2, 3, 5
draws, the large gallery of the test half and galleries of 3/10/50), then the halves swap. The safe
set of a variant is the grid points with zero wrong names at the point and its +/-0.01
neighbours in BOTH folds, every k, draw and gallery; the point is the one with the most correct
names (mean over k; larger margin within 0.5 points). LFW pairs: each fold scored by a transform
fitted on the people of the other folds; threshold chosen on the other folds.

  uv run python benchmarks/normalise.py                       # lfw-dev study + pairs
  uv run python benchmarks/normalise.py --demo ../shared/testdata/demo   # + final demo check
  uv run python benchmarks/normalise.py --seed 0 1 2 ...       # safe in all 6 folds
  uv run python benchmarks/normalise.py --explain raw+snorm@gmm64+mean 0.45 0.11   # wrong names
See benchmarks/README.md, part 5, for the figures and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import (
    LABEL_ERRORS,
    EncodingCache,
    assign_boxes,
    choose_point,
    decisions_from_distances,
    default_cache,
    engine_version,
    grid_counts,
    kfold_accuracy,
    load_people,
    make_setup,
    parse_pairs,
    partition_setups,
    safe_points,
    threshold_grid,
)

OUT = Path(__file__).resolve().parent / "out"
SHIPPED = (0.41, 0.14)  # plugin/matcher.py MatchSettings defaults
KS = (1, 2, 3)
SYNTH_MIN_DIST = 0.0  # --synth-min-dist


# ------------------------------------------------------------------------------------------
# Transforms (fitted on training people only)
# ------------------------------------------------------------------------------------------


@dataclass
class Transform:
    name: str
    mean: np.ndarray | None = None  # subtracted first
    matrix: np.ndarray | None = None  # (128, d): y = (x - mean) @ matrix
    normalise: bool = False
    scale: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64)
        if self.mean is not None:
            y = y - self.mean
        if self.matrix is not None:
            y = y @ self.matrix
        if self.normalise:
            y = y / np.linalg.norm(y, axis=-1, keepdims=True)
        return y * self.scale


def _within_between(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within-class scatter (people with >= 2 images, per sample) and between-class scatter."""
    d = x.shape[1]
    sw = np.zeros((d, d))
    n_w = 0
    means = []
    for lab in np.unique(labels):
        xi = x[labels == lab]
        if len(xi) < 2:
            continue
        c = xi - xi.mean(0)
        sw += c.T @ c
        n_w += len(xi)
        means.append(xi.mean(0))
    m = np.array(means)
    mc = m - m.mean(0)
    return sw / n_w, mc.T @ mc / len(m)


def _inv_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v / np.sqrt(w)) @ v.T


def median_genuine(y: np.ndarray, labels: np.ndarray) -> float:
    ds = []
    for lab in np.unique(labels):
        yi = y[labels == lab]
        if len(yi) < 2:
            continue
        diff = yi[:, None, :] - yi[None, :, :]
        dd = np.sqrt((diff ** 2).sum(-1))
        ds.append(dd[np.triu_indices(len(yi), 1)])
    return float(np.median(np.concatenate(ds)))


def fit_transform(kind: str, x: np.ndarray, labels: np.ndarray, shrink: float) -> Transform:
    """kind: raw | center | wccn | lda<d>. Scaled so the training median genuine distance equals
    the raw one (thresholds keep their rough meaning)."""
    if kind == "raw":
        return Transform("raw")
    mean = x.mean(0)
    if kind == "center":
        t = Transform(kind, mean=mean, normalise=True)
    else:
        sw, sb = _within_between(x - mean, labels)
        sw = (1 - shrink) * sw + shrink * np.trace(sw) / len(sw) * np.eye(len(sw))
        w = _inv_sqrt(sw)
        if kind.startswith("lda"):
            dims = int(kind[3:])
            ev, vec = np.linalg.eigh(w.T @ sb @ w)
            w = w @ vec[:, np.argsort(ev)[::-1][:dims]]
        t = Transform(kind, mean=mean, matrix=w, normalise=True)
    t.scale = median_genuine(x, labels) / median_genuine(t.apply(x), labels)
    return t


# ------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------


def pdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


@dataclass
class Cohort:
    faces: np.ndarray | None  # transformed cohort vectors (None: no normalisation)
    k: int
    c: float = 1.0
    info: str = "training faces"

    def mu(self, y: np.ndarray) -> np.ndarray:
        d = pdist(y, self.faces)
        k = min(self.k, d.shape[1])
        return np.partition(d, k - 1, axis=1)[:, :k].mean(1)

    @classmethod
    def fit(cls, faces: np.ndarray | None, k: int, source: str = "faces",
            labels: np.ndarray | None = None, min_people: int = 10) -> Cohort:
        """source "faces": the training faces themselves (not shippable: third parties'
        templates); "km<N>": at most N centroids of a k-means over per-person mean vectors, each
        centroid the average of >= min_people different people (aggregate statistics)."""
        if faces is None:
            return cls(None, k)
        if source.startswith(("km", "gmm")):
            names = np.unique(labels)
            person_means = np.stack([faces[labels == n].mean(0) for n in names])
            n = int(source.lstrip("kmg"))
            cents = kmeans_min_size(person_means, n, min_people)
            assign = pdist(faces, cents).argmin(1)
            people_per = [len(set(labels[assign == j].tolist())) for j in range(len(cents))]
            if source.startswith("gmm"):
                cents = sample_mixture(faces, cents, len(faces), min_dist=SYNTH_MIN_DIST)
            co = cls(cents, k)
            co.info = (f"{n} requested -> {len(people_per)} clusters, >= {min(people_per)} "
                       f"people each (faces assigned to the nearest centroid); "
                       f"{len(cents)} cohort vectors")
            co.c = float(np.median(co.mu(faces)))  # the median training face's mu
            return co
        co = cls(faces, k)
        d = pdist(faces, faces)  # leave-one-out mu of the cohort itself -> its median
        np.fill_diagonal(d, np.inf)
        co.c = float(np.median(np.partition(d, k - 1, axis=1)[:, :k].mean(1)))
        return co


def sample_mixture(faces: np.ndarray, cents: np.ndarray, count: int, seed: int = 0,
                   min_dist: float = 0.0) -> np.ndarray:
    """Synthetic cohort: each face is assigned to its nearest centroid; per centroid a Gaussian
    (mean, covariance of its faces, shrunk 10 % towards a scaled identity); `count` vectors
    sampled with the clusters' face shares. Only aggregate statistics are used, and no sample is
    any real person's vector; with min_dist > 0 no sample lies within min_dist of a real face."""
    rng = np.random.default_rng(seed)
    assign = pdist(faces, cents).argmin(1)
    shares = np.bincount(assign, minlength=len(cents)) / len(faces)
    counts = rng.multinomial(count, shares)
    out = []
    for j, m in enumerate(counts):
        xj = faces[assign == j]
        if m == 0 or len(xj) < 2:
            continue
        cov = np.cov(xj, rowvar=False)
        cov = 0.9 * cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov))
        got = np.zeros((0, faces.shape[1]))
        while len(got) < m:  # rejection: no sample closer than min_dist to a real face
            cand = rng.multivariate_normal(xj.mean(0), cov, size=2 * m)
            if min_dist > 0:
                cand = cand[pdist(cand, faces).min(1) >= min_dist]
            got = np.concatenate([got, cand])
        out.append(got[:m])
    return np.concatenate(out)


def kmeans_min_size(x: np.ndarray, n: int, min_size: int, iters: int = 30,
                    seed: int = 0) -> np.ndarray:
    """Lloyd's k-means (seeded); clusters with fewer than min_size members are dropped and their
    members reassigned until every centroid averages >= min_size rows of x."""
    rng = np.random.default_rng(seed)
    cents = x[rng.choice(len(x), size=min(n, len(x)), replace=False)]
    while True:
        for _ in range(iters):
            assign = pdist(x, cents).argmin(1)
            cents = np.stack([x[assign == j].mean(0) if (assign == j).any() else cents[j]
                              for j in range(len(cents))])
        assign = pdist(x, cents).argmin(1)
        sizes = np.bincount(assign, minlength=len(cents))
        if sizes.min() >= min_size:
            return cents
        cents = np.delete(cents, int(sizes.argmin()), axis=0)


def subject_scores(probes: np.ndarray, refs: np.ndarray, k: int, norm: str, cohort: Cohort,
                   mean_tpl: bool, mu_p: np.ndarray | None) -> np.ndarray:
    """(probes, subjects) scores. refs: (subjects*k, d) in subject order."""
    n_sub = len(refs) // k
    if mean_tpl:
        refs = refs.reshape(n_sub, k, -1).mean(1)
        k = 1
    d = pdist(probes, refs)
    if norm == "znorm":
        d = d * (cohort.c / mu_p[:, None])
    elif norm == "snorm":
        mu_t = cohort.mu(refs)
        d = d * (cohort.c / np.sqrt(mu_p[:, None] * mu_t[None, :]))
    elif norm == "dnorm":  # subtractive, symmetric
        mu_t = cohort.mu(refs)
        d = d - 0.5 * (mu_p[:, None] + mu_t[None, :]) + cohort.c
    return d.reshape(len(probes), n_sub, k).min(2)


# ------------------------------------------------------------------------------------------
# Identification study
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    transform: str  # raw | center | wccn | lda<d>
    norm: str = "none"  # none | znorm | snorm | dnorm
    mean_tpl: bool = False
    cohort: str = "faces"  # faces | km<N> | gmm<N>

    @property
    def label(self) -> str:
        return (self.transform + ("" if self.norm == "none" else f"+{self.norm}")
                + ("" if self.cohort == "faces" else f"@{self.cohort}")
                + ("+mean" if self.mean_tpl else ""))


def parse_variant(text: str) -> Variant:
    """transform[+znorm|+snorm|+dnorm[@kmN|@gmmN]][+mean], e.g. raw+snorm@km64+mean."""
    parts = text.split("+")
    norm, cohort = "none", "faces"
    for p in parts[1:]:
        base, _, src = p.partition("@")
        if base in ("znorm", "snorm", "dnorm"):
            norm, cohort = base, src or "faces"
    return Variant(parts[0], norm, "mean" in parts[1:], cohort)


def split_people(names: Sequence[str], seed: int) -> tuple[set[str], set[str]]:
    order = sorted(names, key=lambda n: zlib.crc32(f"{seed}:{n}".encode()))
    half = len(order) // 2
    return set(order[:half]), set(order[half:])


def evaluate_fold(variant: Variant, people: dict[str, list[str]], vecs: dict[str, np.ndarray],
                  train: set[str], test: set[str], args: argparse.Namespace,
                  t_full: np.ndarray, m_grid: np.ndarray, collect: list | None = None
                  ) -> dict[str, Any]:
    """Fit on `train` people, measure on `test` people. Returns per-k wrong/correct grids.
    collect=[(t, m)]: also append every wrong name with score <= t and gap >= m."""
    tr_keys = [k for n in sorted(train) for k in people[n]]
    x_tr = np.stack([vecs[k] for k in tr_keys]).astype(np.float64)
    lab_tr = np.array([n for n in sorted(train) for _ in people[n]])
    tf = fit_transform(variant.transform, x_tr, lab_tr, args.shrink)
    cohort = Cohort.fit(tf.apply(x_tr) if variant.norm != "none" else None, args.cohort_k,
                        variant.cohort, lab_tr, args.min_people)
    test_people = {n: people[n] for n in test}
    keys = [k for n in sorted(test_people) for k in test_people[n]]
    y = tf.apply(np.stack([vecs[k] for k in keys]).astype(np.float64))
    row = {k: i for i, k in enumerate(keys)}
    mu = cohort.mu(y) if variant.norm != "none" else None

    raw = {k: vecs[k].astype(np.float64) for k in keys}

    def decide(setup: Any) -> Any:
        p = np.array([row[k] for k in setup.probes])
        r = np.array([row[k] for n in setup.subjects for k in setup.ref_keys[n]])
        s = subject_scores(y[p], y[r], setup.k, variant.norm, cohort, variant.mean_tpl,
                           None if mu is None else mu[p])
        dec = decisions_from_distances(s, setup.truth)
        if collect is not None:
            t, m = collect[0]
            for i in np.flatnonzero((dec.best != dec.truth) & (dec.best_d <= t)
                                    & (dec.gap >= m)):
                name = setup.subjects[dec.best[i]]
                d_raw = min(float(np.linalg.norm(raw[setup.probes[i]] - raw[q]))
                            for q in setup.ref_keys[name])
                who = "stranger" if dec.truth[i] < 0 else setup.subjects[dec.truth[i]]
                collect.append((float(dec.best_d[i]), float(dec.gap[i]), d_raw,
                                Path(setup.probes[i]).name, who, name, setup.k,
                                len(setup.subjects)))
        return dec, s

    out: dict[str, Any] = {"scale": tf.scale, "cohort_c": cohort.c}
    for k in KS:
        decs, enrolled, fm = [], 0, []
        for draw in range(args.draws):
            st = make_setup(test_people, k, draw)
            dec, s = decide(st)
            decs.append(dec)
            enrolled += int((st.truth >= 0).sum())
            fm.append(s[st.truth < 0].ravel())
        wrong, rate = grid_counts(decs, t_full, m_grid)
        small = {}
        for size in args.gallery_sizes:
            gdecs = [decide(g)[0] for draw in range(args.draws)
                     for g in partition_setups(test_people, k, draw, size)]
            small[size] = grid_counts(gdecs, t_full, m_grid)[0]
        fmv = np.sort(np.concatenate(fm))
        out[k] = {"wrong": wrong, "correct": np.rint(rate * enrolled).astype(np.int64),
                  "enrolled": enrolled, "small": small,
                  "fm_hits": np.searchsorted(fmv, t_full, side="right"), "fm_n": len(fmv)}
    return out


def study(variant: Variant, people: dict[str, list[str]], vecs: dict[str, np.ndarray],
          folds: list[tuple[set[str], set[str]]], args: argparse.Namespace,
          t_full: np.ndarray, m_grid: np.ndarray, inner: slice, t_grid: np.ndarray
          ) -> dict[str, Any]:
    res = [evaluate_fold(variant, people, vecs, tr, te, args, t_full, m_grid)
           for tr, te in folds]
    safe = np.ones((len(t_full), len(m_grid)), dtype=bool)
    safe_k = {k: safe.copy() for k in KS}
    correct = {k: sum(r[k]["correct"] for r in res) / sum(r[k]["enrolled"] for r in res)
               for k in KS}
    for r in res:
        for k in KS:
            ok = safe_points(r[k]["wrong"], 1, 1)
            for w in r[k]["small"].values():
                ok &= safe_points(w, 1, 1)
            safe &= ok
            safe_k[k] &= ok
    mean_c = np.mean([correct[k] for k in KS], axis=0)
    pt = choose_point(safe[inner], mean_c[inner], t_grid, m_grid, args.tie_tolerance)
    out: dict[str, Any] = {"variant": variant.label, "point": pt,
                           "scale": [r["scale"] for r in res],
                           "cohort_c": [r["cohort_c"] for r in res]}

    def at(arr: np.ndarray, p: tuple[float, float]) -> Any:
        i = int(np.argmin(np.abs(t_full - p[0])))
        j = int(np.argmin(np.abs(m_grid - p[1])))
        return arr[i, j]

    if pt:
        out["correct"] = {k: float(at(correct[k], pt)) for k in KS}
    out["point_k"] = {}
    for k in KS:
        pk = choose_point(safe_k[k][inner], correct[k][inner], t_grid, m_grid,
                          args.tie_tolerance)
        out["point_k"][k] = (pk, float(at(correct[k], pk)) if pk else 0.0)
    # wrong names at a fixed point (e.g. the shipped one), k=2: large / 50 / 10 / 3
    out["at_shipped"] = {k: (float(at(correct[k], SHIPPED)),
                             int(sum(at(r[k]["wrong"], SHIPPED) for r in res)),
                             {n: int(sum(at(r[k]["small"][n], SHIPPED) for r in res))
                              for n in args.gallery_sizes}) for k in KS}
    # first threshold with a false match (k=2, large galleries, before margin)
    hits = sum(r[2]["fm_hits"] for r in res)
    n = sum(r[2]["fm_n"] for r in res)
    first = np.flatnonzero(hits > 0)
    out["fm_first"] = float(t_full[first[0]]) if len(first) else None
    out["fm_n"] = int(n)
    out["fm_by_t"] = {f"{t:.2f}": int(h) for t, h in zip(t_full, hits, strict=True)}
    out["wrong_k2_rows"] = {}
    if pt:
        j = int(np.argmin(np.abs(m_grid - pt[1])))
        for lab in ["large"] + [str(s) for s in args.gallery_sizes]:
            arr = sum((r[2]["wrong"] if lab == "large" else r[2]["small"][int(lab)])
                      for r in res)
            out["wrong_k2_rows"][lab] = [int(v) for v in arr[:, j]]
        out["correct_k2_row"] = [float(v) for v in correct[2][:, j]]
    return out


# ------------------------------------------------------------------------------------------
# LFW pairs under the transform
# ------------------------------------------------------------------------------------------


def pairs_accuracy(variant: Variant, people: dict[str, list[str]], vecs: dict[str, np.ndarray],
                   args: argparse.Namespace) -> tuple[float, float, list[float]]:
    pairs = parse_pairs(args.pairs.read_text(encoding="utf-8").splitlines())
    images = args.images.resolve()
    folds = sorted({p.fold for p in pairs})
    dist = np.zeros(len(pairs))
    for f in folds:
        in_fold = {Path(p.a).parent.name for p in pairs if p.fold == f} | {
            Path(p.b).parent.name for p in pairs if p.fold == f}
        train = sorted(n for n in people if n not in in_fold)
        x = np.stack([vecs[k] for n in train for k in people[n]]).astype(np.float64)
        lab = np.array([n for n in train for _ in people[n]])
        tf = fit_transform(variant.transform, x, lab, args.shrink)
        cohort = Cohort.fit(tf.apply(x) if variant.norm != "none" else None, args.cohort_k,
                        variant.cohort, lab, args.min_people)
        for i, p in enumerate(pairs):
            if p.fold != f:
                continue
            a = tf.apply(vecs[str(images / p.a)][None].astype(np.float64))
            b = tf.apply(vecs[str(images / p.b)][None].astype(np.float64))
            d = float(pdist(a, b)[0, 0])
            if variant.norm == "dnorm":
                d += cohort.c - 0.5 * float(cohort.mu(a)[0] + cohort.mu(b)[0])
            elif variant.norm != "none":  # verification: both sides normalised (z = s here)
                d *= cohort.c / float(np.sqrt(cohort.mu(a)[0] * cohort.mu(b)[0]))
            dist[i] = d
    same = np.array([p.same for p in pairs])
    fold = np.array([p.fold for p in pairs])
    grid = threshold_grid(0.30, 1.20)
    kf = kfold_accuracy(dist, same, fold, grid)
    accs = np.array([r.accuracy for r in kf])
    return float(accs.mean()), float(accs.std(ddof=1)), [r.threshold for r in kf]


# ------------------------------------------------------------------------------------------
# Demo (final check only)
# ------------------------------------------------------------------------------------------


def demo_encodings(demo: Path, enrolled: Sequence[str], min_iou: float) -> dict[str, Any]:
    """Every detected library face (with its manifest label) and the enrolled references,
    encoded with accuracy.py's engine; cached in benchmarks/out/demo_encodings_j1.npz."""
    cache = OUT / "demo_encodings_j1.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if list(z["enrolled"]) == list(enrolled) and str(z["engine"]) == engine_version(1):
                return {k: z[k] for k in z.files}
    from benchmarks.accuracy import accuracy_engine
    from plugin.imaging import decode

    engine = accuracy_engine(1)
    manifest = json.loads((demo / "manifest.json").read_text(encoding="utf-8"))
    people = {p["name"]: p for p in manifest["people"]}
    ref_vecs, ref_owner = [], []
    for name in enrolled:
        for ref in people[name]["refs"]:
            img = decode(demo / ref)
            dets = engine.detect(img)
            if len(dets) != 1:
                raise SystemExit(f"{ref}: {len(dets)} faces detected")
            ref_vecs.append(engine.encode(img, dets)[0])
            ref_owner.append(name)
    faces, labels, where, targets = [], [], [], 0
    for photo in manifest["photos"]:
        truth = photo["faces"]
        targets += sum(1 for f in truth if f["person"] in enrolled)
        img = decode(demo / photo["path"])
        dets = engine.detect(img)
        if not dets:
            continue
        vecs = engine.encode(img, dets)
        assign = assign_boxes([d.box.as_css() for d in dets], [f["box"] for f in truth], min_iou)
        for i, v in enumerate(vecs):
            person = truth[assign[i]]["person"] if i in assign else None
            faces.append(v)
            labels.append(person or ("stranger" if i in assign else "not-in-manifest"))
            where.append(f"{photo['path']}#{i}")
    out = {"engine": np.array(engine_version(1)), "enrolled": np.array(list(enrolled)),
           "ref_vecs": np.stack(ref_vecs), "ref_owner": np.array(ref_owner),
           "faces": np.stack(faces), "labels": np.array(labels), "where": np.array(where),
           "targets": np.array(targets)}
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **out)
    return out


def demo_check(variant: Variant, point: tuple[float, float], demo: dict[str, Any],
               people: dict[str, list[str]], vecs: dict[str, np.ndarray],
               exclude: set[str], args: argparse.Namespace) -> dict[str, Any]:
    """Transform/cohort fitted on all lfw-dev people except the demo's people; verdicts with the
    Matcher rule (score <= t and runner-up >= margin further)."""
    train = sorted(n for n in people if n not in exclude)
    x = np.stack([vecs[k] for n in train for k in people[n]]).astype(np.float64)
    lab = np.array([n for n in train for _ in people[n]])
    tf = fit_transform(variant.transform, x, lab, args.shrink)
    cohort = Cohort.fit(tf.apply(x) if variant.norm != "none" else None, args.cohort_k,
                        variant.cohort, lab, args.min_people)
    enrolled = [str(n) for n in demo["enrolled"]]
    owner = [str(o) for o in demo["ref_owner"]]
    k = owner.count(enrolled[0])
    refs = tf.apply(np.stack([demo["ref_vecs"][owner.index(n) + i] for n in enrolled
                              for i in range(k)]).astype(np.float64))
    y = tf.apply(demo["faces"].astype(np.float64))
    mu = cohort.mu(y) if variant.norm != "none" else None
    s = subject_scores(y, refs, k, variant.norm, cohort, variant.mean_tpl, mu)
    order = np.argsort(s, axis=1)
    best = order[:, 0]
    bd = s[np.arange(len(s)), best]
    gap = s[np.arange(len(s)), order[:, 1]] - bd
    named = (bd <= point[0]) & (gap >= point[1])
    labels = [str(v) for v in demo["labels"]]
    right = sum(1 for i in range(len(s)) if named[i] and enrolled[best[i]] == labels[i])
    wrong = [f"{demo['where'][i]} ({labels[i]}) -> {enrolled[best[i]]} {bd[i]:.3f}"
             for i in range(len(s)) if named[i] and enrolled[best[i]] != labels[i]]
    own = [float(bd[i]) for i in range(len(s)) if labels[i] in enrolled]
    worst_own = [float(s[i, enrolled.index(labels[i])]) for i in range(len(s))
                 if labels[i] in enrolled]
    strangers = sorted((float(bd[i]), str(demo["where"][i]), enrolled[best[i]])
                       for i in range(len(s)) if labels[i] not in enrolled)
    return {"named": right, "cohort": cohort.info if variant.norm != "none" else "-",
            "targets": int(demo["targets"]), "wrong": wrong,
            "closest_stranger": strangers[0] if strangers else None,
            "farthest_own": max(worst_own) if own else None,
            "own_sorted": sorted(worst_own)}


# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    root = Path(__file__).resolve().parents[1]
    lfw = root.parent / "shared" / "testdata" / "lfw-dev"
    p.add_argument("--images", type=Path, default=lfw / "images")
    p.add_argument("--pairs", type=Path, default=lfw / "pairs.txt")
    p.add_argument("--cache", type=Path, default=default_cache(1),
                   help="accuracy.py j1 encodings (must hold every lfw-dev image)")
    p.add_argument("--variants", nargs="+",
                   default=["raw", "raw+mean", "center", "wccn", "lda64", "wccn+mean",
                            "raw+znorm", "raw+snorm", "wccn+snorm", "raw+snorm+mean",
                            "raw+snorm@km64", "raw+snorm@gmm16", "raw+snorm@gmm64",
                            "raw+snorm@gmm64+mean"],
                   help="transform[+znorm|+snorm|+dnorm[@kmN|@gmmN]][+mean]; transform "
                   "raw|center|wccn|lda<d>")
    p.add_argument("--shrink", type=float, default=0.5,
                   help="WCCN shrinkage towards a scaled identity (0.1 and 0.8: see README)")
    p.add_argument("--cohort-k", type=int, default=10, help="cohort: nearest faces averaged")
    p.add_argument("--min-people", type=int, default=10,
                   help="@kmN cohorts: every centroid averages at least this many people")
    p.add_argument("--synth-min-dist", type=float, default=0.0,
                   help="@gmmN cohorts: reject synthetic vectors closer than this to any real "
                   "training face (0: keep all)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="people split(s); with several, a point must be safe in every fold of "
                   "every split and correct rates are pooled")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--gallery-sizes", type=int, nargs="*", default=[3, 10, 50])
    p.add_argument("--t-min", type=float, default=0.20)
    p.add_argument("--t-max", type=float, default=0.70)
    p.add_argument("--m-max", type=float, default=0.20)
    p.add_argument("--tie-tolerance", type=float, default=0.005)
    p.add_argument("--no-pairs", action="store_true", help="skip the LFW pairs figure")
    p.add_argument("--demo", type=Path, help="demo directory: final check (never tuned on)")
    p.add_argument("--enroll", nargs="+",
                   default=["Barack_Obama", "George_Clooney", "Megawati_Sukarnoputri"])
    p.add_argument("--min-iou", type=float, default=0.4)
    p.add_argument("--explain", nargs=3, metavar=("VARIANT", "T", "M"),
                   help="only list the wrong names of VARIANT with score <= T and runner-up "
                   ">= M further (both folds, every k, draw and gallery), then stop")
    p.add_argument("--json", type=Path, default=OUT / "normalise.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    global SYNTH_MIN_DIST
    SYNTH_MIN_DIST = args.synth_min_dist
    start = time.perf_counter()
    images = args.images.resolve()
    cache = EncodingCache.load(args.cache, engine_version(1))
    paths = sorted(images.glob("*/*.jpg"))
    missing = [p for p in paths if str(p) not in cache.vectors]
    if missing:
        raise SystemExit(f"{len(missing)} lfw-dev images not in {args.cache}: run accuracy.py "
                         "--identify first (this script never encodes lfw-dev)")
    vecs, nf = cache.vectors, cache.n_faces
    people, _, _ = load_people(images, vecs, nf, LABEL_ERRORS)
    folds = []
    for seed in args.seed:
        folds_a, folds_b = split_people(list(people), seed)
        folds += [(folds_a, folds_b), (folds_b, folds_a)]
    t_grid = threshold_grid(args.t_min, args.t_max)
    m_grid = threshold_grid(0.0, args.m_max)
    t_full = threshold_grid(args.t_min - 0.01, args.t_max + 0.01)
    inner = slice(1, 1 + len(t_grid))
    print(f"lfw-dev: {len(people)} people with usable images; halves of {len(folds_a)} and "
          f"{len(folds_b)} people (seeds {args.seed}); fit on one half, measure on the other, "
          f"then swap. k={list(KS)}, {args.draws} draws, galleries large + {args.gallery_sizes}")
    if args.explain:
        v, t, m = parse_variant(args.explain[0]), float(args.explain[1]), float(args.explain[2])
        hits: list = [(t, m)]
        for tr, te in folds:
            evaluate_fold(v, people, vecs, tr, te, args, t_full, m_grid, hits)
        seen: dict[tuple, tuple] = {}
        for h in hits[1:]:
            key = (h[3], h[5])
            if key not in seen or seen[key][0] > h[0]:
                seen[key] = h
        print(f"\nwrong names of {v.label} at score <= {t}, gap >= {m} (each probe/name once, "
              "lowest score; k and gallery size of that occurrence):")
        print("  score   gap    raw d   probe (truth) -> named   k  gallery")
        for h in sorted(seen.values()):
            print(f"  {h[0]:.3f}  {h[1]:.3f}  {h[2]:.3f}   {h[3]} ({h[4]}) -> {h[5]}   {h[6]}  "
                  f"{h[7]}")
        return 0
    demo = None
    exclude: set[str] = set()
    if args.demo:
        demo = demo_encodings(args.demo, args.enroll, args.min_iou)
        manifest = json.loads((args.demo / "manifest.json").read_text(encoding="utf-8"))
        exclude = {p["name"] for p in manifest["people"]}
    results = []
    print("\nvariant        safe point    correct k=1/2/3 (test people)   k=2 alone: point"
          " -> correct   first false match (k=2, before margin)   at shipped (0.41, 0.14) "
          "k=2: correct / wrong large / N=50,10,3" + ("   pairs 5-fold" if not args.no_pairs
                                                   else "") + ("   demo named/wrong" if demo
                                                               else ""))
    for text in args.variants:
        v = parse_variant(text)
        t0 = time.perf_counter()
        r = study(v, people, vecs, folds, args, t_full, m_grid, inner, t_grid)
        if not args.no_pairs:
            r["pairs"] = pairs_accuracy(v, people, vecs, args)
        if demo is not None and r["point"]:
            r["demo"] = demo_check(v, r["point"], demo, people, vecs, exclude, args)
            r["demo_k2_point"] = (demo_check(v, r["point_k"][2][0], demo, people, vecs,
                                             exclude, args) if r["point_k"][2][0] else None)
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
        pt = r["point"]
        c = r.get("correct", {})
        pk2, ck2 = r["point_k"][2]
        cs, wl, ws = r["at_shipped"][2]
        line = (f"{v.label:14s} {f'({pt[0]:.2f}, {pt[1]:.2f})' if pt else 'none':12s}  "
                f"{' / '.join(f'{100 * c[k]:4.1f}' for k in KS) if c else '-':24s}  "
                f"{f'({pk2[0]:.2f}, {pk2[1]:.2f}) -> {100 * ck2:4.1f} %' if pk2 else 'none':22s}"
                f"  {r['fm_first']:.2f}  of {r['fm_n'] / 1e6:.1f} M          "
                f"{100 * cs:4.1f} % / {wl} / {','.join(str(ws[n]) for n in args.gallery_sizes)}")
        if "pairs" in r:
            line += f"   {100 * r['pairs'][0]:.2f} +/- {100 * r['pairs'][1]:.2f} %"
        if "demo" in r:
            d = r["demo"]
            line += f"   {d['named']}/{d['targets']}, {len(d['wrong'])} wrong"
            if r.get("demo_k2_point"):
                d2 = r["demo_k2_point"]
                line += f" (k=2 point: {d2['named']}, {len(d2['wrong'])} wrong)"
        print(line + f"   [{r['seconds']:.0f} s]", flush=True)
    if demo is not None:
        print("\ndemo details (final check; transform/cohort fitted on lfw-dev minus the demo's "
              "people):")
        for r in results:
            if "demo" not in r:
                continue
            d = r["demo"]
            cs = d["closest_stranger"]
            print(f"  {r['variant']:14s} at {r['point']}: named {d['named']}/{d['targets']}, "
                  f"wrong {d['wrong']}; closest non-enrolled face {cs[0]:.3f} "
                  f"({cs[1]} ~ {cs[2]}); own faces' scores to their own person: "
                  + " ".join(f"{v:.3f}" for v in d["own_sorted"]) + f"; cohort: {d['cohort']}")
    print("\nk=2 wrong names at the chosen margin by threshold (large / N=50 / N=10 / N=3, "
          "both folds, 5 draws), and correct % (large):")
    cols = [t for t in t_full if 0.30 <= t <= 0.60]
    for r in results:
        if not r["point"]:
            continue
        print(f"  {r['variant']} (margin {r['point'][1]:.2f})")
        print("    t      " + "".join(f"{t:6.2f}" for t in cols))
        idx = [int(np.argmin(np.abs(t_full - t))) for t in cols]
        for lab, row in r["wrong_k2_rows"].items():
            print(f"    {lab:6s} " + "".join(f"{row[i]:6d}" for i in idx))
        print("    corr%  " + "".join(f"{100 * r['correct_k2_row'][i]:6.1f}" for i in idx))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=lambda o: o.tolist()
                                        if hasattr(o, "tolist") else str(o)), encoding="utf-8")
    print(f"\ntotal time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
