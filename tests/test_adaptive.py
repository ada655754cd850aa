"""Adaptive upsampling on real demo photos: one cheap pass where faces are large, the upsampled
pass where small faces are likely, and never fewer faces than upsampling everything."""

from __future__ import annotations

import pytest

from plugin.engine import DetectorSettings, DlibEngine, small_face_regions
from plugin.imaging import decode

# Photos larger than the direct-upsample bound once decoded (max_side 1600): the ones where
# the adaptive decision is taken.
LARGE = ["IMG_2041", "IMG_2042", "IMG_2043", "IMG_2044", "IMG_2049", "IMG_0816", "IMG_3301",
         "IMG_5104", "DSC_7002"]


def iou(a, b):
    t, r, bt, lf = a
    t2, r2, b2, l2 = b
    inter = max(0, min(bt, b2) - max(t, t2)) * max(0, min(r, r2) - max(lf, l2))
    return inter / ((bt - t) * (r - lf) + (b2 - t2) * (r2 - l2) - inter)


def photo(manifest, stem):
    return next(p for p in manifest["photos"] if f"/{stem}." in p["path"])


def found(detections, truth):
    return [f for f in truth["faces"]
            if any(iou(d.box.as_css(), f["box"]) >= 0.4 for d in detections)]


@pytest.fixture(scope="module")
def fixed_up1():
    e = DlibEngine(DetectorSettings(upsample=1, adaptive=False))
    e.load()
    return e


def run(engine, demo_data, truth):
    before = engine.detector_passes
    detections = engine.detect(decode(demo_data / truth["path"]))
    return detections, engine.detector_passes - before


def test_large_faces_in_a_large_photo_take_one_plain_pass(engine, demo_data, manifest):
    truth = photo(manifest, "IMG_2043")  # 1480x832, one face of ~370 px
    detections, passes = run(engine, demo_data, truth)
    assert passes == 1
    assert len(found(detections, truth)) == 1


def test_small_photo_gets_the_upsampled_pass_directly(engine, demo_data, manifest):
    # A 500x375 group photo with faces of ~37 px: HOG's 80 px window needs the upsample.
    truth = photo(manifest, "IMG_5101")
    plain = DlibEngine(DetectorSettings(upsample=0, adaptive=False))
    assert found(plain.detect(decode(demo_data / truth["path"])), truth) == []
    detections, passes = run(engine, demo_data, truth)
    assert passes == 1
    assert len(found(detections, truth)) == len(truth["faces"]) == 7


def test_small_faces_found_in_a_large_photo_trigger_the_region_pass(engine, demo_data,
                                                                   manifest):
    truth = photo(manifest, "IMG_2049")  # collage, 24 faces, several under 100 px decoded
    detections, passes = run(engine, demo_data, truth)
    assert passes >= 2
    assert len(found(detections, truth)) == 24
    # Overlapping passes are merged: one detection per face.
    assert len(detections) == 24


def test_a_large_photo_without_faces_gets_one_upsampled_look(engine, demo_data, manifest):
    truth = photo(manifest, "DSC_7002")  # landscape, 2048x1360
    detections, passes = run(engine, demo_data, truth)
    assert passes == 2 and detections == []


def test_a_faceless_first_pass_looks_again_on_a_reduced_upsampled_image(engine, demo_data,
                                                                       manifest, tmp_path):
    # IMG_5104's six faces shrunk to 45-55 px, too small for the plain pass, on a 1.1 MP
    # canvas: the upsampled look runs on the image reduced to 1 MP (faces 42-52 px there),
    # finds all six and maps their boxes back onto the full image.
    from PIL import Image

    truth = photo(manifest, "IMG_5104")
    factor, offset = 0.55, (300, 400)  # (top, left) of the photo on the canvas
    with Image.open(demo_data / truth["path"]) as source:
        small = source.convert("RGB").resize(
            (round(source.width * factor), round(source.height * factor)),
            Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (1250, 900), (128, 128, 128))
    canvas.paste(small, (offset[1], offset[0]))
    canvas.save(tmp_path / "canvas.jpg", quality=95)
    moved = {"faces": [{"box": [round(t * factor) + offset[0], round(r * factor) + offset[1],
                                round(b * factor) + offset[0], round(lf * factor) + offset[1]]}
                       for t, r, b, lf in (f["box"] for f in truth["faces"])]}
    image = decode(tmp_path / "canvas.jpg")
    assert engine.settings.empty_pixels == 1_000_000
    assert image.pixels.shape[0] * image.pixels.shape[1] > engine.settings.empty_pixels

    plain = DlibEngine(DetectorSettings(upsample=0, adaptive=False))
    assert plain.detect(image) == []
    before = engine.detector_passes
    detections = engine.detect(image)
    assert engine.detector_passes - before == 2
    assert len(found(detections, moved)) == len(detections) == 6
    # Mapped back onto the full image: where the full-size upsampled pass puts them.
    full = DlibEngine(DetectorSettings(empty_pixels=0)).detect(image)
    assert len(full) == 6
    assert all(max(iou(d.box.as_css(), f.box.as_css()) for f in full) >= 0.6
               for d in detections)


def test_adaptive_finds_every_face_that_upsampling_everything_finds(engine, fixed_up1,
                                                                     demo_data, manifest):
    for stem in LARGE:
        truth = photo(manifest, stem)
        image = decode(demo_data / truth["path"])
        assert image.pixels.shape[0] * image.pixels.shape[1] > engine.settings.direct_pixels
        everywhere = found(fixed_up1.detect(image), truth)
        adaptive = found(engine.detect(image), truth)
        assert len(adaptive) >= len(everywhere), stem


def test_regions_around_small_faces_merge_and_stay_inside_the_image():
    # Two neighbours merge into one area; a far face keeps its own; clipped to the image.
    faces = [(100, 160, 150, 110), (100, 260, 150, 210), (700, 1560, 750, 1510)]
    regions = small_face_regions(faces, 800, 1600, reach=3.0)
    assert len(regions) == 2
    top, right, bottom, left = regions[0]
    assert (top, left) == (0, 0) and right == 260 + 150 and bottom == 150 + 150
    assert regions[1] == (550, 1600, 800, 1360)
