"""`consentry scan` over a folder full of bad input: each failure is named with its cause,
the others are processed, exit code 1, nothing half-written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from connectors.folder import FolderConnector
from plugin.cli import app
from plugin.setup import initialise

PHOTO = "library/events/2024-summit/IMG_2041.jpg"


@pytest.fixture
def library(tmp_path, demo_data):
    lib = tmp_path / "photos"
    lib.mkdir()
    src = demo_data / PHOTO
    shutil.copy(src, lib / "good.jpg")
    data = src.read_bytes()
    (lib / "zero.jpg").write_bytes(b"")
    (lib / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (lib / "notes.jpg").write_text("not an image\n")
    Image.new("1", (20000, 20000)).save(lib / "bomb.png", optimize=True)
    (lib / "folder.jpg").mkdir()
    shutil.copy(src, lib / "vanish.jpg")
    rgb = Image.open(src).convert("RGB")
    rgb.convert("CMYK").save(lib / "cmyk.jpg")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(lib / "deep16.png")
    rgb.convert("L").save(lib / "grey.jpg")
    rgb.convert("RGBA").save(lib / "alpha.png")
    return lib


def test_bad_files_are_reported_and_the_rest_processed(tmp_path, library, engine, monkeypatch):
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    config = tmp_path / "consentry.toml"
    initialise(config, photos=library)
    before = {p.name: p.read_bytes() for p in library.iterdir() if p.is_file()}

    listing = FolderConnector.changes

    def changes_then_vanish(self, cursor):
        refs = listing(self, cursor)
        (library / "vanish.jpg").unlink()
        return refs

    monkeypatch.setattr(FolderConnector, "changes", changes_then_vanish)
    result = CliRunner().invoke(app, ["--config", str(config), "scan"])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    for name, cause in [
        ("zero.jpg", "not a recognised image format"),
        ("truncated.jpg", "truncated or corrupt"),
        ("notes.jpg", "not a recognised image format"),
        ("bomb.png", "decompression-bomb guard"),
        ("folder.jpg", "is a directory"),
        ("vanish.jpg", "vanished"),
    ]:
        assert f"photos:{name}: " in out and cause in out.split(f"photos:{name}: ")[1][:200], name
    assert out.count("failed photos:") == 6

    # Valid but unusual images are processed normally (both faces found in each).
    from plugin.app import App

    with App.open(config) as a:
        for name in ("good.jpg", "cmyk.jpg", "deep16.png", "grey.jpg", "alpha.png"):
            row = a.state.asset("photos", name)
            assert row and row.last_error is None and row.status == "missing", name
            assert len(a.state.faces("photos", name)) == 2, name
    # Nothing half-written: bad files untouched, no temp or backup files anywhere.
    for name in ("zero.jpg", "truncated.jpg", "notes.jpg", "bomb.png"):
        assert (library / name).read_bytes() == before[name]
    leftovers = [p.name for p in library.rglob("*")
                 if p.name.endswith(("_original", ".tmp")) or ".consentry-tmp" in p.name]
    assert not leftovers
