"""Accuracy benchmarks for Consentry's own face pipeline (decode -> detect -> encode -> match).

Three modes, one script (run from the project root with `uv run python benchmarks/accuracy.py`):

  pairs (default)  LFW View 2 verification protocol on a pairs file: TAR/FAR per threshold,
                   k-fold accuracy with the threshold chosen on the other folds, faces not found,
                   time and images/s.
  --identify       open-set identification on the same images: enroll k reference photos per
                   person, probe with their other photos plus never-enrolled strangers, run the
                   real `plugin.matcher.Matcher` over a threshold x margin grid and count correct
                   names, WRONG names and unknown/uncertain faces, in one large gallery and in
                   many small ones; choose the defaults.
  --demo DIR       final check only (never tune on it): enroll the demo's consented people and
                   compare every library face with manifest.json.

Every image is encoded exactly as a scan does (`plugin.imaging.decode` with the scan's max_side,
`DlibEngine().detect`, `DlibEngine().encode`). Encodings are cached in an npz file keyed by the
image's path (plus size and mtime) and by the engine version, so reruns take seconds. Caches and
outputs belong under benchmarks/out/ (git-ignored); encodings of real faces never leave it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Matching defaults chosen with this script on lfw-dev (see benchmarks/README.md).
RECOMMENDED = {"threshold": 0.34, "margin": 0.12, "review_threshold": 0.60}

FOLD_HALF = 300  # LFW View 2: 300 same-person lines then 300 different-person lines per fold
PRINT_STEP = 0.05
# Fallback box when no face is detected, as fractions of the decoded image (top, right, bottom,
# left): the median HOG box of lfw-dev images (measured, see README). Pair protocol only.
FALLBACK_BOX = (0.33, 0.71, 0.73, 0.29)
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
# LFW label problems found with this script (cross-name pairs closer than any genuine impostor
# pair; checked by eye). Naming these "wrongly" names the right person, so identification leaves
# them out (--keep-label-errors keeps them).
LABEL_ERRORS = {
    "Gabrielle_Rose/Gabrielle_Rose_0001.jpg": "the same photograph as Martha_Bowen_0002 (d=0.16)",
    "Hasan_Wirayuda/Hasan_Wirayuda_0001.jpg": "Hassan Wirajuda, other spelling (d=0.36)",
    "Dai_Chul_Chyung/Dai_Chul_Chyung_0001.jpg": "Chyung Dai-chul, other name order (d=0.26)",
}


# --------------------------------------------------------------------------------------------
# Pairs file and verification statistics (pure, tested in tests/test_accuracy_tools.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pair:
    fold: int  # 1-based
    same: bool
    a: str  # image path relative to the images directory
    b: str


def image_relpath(name: str, number: int) -> str:
    """LFW layout: images/<name>/<name>_<n:04d>.jpg (relative to the images directory)."""
    return f"{name}/{name}_{number:04d}.jpg"


def parse_pairs(lines: Iterable[str], fold_half: int = FOLD_HALF) -> list[Pair]:
    """Parse LFW pairs lines; `#` comment lines and blank lines are skipped.

    Folds are consecutive blocks of `fold_half` same-person lines followed by `fold_half`
    different-person lines. A line in the wrong place, a malformed line or an incomplete last
    fold raises ValueError naming the line.
    """
    pairs: list[Pair] = []
    index = 0  # index among pair lines
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        fold, pos = divmod(index, 2 * fold_half)
        expect_same = pos < fold_half
        try:
            if len(parts) == 3:
                same = True
                a = image_relpath(parts[0], int(parts[1]))
                b = image_relpath(parts[0], int(parts[2]))
            elif len(parts) == 4:
                same = False
                a = image_relpath(parts[0], int(parts[1]))
                b = image_relpath(parts[2], int(parts[3]))
            else:
                raise ValueError(f"expected 3 or 4 fields, got {len(parts)}")
        except ValueError as err:
            raise ValueError(f"pairs line {lineno}: {err}: {line!r}") from err
        if same != expect_same:
            kind = "same-person" if expect_same else "different-person"
            raise ValueError(
                f"pairs line {lineno}: expected a {kind} line at position {pos + 1} of fold "
                f"{fold + 1} ({fold_half} same then {fold_half} different per fold)"
            )
        pairs.append(Pair(fold=fold + 1, same=same, a=a, b=b))
        index += 1
    if index == 0:
        raise ValueError("no pairs found")
    if index % (2 * fold_half):
        raise ValueError(
            f"{index} pair lines is not a whole number of folds of {2 * fold_half} lines"
        )
    return pairs


def threshold_grid(lo: float, hi: float, step: float = 0.01) -> np.ndarray:
    """Inclusive grid lo..hi, rounded so that 0.45 is 0.45 and not 0.44999999."""
    count = round((hi - lo) / step) + 1
    return np.round(lo + step * np.arange(count), 4)


def tar_far(
    distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """True-accept rate (same pairs with d <= t) and false-accept rate (different pairs, d <= t)."""
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    t = np.asarray(thresholds, dtype=np.float64)[:, None]
    s, d = distances[same], distances[~same]
    tar = (s[None, :] <= t).mean(axis=1) if s.size else np.full(len(t), np.nan)
    far = (d[None, :] <= t).mean(axis=1) if d.size else np.full(len(t), np.nan)
    return tar, far


def accuracies(distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Verification accuracy (same accepted + different rejected) / all, per threshold."""
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    accept = distances[None, :] <= np.asarray(thresholds, dtype=np.float64)[:, None]
    return (accept == same[None, :]).mean(axis=1)


def best_threshold(distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> float:
    """Threshold of highest accuracy; among ties the LOWEST (fewer false accepts)."""
    acc = accuracies(distances, same, thresholds)
    return float(thresholds[int(np.flatnonzero(acc == acc.max())[0])])


@dataclass(frozen=True, slots=True)
class FoldResult:
    fold: int
    threshold: float  # chosen on the other folds
    accuracy: float  # on this fold


def kfold_accuracy(
    distances: np.ndarray, same: np.ndarray, folds: np.ndarray, thresholds: np.ndarray
) -> list[FoldResult]:
    """Standard LFW protocol: for each fold, pick the threshold on the other folds, test on it."""
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    folds = np.asarray(folds)
    results = []
    for fold in sorted(set(folds.tolist())):
        test = folds == fold
        t = best_threshold(distances[~test], same[~test], thresholds)
        acc = float(accuracies(distances[test], same[test], np.array([t]))[0])
        results.append(FoldResult(fold=int(fold), threshold=t, accuracy=acc))
    return results


# --------------------------------------------------------------------------------------------
# Encoding through Consentry's own engine, with an npz cache
# --------------------------------------------------------------------------------------------


def choose_face(rects: Sequence[tuple[int, int, int, int]], height: int, width: int) -> int:
    """Index of the subject face: among boxes containing the image centre the largest, else the
    box whose centre is nearest the image centre (ties: the larger). Boxes are css (t, r, b, l).
    """
    cy, cx = height / 2.0, width / 2.0

    def key(i: int) -> tuple[int, float]:
        top, right, bottom, left = rects[i]
        area = float((right - left) * (bottom - top))
        if top <= cy < bottom and left <= cx < right:
            return (0, -area)
        dist = ((top + bottom) / 2.0 - cy) ** 2 + ((left + right) / 2.0 - cx) ** 2
        return (1, dist - 1e-9 * area)

    return min(range(len(rects)), key=key)


@dataclass(slots=True)
class EncodingCache:
    """npz cache: one 128-d vector per image path; n_faces 0 means the fallback box was used."""

    path: Path | None
    engine: str
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    n_faces: dict[str, int] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None, engine: str) -> EncodingCache:
        cache = cls(path=path, engine=engine)
        if path is None or not path.is_file():
            return cache
        with np.load(path, allow_pickle=False) as data:
            if str(data["engine"]) != engine:
                print(f"cache {path}: engine {data['engine']} != {engine}, ignored")
                return cache
            for key, vec, n, stamp in zip(
                data["keys"], data["vectors"], data["n_faces"], data["stamps"], strict=True
            ):
                cache.vectors[str(key)] = vec
                cache.n_faces[str(key)] = int(n)
                cache.stamps[str(key)] = str(stamp)
        return cache

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.vectors)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            engine=np.array(self.engine),
            keys=np.array(keys, dtype=str),
            vectors=np.stack([self.vectors[k] for k in keys]).astype(np.float32)
            if keys else np.zeros((0, 128), np.float32),
            n_faces=np.array([self.n_faces[k] for k in keys], dtype=np.int32),
            stamps=np.array([self.stamps[k] for k in keys], dtype=str),
        )
        tmp.replace(self.path)

    def fresh(self, key: str, stamp: str) -> bool:
        return key in self.vectors and self.stamps.get(key) == stamp


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


