"""Same-run corroboration simulated on lfw-dev: may a face named in this run vouch for another?

Reads the j1 encodings cache of `accuracy.py` (run `accuracy.py --identify` first). For every
draw of the identification protocol (k references per enrolled person, strangers mixed in, the
large gallery and galleries of 3/10/50), the matcher names faces at the shipped point. Faces it
named at a distance <= `--anchor` become *anchors* of their person for the rest of the run (in
memory only). Every face left unnamed is matched again with each person's anchors counted as
templates; it is named when an anchor is the nearest evidence, within a second-pass threshold,
with the same margin (`plugin/corroboration.py`'s rule; `--hops N` repeats it with vouched
faces as anchors, not the product's rule). Printed per k and gallery: correct and wrong names
of the matcher alone, then over a grid of second-pass thresholds. Before the grid, the
simulation is checked against `plugin.corroboration` on one setup.

  uv run python benchmarks/corroborate.py [--anchor 0.36] [--cap N] [--reach D] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import (
    IdentSetup,
    cached_identification_data,
    decisions_from_distances,
    make_setup,
    matcher_for,
    partition_setups,
    subject_distances,
)


def anchor_distances(base: np.ndarray, pv: np.ndarray, anchors: np.ndarray, who: np.ndarray,
                     cap: int | None = None) -> np.ndarray:
    """(P, S): each face's distance to the nearest anchor of each subject (inf: none; a face
    is never its own anchor). `cap`: at most this many anchors a subject, the nearest to its
    templates (the product keeps the first 32 it meets)."""
    extra = np.full(base.shape, np.inf)
    idx = np.flatnonzero(anchors)
    if cap is not None and len(idx) > cap:
        best = base.min(axis=1)
        keep = [i for s in np.unique(who[idx])
                for i in sorted(idx[who[idx] == s], key=lambda j: best[j])[:cap]]
        idx = np.array(sorted(keep), dtype=np.intp)
    if not len(idx):
        return extra
    a = pv[idx].astype(np.float64)
    x = pv.astype(np.float64)
    d = np.sqrt(np.maximum((x * x).sum(1)[:, None] + (a * a).sum(1)[None, :] - 2.0 * x @ a.T,
                           0.0))
    d[idx, np.arange(len(idx))] = np.inf
    for s in np.unique(who[idx]):
        extra[:, s] = d[:, who[idx] == s].min(axis=1)
    return extra


def corroborate(base: np.ndarray, pv: np.ndarray, *, threshold: float, margin: float,
                anchor: float, second: float, hops: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (named, who) after the corroboration passes (the product's rule, `hops` = 1).

    base: (P, S) distances to the enrolled templates; pv: (P, 128) the faces.
    """
    dec = decisions_from_distances(base, np.zeros(len(base)))
    named = (dec.best_d <= threshold) & (dec.gap >= margin)
    who = np.where(named, dec.best, -1)
    anchors = named & (dec.best_d <= anchor)
    for _ in range(hops):
        extra = anchor_distances(base, pv, anchors, who)
        dist = np.minimum(base, extra)
        dec2 = decisions_from_distances(dist, np.zeros(len(base)))
        rows = np.arange(len(dist))
        new = (~named & (dec2.best_d <= second) & (dec2.gap >= margin)
               & (extra[rows, dec2.best] < base[rows, dec2.best]))
        if not new.any():
            break
        who = np.where(new, dec2.best, who)
        named = named | new
        anchors = anchors | new
    return named, who


def run(setups: Sequence[IdentSetup], vecs: dict[str, np.ndarray], *, threshold: float,
        margin: float, anchor: float, hops: int, seconds: Sequence[float], reach: float,
        cap: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"probes": 0, "strangers": 0, "correct_before": 0, "wrong_before": 0,
                           "correct": [0] * len(seconds), "wrong": [0] * len(seconds)}
    for s in setups:
        base = subject_distances(s, vecs).astype(np.float64)
        pv = np.stack([vecs[p] for p in s.probes])
        truth = s.truth
        dec = decisions_from_distances(base, truth)
        named0 = (dec.best_d <= threshold) & (dec.gap >= margin)
        out["probes"] += int((truth >= 0).sum())
        out["strangers"] += int((truth < 0).sum())
        out["correct_before"] += int((named0 & (dec.best == truth)).sum())
        out["wrong_before"] += int((named0 & (dec.best != truth)).sum())
        if hops == 1:  # one anchor set for every second-pass threshold: compute it once
            who0 = np.where(named0, dec.best, -1)
            extra = anchor_distances(base, pv, named0 & (dec.best_d <= anchor), who0, cap)
            dist = np.minimum(base, extra)
            dec2 = decisions_from_distances(dist, truth)
            rows = np.arange(len(dist))
            # as the product: only an anchor names (the templates alone keep the first pass)
            by_anchor = extra[rows, dec2.best] < base[rows, dec2.best]
            # the templates must point the same way: the anchor's person is the face's
            # nearest enrolled person, within `reach` of their templates
            agree = (dec2.best == dec.best) & (dec.best_d <= reach)
        for i, t2 in enumerate(seconds):
            if hops == 1:
                new = ~named0 & (dec2.best_d <= t2) & (dec2.gap >= margin) & agree & by_anchor
                named, who = named0 | new, np.where(new, dec2.best, who0)
            else:
                named, who = corroborate(base, pv, threshold=threshold, margin=margin,
                                         anchor=anchor, second=t2, hops=hops)
            out["correct"][i] += int((named & (who == truth)).sum())
            out["wrong"][i] += int((named & (who != truth)).sum())
    return out


