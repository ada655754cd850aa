"""Rotated and mirrored copies of a real photo, in all eight EXIF orientations, scanned by the
whole pipeline (detection on the displayed image): the MWG regions read back by the exiftool
program land on the faces. The stored<->displayed transform here is written independently of
plugin/geometry.py: a mask painted in the stored grid is shown through Pillow's exif_transpose.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from plugin.cli import app
from plugin.setup import initialise

PHOTO = "library/events/2024-summit/IMG_2041.jpg"  # 1126x661, Obama and Biden
# Pillow operation that turns the upright photo into the stored pixels of orientation n
# (the inverse of what a reader applies).
TO_STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def displayed_box(stored_box, stored_size, orientation):
    """Paint the stored-grid box into a mask, let Pillow orient it, take the bounding box."""
    mask = Image.new("L", stored_size, 0)
    top, right, bottom, left = (round(v) for v in stored_box)
    mask.paste(255, (left, top, right, bottom))
    exif = Image.Exif()
    exif[0x0112] = orientation
    mask.info["exif"] = exif.tobytes()
    mask.getexif()[0x0112] = orientation
    shown = ImageOps.exif_transpose(mask)
    ys, xs = np.nonzero(np.asarray(shown))
    return (ys.min(), xs.max() + 1, ys.max() + 1, xs.min())


def iou(a, b):
    t, r, bt, lf = a
    t2, r2, b2, l2 = b
    inter = max(0, min(bt, b2) - max(t, t2)) * max(0, min(r, r2) - max(lf, l2))
    return inter / ((bt - t) * (r - lf) + (b2 - t2) * (r2 - l2) - inter)


def test_regions_land_on_the_faces_in_all_eight_orientations(
        tmp_path, demo_data, manifest, engine, monkeypatch):
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    lib = tmp_path / "photos"
    lib.mkdir()
    upright = Image.open(demo_data / PHOTO)
    for n, op in TO_STORED.items():
        stored = upright if op is None else upright.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = n
        stored.save(lib / f"o{n}.jpg", exif=exif, quality=95)
    config = tmp_path / "consentry.toml"
    initialise(config, photos=lib)
    result = CliRunner().invoke(app, ["--config", str(config), "scan"])
    assert result.exit_code == 0, result.output

    truth = next(p for p in manifest["photos"] if p["path"] == PHOTO)["faces"]
    out = subprocess.run(["exiftool", "-j", "-struct", "-n", "-Orientation",
                          "-XMP-mwg-rs:RegionInfo", *sorted(map(str, lib.glob("*.jpg")))],
                         check=True, capture_output=True, text=True).stdout
    for meta in json.loads(out):
        n = meta["Orientation"]
        info = meta["RegionInfo"]
        w, h = info["AppliedToDimensions"]["W"], info["AppliedToDimensions"]["H"]
        assert (w, h) == ((1126, 661) if n < 5 else (661, 1126)), f"orientation {n}"
        regions = info["RegionList"]
        assert len(regions) == 2, f"orientation {n}"
        for face in truth:
            best = 0.0
            for r in regions:
                a = r["Area"]
                left, top = (a["X"] - a["W"] / 2) * w, (a["Y"] - a["H"] / 2) * h
                stored_box = (top, left + a["W"] * w, top + a["H"] * h, left)
                best = max(best, iou(displayed_box(stored_box, (w, h), n), face["box"]))
            assert best >= 0.5, f"orientation {n}: no region on face {face['box']} ({best:.2f})"


def test_independent_transform_is_not_the_identity():
    # Guards the guard: orientation 6 must really move a box.
    assert displayed_box((0, 10, 10, 0), (100, 50), 6) != (0, 10, 10, 0)


pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool missing")