_ENGINE: Any = None
_JITTERS = 1  # set by encode_all before the workers fork


def _worker_init() -> None:
    global _ENGINE

    _ENGINE = accuracy_engine(_JITTERS)
    _ENGINE.load()


def encode_subject_face(path: str) -> tuple[str, np.ndarray, int, float]:
    """decode -> detect -> encode the subject face (see choose_face); fallback box if none.

    Returns (path, vector, number of faces detected, seconds).
    """
    from plugin.engine import Detection
    from plugin.imaging import decode
    from plugin.models import FaceBox

    if _ENGINE is None:
        _worker_init()
    start = time.perf_counter()
    image = decode(Path(path))
    detections = _ENGINE.detect(image)
    if detections:
        h, w = image.pixels.shape[:2]
        face = detections[choose_face([d.rect for d in detections], h, w)]
    else:
        h, w = image.pixels.shape[:2]
        t, r, b, lf = FALLBACK_BOX
        rect = (round(t * h), round(r * w), round(b * h), round(lf * w))
        face = Detection(rect=rect, box=FaceBox(top=rect[0], right=rect[1], bottom=rect[2],
                                                left=rect[3]), score=0.0)
    vector = _ENGINE.encode(image, [face])[0]
    return path, vector, len(detections), time.perf_counter() - start


@dataclass(frozen=True, slots=True)
class EncodeStats:
    images: int
    encoded_now: int
    from_cache: int
    wall_seconds: float
    cpu_seconds: float  # sum of per-image times in the workers

    @property
    def images_per_second(self) -> float:
        return self.encoded_now / self.wall_seconds if self.wall_seconds > 0 else float("nan")


def accuracy_engine(jitters: int = 1):
    """The engine these figures were measured with: HOG with one upsample on every image, no
    quality gates (the shipped adaptive detector upsamples LFW's 150x150 images just the same).
    Pinned so the cached encodings keep their engine version."""
    from plugin.engine import DetectorSettings, DlibEngine

    return DlibEngine(DetectorSettings(upsample=1, adaptive=False), jitters=jitters, quality=None)


def engine_version(jitters: int = 1) -> str:
    return accuracy_engine(jitters).version


def default_cache(jitters: int) -> Path:
    """encodings.npz for jitters=1 (as before), encodings_j<N>.npz otherwise."""
    return DEFAULT_OUT / ("encodings.npz" if jitters == 1 else f"encodings_j{jitters}.npz")


def encode_all(
    paths: Sequence[Path], cache: EncodingCache, workers: int, jitters: int = 1
) -> tuple[dict[str, np.ndarray], dict[str, int], EncodeStats]:
    """Encode every path (subject face only), reusing the cache; returns vectors, n_faces, stats.

    jitters: DlibEngine(jitters=N) (dlib averages N jittered chips); the cache must belong to
    the same engine version (the version string ends in /j<N>).
    """
    global _ENGINE, _JITTERS
    if cache.engine != engine_version(jitters):
        raise ValueError(f"cache engine {cache.engine} != {engine_version(jitters)}")
    if jitters != _JITTERS:
        _JITTERS, _ENGINE = jitters, None
    keys = [str(p.resolve()) for p in paths]
    stamps = {k: _stamp(Path(k)) for k in keys}
    todo = sorted({k for k in keys if not cache.fresh(k, stamps[k])})
    start = time.perf_counter()
    cpu = 0.0
    if todo:
        print(f"encoding {len(todo)} images ({len(keys) - len(todo)} cached) "
              f"with {workers} worker(s) ...", flush=True)
        if workers > 1:
            ctx = multiprocessing.get_context("fork")
            pool = ctx.Pool(workers, initializer=_worker_init)
            results: Iterable[tuple[str, np.ndarray, int, float]] = pool.imap_unordered(
                encode_subject_face, todo, chunksize=8)
        else:
            pool = None
            results = map(encode_subject_face, todo)
        try:
            for done, (key, vec, n, secs) in enumerate(results, start=1):
                cache.vectors[key] = vec
                cache.n_faces[key] = n
                cache.stamps[key] = stamps[key]
                cpu += secs
                if done % 500 == 0:
                    cache.save()
                    rate = done / (time.perf_counter() - start)
                    print(f"  {done}/{len(todo)}  {rate:.1f} images/s", flush=True)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        cache.save()
    wall = time.perf_counter() - start
    stats = EncodeStats(images=len(keys), encoded_now=len(todo),
                        from_cache=len(keys) - len(todo), wall_seconds=wall, cpu_seconds=cpu)
    return ({k: cache.vectors[k] for k in keys}, {k: cache.n_faces[k] for k in keys}, stats)


def print_encode_stats(stats: EncodeStats, n_faces: dict[str, int], workers: int) -> None:
    counts = np.array(list(n_faces.values()))
    print(f"images: {stats.images}; encoded now: {stats.encoded_now}, "
          f"from cache: {stats.from_cache}")
    if stats.encoded_now:
        print(f"encode time: {stats.wall_seconds:.1f} s wall with {workers} worker(s), "
              f"{stats.images_per_second:.2f} images/s "
              f"({stats.cpu_seconds / stats.encoded_now * 1000:.0f} ms per image per process)")
    print(f"faces not found: {int((counts == 0).sum())} of {len(counts)} images "
          f"({(counts == 0).mean():.2%}); several faces: {int((counts > 1).sum())} "
          "(subject = face at the centre / nearest it)")


# --------------------------------------------------------------------------------------------
# Pairs mode
# --------------------------------------------------------------------------------------------


def run_pairs(args: argparse.Namespace) -> dict[str, Any]:
    pairs = parse_pairs(args.pairs.read_text(encoding="utf-8").splitlines())
    images = args.images
    rels = sorted({p.a for p in pairs} | {p.b for p in pairs})
    missing = [r for r in rels if not (images / r).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} images of the pairs file are missing, e.g. {missing[0]}")
    cache = EncodingCache.load(args.cache, engine_version(args.jitters))
    vecs, nf, stats = encode_all([images / r for r in rels], cache, args.workers, args.jitters)
    key = {r: str((images / r).resolve()) for r in rels}

    a = np.stack([vecs[key[p.a]] for p in pairs]).astype(np.float64)
    b = np.stack([vecs[key[p.b]] for p in pairs]).astype(np.float64)
    dist = np.linalg.norm(a - b, axis=1)
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    found = np.array([nf[key[p.a]] > 0 and nf[key[p.b]] > 0 for p in pairs])
    grid = threshold_grid(args.t_min, args.t_max)

    print(f"\n== LFW pairs protocol: {len(pairs)} pairs, {len(set(folds.tolist()))} folds, "
          f"{args.pairs} ==")
    print_encode_stats(stats, {key[r]: nf[key[r]] for r in rels}, args.workers)
    print(f"pairs with a face not found in either image: {int((~found).sum())} "
          f"(counted with the fallback central box)")
    print(f"median distance: same {np.median(dist[same]):.3f}, "
          f"different {np.median(dist[~same]):.3f}; closest different-person pair "
          f"{dist[~same].min():.3f} (random impostor pairs: see --identify for look-alikes)")

    tar, far = tar_far(dist, same, grid)
    tar_f, far_f = tar_far(dist[found], same[found], grid)
    acc = accuracies(dist, same, grid)
    print("\nthreshold   TAR (same accepted)   FAR (different accepted)   accuracy   "
          "[faces found in both: TAR / FAR]")
    for i, t in enumerate(grid):
        on_print_step = abs(round(t / PRINT_STEP) * PRINT_STEP - t) < 1e-9
        if on_print_step or args.all_thresholds or abs(t - args.mark) < 1e-9:
            mark = "  <- recommended" if abs(t - args.mark) < 1e-9 else ""
            print(f"  {t:.2f}      {tar[i]:7.2%}              {far[i]:7.3%}"
                  f"               {acc[i]:7.2%}    [{tar_f[i]:7.2%} / {far_f[i]:.3%}]{mark}")

    kf = kfold_accuracy(dist, same, folds, grid)
    kf_found = kfold_accuracy(dist[found], same[found], folds[found], grid)
    accs = np.array([r.accuracy for r in kf])
    accs_f = np.array([r.accuracy for r in kf_found])
    print(f"\n{len(kf)}-fold accuracy (threshold chosen on the other folds, grid "
          f"{grid[0]:.2f}..{grid[-1]:.2f} step 0.01, ties -> lowest):")
    for r in kf:
        print(f"  fold {r.fold}: threshold {r.threshold:.2f}  accuracy {r.accuracy:.2%}")
    print(f"  mean {accs.mean():.2%} +/- {accs.std(ddof=1):.2%} (all pairs, fallback box "
          f"where no face); {accs_f.mean():.2%} +/- {accs_f.std(ddof=1):.2%} on the "
          f"{int(found.sum())} pairs with both faces found")
    if any(r.threshold in (grid[0], grid[-1]) for r in kf):
        print("  NOTE: a chosen threshold lies on the edge of the grid; widen --t-min/--t-max")
    return {
        "pairs": len(pairs), "images": len(rels),
        "faces_not_found": int(sum(1 for r in rels if nf[key[r]] == 0)),
        "pairs_with_fallback": int((~found).sum()),
        "encode": {"wall_s": stats.wall_seconds, "encoded_now": stats.encoded_now,
                   "images_per_s": stats.images_per_second, "workers": args.workers},
        "thresholds": grid.tolist(), "tar": tar.tolist(), "far": far.tolist(),
        "accuracy": acc.tolist(),
        "kfold": [{"fold": r.fold, "threshold": r.threshold, "accuracy": r.accuracy} for r in kf],
        "kfold_mean": float(accs.mean()), "kfold_std": float(accs.std(ddof=1)),
        "kfold_found_mean": float(accs_f.mean()),
    }


