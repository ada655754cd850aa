"""Images/second of `consentry scan` against a plain face_recognition loop, in one run.

    uv run python benchmarks/throughput.py [--photos DIR] [--copies N]

Both sides see the same photos (the demo library of $CONSENTRY_TESTDATA/demo, replicated
`--copies` times under distinct names). The plain loop is what a script using face_recognition
as-is does: load, locate (HOG, 1 upsample, its default 'hog' model), encode, per image.
`consentry scan` does all of that plus matching, the consent policy, XMP write-back through
exiftool, the state database and the audit log. Printed: images/s of each, their ratio,
detector calls, and the rescan time of unchanged photos.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from plugin.demo import testdata_dir


def build_library(source: Path, target: Path, copies: int) -> list[Path]:
    photos = sorted((source / "library").rglob("*.jpg"))
    out = []
    for i in range(copies):
        for p in photos:
            dest = target / f"copy{i:03d}" / p.relative_to(source / "library")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
            out.append(dest)
    return out


def plain_loop(files: list[Path]) -> tuple[float, int]:
    import face_recognition

    faces = 0
    start = time.perf_counter()
    for f in files:
        image = face_recognition.load_image_file(str(f))
        boxes = face_recognition.face_locations(image, number_of_times_to_upsample=1)
        faces += len(face_recognition.face_encodings(image, boxes))
    return time.perf_counter() - start, faces


def consentry_scan(source: Path, work: Path, copies: int) -> dict[str, float]:
    from plugin.app import App
    from plugin.cli import scan_app
    from plugin.demo import run_demo

    # The demo sets up people, consents and templates; its scan is not timed here.
    demo_dir = work / "consentry"
    library = demo_dir / "library"
    quiet = Console(file=io.StringIO())
    lib_source = work / "demo-source"
    (lib_source / "library").mkdir(parents=True)
    shutil.copy(source / "manifest.json", lib_source / "manifest.json")
    shutil.copytree(source / "people", lib_source / "people")
    run_demo(out=demo_dir, photos=lib_source, console=quiet)
    build_library(source, library, copies)
    with App.open(demo_dir / "consentry.toml") as a:
        calls0 = a.engine.detector_calls
        start = time.perf_counter()
        scan_app(a, paths=[], out=quiet)
        first = time.perf_counter() - start
        calls = a.engine.detector_calls - calls0
        start = time.perf_counter()
        scan_app(a, paths=[], out=quiet)
        rescan = time.perf_counter() - start
    return {"first": first, "rescan": rescan, "detector_calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=testdata_dir() / "demo")
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = build_library(args.photos, work / "plain", args.copies)
        n = len(files)
        plain_s, plain_faces = plain_loop(files)
        os.environ.setdefault("CONSENTRY_TESTDATA", str(args.photos.parent))
        scan = consentry_scan(args.photos, work, args.copies)
    result = {
        "images": n,
        "plain_images_per_s": round(n / plain_s, 2),
        "plain_faces": plain_faces,
        "scan_images_per_s": round(n / scan["first"], 2),
        "ratio_scan_over_plain": round(plain_s / scan["first"], 2),
        "scan_detector_calls": scan["detector_calls"],
        "rescan_unchanged_s": round(scan["rescan"], 3),
        "rescan_share_of_first_scan": round(scan["rescan"] / scan["first"], 4),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
