"""Assets deleted on the platform are forgotten: their face records (who was in a photo that no
longer exists) leave the state database, audited, and the audit chain still verifies."""

from __future__ import annotations

import shutil

import pytest

from plugin.app import App
from plugin.forget import forget_assets
from plugin.settings import load
from plugin.setup import initialise

PHOTOS = ("events/2024-summit/IMG_2041.jpg", "events/2024-summit/IMG_2042.jpg")


@pytest.fixture
def library(tmp_path, demo_data, engine, monkeypatch):
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    lib = tmp_path / "photos"
    for rel in PHOTOS:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data / "library" / rel, lib / rel)
    cfg = tmp_path / "consentry.toml"
    initialise(cfg, photos=lib)
    return lib, cfg


def scan(cfg):
    with App(load(cfg), config_file=cfg) as app:
        results = app.pipeline.scan("photos")
        return {r.ref.id: r.outcome.value for r in results}


def records(cfg, asset_id):
    with App(load(cfg), config_file=cfg) as app:
        return app.state.asset("photos", asset_id), app.state.faces("photos", asset_id)


def test_a_deleted_photo_is_forgotten_and_a_renamed_one_analysed_anew(library):
    lib, cfg = library
    first = scan(cfg)
    assert set(first) == set(PHOTOS) and set(first.values()) == {"processed"}
    row, faces = records(cfg, PHOTOS[0])
    assert row is not None and len(faces) == 2

    (lib / PHOTOS[0]).unlink()
    renamed = "events/2024-summit/renamed.jpg"
    (lib / PHOTOS[1]).rename(lib / renamed)
    second = scan(cfg)
    assert second == {renamed: "processed"}
    for gone in PHOTOS:
        assert records(cfg, gone) == (None, [])
    assert len(records(cfg, renamed)[1]) == 3
    with App(load(cfg), config_file=cfg) as app:
        forgotten = [e for e in app.audit.entries() if e["action"] == "asset.forgotten"]
        assert sorted(e["asset"] for e in forgotten) == sorted(f"photos:{p}" for p in PHOTOS)
        assert app.audit.verify() > 0
        # Reported twice (a repeated webhook): nothing more happens.
        assert forget_assets(app.state, app.audit, "photos", [PHOTOS[0]], reason="test") == 0


def test_an_emptied_root_looks_unmounted_and_nothing_is_forgotten(library):
    lib, cfg = library
    scan(cfg)
    shutil.rmtree(lib)
    lib.mkdir()  # the mount point is there, the share is not
    assert scan(cfg) == {}
    assert all(records(cfg, p)[0] is not None for p in PHOTOS)
