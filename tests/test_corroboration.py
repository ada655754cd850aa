"""Same-run corroboration (plugin/corroboration.py) on the real demo library: who vouches for
whom, what the file says, and how a reviewer takes a vouched name back."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import plugin.cli_review  # noqa: F401  (registers `consentry review`)
from plugin.app import App
from plugin.cli import app
from plugin.corroboration import CorroborationSettings, RunCorroboration
from plugin.matcher import Matcher
from plugin.models import FaceBox, FaceRecord, FaceState
from tests.demo_run import scanned_demo
from tests.test_demo_e2e import exiftool_json, iou

runner = CliRunner()
GALA = "events/2023-film-gala/"
PORTRAIT = "portraits/IMG_3302.jpg"  # Clooney, named by the matcher at 0.285: an anchor
# The faces the run's anchors name (the matcher alone leaves them uncertain at 0.43-0.46).
VOUCHED = {GALA + "IMG_0811.jpg": "George_Clooney", GALA + "IMG_0813.jpg": "George_Clooney",
           "portraits/IMG_3306.jpg": "Megawati_Sukarnoputri"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, demo_data, engine, monkeypatch_module):
    monkeypatch_module.delenv("CONSENTRY_KEY", raising=False)
    out = tmp_path_factory.mktemp("corroboration") / "consentry-demo"
    return scanned_demo(out, demo_data, engine, monkeypatch_module)


@pytest.fixture
def config(demo_out, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_out, copy)
    return copy / "consentry.toml"


def manifest_face(manifest: dict, path: str) -> dict:
    (photo,) = [p for p in manifest["photos"] if p["path"] == "library/" + path]
    (face,) = [f for f in photo["faces"] if f["person"]]
    return face


def test_the_runs_anchors_name_the_gala_faces_and_the_file_says_so(demo_out, manifest):
    config = demo_out / "consentry.toml"
    with App.open(config) as a:
        ids = {s.display_name: s.id for s in a.state.subjects()}
        for path, person in VOUCHED.items():
            faces = a.state.faces("photos", path)
            truth = manifest_face(manifest, path)
            face = max(faces, key=lambda f: iou(f.box.as_css(), truth["box"]))
            assert iou(face.box.as_css(), truth["box"]) >= 0.4, path
            assert face.state == FaceState.AUTO, path
            assert face.subject_id == ids[person.replace("_", " ")], path
            assert 0.36 < face.distance <= 0.43, path
            # the anchor is a face of the same person in another photo of this run
            anchor_asset, _, idx = face.vouched_by.partition(":")[2].rpartition("#")
            anchor = a.state.faces("photos", anchor_asset)[int(idx)]
            assert anchor.subject_id == face.subject_id and anchor.vouched_by is None
            assert anchor.state == FaceState.AUTO and anchor.distance <= 0.36
        # faces the matcher named itself carry no voucher
        (portrait,) = a.state.faces("photos", PORTRAIT)
        assert portrait.vouched_by is None and portrait.distance < 0.3
        entries = [e for e in a.audit.entries() if e["action"] == "face.corroborated"]
        assert sorted(e["asset"] for e in entries) == sorted(f"photos:{p}" for p in VOUCHED)
        assert "Clooney" not in json.dumps(entries) and "Megawati" not in json.dumps(entries)
        assert a.audit.verify() > 0
    metas = exiftool_json(*(demo_out / "library" / p for p in VOUCHED))
    for meta, person in zip(metas, VOUCHED.values(), strict=True):
        assert meta["XMP-iptcExt:PersonInImage"] == [person.replace("_", " ")]


def test_rejecting_the_anchor_sends_the_faces_it_vouched_for_back_to_review(config):
    gala = [p for p, who in VOUCHED.items() if who == "George_Clooney"]
    with App.open(config) as a:
        clooney = a.state.resolve_subject("George Clooney").id
        vouched_by = {a.state.faces("photos", p)[0].vouched_by for p in gala}
    assert vouched_by == {f"photos:{PORTRAIT}#0"}

    result = runner.invoke(app, ["--config", str(config), "review", "reject",
                                 f"photos:{PORTRAIT}#0"])
    assert result.exit_code == 0, result.output

    with App.open(config) as a:
        for path in gala:
            (face,) = a.state.faces("photos", path)
            assert face.state == FaceState.UNCERTAIN and face.subject_id is None
            assert face.candidates == (clooney,) and face.vouched_by is None
        (megawati,) = a.state.faces("photos", "portraits/IMG_3306.jpg")
        assert megawati.state == FaceState.AUTO  # vouched for by another anchor: unchanged
        withdrawn = [e for e in a.audit.entries() if e["action"] == "face.vouch_withdrawn"]
        assert sorted(e["asset"] for e in withdrawn) == sorted(f"photos:{p}" for p in gala)
    for meta in exiftool_json(*(config.parent / "library" / p for p in [*gala, PORTRAIT])):
        assert "George Clooney" not in json.dumps(
            {k: v for k, v in meta.items() if k.startswith(("XMP-iptcExt:", "XMP-mwg-rs:"))})


def test_corroboration_off_leaves_the_gala_faces_to_review(config, engine):
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[matching]\n", "[matching]\ncorroborate = false\n", 1),
                      encoding="utf-8")
    with App.open(config, engine=engine) as a:
        before = len([e for e in a.audit.entries() if e["action"] == "face.corroborated"])
        # the setting is part of the processing key: every asset is analysed again
        results = a.pipeline.scan("photos")
        assert {r.outcome.value for r in results} == {"processed"}
        for path in VOUCHED:
            (face,) = [f for f in a.state.faces("photos", path) if f.candidates]
            assert face.state == FaceState.UNCERTAIN and face.vouched_by is None, path
        after = len([e for e in a.audit.entries() if e["action"] == "face.corroborated"])
        assert before == len(VOUCHED) and after == before


def _faces(vectors: np.ndarray, states: list[FaceState], subject: uuid.UUID,
           distances: list[float]) -> list[FaceRecord]:
    box = FaceBox(top=0, right=10, bottom=10, left=0)
    return [FaceRecord(box=box, state=s, subject_id=subject if s == FaceState.AUTO else None,
                       distance=d) for s, d in zip(states, distances, strict=True)]


def test_buffers_are_bounded_and_only_strong_names_vouch(demo_encodings):
    """Real encodings (demo references and faces); the buffers stop at their limits."""
    refs, faces = demo_encodings
    sid = uuid.uuid4()
    matcher = Matcher([sid, sid], refs["George_Clooney"])
    run = RunCorroboration(matcher, 0.14, CorroborationSettings(max_pending=1))
    portrait, gala_a, gala_b = faces[PORTRAIT], faces[GALA + "IMG_0811.jpg"], \
        faces[GALA + "IMG_0813.jpg"]
    # a name at 0.40 is not strong enough to vouch
    run.observe(("photos", "weak"), _faces(portrait[None], [FaceState.AUTO], sid, [0.40]),
                {0: portrait})
    run.observe(("photos", "a"), _faces(gala_a[None], [FaceState.UNCERTAIN], sid, [0.43]),
                {0: gala_a})
    assert run.resolve() == []
    run.observe(("photos", "strong"), _faces(portrait[None], [FaceState.AUTO], sid, [0.285]),
                {0: portrait})
    run.observe(("photos", "a"), _faces(gala_a[None], [FaceState.UNCERTAIN], sid, [0.43]),
                {0: gala_a})
    run.observe(("photos", "b"), _faces(gala_b[None], [FaceState.UNCERTAIN], sid, [0.43]),
                {0: gala_b})
    assert run.pending == 1 and run.overflow == 1
    (vouched,) = run.resolve()
    assert (vouched.asset, vouched.idx, vouched.subject_id) == (("photos", "a"), 0, sid)
    assert vouched.anchor == ("photos", "strong", 0)
    assert vouched.distance == pytest.approx(np.linalg.norm(gala_a - portrait), abs=1e-4)
    assert run.pending == 0  # the vectors are gone after the run

    # a face farther than anchor + threshold (0.79) from every reference is never held: no
    # anchor could be within 0.43 of it
    run.observe(("photos", "far"), _faces(gala_b[None], [FaceState.UNKNOWN], sid, [0.80]),
                {0: gala_b})
    assert run.pending == 0
    # an anchor never vouches for another face of its own photo
    run.observe(("photos", "group"), _faces(np.stack([portrait, gala_a]),
                                            [FaceState.AUTO, FaceState.UNCERTAIN], sid,
                                            [0.285, 0.43]), {0: portrait, 1: gala_a})
    assert run.resolve() == []


@pytest.fixture(scope="module")
def demo_encodings(demo_data: Path, engine):
    """Encodings of the Clooney references and three library faces, as a scan makes them."""
    from plugin.workers import detect_and_encode

    def encode(path: Path) -> np.ndarray:
        raw = detect_and_encode(engine, path, asset=path.name, decode_options={})
        return raw.vectors[int(np.argmax([d.box.width for d in raw.detections]))]

    refs = {"George_Clooney": np.stack([encode(p) for p in sorted(
        (demo_data / "people" / "George_Clooney").glob("*.jpg"))])}
    faces = {p: encode(demo_data / "library" / p)
             for p in (PORTRAIT, GALA + "IMG_0811.jpg", GALA + "IMG_0813.jpg")}
    return refs, faces


def test_erasure_drops_the_link_between_the_persons_faces(config):
    import plugin.cli_erasure  # noqa: F401  (registers `subjects erase`)

    result = runner.invoke(app, ["--config", str(config), "subjects", "erase", "George Clooney",
                                 "--yes"])
    assert result.exit_code == 0, result.output
    with App.open(config) as a:
        for path in (p for p, who in VOUCHED.items() if who == "George_Clooney"):
            (face,) = a.state.faces("photos", path)
            assert face.state == FaceState.UNKNOWN and face.subject_id is None
            assert face.vouched_by is None  # "same person as that face" was theirs too
        (megawati,) = a.state.faces("photos", "portraits/IMG_3306.jpg")
        assert megawati.vouched_by is not None


def test_vouched_names_can_be_listed_and_rejected_one_by_one(config):
    result = runner.invoke(app, ["--config", str(config), "review", "list", "--vouched",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = {i["asset"]: i for i in json.loads(result.output) if i["vouched_by"]}
    assert set(listed) == set(VOUCHED)
    for path, person in VOUCHED.items():
        assert listed[path]["state"] == "auto"
        assert [c["name"] for c in listed[path]["candidates"]] == [person.replace("_", " ")]
    plain = runner.invoke(app, ["--config", str(config), "review", "list", "--format", "json"])
    assert not [i for i in json.loads(plain.output) if i["vouched_by"]]

    megawati = "portraits/IMG_3306.jpg"
    result = runner.invoke(app, ["--config", str(config), "review", "reject",
                                 listed[megawati]["face"]])
    assert result.exit_code == 0, result.output
    with App.open(config) as a:
        (face,) = a.state.faces("photos", megawati)
        assert face.state == FaceState.REJECTED and face.vouched_by is None
        assert all(a.state.faces("photos", p)[0].state == FaceState.AUTO
                   for p in VOUCHED if p != megawati)
    (meta,) = exiftool_json(config.parent / "library" / megawati)
    assert "XMP-iptcExt:PersonInImage" not in meta
