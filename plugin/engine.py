"""Face detection and encoding behind one small interface (STYLE rule 9).

`DlibEngine` calls dlib directly with the model files of the `face_recognition_models`
distribution, located without importing it: that package imports `pkg_resources`, and
`face_recognition` calls `quit()` (exit status 0!) when that import fails. A missing model here
is an `EngineError`, never a silent exit.

Coordinates: boxes are css order (top, right, bottom, left); `Detection.rect` is in the
pixels of the decoded array, `Detection.box` in full-size displayed pixels. Encodings are
(n, 128) float32, in memory only: they are never written anywhere but the vault.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from plugin.errors import EngineError
from plugin.imaging import DecodedImage
from plugin.models import FaceBox

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"
ENCODER_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


@dataclass(frozen=True, slots=True)
class Detection:
    rect: tuple[int, int, int, int]
    box: FaceBox
    score: float


class FaceEngine(Protocol):
    """What the pipeline needs from a face library."""

    @property
    def version(self) -> str: ...

    def detect(self, image: DecodedImage) -> list[Detection]: ...

    def encode(self, image: DecodedImage, faces: Sequence[Detection]) -> np.ndarray: ...


def models_dir() -> Path:
    """Directory of the dlib model files shipped by `face_recognition_models`."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "face_recognition_models is not installed: reinstall consentry (see README)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    upsample: int = 1
    # HOG score below which a detection is dropped; dlib's own default is 0.
    min_score: float = 0.0


class DlibEngine:
    """HOG detection, 5-point alignment, ResNet encoding; models loaded on first use.

    One instance is safe to use from one thread at a time; a lock guards the lazy load.
    """

    def __init__(self, settings: DetectorSettings | None = None, *, jitters: int = 1) -> None:
        self.settings = settings or DetectorSettings()
        self.jitters = jitters
        self.detector_calls = 0
        self._lock = threading.Lock()
        self._models: tuple[Any, Any, Any] | None = None

    @property
    def version(self) -> str:
        import dlib

        s = self.settings
        return f"dlib-{dlib.__version__}/hog-up{s.upsample}/sp5/resnet-v1/j{self.jitters}"

    def _load(self) -> tuple[Any, Any, Any]:
        with self._lock:
            if self._models is None:
                try:
                    import dlib
                except ImportError as err:
                    raise EngineError(f"dlib cannot be imported: {err}") from err
                folder = models_dir()
                missing = [m for m in (SHAPE_MODEL, ENCODER_MODEL) if not (folder / m).is_file()]
                if missing:
                    raise EngineError(f"face model files missing in {folder}: {missing}")
                try:
                    self._models = (
                        dlib.get_frontal_face_detector(),
                        dlib.shape_predictor(str(folder / SHAPE_MODEL)),
                        dlib.face_recognition_model_v1(str(folder / ENCODER_MODEL)),
                    )
                except RuntimeError as err:
                    raise EngineError(f"cannot load face models from {folder}: {err}") from err
            return self._models

    def load(self) -> None:
        """Load the models now (fail fast at start-up instead of on the first photo)."""
        self._load()

    def detect(self, image: DecodedImage) -> list[Detection]:
        detector, _, _ = self._load()
        self.detector_calls += 1
        rects, scores, _ = detector.run(image.pixels, self.settings.upsample, 0.0)
        height, width = image.pixels.shape[:2]
        disp_w, disp_h = image.displayed_size
        found = []
        for rect, score in zip(rects, scores, strict=True):
            if score < self.settings.min_score:
                continue
            top, right = max(0, rect.top()), min(width, rect.right() + 1)
            bottom, left = min(height, rect.bottom() + 1), max(0, rect.left())
            if right <= left or bottom <= top:
                continue
            s = image.scale
            box = FaceBox(
                top=max(0, round(top * s)),
                right=min(disp_w, round(right * s)),
                bottom=min(disp_h, round(bottom * s)),
                left=max(0, round(left * s)),
            )
            found.append(Detection(rect=(top, right, bottom, left), box=box, score=float(score)))
        return found

    def encode(self, image: DecodedImage, faces: Sequence[Detection]) -> np.ndarray:
        import dlib

        if not faces:
            return np.zeros((0, 128), dtype=np.float32)
        _, predictor, encoder = self._load()
        shapes = dlib.full_object_detections()
        for face in faces:
            top, right, bottom, left = face.rect
            shapes.append(predictor(image.pixels, dlib.rectangle(left, top, right - 1, bottom - 1)))
        vectors = encoder.compute_face_descriptor(image.pixels, shapes, self.jitters)
        return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32)
