"""Face boxes between the displayed grid, the stored grid and MWG normalised areas.

Detection runs on the image as displayed (EXIF orientation applied, as Pillow's
`ImageOps.exif_transpose` shows it), but MWG regions describe the pixels **as stored**: readers
such as Immich, digiKam and PhotoPrism apply the orientation to the region themselves
(api/xmp.md). Every function here is pure.

Coordinates are pixel edges: a `FaceBox` (css order top, right, bottom, left; right/bottom
exclusive) covers the pixels ``left <= x < right`` and ``top <= y < bottom``. Mirroring a box
in a grid of width W therefore maps ``[left, right)`` to ``[W - right, W - left)``, exactly, in
integers. A stored-grid box is also held in a `FaceBox`; the function names say which grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from plugin.models import FaceBox, Geometry

log = logging.getLogger(__name__)

AREA_DECIMALS = 6

_PointMap = Callable[[int, int, int, int], tuple[int, int]]

# Where a stored point (x, y) of a W x H stored grid appears on the displayed image, for each
# EXIF orientation; the same operations as Pillow's exif_transpose (2 FLIP_LEFT_RIGHT,
# 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90).
_STORED_TO_DISPLAYED: dict[int, _PointMap] = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}
# Each operation undoes itself except the two quarter turns, which undo each other.
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


class Area(NamedTuple):
    """MWG `stArea` with unit `normalized`: centre x, y and size w, h over the stored grid."""

    x: float
    y: float
    w: float
    h: float


def clamp(box: FaceBox, width: int, height: int) -> FaceBox:
    """`box` cut to a width x height grid; a box wholly outside becomes empty (zero size)."""
    left = min(max(box.left, 0), width)
    top = min(max(box.top, 0), height)
    right = min(max(box.right, left), width)
    bottom = min(max(box.bottom, top), height)
    return FaceBox(top=top, right=right, bottom=bottom, left=left)


def _apply(box: FaceBox, orientation: int, width: int, height: int) -> FaceBox:
    point = _STORED_TO_DISPLAYED[orientation]
    x1, y1 = point(box.left, box.top, width, height)
    x2, y2 = point(box.right, box.bottom, width, height)
    return FaceBox(top=min(y1, y2), right=max(x1, x2), bottom=max(y1, y2), left=min(x1, x2))


def to_stored(box: FaceBox, geometry: Geometry) -> FaceBox:
    """A displayed-grid box on the stored grid, clamped to the image."""
    disp_w, disp_h = geometry.displayed_size
    inside = clamp(box, disp_w, disp_h)
    # The displayed grid, read as if it were stored, needs the inverse operation.
    return _apply(inside, _INVERSE[geometry.orientation], disp_w, disp_h)


def to_displayed(box: FaceBox, geometry: Geometry) -> FaceBox:
    """A stored-grid box on the displayed grid, clamped to the image."""
    width, height = geometry.stored_width, geometry.stored_height
    return _apply(clamp(box, width, height), geometry.orientation, width, height)


def to_area(box: FaceBox, geometry: Geometry, *, decimals: int = AREA_DECIMALS) -> Area:
    """A displayed-grid box as an MWG area of the stored grid.

    Rounded to `decimals` so that the same box always writes the same bytes. Raises ValueError
    when nothing of the box lies inside the image: such a region would point at nothing.
    """
    stored = to_stored(box, geometry)
    if stored.width <= 0 or stored.height <= 0:
        raise ValueError("face box lies outside the image")
    width, height = geometry.stored_width, geometry.stored_height
    return Area(
        x=round((stored.left + stored.right) / 2 / width, decimals),
        y=round((stored.top + stored.bottom) / 2 / height, decimals),
        w=round(stored.width / width, decimals),
        h=round(stored.height / height, decimals),
    )


def from_area(area: Area, geometry: Geometry) -> FaceBox:
    """An MWG area (stored grid) as a displayed-grid box in whole pixels, clamped to the image."""
    width, height = geometry.stored_width, geometry.stored_height
    stored = FaceBox(
        top=round((area.y - area.h / 2) * height),
        right=round((area.x + area.w / 2) * width),
        bottom=round((area.y + area.h / 2) * height),
        left=round((area.x - area.w / 2) * width),
    )
    return to_displayed(stored, geometry)
