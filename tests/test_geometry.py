"""Displayed <-> stored boxes and MWG areas, checked against Pillow's own notion of orientation."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw, ImageOps

from plugin.geometry import Area, clamp, from_area, to_area, to_displayed, to_stored
from plugin.models import FaceBox, Geometry

ORIENTATION = 0x0112
STORED = (13, 7)  # small and uneven, so a swapped axis cannot pass by accident


def _oriented(image: Image.Image, orientation: int) -> Image.Image:
    tagged = image.copy()
    tagged.getexif()[ORIENTATION] = orientation
    return tagged


def stored_from_upright(image: Image.Image, orientation: int) -> Image.Image:
    """The stored pixels that Pillow shows as `image` under `orientation`.

    Each orientation is one of the eight symmetries of a rectangle, so applying it three times
    undoes it: only Pillow's exif_transpose decides what an orientation means here.
    """
    out = image
    for _ in range(3):
        out = ImageOps.exif_transpose(_oriented(out, orientation))
    return out


def random_box(rng: random.Random, width: int, height: int) -> FaceBox:
    left = rng.randrange(0, width)
    top = rng.randrange(0, height)
    return FaceBox(
        top=top,
        right=rng.randrange(left + 1, width + 1),
        bottom=rng.randrange(top + 1, height + 1),
        left=left,
    )


def mask(size: tuple[int, int], box: FaceBox) -> Image.Image:
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle((box.left, box.top, box.right - 1, box.bottom - 1), fill=255)
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_from_upright_is_what_pillow_displays(orientation: int) -> None:
    upright = Image.effect_noise((11, 5), 64).convert("L")
    stored = stored_from_upright(upright, orientation)
    shown = ImageOps.exif_transpose(_oriented(stored, orientation))
    assert shown.tobytes() == upright.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_to_stored_matches_pillow_masks(orientation: int) -> None:
    geometry = Geometry(stored_width=STORED[0], stored_height=STORED[1], orientation=orientation)
    displayed = geometry.displayed_size
    rng = random.Random(orientation)
    for _ in range(60):
        box = random_box(rng, *displayed)
        expected = stored_from_upright(mask(displayed, box), orientation).getbbox()
        got = to_stored(box, geometry)
        assert (got.left, got.top, got.right, got.bottom) == expected
        assert to_displayed(got, geometry) == box


@pytest.mark.parametrize("orientation", range(1, 9))
def test_round_trip_for_every_orientation(orientation: int) -> None:
    geometry = Geometry(stored_width=640, stored_height=427, orientation=orientation)
    rng = random.Random(100 + orientation)
    for _ in range(500):
        displayed = random_box(rng, *geometry.displayed_size)
        assert to_displayed(to_stored(displayed, geometry), geometry) == displayed
        stored = random_box(rng, geometry.stored_width, geometry.stored_height)
        assert to_stored(to_displayed(stored, geometry), geometry) == stored
        back = from_area(to_area(displayed, geometry), geometry)
        assert all(abs(a - b) <= 1 for a, b in zip(back.as_css(), displayed.as_css(), strict=True))


def test_area_is_centre_and_size_over_the_stored_grid() -> None:
    box = FaceBox(top=10, right=60, bottom=30, left=20)
    assert to_area(box, Geometry(stored_width=100, stored_height=50)) == Area(0.4, 0.4, 0.4, 0.4)
    # Orientation 6 (shown turned 90° clockwise): displayed 50 x 100 over a stored 100 x 50.
    rotated = Geometry(stored_width=100, stored_height=50, orientation=6)
    low_left = FaceBox(top=60, right=15, bottom=90, left=5)
    assert to_stored(low_left, rotated) == FaceBox(top=35, right=90, bottom=45, left=60)
    assert to_area(low_left, rotated) == Area(0.75, 0.8, 0.3, 0.2)


def test_area_is_rounded_to_six_decimals() -> None:
    area = to_area(
        FaceBox(top=0, right=1, bottom=1, left=0), Geometry(stored_width=3, stored_height=7)
    )
    assert area == Area(0.166667, 0.071429, 0.333333, 0.142857)
    assert all(round(v, 6) == v for v in area)


def test_boxes_are_clamped_to_the_image() -> None:
    geometry = Geometry(stored_width=100, stored_height=50, orientation=3)
    assert to_stored(FaceBox(top=-5, right=130, bottom=20, left=90), geometry) == FaceBox(
        top=30, right=10, bottom=50, left=0
    )
    assert clamp(FaceBox(top=60, right=120, bottom=80, left=110), 100, 50).width == 0


def test_a_box_outside_the_image_has_no_area() -> None:
    with pytest.raises(ValueError, match="outside"):
        to_area(
            FaceBox(top=60, right=120, bottom=80, left=110),
            Geometry(stored_width=100, stored_height=50),
        )
