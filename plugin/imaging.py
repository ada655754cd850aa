"""Decode a photo for face analysis: safely, oriented, and no larger than needed.

Why each step:
- the header is read first and the pixel count bounded, so a 20k x 20k "bomb" is refused before
  any pixel is decoded;
- JPEGs are decoded at reduced scale (libjpeg DCT scaling through Pillow's `draft`) when the
  photo is far larger than the analysis size: decoding a 12 MP photo whole costs more than
  detecting faces in it;
- EXIF orientation is applied (face_recognition's loader ignores it), so boxes are in the
  displayed grid; `Geometry` remembers the stored grid for the XMP writer;
- odd but valid modes (CMYK, 16-bit, greyscale, alpha, palette) become 8-bit RGB.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from plugin.errors import ImageError
from plugin.models import Geometry

log = logging.getLogger(__name__)

# Truncated files must fail loudly rather than decode as grey: never tag a half image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own bound (max_pixels) is checked before decoding; Pillow's check stays as a backstop.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_SIDE = 1600


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """RGB uint8 pixels in the displayed orientation, possibly downscaled.

    `scale` = displayed full-size pixels per array pixel (>= 1.0): a box found in `pixels`
    multiplied by `scale` lands on the full-size displayed image.
    """

    pixels: np.ndarray
    geometry: Geometry
    scale: float

    @property
    def displayed_size(self) -> tuple[int, int]:
        return self.geometry.displayed_size


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not make the photo unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's convert("RGB") clips instead of scaling.
        arr = np.asarray(image, dtype=np.uint32)
        top = 65535 if image.mode != "I" or arr.max() > 255 else 255
        arr8 = (arr * 255 // max(top, 1)).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode(
    source: Path,
    *,
    asset: str | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode `source` for analysis, its longer displayed side bounded by `max_side`.

    Raises ImageError naming the asset for anything that is not a decodable, bounded image.
    """
    name = asset or str(source)
    if source.is_dir():
        raise ImageError(name, "is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError as err:
        raise ImageError(name, "file vanished before it could be read") from err
    except UnidentifiedImageError as err:
        raise ImageError(name, "not a recognised image format") from err
    except (OSError, ValueError, Image.DecompressionBombWarning) as err:
        raise ImageError(name, f"cannot open image: {err}") from err
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(name, "image has no pixels")
        if width * height > max_pixels:
            raise ImageError(
                name,
                f"image is {width}x{height} ({width * height / 1e6:.0f} MP), over the "
                f"{max_pixels / 1e6:.0f} MP limit (decompression-bomb guard)",
            )
        geometry = Geometry(stored_width=width, stored_height=height,
                            orientation=_orientation(image))
        if image.format == "JPEG" and max(width, height) > 2 * max_side:
            # DCT scaling picks a power-of-two reduction no smaller than the requested size.
            factor = max_side / max(width, height)
            image.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor)))
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(oriented)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(name, f"cannot decode image (truncated or corrupt): {err}") from err
    disp_w, _ = geometry.displayed_size
    longest = max(rgb.size)
    if longest > max_side:
        factor = max_side / longest
        rgb = rgb.resize(
            (max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor))),
            Image.Resampling.BILINEAR,
            reducing_gap=2.0,
        )
    scale = disp_w / rgb.width
    return DecodedImage(pixels=np.ascontiguousarray(np.asarray(rgb)), geometry=geometry,
                        scale=scale)
