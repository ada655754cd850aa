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
from PIL import Image

from plugin.errors import EngineError
from plugin.imaging import DecodedImage
from plugin.models import FaceBox
from plugin.quality import QualitySettings

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"
ENCODER_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
# (top, right, bottom, left) in pixels of the decoded array, right/bottom exclusive.
Rect = tuple[int, int, int, int]


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
    """How HOG looks for faces.

    HOG's window is 80 px: faces smaller than that are found only on an upsampled image, and one
    upsample costs 4x the pixels. `adaptive` pays that only where small faces are likely:
    - a small image (<= `direct_pixels`) gets the upsampled pass directly (it is cheap there);
    - a larger one gets a plain pass first; when that pass finds no face, or a face narrower than
      `small_face` px (small faces come in crowds), a second, upsampled pass follows: on the
      regions around the small faces (`second_area = "regions"`, `reach` face sizes each way),
      else on the whole image. HOG's plain-pass boxes come in pyramid steps of 80, 96, 115 px;
      the default 100 looks again around faces found at the two finest steps.
    - a whole-image second pass after a plain pass that found nothing runs on the image reduced
      to at most `empty_pixels` (0: full size): most large photos without a face found at full
      size hold none, and upsampling all of one costs 4x the plain pass (0.5 s at 1,600 px).
      The reduced pass still finds faces down to 40 px x sqrt(pixels / empty_pixels).
    """

    upsample: int = 1
    # HOG score below which a detection is dropped; dlib's own default is 0.
    min_score: float = 0.0
    adaptive: bool = True
    direct_pixels: int = 500_000
    small_face: int = 100
    second_area: str = "regions"
    reach: float = 2.0
    empty_pixels: int = 1_000_000

    def describe(self) -> str:
        if not self.adaptive or self.upsample == 0:
            return f"hog-up{self.upsample}"
        bound = f"-e{self.empty_pixels}" if self.empty_pixels else ""
        return (f"hog-a{self.upsample}-{self.direct_pixels}-{self.small_face}"
                f"-{self.second_area[0]}{self.reach:g}{bound}")


class DlibEngine:
    """HOG detection, 5-point alignment, ResNet encoding; models loaded on first use.

    One instance is safe to use from one thread at a time; a lock guards the lazy load.
    """

    def __init__(self, settings: DetectorSettings | None = None, *, jitters: int = 1,
                 quality: QualitySettings | None = QualitySettings()) -> None:  # noqa: B008
        self.settings = settings or DetectorSettings()
        self.jitters = jitters
        # Gates applied before encoding (plugin/quality.py); None: every face is encoded.
        self.quality = quality
        self.detector_calls = 0
        # Detector runs: one per call, two when the adaptive second pass runs.
        self.detector_passes = 0
        self._lock = threading.Lock()
        self._models: tuple[Any, Any, Any] | None = None

    @property
    def version(self) -> str:
        import dlib

        s = self.settings
        gates = f"/{self.quality.describe()}" if self.quality else ""
        return f"dlib-{dlib.__version__}/{s.describe()}{gates}/sp5/resnet-v1/j{self.jitters}"

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
        pixels = image.pixels
        rects = self._passes(detector, pixels)
        height, width = pixels.shape[:2]
        disp_w, disp_h = image.displayed_size
        found = []
        for (top, right, bottom, left), score in rects:
            if score < self.settings.min_score:
                continue
            top, right = max(0, top), min(width, right)
            bottom, left = min(height, bottom), max(0, left)
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

    def _run(self, detector: Any, pixels: np.ndarray, upsample: int,
             offset: tuple[int, int] = (0, 0)) -> list[tuple[Rect, float]]:
        self.detector_passes += 1
        rects, scores, _ = detector.run(pixels, upsample, 0.0)
        dy, dx = offset
        return [((r.top() + dy, r.right() + 1 + dx, r.bottom() + 1 + dy, r.left() + dx),
                 float(sc)) for r, sc in zip(rects, scores, strict=True)]

    def _passes(self, detector: Any, pixels: np.ndarray) -> list[tuple[Rect, float]]:
        s = self.settings
        height, width = pixels.shape[:2]
        if not s.adaptive or s.upsample == 0 or height * width <= s.direct_pixels:
            return self._run(detector, pixels, s.upsample)
        first = self._run(detector, pixels, 0)
        small = [r for r, _ in first if min(r[1] - r[3], r[2] - r[0]) < s.small_face]
        if first and not small:
            return first
        if not first:
            return self._reduced_pass(detector, pixels)
        if s.second_area == "whole":
            return self._run(detector, pixels, s.upsample)
        found = list(first)
        for top, right, bottom, left in small_face_regions(small, height, width,
                                                           reach=s.reach):
            crop = np.ascontiguousarray(pixels[top:bottom, left:right])
            found += self._run(detector, crop, s.upsample, offset=(top, left))
        return dedupe(found)

    def _reduced_pass(self, detector: Any, pixels: np.ndarray) -> list[tuple[Rect, float]]:
        """The upsampled pass on `pixels` shrunk to `empty_pixels`, boxes mapped back."""
        height, width = pixels.shape[:2]
        limit = self.settings.empty_pixels
        if not limit or height * width <= limit:
            return self._run(detector, pixels, self.settings.upsample)
        ratio = (limit / (height * width)) ** 0.5
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
        fx, fy = width / size[0], height / size[1]
        return [((round(t * fy), round(r * fx), round(b * fy), round(lft * fx)), score)
                for (t, r, b, lft), score in self._run(detector, small, self.settings.upsample)]

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