# --------------------------------------------------------------------------------------------
# Identification mode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decisions:
    """Per probe: nearest subject index, its distance and the gap to the runner-up subject."""

    best: np.ndarray
    best_d: np.ndarray
    gap: np.ndarray
    truth: np.ndarray  # subject index, -1 for a stranger


def decisions_from_distances(per_subject: np.ndarray, truth: np.ndarray) -> Decisions:
    """Same arithmetic as Matcher.match: float(row[best]), float(row[runner]) - best_d."""
    per_subject = np.asarray(per_subject)
    order = np.argsort(per_subject, axis=1, kind="stable")
    rows = np.arange(len(per_subject))
    best = order[:, 0]
    best_d = per_subject[rows, best].astype(np.float64)
    if per_subject.shape[1] > 1:
        runner = per_subject[rows, order[:, 1]].astype(np.float64)
    else:
        runner = np.full(len(per_subject), np.inf)
    return Decisions(best=best, best_d=best_d, gap=runner - best_d, truth=np.asarray(truth))


@dataclass(frozen=True, slots=True)
class Counts:
    correct: int
    wrong_stranger: int  # a never-enrolled person got a name
    wrong_swap: int  # an enrolled person got someone else's name
    uncertain: int
    unknown: int
    enrolled_probes: int
    stranger_probes: int

    @property
    def wrong(self) -> int:
        return self.wrong_stranger + self.wrong_swap


def count_decisions(
    dec: Decisions, threshold: float, margin: float, review_threshold: float
) -> Counts:
    """Apply Matcher's rule: identified iff best_d <= threshold and gap >= margin."""
    named = (dec.best_d <= threshold) & (dec.gap >= margin)
    stranger = dec.truth < 0
    right = named & (dec.best == dec.truth)
    uncertain = ~named & (dec.best_d <= review_threshold)
    return Counts(
        correct=int(right.sum()),
        wrong_stranger=int((named & stranger).sum()),
        wrong_swap=int((named & ~stranger & ~right).sum()),
        uncertain=int(uncertain.sum()),
        unknown=int((~named & ~uncertain).sum()),
        enrolled_probes=int((~stranger).sum()),
        stranger_probes=int(stranger.sum()),
    )


