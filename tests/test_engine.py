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
