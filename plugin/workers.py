"""Decode, detect and encode in a pool of processes, so a scan keeps every core busy.

dlib releases no GIL worth having for HOG on small images, so threads do not help; each worker
process loads the models once. Vectors travel back through the pool's pipe and live in memory
only, exactly as in the single-process path.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plugin.engine import Detection, DetectorSettings, DlibEngine, FaceEngine
from plugin.imaging import decode
from plugin.matcher import Match, Matcher
from plugin.models import FaceState, Geometry
from plugin.quality import QualitySettings, gate_all

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawAnalysis:
    """What the face library found on the decoded image (displayed grid of the fetched file).

    `gates[i]` is None when detection i passed the quality gates, else why it did not;
    `vectors` holds one row per passing detection, in order (gated faces are never encoded).
    """

    geometry: Geometry
    detections: list[Detection]
    vectors: np.ndarray
    gates: tuple[str | None, ...] = ()
    detector_passes: int = 1

    def matches(self, matcher: Matcher) -> list[Match]:
        """One match per detection: gated faces are UNCERTAIN with no candidate (review)."""
        found = iter(matcher.match(self.vectors) if len(self.vectors) else [])
        return [next(found) if why is None else Match(FaceState.UNCERTAIN, None, None)
                for why in self._gates()]

    def vectors_by_detection(self) -> dict[int, np.ndarray]:
        """Detection index -> its vector, for the detections that passed the gates."""
        passing = [i for i, why in enumerate(self._gates()) if why is None]
        return dict(zip(passing, self.vectors, strict=True))

    def _gates(self) -> tuple[str | None, ...]:
        return self.gates or tuple(None for _ in self.detections)


# Gates for engines that do not carry their own (`DlibEngine.quality`).
DEFAULT_QUALITY: QualitySettings | None = QualitySettings()


def detect_and_encode(engine: FaceEngine, path: Path, *, asset: str,
                      decode_options: dict[str, Any]) -> RawAnalysis:
    image = decode(path, asset=asset, **decode_options)
    passes = getattr(engine, "detector_passes", 0)
    detections = engine.detect(image)
    gates = gate_all(image.pixels, detections, getattr(engine, "quality", DEFAULT_QUALITY))
    passing = [d for d, why in zip(detections, gates, strict=True) if why is None]
    if len(passing) < len(detections):
        log.debug("%s: %d face(s) to review without encoding: %s", asset,
                  len(detections) - len(passing), [g for g in gates if g])
    return RawAnalysis(image.geometry, detections, engine.encode(image, passing), gates,
                       max(1, getattr(engine, "detector_passes", 1) - passes))


_ENGINE: DlibEngine | None = None


def _start(settings: DetectorSettings, jitters: int, quality: QualitySettings | None) -> None:
    global _ENGINE
    _ENGINE = DlibEngine(settings, jitters=jitters, quality=quality)
    _ENGINE.load()


def _work(path: Path, asset: str, decode_options: dict[str, Any]) -> RawAnalysis:
    if _ENGINE is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("worker engine not started")
    return detect_and_encode(_ENGINE, path, asset=asset, decode_options=decode_options)


class AnalysisPool:
    """A process pool running `detect_and_encode` with the same engine settings everywhere."""

    def __init__(self, engine: DlibEngine, *, workers: int) -> None:
        self.workers = workers
        self.version = engine.version
        # spawn: a fresh interpreter per worker; never a fork of a process holding locks.
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(engine.settings, engine.jitters, engine.quality),
        )
        # Counted here, as the workers' engines are out of reach (benchmarks read them).
        self.detector_calls = 0
        self.detector_passes = 0

    def submit(self, path: Path, *, asset: str, decode_options: dict[str, Any]
               ) -> Future[RawAnalysis]:
        future = self._executor.submit(_work, path, asset, decode_options)
        future.add_done_callback(self._count)
        return future

    def _count(self, future: Future[RawAnalysis]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.detector_calls += 1
            self.detector_passes += future.result().detector_passes

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