def verify_against_product(setup: IdentSetup, vecs: dict[str, np.ndarray], *, threshold: float,
                           margin: float, anchor: float, second: float) -> int:
    """The simulation must give exactly the verdicts of plugin.corroboration on one setup
    (every probe its own asset). Returns the number of vouched faces compared."""
    from plugin.corroboration import CorroborationSettings, RunCorroboration
    from plugin.matcher import MatchSettings
    from plugin.models import FaceBox, FaceRecord

    matcher, ids = matcher_for(setup, vecs, False, MatchSettings(threshold, margin, 0.6))
    n = len(setup.probes)
    run = RunCorroboration(matcher, margin, CorroborationSettings(
        anchor=anchor, threshold=second, max_anchors_per_subject=n, max_anchors=n,
        max_pending=n))
    pv = np.stack([vecs[p] for p in setup.probes]).astype(np.float32)
    box = FaceBox(top=0, right=1, bottom=1, left=0)
    for i, m in enumerate(matcher.match(pv)):
        run.observe(("lfw", str(i)), [FaceRecord(box=box, state=m.state, subject_id=m.subject_id,
                                                 distance=m.distance)], {0: pv[i]})
    product = {(int(v.asset[1]), ids.index(v.subject_id)) for v in run.resolve()}
    base = subject_distances(setup, vecs).astype(np.float64)
    named0 = decisions_from_distances(base, setup.truth)
    first = (named0.best_d <= threshold) & (named0.gap >= margin)
    named, who = corroborate(base, pv, threshold=threshold, margin=margin, anchor=anchor,
                             second=second, hops=1)
    simulated = {(int(i), int(who[i])) for i in np.flatnonzero(named & ~first)}
    if product != simulated:
        raise SystemExit(f"simulation and plugin.corroboration disagree: {len(product)} vs "
                         f"{len(simulated)} vouched faces ({len(product ^ simulated)} differ)")
    return len(product)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=Path("../shared/testdata/lfw-dev/images"))
    p.add_argument("--threshold", type=float, default=0.41)
    p.add_argument("--margin", type=float, default=0.14)
    p.add_argument("--anchor", type=float, default=0.36,
                   help="a face named at <= this distance vouches for others")
    p.add_argument("--hops", type=int, default=1)
    p.add_argument("--reach", type=float, default=9.0,
                   help="hops=1: name only a face whose nearest enrolled person by the templates "
                        "is the anchor's, at most this far (default: no such check)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--gallery-sizes", type=int, nargs="*", default=[3, 10, 50])
    p.add_argument("--json", type=Path)
    p.add_argument("--cap", type=int,
                   help="hops=1: at most this many anchors a person (those nearest their "
                        "templates); default: no cap")
    args = p.parse_args(argv)
    vecs, people = cached_identification_data(args.images)
    seconds = [round(0.36 + 0.01 * i, 2) for i in range(13)]
    if args.cap is None and args.reach >= 9.0:  # the product's rule: check it is the same
        checked = verify_against_product(make_setup(people, 2, 0), vecs,
                                         threshold=args.threshold, margin=args.margin,
                                         anchor=args.anchor, second=0.43)
        print(f"check: plugin.corroboration vouches for the same {checked} faces as the "
              "simulation (k=2, draw 0, large gallery, second pass 0.43)")
    print(f"same-run corroboration: first pass ({args.threshold}, {args.margin}); anchors named "
          f"at <= {args.anchor}; {args.hops} hop(s); reach {args.reach}; "
          f"{args.draws} draws; lfw-dev j1")
    print("second-pass thresholds: " + " ".join(f"{t:.2f}" for t in seconds))
    result: dict[str, Any] = {}
    for k in args.k:
        galleries: list[tuple[str, list[IdentSetup]]] = [
            ("large", [make_setup(people, k, d) for d in range(args.draws)])]
        galleries += [(f"N={n}", [g for d in range(args.draws)
                                  for g in partition_setups(people, k, d, n)])
                      for n in args.gallery_sizes]
        for label, setups in galleries:
            r = run(setups, vecs, threshold=args.threshold, margin=args.margin,
                    anchor=args.anchor, hops=args.hops, seconds=seconds, reach=args.reach,
                    cap=args.cap)
            result[f"k{k} {label}"] = r
            n = r["probes"]
            print(f"k={k} {label:>5}: before {r['correct_before'] / n:6.1%} / "
                  f"{r['wrong_before']:3d} wrong | correct% "
                  + " ".join(f"{c / n * 100:5.1f}" for c in r["correct"])
                  + " | wrong " + " ".join(f"{w:3d}" for w in r["wrong"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
