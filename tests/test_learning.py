"""Confirmed faces as templates (`matching.learn_from_review`), on the real demo library."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import plugin.cli_review  # noqa: F401  (registers `consentry review`)
from plugin.app import App
from plugin.cli import app
from plugin.imaging import decode
from tests.demo_run import scanned_demo

runner = CliRunner()
CLOONEY = "events/2023-film-gala/IMG_0811.jpg"
CLOONEY_TOO = "events/2023-film-gala/IMG_0812.jpg"


def cli(config: Path, *args: str):
    return runner.invoke(app, ["--config", str(config), *args])


def learning(config: Path, on: bool) -> None:
    text = config.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^learn_from_review = .*\n", "", text)
    config.write_text(text.replace("[matching]\n", f"[matching]\nlearn_from_review = "
                                   f"{'true' if on else 'false'}\n", 1), encoding="utf-8")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, demo_data, engine, monkeypatch_module):
    monkeypatch_module.delenv("CONSENTRY_KEY", raising=False)
    out = tmp_path_factory.mktemp("learning") / "consentry-demo"
    return scanned_demo(out, demo_data, engine, monkeypatch_module)


@pytest.fixture
def config(demo_out, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_out, copy)
    return copy / "consentry.toml"


def uncertain_distance(config: Path, asset: str) -> float:
    with App.open(config) as a:
        (face,) = a.state.faces("photos", asset)
    assert face.state.value == "uncertain"
    return face.distance


def templates(config: Path, name: str) -> np.ndarray:
    with App.open(config) as a:
        return a.vault.templates(a.state.resolve_subject(name).id)


def test_a_confirmed_face_becomes_a_template_and_brings_the_persons_faces_nearer(
        config, engine, caplog):
    learning(config, True)
    before = uncertain_distance(config, CLOONEY_TOO)
    assert len(templates(config, "George Clooney")) == 2

    result = cli(config, "review", "confirm", f"photos:{CLOONEY}#0", "George Clooney")
    assert result.exit_code == 0, result.output
    assert "template: stored (3 in all)" in result.output
    held = templates(config, "George Clooney")
    assert held.shape == (3, 128)
    # The new template is the confirmed face, encoded as a scan encodes it.
    image = decode(config.parent / "library" / CLOONEY)
    (face,) = engine.detect(image)
    assert np.allclose(held[2], engine.encode(image, [face])[0], atol=1e-5)
    with App.open(config) as a:
        (entry,) = [e for e in a.audit.entries() if e["action"] == "subject.template_learned"]
        assert entry["subject_id"] == str(a.state.resolve_subject("George Clooney").id)
        assert entry["details"]["templates_total"] == 3
        assert "Clooney" not in str(entry)
        assert a.audit.verify() > 0
    assert "Clooney" not in caplog.text

    # Faces still open are analysed again: his other gala photo now sits near the new template.
    assert cli(config, "scan").exit_code == 0
    after = uncertain_distance(config, CLOONEY_TOO)
    assert before > 0.48 and after < before - 0.05


def test_nothing_is_learned_without_biometric_consent_or_with_the_setting_off(config):
    # Laura Bush consented to publication only: she may be named by a human, never templated.
    learning(config, True)
    with App.open(config) as a:
        laura = [f for f in a.state.faces("photos", "portraits/IMG_3304.jpg")]
    assert len(laura) == 1
    result = cli(config, "review", "confirm", "photos:portraits/IMG_3304.jpg#0", "Laura Bush")
    assert result.exit_code == 0, result.output
    assert "no active biometric consent" in result.output
    assert len(templates(config, "Laura Bush")) == 0

    learning(config, False)
    result = cli(config, "review", "confirm", f"photos:{CLOONEY}#0", "George Clooney")
    assert result.exit_code == 0 and "template" not in result.output
    assert len(templates(config, "George Clooney")) == 2
    with App.open(config) as a:
        assert not [e for e in a.audit.entries() if e["action"] == "subject.template_learned"]


def test_a_person_keeps_at_most_three_templates_and_no_duplicate(config):
    learning(config, True)
    assert cli(config, "review", "confirm", f"photos:{CLOONEY}#0", "George Clooney"
               ).exit_code == 0
    result = cli(config, "review", "confirm", f"photos:{CLOONEY_TOO}#0", "George Clooney")
    assert result.exit_code == 0, result.output
    assert "already has 3 templates" in result.output
    assert len(templates(config, "George Clooney")) == 3

    # A library photo that is also the person's reference photo adds nothing new.
    doc = config.parent / "consent.pdf"
    doc.write_bytes(b"%PDF signed")
    scott = config.parent / "library/portraits/IMG_3311.jpg"
    for args in (("subjects", "add", "Ridley Scott"),
                 ("consents", "add", "Ridley Scott", "--document", str(doc), "--biometric",
                  "--channels", "all"),
                 ("subjects", "enroll", "Ridley Scott", str(scott))):
        assert cli(config, *args).exit_code == 0
    result = cli(config, "review", "confirm", "photos:portraits/IMG_3311.jpg#0", "Ridley Scott")
    assert result.exit_code == 0, result.output
    assert "already one of the person's templates (1 in all)" in result.output
    assert len(templates(config, "Ridley Scott")) == 1
