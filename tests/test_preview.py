"""Analysis on a platform's preview: boxes land on the original's pixel grid."""

from __future__ import annotations

import shutil

from PIL import Image

from connectors.base import Fetched
from plugin.app import App
from plugin.models import AssetRef, FaceBox, Geometry
from plugin.setup import initialise
from plugin.workers import detect_and_encode

PHOTO = "library/events/2024-summit/IMG_2041.jpg"  # 1126x661


def test_boxes_found_on_a_preview_are_mapped_to_the_original(tmp_path, demo_data, manifest,
                                                             counting_engine):
    lib = tmp_path / "photos"
    lib.mkdir()
    shutil.copy(demo_data / PHOTO, lib / "original.jpg")
    preview = tmp_path / "preview.jpg"
    Image.open(demo_data / PHOTO).resize((563, 331)).save(preview)
    config = tmp_path / "consentry.toml"
    initialise(config, photos=lib)
    truth = next(p for p in manifest["photos"] if p["path"] == PHOTO)["faces"]
    with App.open(config) as a:
        matcher = a.pipeline.build_matcher(a.pipeline.clock())
        ref = AssetRef(connector="photos", id="original.jpg", version="v", name="original.jpg")
        original = Geometry(stored_width=1126, stored_height=661)
        fetched = Fetched(preview, original)
        raw = detect_and_encode(a.engine, preview, asset=ref.name, decode_options={})
        analysis = a.pipeline._analyse(raw, fetched, matcher)
    assert analysis.geometry == original
    assert len(analysis.faces) == 2
    for face in truth:
        box = FaceBox(top=face["box"][0], right=face["box"][1], bottom=face["box"][2],
                      left=face["box"][3])
        assert max(f.box.iou(box) for f in analysis.faces) >= 0.5
