"""Images/second of `consentry scan` against a plain face_recognition loop, in one run.

    uv run python benchmarks/throughput.py --files 40            # quick (shared machine)
    uv run python benchmarks/throughput.py --files 500 2000      # the issue's comparison

Both sides see the same library: the 35 demo photos ($CONSENTRY_TESTDATA/demo) replicated to
`--files` files with distinct names. The plain loop is what a script using face_recognition as-is
does, in one process: load, locate (HOG, 1 upsample, its default 'hog' model), encode every face.
`consentry scan` does all of that plus matching, the consent policy, XMP write-back through
exiftool, the state database and the audit log, with its default settings (adaptive upsampling,
quality gates, one analysis process per core).

Phases, each size in fresh processes so peak memory belongs to that size alone:
1. plain loop over the files (`--plain-files K` times only the first K of them and reports
   the rate; the replicas make the rate of a prefix representative);
2. `consentry demo`-style setup (people, consents, enrollment), then the first scan, an
   unchanged rescan, and a consent change: the publication grants of every enrolled person are
   withdrawn (names stay: the biometric grant is untouched), so every photo naming one of them
   changes status; `Pipeline.reevaluate` re-labels them from the stored faces.

Printed per size: images/s of both and their ratio, detector calls (and HOG passes) of the
scan, the rescan time, re-labelled assets/s with the detector calls it made (must be 0) and
the CPU it cost per changed asset (Python and exiftool), and peak memory (ru_maxrss) of the main
process and of the largest child (analysis workers; exiftool is a child too).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.demo import testdata_dir

HERE = Path(__file__).resolve()


def build_library(source: Path, target: Path, files: int) -> list[Path]:
    """`files` copies of the demo photos, round-robin, each under its own name."""
    photos = sorted((source / "library").rglob("*.jpg"))
    out = []
    for i in range(files):
        p = photos[i % len(photos)]
        rel = p.relative_to(source / "library")
        dest = target / f"copy{i // len(photos):04d}" / rel.parent / f"{p.stem}_{i:05d}{p.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
        out.append(dest)
    return out


def peak_mb() -> dict[str, int]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    return {"peak_rss_main_mb": own, "peak_rss_largest_child_mb": child}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """CPU time a running process has used so far (Linux /proc; 0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exiftool_cpu_seconds(writer) -> float:
    """CPU time of the writer's running exiftool processes so far."""
    total = 0.0
    for et in getattr(writer, "_all", []):
        process = getattr(et, "_process", None)
        if process is not None and process.poll() is None:
            total += process_cpu_seconds(process.pid)
    return total


def worker_cpu_seconds(pool) -> float:
    """CPU time of the analysis pool's worker processes so far (start-up included)."""
    if pool is None:
        return 0.0
    return sum(process_cpu_seconds(pid) for pid in list(pool._executor._processes or {}))


def plain_phase(source: Path, work: Path, files: int, limit: int | None) -> dict:
    import face_recognition

    paths = build_library(source, work / "plain", files)[:limit]
    faces = 0
    start = time.perf_counter()
    for f in paths:
        image = face_recognition.load_image_file(str(f))
        boxes = face_recognition.face_locations(image, number_of_times_to_upsample=1)
        faces += len(face_recognition.face_encodings(image, boxes))
    seconds = time.perf_counter() - start
    return {"plain_images": len(paths), "plain_s": round(seconds, 2),
            "plain_images_per_s": round(len(paths) / seconds, 2), "plain_faces": faces,
            "plain_detector_calls": len(paths), **{f"plain_{k}": v for k, v in peak_mb().items()}}


def consentry_phase(source: Path, work: Path, files: int) -> dict:
    from rich.console import Console

    from plugin import people
    from plugin.app import App
    from plugin.cli import scan_app
    from plugin.consent import has_active_biometric
    from plugin.demo import run_demo
    from plugin.models import GrantKind
    from plugin.pipeline import Outcome

    # The demo sets up people, consents and templates on an empty library; not timed.
    demo_dir = work / "consentry"
    quiet = Console(file=io.StringIO())
    lib_source = work / "demo-source"
    (lib_source / "library").mkdir(parents=True)
    shutil.copy(source / "manifest.json", lib_source / "manifest.json")
    shutil.copytree(source / "people", lib_source / "people")
    run_demo(out=demo_dir, photos=lib_source, console=quiet)
    build_library(source, demo_dir / "library", files)

    def calls(a) -> tuple[int, int]:
        pool = a.pipeline.pool
        engine = a.engine
        c = getattr(engine, "detector_calls", 0) + (pool.detector_calls if pool else 0)
        p = getattr(engine, "detector_passes", 0) + (pool.detector_passes if pool else 0)
        return c, p

    out: dict = {}
    with App.open(demo_dir / "consentry.toml") as a:
        out["engine"] = a.engine.version
        out["workers"] = a.pipeline.pool.workers if a.pipeline.pool else 1
        c0, p0 = calls(a)
        own0, tool0 = cpu_seconds(), exiftool_cpu_seconds(a.writer)
        start = time.perf_counter()
        scan_app(a, paths=[], out=quiet)
        out["scan_s"] = round(time.perf_counter() - start, 2)
        # Where the scan's CPU goes, per file: this process (matching, state, audit, XMP
        # planning), the analysis workers (decode, detect, encode; start-up included), exiftool.
        cpu = {"main": cpu_seconds() - own0, "workers": worker_cpu_seconds(a.pipeline.pool),
               "exiftool": exiftool_cpu_seconds(a.writer) - tool0}
        for part, seconds in cpu.items():
            out[f"scan_{part}_cpu_ms_per_file"] = round(1000 * seconds / files, 1)
        c1, p1 = calls(a)
        out["scan_detector_calls"], out["scan_detector_passes"] = c1 - c0, p1 - p0
        out["scan_images_per_s"] = round(files / out["scan_s"], 2)
        start = time.perf_counter()
        scan_app(a, paths=[], out=quiet)
        out["rescan_unchanged_s"] = round(time.perf_counter() - start, 3)
        out["rescan_detector_calls"] = calls(a)[0] - c1

        # Consent change: withdraw every enrolled person's publication grant.
        now = a.pipeline.clock()
        changed = []
        for subject in a.state.subjects():
            consents = a.state.consents(subject.id)
            if not has_active_biometric(consents, now):
                continue
            changed.append(subject.id)
            for consent in consents:
                people.withdraw_consent(a.state, a.vault, a.audit, consent, at=now, now=now,
                                        kinds=[GrantKind.PUBLICATION])
        c2 = calls(a)[0]
        own0, tool0 = cpu_seconds(), exiftool_cpu_seconds(a.writer)
        start = time.perf_counter()
        results = a.pipeline.reevaluate(subject_ids=changed, reason="benchmark")
        seconds = time.perf_counter() - start
        own, tool = cpu_seconds() - own0, exiftool_cpu_seconds(a.writer) - tool0
        relabelled = sum(r.outcome == Outcome.PROCESSED for r in results)
        out["relabel_assets"] = len(results)
        out["relabel_changed"] = relabelled
        out["relabel_failed"] = sum(r.outcome == Outcome.FAILED for r in results)
        out["relabel_s"] = round(seconds, 3)
        out["relabel_changed_per_s"] = round(relabelled / seconds, 1) if seconds else None
        out["relabel_detector_calls"] = calls(a)[0] - c2
        out["relabel_threads"] = a.pipeline.write_threads
        if relabelled:
            # Where the time goes: CPU per changed asset, this process and exiftool's.
            out["relabel_python_cpu_ms_per_asset"] = round(1000 * own / relabelled, 1)
            out["relabel_exiftool_cpu_ms_per_asset"] = round(1000 * tool / relabelled, 1)
    out.update(peak_mb())
    return out


def one_size(files: int, args: argparse.Namespace) -> dict:
    """Both phases for one library size, each in a fresh interpreter (clean peak memory)."""
    result: dict = {"files": files, "cpus": os.cpu_count()}
    phases = ["consentry"] if args.skip_plain else ["plain", "consentry"]
    for phase in phases:
        cmd = [sys.executable, str(HERE), "--phase", phase, "--files", str(files),
               "--photos", str(args.photos)]
        if args.plain_files:
            cmd += ["--plain-files", str(args.plain_files)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    if "plain_images_per_s" in result:
        result["ratio_scan_over_plain"] = round(
            result["scan_images_per_s"] / result["plain_images_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=testdata_dir() / "demo")
    parser.add_argument("--files", type=int, nargs="+", default=[35])
    parser.add_argument("--plain-files", type=int, default=None,
                        help="time the plain loop on the first K files only")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--phase", choices=["plain", "consentry"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("CONSENTRY_TESTDATA", str(args.photos.parent))
    if args.phase:
        with tempfile.TemporaryDirectory() as tmp:
            files = args.files[0]
            out = (plain_phase(args.photos, Path(tmp), files, args.plain_files)
                   if args.phase == "plain" else consentry_phase(args.photos, Path(tmp), files))
        print(json.dumps(out))
        return
    results = []
    for files in args.files:
        result = one_size(files, args)
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