def grid_counts(
    decs: Sequence[Decisions], t_grid: np.ndarray, m_grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(wrong names summed over decs, correct names / enrolled probes) per (threshold, margin).

    Same rule as count_decisions (best_d <= t and gap >= m), counted with sorted distances.
    """
    t = np.asarray(t_grid, dtype=np.float64)
    wrong = np.zeros((len(t_grid), len(m_grid)), dtype=np.int64)
    correct = np.zeros_like(wrong)
    enrolled = 0
    for dec in decs:
        right = dec.best == dec.truth
        enrolled += int((dec.truth >= 0).sum())
        for j, m in enumerate(np.asarray(m_grid, dtype=np.float64)):
            sel = dec.gap >= m
            wrong[:, j] += np.searchsorted(np.sort(dec.best_d[sel & ~right]), t, side="right")
            correct[:, j] += np.searchsorted(np.sort(dec.best_d[sel & right]), t, side="right")
    return wrong, correct / max(enrolled, 1)


def safe_points(wrong: np.ndarray, buffer_t: int, buffer_m: int) -> np.ndarray:
    """wrong[t, m] -> bool[t, m]: zero wrong names at (t, m) and at every grid point within
    buffer_t threshold steps and buffer_m margin steps (points outside the grid are ignored)."""
    n_t, n_m = wrong.shape
    ok = np.zeros_like(wrong, dtype=bool)
    for i in range(n_t):
        for j in range(n_m):
            block = wrong[max(0, i - buffer_t): i + buffer_t + 1,
                          max(0, j - buffer_m): j + buffer_m + 1]
            ok[i, j] = not block.any()
    return ok


def choose_point(
    safe: np.ndarray, correct: np.ndarray, t_grid: np.ndarray, m_grid: np.ndarray,
    tolerance: float = 0.0,
) -> tuple[float, float] | None:
    """Among safe points, those within `tolerance` (absolute correct rate) of the best one; of
    these the largest margin (a margin is cheap insurance), then the most correct names, then the
    lower threshold. None when no point is safe."""
    cands = [(i, j) for i in range(len(t_grid)) for j in range(len(m_grid)) if safe[i, j]]
    if not cands:
        return None
    best = max(correct[i, j] for i, j in cands)
    near = [(i, j) for i, j in cands if correct[i, j] >= best - tolerance - 1e-12]
    i, j = max(near, key=lambda ij: (m_grid[ij[1]], correct[ij], -t_grid[ij[0]]))
    return float(t_grid[i]), float(m_grid[j])


@dataclass
class IdentSetup:
    k: int
    draw: int
    subjects: list[str]
    probes: list[str]  # image keys
    truth: np.ndarray
    ref_keys: dict[str, list[str]]


def _ordered(images: list[str], draw: int, name: str) -> list[str]:
    """Draw 0: images in file order; later draws: a shuffle seeded by (draw, person) only, so a
    person's references do not depend on who else is in the data."""
    if not draw:
        return list(images)
    rng = np.random.default_rng([draw, zlib.crc32(name.encode())])
    return [images[i] for i in rng.permutation(len(images))]


def make_setup(
    people: dict[str, list[str]], k: int, draw: int, stranger_max: int | None = None,
    fixed_refs_pool: int | None = None,
) -> IdentSetup:
    """Enroll every person with >= k+1 usable images (k refs: the first k by number for draw 0,
    a seeded random choice for later draws); probes = their other images + every image of the
    people with <= stranger_max images (default k: too few to enroll, never enrolled).

    With fixed_refs_pool=P (controlled comparison of k): only people with >= P+1 images, refs
    taken from their first P images (after the draw's shuffle), probes = the images after those
    P, so the probes are the same for every k <= P.
    """
    stranger_max = k if stranger_max is None else stranger_max
    pool = fixed_refs_pool or k
    subjects, probes, truth, refs = [], [], [], {}
    for name in sorted(people):
        imgs = _ordered(people[name], draw, name)
        if len(imgs) >= pool + 1:
            refs[name] = imgs[:k]
            idx = len(subjects)
            subjects.append(name)
            probes += imgs[pool:]
            truth += [idx] * len(imgs[pool:])
        elif len(imgs) <= stranger_max:
            probes += imgs
            truth += [-1] * len(imgs)
    return IdentSetup(k=k, draw=draw, subjects=subjects, probes=probes,
                      truth=np.array(truth, dtype=np.int64), ref_keys=refs)


def partition_setups(people: dict[str, list[str]], k: int, draw: int, size: int
                     ) -> list[IdentSetup]:
    """Small galleries: the people with >= k+1 images split at random into groups of `size`;
    each group is enrolled on its own, and everyone outside it (other groups included) is a
    stranger. Every person is enrolled exactly once per draw."""
    full = make_setup(people, k, draw)
    rng = np.random.default_rng(5000 + draw)
    names = [full.subjects[i] for i in rng.permutation(len(full.subjects))]
    own_probes: dict[str, list[str]] = defaultdict(list)
    for probe, t in zip(full.probes, full.truth.tolist(), strict=True):
        if t >= 0:
            own_probes[full.subjects[t]].append(probe)
    base_strangers = [p for p, t in zip(full.probes, full.truth.tolist(), strict=True) if t < 0]
    setups = []
    for start in range(0, len(names), size):
        group = sorted(names[start:start + size])
        members = set(group)
        probes, truth = list(base_strangers), [-1] * len(base_strangers)
        for name in names:
            if name in members:
                probes += own_probes[name]
                truth += [group.index(name)] * len(own_probes[name])
            else:  # not enrolled in this gallery: all of their images are strangers
                probes += people[name]
                truth += [-1] * len(people[name])
        setups.append(IdentSetup(k=k, draw=draw, subjects=group, probes=probes,
                                 truth=np.array(truth, dtype=np.int64),
                                 ref_keys={n: full.ref_keys[n] for n in group}))
    return setups


REF_PREFIX = "ref:"  # vecs[REF_PREFIX + key]: the image encoded as a reference (--ref-jitters)


def ref_vector(vecs: dict[str, np.ndarray], key: str) -> np.ndarray:
    """The image's vector as an enrolled reference: its --ref-jitters encoding when loaded,
    else the probe encoding."""
    ref = vecs.get(REF_PREFIX + key)
    return vecs[key] if ref is None else ref


TEMPLATE_VARIANT = {"nearest": "min", "mean": "mean-template"}  # --templates -> variant
VARIANTS = {
    "min": "nearest of the k templates (Matcher as shipped)",
    "mean-template": "one template = mean of the k vectors (Matcher, averaged rows)",
    "mean-dist": "mean of the distances to the k templates",
    "max-dist": "farthest of the k templates (all references must agree)",
}


def matcher_for(setup: IdentSetup, vecs: dict[str, np.ndarray], mean_templates: bool,
                settings: Any = None) -> tuple[Any, list[uuid.UUID]]:
    from plugin.matcher import Matcher

    ids = [uuid.UUID(int=i + 1) for i in range(len(setup.subjects))]
    sid, rows = [], []
    for i, name in enumerate(setup.subjects):
        refs = np.stack([ref_vector(vecs, r) for r in setup.ref_keys[name]])
        if mean_templates:
            refs = refs.mean(axis=0, keepdims=True)
        for row in refs:
            sid.append(ids[i])
            rows.append(row)
    return Matcher(sid, np.stack(rows).astype(np.float32), settings), ids


def subject_distances(setup: IdentSetup, vecs: dict[str, np.ndarray], variant: str = "min"
                      ) -> np.ndarray:
    """(probes, subjects) distances; columns in setup.subjects order."""
    probes = np.stack([vecs[p] for p in setup.probes]).astype(np.float32)
    if variant in ("min", "mean-template"):
        matcher, _ = matcher_for(setup, vecs, variant == "mean-template")
        # Matcher orders subjects by uuid int; ids are 1..N in subject order: columns align.
        return matcher.subject_distances(probes)
    k = setup.k
    templates = np.stack([ref_vector(vecs, r) for n in setup.subjects
                          for r in setup.ref_keys[n]])
    sq = ((probes.astype(np.float64) ** 2).sum(1)[:, None]
          + (templates.astype(np.float64) ** 2).sum(1)[None, :]
          - 2.0 * probes.astype(np.float64) @ templates.astype(np.float64).T)
    dist = np.sqrt(np.maximum(sq, 0.0)).reshape(len(probes), len(setup.subjects), k)
    out = dist.mean(axis=2) if variant == "mean-dist" else dist.max(axis=2)
    return out.astype(np.float32)


def verify_against_matcher(setup: IdentSetup, vecs: dict[str, np.ndarray], dec: Decisions,
                           mean_templates: bool,
                           points: Iterable[tuple[float, float, float]]) -> None:
    """The grid uses a vectorised copy of Matcher's rule: check it gives the same verdicts."""
    from plugin.matcher import MatchSettings
    from plugin.models import FaceState

    probes = np.stack([vecs[p] for p in setup.probes]).astype(np.float32)
    for t, m, r in points:
        matcher, ids = matcher_for(setup, vecs, mean_templates, MatchSettings(t, m, r))
        results = matcher.match(probes)
        named = np.array([res.state == FaceState.AUTO for res in results])
        who = np.array([ids.index(res.subject_id) if res.subject_id else -1 for res in results])
        unc = np.array([res.state == FaceState.UNCERTAIN for res in results])
        mine = (dec.best_d <= t) & (dec.gap >= m)
        if not (np.array_equal(named, mine) and np.array_equal(who[mine], dec.best[mine])
                and np.array_equal(unc, ~mine & (dec.best_d <= r))):
            raise AssertionError(f"vectorised rule differs from Matcher at t={t} m={m}")


def _fmt_grid(title: str, t_grid: np.ndarray, m_grid: np.ndarray, cells: np.ndarray,
              fmt: str, width: int, mark: tuple[float, float] | None = None) -> None:
    print(title)
    print("  thr\\margin" + "".join(f"{m:>{width}.2f}" for m in m_grid))
    for i, t in enumerate(t_grid):
        row = ""
        for j, m in enumerate(m_grid):
            cell = format(cells[i, j], fmt)
            if mark and abs(t - mark[0]) < 1e-9 and abs(m - mark[1]) < 1e-9:
                cell = f"[{cell}]"
            row += f"{cell:>{width}}"
        print(f"  {t:.2f}      {row}")


def load_people(images: Path, vecs: dict[str, np.ndarray], nf: dict[str, int],
                exclude: dict[str, str], only: set[str] | None = None
                ) -> tuple[dict[str, list[str]], int, int]:
    """name -> usable image keys (a face was detected, not a known label error); `only`: keep
    these people (directory names) only."""
    people: dict[str, list[str]] = defaultdict(list)
    no_face = excluded = 0
    for p in sorted(images.glob("*/*.jpg")):
        if only is not None and p.parent.name not in only:
            continue
        key = str(p.resolve())
        if f"{p.parent.name}/{p.name}" in exclude:
            excluded += 1
        elif nf[key] > 0:
            people[p.parent.name].append(key)
        else:
            no_face += 1  # a scan finds no face here: nothing to name, nothing to enroll
    return dict(people), no_face, excluded


def cached_identification_data(images: Path
                               ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """(vectors by path, usable images per person) from the j1 cache, for the scripts that
    simulate on top of the identification protocol; they never encode."""
    cache = EncodingCache.load(default_cache(1), engine_version(1))
    paths = [str(q.resolve()) for q in sorted(images.glob("*/*.jpg"))]
    missing = [q for q in paths if q not in cache.vectors]
    if not paths or missing:
        raise SystemExit(f"{len(missing)} of {len(paths)} images are not in {cache.path}: run "
                         "`benchmarks/accuracy.py --identify --images ...` first")
    vecs = {q: cache.vectors[q] for q in paths}
    people, _, _ = load_people(images, vecs, {q: cache.n_faces[q] for q in paths},
                               LABEL_ERRORS)
    return vecs, people


def near_duplicate_names(people: dict[str, list[str]], vecs: dict[str, np.ndarray],
                         below: float) -> list[tuple[float, str, str]]:
    """Cross-name image pairs closer than `below` (label errors or look-alikes)."""
    keys = [k for v in people.values() for k in v]
    names = np.array([Path(k).parent.name for k in keys])
    x = np.stack([vecs[k] for k in keys]).astype(np.float64)
    sq = (x * x).sum(1)
    out = []
    for i in range(len(keys)):
        d = np.sqrt(np.maximum(sq[i] + sq[i + 1:] - 2.0 * x[i + 1:] @ x[i], 0.0))
        for j in np.flatnonzero((d < below) & (names[i + 1:] != names[i])):
            out.append((float(d[j]), Path(keys[i]).name, Path(keys[i + 1 + j]).name))
    return sorted(out)


def _cells(correct: np.ndarray, wrong_full: np.ndarray, wrong_small: np.ndarray) -> np.ndarray:
    return np.array([[f"{100 * correct[i, j]:.1f}/{wrong_full[i, j]}/{wrong_small[i, j]}"
                      for j in range(correct.shape[1])] for i in range(correct.shape[0])])


def fmr_threshold(rows: Sequence[tuple[float, int, int]], max_rate: float) -> float | None:
    """Largest threshold t such that every t' <= t on the (ascending) grid has a false-match rate
    hits/comparisons <= max_rate; None when the first row already exceeds it."""
    best = None
    for t, hits, pairs in rows:
        if hits > max_rate * pairs:
            break
        best = t
    return best


def variant_summary(
    args: argparse.Namespace, main: str, floor: tuple[float, str, str] | None,
    t_grid: np.ndarray, t_full: np.ndarray, m_grid: np.ndarray, inner: slice,
    full: dict[tuple[str, int], list[tuple[IdentSetup, Decisions, np.ndarray]]],
    wrong: dict[tuple[str, int], np.ndarray], correct: dict[tuple[str, int], np.ndarray],
    wrong_small: dict[tuple[str, int, int], np.ndarray], exposure: dict[tuple[int, int], int],
    safe_for: Any,
) -> dict[str, Any]:
    """Per k, for the selected variant: the safe point under the strict rule (that k alone, all
    galleries and draws, +/- buffer), the per-comparison false-match rate 0.34..0.46 before any
    margin, the threshold where it stays <= --fmr-max, wrong names by gallery size at margins
    0.10..0.14."""
    sizes = list(args.gallery_sizes)
    fm_grid = threshold_grid(0.34, 0.46)
    wide = threshold_grid(0.30, 0.55)
    margins = [m for m in (0.10, 0.11, 0.12, 0.13, 0.14) if np.isclose(m_grid, m).any()]
    out: dict[str, Any] = {"engine": engine_version(args.jitters), "jitters": args.jitters,
                           "templates": args.templates, "fmr_max": args.fmr_max,
                           "impostor_floor": floor, "k": {}}
    print(f"\n== Summary: {VARIANTS[main]}, jitters {args.jitters}; impostor floor "
          f"{floor[0]:.3f} ({floor[1]} / {floor[2]}) ==" if floor else "\n== Summary ==")
    for k in args.k:
        corr = correct[(main, k)][inner]
        pt = choose_point(safe_for(main, [k])[inner], corr, t_grid, m_grid, args.tie_tolerance)
        at = float(corr[t_grid.tolist().index(pt[0]), m_grid.tolist().index(pt[1])]) if pt else 0.0
        rows = []
        for t in wide:
            hits = sum(int((dist[st.truth < 0] <= t).sum()) for st, _, dist in full[(main, k)])
            pairs = sum(int((st.truth < 0).sum()) * len(st.subjects) for st, _, _ in
                        full[(main, k)])
            rows.append((float(t), hits, pairs))
        t_fmr = fmr_threshold(rows, args.fmr_max)
        print(f"-- k={k}: safe point (strict rule, this k alone) "
              f"{f'({pt[0]:.2f}, {pt[1]:.2f})' if pt else 'none'}, correct there {at:.1%}; "
              f"largest threshold with false-match rate <= {args.fmr_max:.0e} per comparison: "
              f"{t_fmr if t_fmr is None else f'{t_fmr:.2f}'}")
        fm = [r for r in rows if np.isclose(fm_grid, r[0]).any()]
        print("  false matches per comparison (large galleries, all draws, before margin): "
              + "  ".join(f"{t:.2f}: {h}/{n / 1e6:.1f}M={h / n:.1e}" for t, h, n in fm))
        print("  wrong names by gallery size (all draws) at thresholds "
              + " ".join(f"{t:.2f}" for t in fm_grid))
        by: dict[str, dict[str, list[int]]] = {}
        for m in margins:
            j = int(np.flatnonzero(np.isclose(m_grid, m))[0])
            for label, w in [("large", wrong[(main, k)])] + [
                    (f"N={n}", wrong_small[(main, k, n)]) for n in sizes]:
                row = [int(w[int(np.argmin(np.abs(t_full - t))), j]) for t in fm_grid]
                by.setdefault(f"{m:.2f}", {})[label] = row
                print(f"    m {m:.2f} {label:6s} " + "".join(f"{v:5d}" for v in row))
        out["k"][str(k)] = {
            "safe_point": pt, "correct_at_safe": at, "fmr_threshold": t_fmr,
            "false_match": rows, "wrong_by_size": by,
            "exposure_small": {str(n): exposure[(k, n)] for n in sizes},
            "correct_by_threshold_m012": [float(correct[(main, k)][int(np.argmin(np.abs(
                t_full - t))), int(np.flatnonzero(np.isclose(m_grid, 0.12))[0])])
                for t in fm_grid] if np.isclose(m_grid, 0.12).any() else None,
        }
    return out


def run_identify(args: argparse.Namespace) -> dict[str, Any]:
    images = args.images
    main = TEMPLATE_VARIANT[args.templates]
    paths = sorted(images.glob("*/*.jpg"))
    only = None
    if args.people:  # a subset of people (e.g. those already encoded with --jitters 10)
        only = {line.strip() for line in args.people.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
        paths = [p for p in paths if p.parent.name in only]
        print(f"--people {args.people}: {len(only)} people, {len(paths)} images")
    cache = EncodingCache.load(args.cache, engine_version(args.jitters))
    vecs, nf, stats = encode_all(paths, cache, args.workers, args.jitters)
    if args.ref_jitters != args.jitters:  # references jittered alone (enrollment-time cost)
        count: dict[str, int] = defaultdict(int)
        for path in paths:
            count[path.parent.name] += 1
        # Only people with 2+ images are ever enrolled (k references + at least one probe).
        ref_paths = [path for path in paths if count[path.parent.name] > 1]
        ref_cache = EncodingCache.load(default_cache(args.ref_jitters),
                                       engine_version(args.ref_jitters))
        refs, _, _ = encode_all(ref_paths, ref_cache, args.workers, args.ref_jitters)
        vecs.update({REF_PREFIX + k: v for k, v in refs.items()})
    exclude = {} if args.keep_label_errors else LABEL_ERRORS
    people, no_face, excluded = load_people(images, vecs, nf, exclude, only)
    print(f"\n== Identification on {images}: {len(paths)} images of "
          f"{len({p.parent.name for p in paths})} people; engine {cache.engine}; references "
          f"jitters {args.ref_jitters}; templates: "
          f"{args.templates} ({VARIANTS[main]}) ==")
    print_encode_stats(stats, nf, args.workers)
    print(f"not used: {no_face} images without a detected face (a scan has nothing to name "
          f"there), {excluded} known LFW label errors (--keep-label-errors keeps them):")
    for rel, why in exclude.items():
        print(f"  {rel}: {why}")
    dups = near_duplicate_names(people, vecs, 0.42)
    print("closest image pairs with DIFFERENT names among the usable images (d < 0.42); the "
          "smallest is the impostor floor of this model on lfw-dev:")
    for d, a, b in dups[:10]:
        print(f"  {d:.3f}  {a}  {b}")
    floor = dups[0] if dups else None

    t_grid = threshold_grid(args.id_t_min, args.id_t_max)
    m_grid = threshold_grid(0.0, args.id_m_max)
    bt, bm = args.buffer_t, args.buffer_m
    pad = max(bt, 1) * 0.01  # the safety neighbourhood is measured beyond the printed grid
    t_full = threshold_grid(args.id_t_min - pad, args.id_t_max + pad)
    inner = slice(round(pad / 0.01), round(pad / 0.01) + len(t_grid))
    sizes = list(args.gallery_sizes)
    result: dict[str, Any] = {"t_grid": t_grid.tolist(), "m_grid": m_grid.tolist(), "k": {},
                              "label_errors_excluded": list(exclude), "gallery_sizes": sizes}

    # ---- every configuration: one large gallery per draw + many small galleries -------------
    start = time.perf_counter()
    full: dict[tuple[str, int], list[tuple[IdentSetup, Decisions, np.ndarray]]] = {}
    wrong: dict[tuple[str, int], np.ndarray] = {}
    correct: dict[tuple[str, int], np.ndarray] = {}
    wrong_small: dict[tuple[str, int, int], np.ndarray] = {}
    exposure: dict[tuple[int, int], int] = {}  # stranger-face x enrolled-person comparisons
    for k in args.k:
        for variant in VARIANTS:
            if k == 1 and variant != "min":
                continue
            lst = []
            for draw in range(args.draws):
                setup = make_setup(people, k, draw)
                dist = subject_distances(setup, vecs, variant)
                lst.append((setup, decisions_from_distances(dist, setup.truth), dist))
            full[(variant, k)] = lst
            wrong[(variant, k)], correct[(variant, k)] = grid_counts(
                [d for _, d, _ in lst], t_full, m_grid)
            for size in sizes:
                groups = [g for draw in range(args.draws)
                          for g in partition_setups(people, k, draw, size)]
                gdecs = [decisions_from_distances(subject_distances(g, vecs, variant), g.truth)
                         for g in groups]
                wrong_small[(variant, k, size)] = grid_counts(gdecs, t_full, m_grid)[0]
                exposure[(k, size)] = sum(int((g.truth < 0).sum()) * len(g.subjects)
                                          for g in groups)
    if 1 in args.k:  # one reference: every variant is the nearest template
        for variant in VARIANTS:
            full.setdefault((variant, 1), full[("min", 1)])
            wrong.setdefault((variant, 1), wrong[("min", 1)])
            correct.setdefault((variant, 1), correct[("min", 1)])
            for size in sizes:
                wrong_small.setdefault((variant, 1, size), wrong_small[("min", 1, size)])
    print(f"identification runs: {time.perf_counter() - start:.1f} s")

    for k in args.k:
        setup, dec, _ = full[(main, k)][0]
        verify_against_matcher(setup, vecs, dec, main == "mean-template", [
            (args.id_t_min, 0.0, 0.6), (0.45, 0.05, 0.6), (args.id_t_max, args.id_m_max, 0.6),
            (RECOMMENDED["threshold"], RECOMMENDED["margin"], RECOMMENDED["review_threshold"]),
        ])
    print("vectorised matching rule checked against plugin.matcher.Matcher.match: identical")

    def small_sum(variant: str, k: int) -> np.ndarray:
        return sum((wrong_small[(variant, k, n)] for n in sizes),
                   np.zeros((len(t_full), len(m_grid)), dtype=np.int64))

    def safe_for(variant: str, ks: Sequence[int]) -> np.ndarray:
        ok = np.ones((len(t_full), len(m_grid)), dtype=bool)
        for k in ks:
            ok &= safe_points(wrong[(variant, k)], bt, bm)
            for n in sizes:
                ok &= safe_points(wrong_small[(variant, k, n)], bt, bm)
        return ok

    # ---- choice --------------------------------------------------------------------------
    mean_correct = np.mean([correct[(main, k)] for k in args.k], axis=0)
    chosen = choose_point(safe_for(main, args.k)[inner], mean_correct[inner], t_grid, m_grid,
                          args.tie_tolerance)
    if chosen is None:
        raise SystemExit("no safe point on the grid: lower --id-t-min")
    ci = int(np.flatnonzero(np.isclose(t_grid, chosen[0]))[0])
    cj = int(np.flatnonzero(np.isclose(m_grid, chosen[1]))[0])

    for k in args.k:
        setup0 = full[(main, k)][0][0]
        print(f"\n-- k = {k} reference photo(s) per person, {VARIANTS[main]}. Large "
              f"gallery: {len(setup0.subjects)} people enrolled, "
              f"{int((setup0.truth >= 0).sum())} probes of enrolled people, "
              f"{int((setup0.truth < 0).sum())} stranger probes (people with <= {k} usable "
              f"images, never enrolled). Small galleries: the same people in random groups of "
              f"{sizes}, each enrolled alone, everyone else a stranger. {args.draws} draws of "
              f"references; counts summed --")
        _fmt_grid(f"WRONG names, large gallery (k={k}):", t_grid, m_grid,
                  wrong[(main, k)][inner], "d", 6, chosen)
        _fmt_grid(f"WRONG names, small galleries of {sizes} together (k={k}):", t_grid, m_grid,
                  small_sum(main, k)[inner], "d", 6, chosen)
        _fmt_grid(f"correct names, % of enrolled-person probes, large gallery (k={k}):", t_grid,
                  m_grid, 100 * correct[(main, k)][inner], ".1f", 6, chosen)
        result["k"][str(k)] = {
            "subjects": len(setup0.subjects),
            "enrolled_probes": int((setup0.truth >= 0).sum()),
            "stranger_probes": int((setup0.truth < 0).sum()),
            "wrong": wrong[(main, k)][inner].tolist(),
            "wrong_small": small_sum(main, k)[inner].tolist(),
            "correct_rate": correct[(main, k)][inner].tolist(),
        }

    print(f"\n== Choice: zero wrong names at the point and at every grid point within "
          f"+/-{bt} threshold step(s) and +/-{bm} margin step(s) of 0.01, for every k in "
          f"{args.k}, every draw, the large gallery AND the small galleries {sizes}; then the "
          f"largest margin whose mean correct rate over k is within "
          f"{100 * args.tie_tolerance:.1f} points of the best safe point ==")
    print(f"chosen: threshold {chosen[0]:.2f}, margin {chosen[1]:.2f}")
    lo_t, hi_t = max(0, ci - 3), min(len(t_grid), ci + 4)
    lo_m, hi_m = max(0, cj - 3), min(len(m_grid), cj + 4)
    around: dict[str, Any] = {}
    for k in args.k:
        cells = _cells(correct[(main, k)][inner][lo_t:hi_t, lo_m:hi_m],
                       wrong[(main, k)][inner][lo_t:hi_t, lo_m:hi_m],
                       small_sum(main, k)[inner][lo_t:hi_t, lo_m:hi_m])
        _fmt_grid(f"around the chosen point, k={k}: correct % / wrong (large) / wrong (small "
                  "galleries)", t_grid[lo_t:hi_t], m_grid[lo_m:hi_m], cells, "s", 15, chosen)
        around[str(k)] = {"thresholds": t_grid[lo_t:hi_t].tolist(),
                          "margins": m_grid[lo_m:hi_m].tolist(), "cells": cells.tolist()}
        _, dec, _ = full[(main, k)][0]
        cnt = count_decisions(dec, chosen[0], chosen[1], args.review_threshold)
        print(f"  k={k}, large gallery, draw 0: correct {cnt.correct}/{cnt.enrolled_probes} "
              f"({cnt.correct / cnt.enrolled_probes:.1%}), wrong {cnt.wrong}, uncertain "
              f"{cnt.uncertain}, unknown {cnt.unknown} (of them {cnt.stranger_probes} strangers)")
    result["chosen"] = {"threshold": chosen[0], "margin": chosen[1], "around": around}

    print("\nnearest wrong names in the large galleries, any draw (what limits the threshold):")
    for k in args.k:
        seen: dict[tuple[str, str], tuple[float, float, str]] = {}
        for setup, dec, _ in full[(main, k)]:
            for i in np.flatnonzero((dec.best != dec.truth) & (dec.best_d <= chosen[0] + 0.06)):
                who = "stranger" if dec.truth[i] < 0 else setup.subjects[dec.truth[i]]
                key = (Path(setup.probes[i]).name, setup.subjects[dec.best[i]])
                if key not in seen or seen[key][0] > dec.best_d[i]:
                    seen[key] = (float(dec.best_d[i]), float(dec.gap[i]), who)
        for (probe, named), (d, g, who) in sorted(seen.items(), key=lambda x: x[1][0])[:5]:
            print(f"  k={k}: {probe} ({who}) nearest {named} at {d:.3f}, runner-up +{g:.3f}")

    # ---- gallery size: the margin protects only when look-alikes are enrolled too ----------
    kk = 2 if 2 in args.k else args.k[0]
    cols = [t for t in threshold_grid(max(args.id_t_min, chosen[0] - 0.03), chosen[0] + 0.08)]
    print(f"\nwrong names by gallery size (k={kk}, margin {chosen[1]:.2f}, all draws); every "
          "eligible person is enrolled once per draw; last column: stranger-face x "
          "enrolled-person comparisons (exposure)")
    print("  gallery      " + "".join(f"{t:7.2f}" for t in cols) + "   exposure")
    by_size: dict[str, list[int]] = {}
    large_exposure = sum(int((st.truth < 0).sum()) * len(st.subjects)
                         for st, _, _ in full[(main, kk)])
    for label, w, expo in [("large", wrong[(main, kk)], large_exposure)] + [
            (f"N={n}", wrong_small[(main, kk, n)], exposure[(kk, n)]) for n in sizes]:
        row = [int(w[int(np.argmin(np.abs(t_full - t))), cj]) for t in cols]
        by_size[label] = row
        print(f"  {label:11s}  " + "".join(f"{v:7d}" for v in row) + f"   {expo:,}")
    if sizes:
        row0 = [int(wrong_small[(main, kk, sizes[0])][int(np.argmin(np.abs(t_full - t))), 0])
                for t in cols]
        print(f"  {'N=' + str(sizes[0]) + ' m=0':11s}  " + "".join(f"{v:7d}" for v in row0))
    result["by_gallery_size"] = {"thresholds": [float(t) for t in cols], "rows": by_size}

    # ---- per-comparison false-match rate: scales to any gallery / library size -------------
    print(f"\nfalse-match rate per (stranger face, enrolled person) comparison (k={kk}, "
          f"{args.templates} template(s), large galleries, all draws). Expected wrong names "
          "before any margin ~= "
          "rate x enrolled people x stranger faces:")
    fm_rows = []
    for t in threshold_grid(0.34, 0.50):
        hits = sum(int((dist[setup.truth < 0] <= t).sum()) for setup, _, dist in
                   full[(main, kk)])
        pairs = sum(int((setup.truth < 0).sum()) * len(setup.subjects)
                    for setup, _, _ in full[(main, kk)])
        fm_rows.append((float(t), hits, pairs))
        print(f"  {t:.2f}: {hits:5d} of {pairs} = {hits / pairs:.1e}  -> "
              f"{hits / pairs * 10 * 10_000:6.2f} wrong names per 10,000 stranger faces with 10 "
              "people enrolled")
    result["false_match_rate"] = fm_rows

    # ---- per-k summary of the selected variant (jitters / templates comparison) ------------
    result["summary"] = variant_summary(
        args, main, floor, t_grid, t_full, m_grid, inner, full, wrong, correct, wrong_small,
        exposure, safe_for)

    # ---- alternatives ----------------------------------------------------------------------
    print("\n== Alternatives: each variant and k on its own, same selection rule (large + small "
          "galleries, buffer) ==")
    print(f"  {'variant':14s} k  safe point    correct there   at ({chosen[0]:.2f}, "
          f"{chosen[1]:.2f}): correct / wrong large / wrong small")
    alt: dict[str, Any] = {}
    for (variant, k) in sorted(wrong, key=lambda x: (x[1], x[0])):
        if k == 1 and variant != "min":
            continue
        corr = correct[(variant, k)][inner]
        pt = choose_point(safe_for(variant, [k])[inner], corr, t_grid, m_grid,
                          args.tie_tolerance)
        at = corr[t_grid.tolist().index(pt[0]), m_grid.tolist().index(pt[1])] if pt else 0.0
        pts = f"{pt[0]:.2f}, {pt[1]:.2f}" if pt else "none"
        wl, ws = wrong[(variant, k)][inner][ci, cj], small_sum(variant, k)[inner][ci, cj]
        print(f"  {variant:14s} {k}  {pts:12s}  {at:12.1%}    {corr[ci, cj]:8.1%} / {wl} / {ws}")
        alt[f"{variant}-k{k}"] = {"safe_point": pt, "correct_at_safe": float(at),
                                  "correct_at_chosen": float(corr[ci, cj]),
                                  "wrong_large_at_chosen": int(wl),
                                  "wrong_small_at_chosen": int(ws)}
    for v, text in VARIANTS.items():
        print(f"    {v}: {text}")

    pool = max(args.k)
    print(f"\ncontrolled k comparison at the chosen point: the same people (>= {pool + 1} usable "
          f"images) and the same probes for every k; refs from their first {pool} (per draw); "
          "strangers = people with 1 image")
    for k in args.k:
        tot = np.zeros(3, dtype=np.int64)
        for draw in range(args.draws):
            setup = make_setup(people, k, draw, stranger_max=1, fixed_refs_pool=pool)
            dec = decisions_from_distances(subject_distances(setup, vecs, main), setup.truth)
            cnt = count_decisions(dec, chosen[0], chosen[1], args.review_threshold)
            tot += (cnt.correct, cnt.wrong, cnt.enrolled_probes)
        print(f"  k={k}: {len(setup.subjects)} people, correct {tot[0] / tot[2]:.1%} of "
              f"{tot[2]} probes, wrong {tot[1]}")
        alt[f"controlled-k{k}"] = {"correct_rate": float(tot[0] / tot[2]), "wrong": int(tot[1])}
    result["alternatives"] = alt

    # ---- review threshold ------------------------------------------------------------------
    print(f"\nreview_threshold (k={kk}, at the chosen threshold/margin, all draws): of the "
          "enrolled people's faces that are NOT named, the share that reaches review with the "
          "right person among the <= 5 candidates; and the share of stranger faces reviewers see")
    review: dict[str, Any] = {}
    g10 = [(g, subject_distances(g, vecs)) for draw in range(args.draws)
           for g in partition_setups(people, kk, draw, 10)]
    large = [(s, dist) for s, _, dist in full[(main, kk)]]
    for r in (0.55, 0.60, 0.65):
        line = f"  {r:.2f}:"
        for label, items in (("large gallery", large), ("galleries of 10", g10)):
            ok = total = load = strangers = 0
            for setup, dist in items:
                dec = decisions_from_distances(dist, setup.truth)
                named = (dec.best_d <= chosen[0]) & (dec.gap >= chosen[1])
                enrolled = setup.truth >= 0
                rows = np.flatnonzero(enrolled & ~named)
                true_d = dist[rows, setup.truth[rows]]
                rank = (dist[rows] < true_d[:, None]).sum(axis=1)
                ok += int(((true_d <= r) & (rank < 5)).sum())
                total += len(rows)
                load += int((~enrolled & ~named & (dec.best_d <= r)).sum())
                strangers += int((~enrolled).sum())
            line += (f"  {label}: {ok / total:.1%} reach review, {load / strangers:.1%} of "
                     "strangers in review;")
            review[f"{r:.2f} {label}"] = {"reviewable": ok / total, "load": load / strangers}
        print(line)
    result["review"] = review
    return result


# --------------------------------------------------------------------------------------------
# Demo check (final check only: never tune on it)
# --------------------------------------------------------------------------------------------


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two css boxes (top, right, bottom, left), right/bottom exclusive."""
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[1], b[1]) - max(a[3], b[3]))
    inter = ih * iw
    union = (a[1] - a[3]) * (a[2] - a[0]) + (b[1] - b[3]) * (b[2] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def assign_boxes(dets: Sequence[Sequence[int]], truth: Sequence[Sequence[int]],
                 min_iou: float) -> dict[int, int]:
    """Greedy one-to-one assignment detection -> manifest box by decreasing IoU >= min_iou."""
    pairs = sorted(((iou(d, t), i, j) for i, d in enumerate(dets) for j, t in enumerate(truth)),
                   reverse=True)
    used_d: set[int] = set()
    used_t: set[int] = set()
    out = {}
    for v, i, j in pairs:
        if v < min_iou or i in used_d or j in used_t:
            continue
        out[i] = j
        used_d.add(i)
        used_t.add(j)
    return out


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from plugin.imaging import decode
    from plugin.matcher import Matcher, MatchSettings
    from plugin.models import FaceState

    demo = args.demo
    manifest = json.loads((demo / "manifest.json").read_text(encoding="utf-8"))
    settings = MatchSettings(args.threshold, args.margin, args.review_threshold)
    engine = accuracy_engine(args.jitters)
    ref_engine = accuracy_engine(args.ref_jitters)
    start = time.perf_counter()
    enrolled = args.enroll
    ids = {name: uuid.UUID(int=i + 1) for i, name in enumerate(enrolled)}
    names = {v: k for k, v in ids.items()}
    sid, rows = [], []
    people = {p["name"]: p for p in manifest["people"]}
    for name in enrolled:
        for ref in people[name]["refs"]:
            img = decode(demo / ref)
            dets = engine.detect(img)
            if len(dets) != 1:
                raise SystemExit(f"{ref}: {len(dets)} faces detected, enrollment needs exactly 1")
            sid.append(ids[name])
            rows.append(ref_engine.encode(img, dets)[0])
    if args.templates == "mean":  # one averaged template per person (lfw-dev alternative)
        sid, rows = list(ids.values()), [
            np.mean([r for s_, r in zip(sid, rows, strict=True) if s_ == u], axis=0)
            for u in ids.values()]
    matcher = Matcher(sid, np.stack(rows), settings)
    print(f"\n== Demo check (final check, not tuned on): threshold {settings.threshold:.2f}, "
          f"margin {settings.margin:.2f}, review_threshold {settings.review_threshold:.2f}; "
          f"templates: {args.templates}; jitters {args.jitters}, references "
          f"{args.ref_jitters}; enrolled {', '.join(enrolled)} ==")
    target = {"named": 0, "uncertain": 0, "unknown": 0, "missed": 0, "total": 0}
    wrong: list[str] = []
    stranger_close: list[str] = []
    per_face: list[str] = []
    analysed = []
    for photo in manifest["photos"]:
        img = decode(demo / photo["path"])
        dets = engine.detect(img)
        vecs = engine.encode(img, dets)
        analysed.append((photo, dets, vecs, matcher.match(vecs) if len(dets) else []))
    vouched = corroborate_demo(analysed, matcher, settings, args) if args.corroborate else {}
    for photo, dets, _, matches in analysed:
        matches = [vouched.get((photo["path"], i), m) for i, m in enumerate(matches)]
        truth = photo["faces"]
        assign = assign_boxes([d.box.as_css() for d in dets], [f["box"] for f in truth],
                              args.min_iou)
        seen = set(assign.values())
        for j, face in enumerate(truth):
            if face["person"] in enrolled:
                target["total"] += 1
                if j not in seen:
                    target["missed"] += 1
        for i, (det, m) in enumerate(zip(dets, matches, strict=True)):
            person = truth[assign[i]]["person"] if i in assign else None
            label = person or ("stranger" if i in assign else "not in manifest")
            named = names[m.subject_id] if m.state == FaceState.AUTO else None
            if person in enrolled:
                key = "named" if named == person else (
                    "wrong" if named else m.state.value)
                if key != "wrong":
                    target[key] += 1
                near = names[m.candidates[0]] if m.candidates else named
                per_face.append(f"{photo['path']}: {person} -> {key} (nearest {near}, "
                                f"d={m.distance:.3f}"
                                f"{', vouched' if (photo['path'], i) in vouched else ''})")
            if named and named != person:
                wrong.append(f"{photo['path']} {det.box.as_css()}: {label} named {named} "
                             f"at {m.distance:.3f}")
            elif not named and person not in enrolled and m.distance is not None \
                    and m.distance <= settings.review_threshold:
                near = names[m.candidates[0]] if m.candidates else "?"
                stranger_close.append(f"{photo['path']}: {label} -> {m.state.value} "
                                      f"(nearest {near}, d={m.distance:.3f})")
    secs = time.perf_counter() - start
    print(f"faces of the enrolled people: {target['total']}; named correctly "
          f"{target['named']}, uncertain {target['uncertain']}, unknown {target['unknown']}, "
          f"not detected {target['missed']}")
    for line in per_face:
        print(f"  {line}")
    print(f"WRONG names: {len(wrong)}")
    for line in wrong:
        print(f"  {line}")
    print(f"other faces sent to review (uncertain): {len(stranger_close)}")
    for line in stranger_close:
        print(f"  {line}")
    verdict = target["named"] > 12 and not wrong
    print(f"acceptance (more than 12 of {target['total']} named, zero wrong): "
          f"{'PASS' if verdict else 'FAIL'}  ({secs:.1f} s)")
    return {"settings": {"threshold": settings.threshold, "margin": settings.margin,
                         "review_threshold": settings.review_threshold,
                         "corroborate": [args.corroborate_anchor, args.corroborate_threshold]
                         if args.corroborate else None},
            **target, "wrong": wrong, "pass": verdict, "seconds": secs}


def corroborate_demo(analysed: Sequence[tuple[dict, Any, np.ndarray, Sequence[Any]]],
                     matcher: Any, settings: Any, args: argparse.Namespace
                     ) -> dict[tuple[str, int], Any]:
    """The product's same-run corroboration (plugin/corroboration.py) over the demo photos:
    (photo path, face index) -> the Match a vouched face gets."""
    from plugin.corroboration import CorroborationSettings, RunCorroboration
    from plugin.matcher import Match
    from plugin.models import FaceBox, FaceRecord, FaceState

    run = RunCorroboration(matcher, settings.margin, CorroborationSettings(
        anchor=args.corroborate_anchor, threshold=args.corroborate_threshold))
    box = FaceBox(top=0, right=1, bottom=1, left=0)  # boxes play no part in the rule
    for photo, _, vecs, matches in analysed:
        run.observe(("demo", photo["path"]),
                    [FaceRecord(box=box, state=m.state, subject_id=m.subject_id,
                                distance=m.distance) for m in matches],
                    dict(enumerate(vecs)))
    return {(v.asset[1], v.idx): Match(FaceState.AUTO, v.subject_id, v.distance)
            for v in run.resolve()}


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Accuracy of Consentry's face pipeline on LFW-style data (see module doc).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", type=Path, help="LFW pairs file (pairs mode)")
    p.add_argument("--images", type=Path, help="images directory (<name>/<name>_NNNN.jpg)")
    p.add_argument("--cache", type=Path, default=None,
                   help="npz cache of encodings keyed by path (default: out/encodings.npz for "
                   "--jitters 1, out/encodings_j<N>.npz otherwise); 'none' disables")
    p.add_argument("--jitters", type=int, default=1,
                   help="DlibEngine(jitters=N): dlib averages N jittered chips per face "
                   "(~67 ms x N per face); used for probes, and for references unless "
                   "--ref-jitters says otherwise")
    p.add_argument("--ref-jitters", type=int, default=None,
                   help="jitters of the enrolled reference photos only (identify and demo "
                   "modes; an enrollment-time cost); default: --jitters")
    p.add_argument("--workers", type=int, default=2, help="encoding processes (max 2 here)")
    p.add_argument("--t-min", type=float, default=0.30, help="pairs: lowest threshold")
    p.add_argument("--t-max", type=float, default=0.65, help="pairs: highest threshold")
    p.add_argument("--all-thresholds", action="store_true",
                   help="pairs: print every 0.01 step, not only every 0.05")
    p.add_argument("--mark", type=float, default=RECOMMENDED["threshold"],
                   help="pairs: threshold row to mark in the table")
    p.add_argument("--identify", action="store_true", help="identification mode")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3],
                   help="identify: reference photos per person")
    p.add_argument("--draws", type=int, default=5,
                   help="identify: reference draws (0 = first k by number, then random)")
    p.add_argument("--id-t-min", type=float, default=0.30)
    p.add_argument("--id-t-max", type=float, default=0.55)
    p.add_argument("--id-m-max", type=float, default=0.15)
    p.add_argument("--people", type=Path,
                   help="identify: only these people (one directory name a line); the same "
                   "subset for two runs makes them comparable")
    p.add_argument("--fmr-max", type=float, default=1e-6,
                   help="identify: summary reports the largest threshold whose false-match rate "
                   "per (stranger face x enrolled person) comparison stays at or below this")
    p.add_argument("--keep-label-errors", action="store_true",
                   help="identify: keep the known LFW label errors (LABEL_ERRORS)")
    p.add_argument("--gallery-sizes", type=int, nargs="*", default=[3, 10, 50],
                   help="identify: small-gallery sizes to check")
    p.add_argument("--tie-tolerance", type=float, default=0.005,
                   help="identify: correct-rate loss accepted for a larger margin")
    p.add_argument("--buffer-t", type=int, default=1,
                   help="identify: safety buffer, threshold steps of 0.01 with zero wrong names")
    p.add_argument("--buffer-m", type=int, default=1,
                   help="identify: safety buffer, margin steps of 0.01 with zero wrong names")
    p.add_argument("--demo", type=Path, help="demo directory (final check)")
    p.add_argument("--enroll", nargs="+",
                   default=["Barack_Obama", "George_Clooney", "Megawati_Sukarnoputri"],
                   help="demo: people to enroll (those with a biometric grant)")
    p.add_argument("--min-iou", type=float, default=0.4, help="demo: detection/manifest IoU")
    p.add_argument("--templates", choices=["nearest", "mean"], default="nearest",
                   help="identify and demo: Matcher as shipped (nearest reference) or one mean "
                   "template per person (the average of the k reference vectors)")
    p.add_argument("--threshold", type=float, default=RECOMMENDED["threshold"])
    p.add_argument("--margin", type=float, default=RECOMMENDED["margin"])
    p.add_argument("--review-threshold", type=float, default=RECOMMENDED["review_threshold"])
    p.add_argument("--no-corroborate", dest="corroborate", action="store_false",
                   help="demo: the matcher alone, without same-run corroboration")
    p.add_argument("--corroborate-anchor", type=float, default=0.36,
                   help="demo: a face named at <= this vouches (matching.corroborate_anchor)")
    p.add_argument("--corroborate-threshold", type=float, default=0.43,
                   help="demo: vouched-for faces up to this far (matching.corroborate_threshold)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.ref_jitters is None:
        args.ref_jitters = args.jitters
    if args.jitters < 1 or args.ref_jitters < 1:
        raise SystemExit("--jitters and --ref-jitters must be >= 1")
    if args.cache is None:
        args.cache = default_cache(args.jitters)
    elif str(args.cache).lower() == "none":
        args.cache = None
    start = time.perf_counter()
    if args.demo:
        out = run_demo(args)
    elif args.identify:
        if not args.images:
            raise SystemExit("--identify needs --images DIR")
        out = run_identify(args)
    else:
        if not (args.pairs and args.images):
            raise SystemExit("pairs mode needs --pairs FILE and --images DIR")
        out = run_pairs(args)
    elapsed = time.perf_counter() - start
    print(f"\ntotal time: {elapsed:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out["total_seconds"] = elapsed
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