def small_face_regions(faces: Sequence[Rect], height: int, width: int, *,
                       reach: float = 2.0) -> list[Rect]:
    """Areas worth an upsampled look: around each small face, `reach` face sizes each way.

    People in one crowd are at about the same distance, so the faces HOG missed (smaller than
    its window) sit beside and around the small ones it found. Overlapping areas are merged
    so no pixel is searched twice.
    """
    boxes = []
    for top, right, bottom, left in faces:
        size = max(right - left, bottom - top)
        pad = round(reach * size)
        boxes.append([max(0, top - pad), min(width, right + pad),
                      min(height, bottom + pad), max(0, left - pad)])
    merged: list[list[int]] = []
    for box in sorted(boxes, key=lambda b: (b[0], b[3])):
        for m in merged:
            if box[0] < m[2] and box[3] < m[1] and m[0] < box[2] and m[3] < box[1]:
                m[0], m[1] = min(m[0], box[0]), max(m[1], box[1])
                m[2], m[3] = max(m[2], box[2]), min(m[3], box[3])
                break
        else:
            merged.append(box)
    return [(t, r, b, lf) for t, r, b, lf in merged]


def _iou(a: Rect, b: Rect) -> float:
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[1], b[1]) - max(a[3], b[3]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[1] - a[3]) + (b[2] - b[0]) * (b[1] - b[3]) - inter
    return inter / union if union > 0 else 0.0


def dedupe(found: Sequence[tuple[Rect, float]], *, overlap: float = 0.3
           ) -> list[tuple[Rect, float]]:
    """One detection per face when passes overlap: the best-scoring one wins."""
    kept: list[tuple[Rect, float]] = []
    for rect, score in sorted(found, key=lambda f: -f[1]):
        if all(_iou(rect, k) < overlap for k, _ in kept):
            kept.append((rect, score))
    return kept


def engine_from_settings(engine: Any) -> DlibEngine:
    """The engine the `[engine]` settings section describes (plugin.settings.EngineSettings).

    All three quality gates at 0 (or below) turn the gates off: every face is encoded.
    """
    gates = QualitySettings(min_face_px=engine.min_face_px, min_score=engine.min_detector_score,
                            min_sharpness=engine.min_sharpness)
    off = gates.min_face_px <= 0 and gates.min_score <= 0 and gates.min_sharpness <= 0
    return DlibEngine(
        DetectorSettings(upsample=engine.upsample, adaptive=engine.adaptive_upsample,
                         direct_pixels=engine.direct_upsample_pixels,
                         small_face=engine.small_face_px, second_area=engine.second_pass_area,
                         reach=engine.second_pass_reach,
                         empty_pixels=engine.empty_second_pass_pixels),
        jitters=engine.jitters,
        quality=None if off else gates,
    )
