"""What `matching.learn_from_review` does to names and wrong names, simulated on lfw-dev.

Reads the j1 encodings cache of `accuracy.py` (benchmarks/out/encodings.npz; run
`accuracy.py --identify` first on a fresh machine). For every draw of k references (the
identification protocol of accuracy.py: every lfw-dev person with k+1 usable images enrolled,
people with fewer images as strangers), the matcher runs at the given point; then, as a reviewer
would, the first of each enrolled person's own faces left *uncertain* (nearest distance <= the
review threshold, not named) is confirmed and becomes one more template (plugin/learning.py:
k + 1 templates, at most 3). The remaining faces are matched again. Printed: templates learned,
correct names and wrong names before and after on the same remaining faces, and wrong names after
learning over a threshold x margin grid, in the large gallery and in galleries of 10 people.

  uv run python benchmarks/learning.py [--threshold 0.41 --margin 0.14] [--json FILE]
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
    partition_setups,
    subject_distances,
)

LEARNED_MAX = 3  # plugin.learning.MAX_TEMPLATES


def simulate(setups: Sequence[IdentSetup], vecs: dict[str, np.ndarray], *, threshold: float,
             margin: float, review: float, grid_t: Sequence[float], grid_m: Sequence[float]
             ) -> dict[str, Any]:
    out = {"learned": 0, "probes": 0, "strangers": 0, "correct_before": 0, "correct_after": 0,
           "wrong_before": 0, "wrong_after": 0,
           "wrong_grid": np.zeros((len(grid_t), len(grid_m)), dtype=np.int64)}
    for s in setups:
        dec = decisions_from_distances(subject_distances(s, vecs), s.truth)
        named = (dec.best_d <= threshold) & (dec.gap >= margin)
        uncertain = ~named & (dec.best_d <= review)
        confirmed: dict[str, int] = {}
        if s.k < LEARNED_MAX:
            for i in np.flatnonzero(uncertain & (s.truth >= 0)):
                confirmed.setdefault(s.subjects[s.truth[i]], int(i))
        keep = np.ones(len(s.probes), dtype=bool)
        keep[list(confirmed.values())] = False
        after = IdentSetup(k=s.k, draw=s.draw, subjects=s.subjects,
                           probes=[p for p, k in zip(s.probes, keep, strict=True) if k],
                           truth=s.truth[keep],
                           ref_keys={n: [*r, *([s.probes[confirmed[n]]] if n in confirmed
                                                else [])] for n, r in s.ref_keys.items()})
        dec2 = decisions_from_distances(subject_distances(after, vecs), after.truth)
        truth = after.truth
        before_named, before_best = named[keep], dec.best[keep]
        after_named = (dec2.best_d <= threshold) & (dec2.gap >= margin)
        out["learned"] += len(confirmed)
        out["probes"] += int((truth >= 0).sum())
        out["strangers"] += int((truth < 0).sum())
        out["correct_before"] += int((before_named & (before_best == truth)).sum())
        out["wrong_before"] += int((before_named & (before_best != truth)).sum())
        out["correct_after"] += int((after_named & (dec2.best == truth)).sum())
        out["wrong_after"] += int((after_named & (dec2.best != truth)).sum())
        for a, t in enumerate(grid_t):
            for b, m in enumerate(grid_m):
                n = (dec2.best_d <= t) & (dec2.gap >= m)
                out["wrong_grid"][a, b] += int((n & (dec2.best != truth)).sum())
    out["wrong_grid"] = out["wrong_grid"].tolist()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=Path("../shared/testdata/lfw-dev/images"))
    p.add_argument("--threshold", type=float, default=0.41)
    p.add_argument("--margin", type=float, default=0.14)
    p.add_argument("--review-threshold", type=float, default=0.60)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    vecs, people = cached_identification_data(args.images)
    grid_t = [round(0.36 + 0.01 * i, 2) for i in range(11)]
    grid_m = [0.10, 0.12, 0.14]
    print(f"learn_from_review simulated at threshold {args.threshold}, margin {args.margin}, "
          f"review {args.review_threshold}; {args.draws} draws; lfw-dev j1 encodings")
    result: dict[str, Any] = {}
    for k in (1, 2):
        for label, setups in (
                ("large gallery", [make_setup(people, k, d) for d in range(args.draws)]),
                ("galleries of 10", [g for d in range(args.draws)
                                     for g in partition_setups(people, k, d, 10)])):
            r = simulate(setups, vecs, threshold=args.threshold, margin=args.margin,
                         review=args.review_threshold, grid_t=grid_t, grid_m=grid_m)
            result[f"k{k} {label}"] = r
            n = r["probes"]
            print(f"\nk={k} references, {label}: {r['learned']} templates learned; "
                  f"{n} remaining faces of enrolled people, {r['strangers']} stranger faces")
            print(f"  correct names {r['correct_before'] / n:.1%} -> {r['correct_after'] / n:.1%}"
                  f"; wrong names {r['wrong_before']} -> {r['wrong_after']}")
            print("  wrong names after learning, margin " + " / ".join(map(str, grid_m)) + ": "
                  + "  ".join(f"{t:.2f}: " + "/".join(str(r["wrong_grid"][a][b])
                                                      for b in range(len(grid_m)))
                              for a, t in enumerate(grid_t)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
