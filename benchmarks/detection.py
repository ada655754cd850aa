"""Recall and cost of the face detection strategies on the demo manifest's boxes.

    uv run python benchmarks/detection.py [--demo DIR] [--repeat N] [--json FILE]

Every photo of the manifest goes through:
- `plain`: what a script using face_recognition as-is does: `load_image_file` (full size),
  `face_locations(number_of_times_to_upsample=1)`;
- Consentry's `decode` (bounded to `--max-side`, reduced-scale JPEG decoding) followed by
  `DlibEngine.detect` in several settings: fixed upsampling 0 and 1, and the adaptive
  strategy with its second pass on the regions around small faces or on the whole image.

A manifest face counts as found when a detection overlaps it with IoU >= 0.4 (as in
tests/test_demo_e2e.py); `extra` counts detections that overlap no manifest face. Times are
the median of `--repeat` runs per photo, decode included, one process.

`--scale 0.7` first resizes every photo (and its boxes) by that factor and saves it as a JPEG
(quality 95) in a temporary folder: the same scenes with smaller faces, which is where the
adaptive decision matters (the demo's faces are mostly large or in small photos).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.demo import testdata_dir
from plugin.engine import DetectorSettings, DlibEngine
from plugin.imaging import decode

Box = tuple[int, int, int, int]


def iou(a: Box, b: Box) -> float:
    t, r, btm, lft = a
    t2, r2, b2, l2 = b
    inter = max(0, min(btm, b2) - max(t, t2)) * max(0, min(r, r2) - max(lft, l2))
    union = (btm - t) * (r - lft) + (b2 - t2) * (r2 - l2) - inter
    return inter / union if union else 0.0


def strategies(max_side: int) -> dict[str, DetectorSettings]:
    adaptive = DetectorSettings()
    return {
        "up0": DetectorSettings(upsample=0, adaptive=False),
        "up1": DetectorSettings(upsample=1, adaptive=False),
        "adaptive-regions": adaptive,
        "adaptive-regions-empty-full": replace(adaptive, empty_pixels=0),
        "adaptive-regions-empty-600k": replace(adaptive, empty_pixels=600_000),
        "adaptive-whole": replace(adaptive, second_area="whole"),
        "adaptive-regions-sf120-reach3": replace(adaptive, small_face=120, reach=3.0),
        "adaptive-regions-sf80": replace(adaptive, small_face=80),
        "adaptive-regions-sf160": replace(adaptive, small_face=160),
    }


def plain_detect(path: Path) -> list[Box]:
    import face_recognition

    image = face_recognition.load_image_file(str(path))
    return [tuple(b) for b in face_recognition.face_locations(image, 1)]


def score(found: list[Box], faces: list[dict]) -> tuple[int, int, int, int]:
    """(found, of, found among clear faces, extra detections)."""
    hit = [any(iou(f, tuple(face["box"])) >= 0.4 for f in found) for face in faces]
    clear = sum(h for h, face in zip(hit, faces, strict=True) if not face.get("hard"))
    extra = sum(all(iou(f, tuple(face["box"])) < 0.4 for face in faces) for f in found)
    return sum(hit), len(faces), clear, extra


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def rescaled(demo: Path, photos: list[dict], factor: float, folder: Path) -> list[dict]:
    from PIL import Image

    out = []
    for photo in photos:
        with Image.open(demo / photo["path"]) as image:
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            target = folder / photo["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(target, quality=95)
        faces = [{**f, "box": [round(v * factor) for v in f["box"]]} for f in photo["faces"]]
        out.append({**photo, "faces": faces, "width": size[0], "height": size[1]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=testdata_dir() / "demo")
    parser.add_argument("--max-side", type=int, default=1600)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="strategies to run (default: all)")
    parser.add_argument("--photos", nargs="*", help="manifest paths containing these strings")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.scale != 1.0:
            manifest = json.loads((args.demo / "manifest.json").read_text(encoding="utf-8"))
            photos = rescaled(args.demo, manifest["photos"], args.scale, Path(tmp))
            Path(tmp, "manifest.json").write_text(json.dumps({"photos": photos}))
            args.demo = Path(tmp)
        run(args)


def run(args: argparse.Namespace) -> None:
    manifest = json.loads((args.demo / "manifest.json").read_text(encoding="utf-8"))
    photos = [p for p in manifest["photos"]
              if not args.photos or any(s in p["path"] for s in args.photos)]
    names = ["plain", *strategies(args.max_side)]
    if args.only:
        names = [n for n in names if n in args.only]
    engines = {n: DlibEngine(s) for n, s in strategies(args.max_side).items() if n in names}
    for e in engines.values():
        e.load()
    totals = {n: {"found": 0, "faces": 0, "clear_found": 0, "extra": 0, "seconds": 0.0,
                  "passes": 0} for n in names}
    clear_total = sum(1 for p in photos for f in p["faces"] if not f.get("hard"))
    rows = []
    for photo in photos:
        path = args.demo / photo["path"]
        row = {"photo": photo["path"], "faces": len(photo["faces"])}
        for name in names:
            if name == "plain":
                found, secs = timed(lambda p=path: plain_detect(p), args.repeat)
                passes = 1
            else:
                engine = engines[name]
                before = engine.detector_passes

                def run(p=path, e=engine):
                    image = decode(p, max_side=args.max_side)
                    return [d.box.as_css() for d in e.detect(image)]

                found, secs = timed(run, args.repeat)
                passes = (engine.detector_passes - before) // args.repeat
            got, of, clear, extra = score(found, photo["faces"])
            t = totals[name]
            t["found"] += got
            t["faces"] += of
            t["clear_found"] += clear
            t["extra"] += extra
            t["seconds"] += secs
            t["passes"] += passes
            row[name] = {"found": got, "extra": extra, "ms": round(secs * 1000, 1),
                         "passes": passes}
        rows.append(row)
        print(photo["path"], " ".join(f"{n}={row[n]['found']}/{row['faces']}"
                                      f"+{row[n]['extra']} {row[n]['ms']}ms"
                                      for n in names), flush=True)
    print(f"\n{'strategy':24} {'found':>7} {'clear':>8} {'extra':>6} {'time s':>8} "
          f"{'passes':>7}")
    for name, t in totals.items():
        print(f"{name:24} {t['found']:>3}/{t['faces']:<3} {t['clear_found']:>3}/{clear_total:<4} "
              f"{t['extra']:>6} {t['seconds']:>8.2f} {t['passes']:>7}")
    if args.json:
        args.json.write_text(json.dumps({"totals": totals, "clear_faces": clear_total,
                                         "photos": rows}, indent=1))


if __name__ == "__main__":
    main()
