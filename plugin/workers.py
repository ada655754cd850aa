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
from plugin.models import Geometry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawAnalysis:
    """What the face library found on the decoded image (displayed grid of the fetched file)."""

    geometry: Geometry
    detections: list[Detection]
    vectors: np.ndarray


def detect_and_encode(engine: FaceEngine, path: Path, *, asset: str,
                      decode_options: dict[str, Any]) -> RawAnalysis:
    image = decode(path, asset=asset, **decode_options)
    detections = engine.detect(image)
    return RawAnalysis(image.geometry, detections, engine.encode(image, detections))


_ENGINE: DlibEngine | None = None


def _start(settings: DetectorSettings, jitters: int) -> None:
    global _ENGINE
    _ENGINE = DlibEngine(settings, jitters=jitters)
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
            initargs=(engine.settings, engine.jitters),
        )

    def submit(self, path: Path, *, asset: str, decode_options: dict[str, Any]
               ) -> Future[RawAnalysis]:
        return self._executor.submit(_work, path, asset, decode_options)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
