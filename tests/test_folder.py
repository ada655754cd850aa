"""The folder connector on a real directory tree (the writer is a recording stand-in here;
the real XMP writer is exercised in test_xmp.py and end to end in test_demo_e2e.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from connectors.base import ConnectorContext
from connectors.folder import FolderConfig, FolderConnector
from plugin.errors import AssetError, ConfigError
from plugin.models import AssetVerdict, Geometry, ModelRelease, Status

VERDICT = AssetVerdict(status=Status.NO_FACES, model_release=ModelRelease.NOT_APPLICABLE)
GEOM = Geometry(stored_width=10, stored_height=10)


class RecordingWriter:
    def __init__(self, change=True):
        self.calls, self.change = [], change

    def write(self, image, verdict, geometry, *, engine, sidecar=None):
        self.calls.append((image, sidecar))
        if self.change and sidecar is None:
            image.write_bytes(image.read_bytes() + b"xmp")
        return self.change


class Known:
    def __init__(self):
        self.table = {}

    def known_version(self, connector, asset_id):
        return self.table.get(asset_id)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "lib"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "one.jpg").write_bytes(b"one")
    (root / "a" / "b" / "two.PNG").write_bytes(b"two")
    (root / "notes.txt").write_text("not a photo")
    (root / "album.jpg").mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret")
    (root / "link-out.jpg").symlink_to(outside)
    (root / "link-in.jpg").symlink_to(root / "a" / "one.jpg")
    (root / "dirlink").symlink_to(tmp_path)
    return root


def make(root, writer=None, known=None, **cfg):
    context = ConnectorContext(writer=writer or RecordingWriter(), engine_version="test",
                               known=known)
    return FolderConnector(FolderConfig(root=root, **cfg), context)


def test_lists_photos_never_leaving_the_root(tree):
    refs, _ = make(tree).changes(None)
    ids = [r.id for r in refs]
    assert ids == ["album.jpg", "link-in.jpg", "a/one.jpg", "a/b/two.PNG"]
    one = next(r for r in refs if r.id == "a/one.jpg")
    assert one.version == hashlib.sha256(b"one").hexdigest() and one.mime == "image/jpeg"


def test_version_reused_while_fingerprint_holds(tree):
    known = Known()
    c = make(tree, known=known)
    path = tree / "a" / "one.jpg"
    ref = c.ref_for(path)
    known.table["a/one.jpg"] = (ref.fingerprint, "stored-version")
    assert c.ref_for(path).version == "stored-version"
    os.utime(path, ns=(1, 1))  # touched, same bytes: hashed again, same content hash
    assert c.ref_for(path).version == hashlib.sha256(b"one").hexdigest()


def test_fetch_of_a_vanished_file(tree):
    c = make(tree)
    ref = c.ref_for(tree / "a" / "one.jpg")
    (tree / "a" / "one.jpg").unlink()
    with pytest.raises(AssetError, match=r"a/one\.jpg: file vanished"):
        c.fetch(ref, "analysis")


@pytest.mark.parametrize(("naming", "expected"), [("full", "one.jpg.xmp"), ("stem", "one.xmp")])
def test_sidecar_mode_leaves_the_photo_alone(tree, naming, expected):
    writer = RecordingWriter()
    c = make(tree, writer, write_mode="sidecar", sidecar_naming=naming)
    ref = c.ref_for(tree / "a" / "one.jpg")
    assert c.write_back(ref, VERDICT, GEOM) == ref
    assert writer.calls[0][1].name == expected
    assert (tree / "a" / "one.jpg").read_bytes() == b"one"


def test_embedded_write_reports_the_new_version(tree):
    c = make(tree)
    ref = c.ref_for(tree / "a" / "one.jpg")
    new = c.write_back(ref, VERDICT, GEOM)
    assert new.version == hashlib.sha256(b"onexmp").hexdigest() != ref.version


def test_unchanged_write_keeps_the_version(tree):
    c = make(tree, RecordingWriter(change=False))
    ref = c.ref_for(tree / "a" / "one.jpg")
    assert c.write_back(ref, VERDICT, GEOM) is ref


def test_select_refuses_paths_outside_the_root(tree, tmp_path):
    c = make(tree)
    assert [r.id for r in c.select([tree / "a"])] == ["a/one.jpg", "a/b/two.PNG"]
    with pytest.raises(ConfigError, match="not inside the library root"):
        c.select([tmp_path / "outside.jpg"])


def test_missing_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make(tmp_path / "nope")


def test_symlink_escape_cannot_be_fetched(tree):
    c = make(tree)
    from plugin.models import AssetRef

    ref = AssetRef(connector="photos", id="../outside.jpg", version="x", name="../outside.jpg")
    with pytest.raises(AssetError, match="escapes the library root"):
        c.fetch(ref, "analysis")
    assert c.ref_for(Path(tree / "link-out.jpg")) is None
