"""The face engine on real photos: boxes and encodings; a broken install fails loudly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from plugin.engine import DlibEngine
from plugin.errors import EngineError
from plugin.imaging import decode


def iou(a, b):
    t, r, bt, lf = a
    t2, r2, b2, l2 = b
    inter = max(0, min(bt, b2) - max(t, t2)) * max(0, min(r, r2) - max(lf, l2))
    return inter / ((bt - t) * (r - lf) + (b2 - t2) * (r2 - l2) - inter)


def test_finds_both_faces_of_a_real_photo(engine, demo_data, manifest):
    photo = next(p for p in manifest["photos"] if p["path"].endswith("IMG_2041.jpg"))
    image = decode(demo_data / photo["path"])
    found = engine.detect(image)
    assert len(found) == 2
    for truth in photo["faces"]:
        assert max(iou(f.box.as_css(), truth["box"]) for f in found) >= 0.5
    vectors = engine.encode(image, found)
    assert vectors.shape == (2, 128) and vectors.dtype == np.float32


def test_same_person_closer_than_different_people(engine, demo_data):
    def encode(rel):
        img = decode(demo_data / rel)
        [face] = engine.detect(img)
        return engine.encode(img, [face])[0]

    o1, o2 = encode("people/Barack_Obama/ref-1.jpg"), encode("people/Barack_Obama/ref-2.jpg")
    c1 = encode("people/George_Clooney/ref-1.jpg")
    assert np.linalg.norm(o1 - o2) < 0.5 < np.linalg.norm(o1 - c1)


def test_missing_models_raise_engine_error(monkeypatch, tmp_path):
    monkeypatch.setattr("plugin.engine.models_dir", lambda: tmp_path)
    with pytest.raises(EngineError, match="model files missing"):
        DlibEngine().load()


def test_engine_loads_in_a_fresh_process():
    # face_recognition calls quit() with status 0 when its models cannot load; our engine must
    # load for real and say so, so a broken install can never "pass" silently.
    code = ("from plugin.engine import DlibEngine; e = DlibEngine(); e.load(); "
            "print('loaded', e.version)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.startswith("loaded dlib-")


def test_detection_runs_on_a_reduced_scale_decode_of_a_large_jpeg(engine, demo_data, manifest,
                                                                     tmp_path, monkeypatch):
    # A 12 MP JPEG: libjpeg's DCT scaling (Pillow draft) must deliver it already reduced, and
    # the engine must see at most max_side pixels; boxes still land on the full-size grid.
    from PIL import Image, JpegImagePlugin

    photo = next(p for p in manifest["photos"] if p["path"].endswith("IMG_2043.jpg"))
    big = tmp_path / "big.jpg"
    with Image.open(demo_data / photo["path"]) as img:
        img.resize((img.width * 3, img.height * 3)).save(big, quality=90)
    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    image = decode(big, max_side=1600)
    assert drafts and max(drafts[0]) < 4440 / 1.9  # decoded at 1/2 scale or less
    assert max(image.pixels.shape[:2]) == 1600
    [face] = engine.detect(image)
    truth = [v * 3 for v in photo["faces"][0]["box"]]
    assert iou(face.box.as_css(), truth) >= 0.5


def test_engine_settings_reach_the_engine():
    from plugin.engine import engine_from_settings
    from plugin.settings import EngineSettings

    e = engine_from_settings(EngineSettings(adaptive_upsample=False, min_face_px=20))
    assert not e.settings.adaptive and e.quality.min_face_px == 20
    assert "hog-up1/" in e.version
    adaptive = engine_from_settings(EngineSettings())
    assert adaptive.settings.adaptive and adaptive.version != e.version
    off = engine_from_settings(EngineSettings(min_face_px=0, min_detector_score=0,
                                              min_sharpness=0))
    assert off.quality is None and "/q" not in off.version
