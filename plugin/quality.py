"""Face quality gates: faces too poor to encode reliably go to human review, never to a name.

Why gate before encoding: a 128-d encoding of a tiny, barely detected or smeared face is noise
that can land near anyone's template, and it costs ~67 ms per face (most of the time of a
crowd photo). A gated face is kept as a region with state UNCERTAIN and no candidates, so a
reviewer sees it and the photo cannot be cleared without a human, but no name is guessed.

Gates, each measured on the pixels the engine actually analysed (after the `max_side` bound):
- size: the shorter side of the detected box below `min_face_px`. The encoder resamples every
  face to a 150 px chip; below ~40 px that is mostly interpolation;
- detector confidence: dlib's HOG score below `min_score` (0 is HOG's own decision
  threshold; scores near it are often partial faces, profiles or false alarms);
- extreme blur: variance of the Laplacian of the face crop resized to 64x64 below
  `min_sharpness`. The resize makes the value comparable between face sizes. On the demo
  photos sharp faces score 60-1400; a Gaussian blur that still leaves the face detectable
  drives it below 40.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

CROP_SIDE = 64


@dataclass(frozen=True, slots=True)
class QualitySettings:
    min_face_px: int = 40
    min_score: float = 0.3
    min_sharpness: float = 40.0

    def describe(self) -> str:
        return f"q{self.min_face_px}-{self.min_score:g}-{self.min_sharpness:g}"


def sharpness(pixels: np.ndarray, rect: tuple[int, int, int, int]) -> float:
    """Variance of the 4-neighbour Laplacian of the face crop (grey, 64x64)."""
    top, right, bottom, left = rect
    crop = pixels[top:bottom, left:right]
    if crop.size == 0:
        return 0.0
    grey = Image.fromarray(np.ascontiguousarray(crop)).convert("L")
    a = np.asarray(grey.resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BILINEAR),
                   dtype=np.float32)
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4.0 * a[1:-1, 1:-1]
    return float(lap.var())


def gate(pixels: np.ndarray, rect: tuple[int, int, int, int], score: float,
         settings: QualitySettings) -> str | None:
    """Why this face must go to review instead of being encoded, or None when it may pass.

    Cheapest test first: sharpness (a resize and a few array sums) runs only on faces that
    passed size and score.
    """
    top, right, bottom, left = rect
    side = min(right - left, bottom - top)
    if side < settings.min_face_px:
        return f"face {side} px < {settings.min_face_px} px"
    if score < settings.min_score:
        return f"detector score {score:.2f} < {settings.min_score:g}"
    value = sharpness(pixels, rect)
    if value < settings.min_sharpness:
        return f"blurred (sharpness {value:.0f} < {settings.min_sharpness:g})"
    return None


def gate_all(pixels: np.ndarray, faces: Sequence[object], settings: QualitySettings | None
             ) -> tuple[str | None, ...]:
    """`gate` for each detection (objects with `rect` and `score`); no settings: all pass."""
    if settings is None:
        return tuple(None for _ in faces)
    return tuple(gate(pixels, f.rect, f.score, settings) for f in faces)  # type: ignore[attr-defined]
