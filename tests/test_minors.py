"""Minors (DESIGN §4, §7): a guardian signs their consent, and a photo that depicts an
identified minor says so in `XMP-plus:MinorModelAgeDisclosure` (read back with exiftool).

A minor is either flagged (`subjects add --minor`) or under 18 by birth date.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from plugin.app import App
from plugin.cli import app

runner = CliRunner()
PLUS = "http://ns.useplus.org/ldf/vocab/"
PHOTOS = {  # library file -> the demo person in it (one face each)
    "obama.jpg": ("portraits/IMG_3301.jpg", "Barack_Obama"),
    "megawati.jpg": ("portraits/IMG_3307.jpg", "Megawati_Sukarnoputri"),
    "clooney.jpg": ("portraits/IMG_3302.jpg", "George_Clooney"),
}


def years_ago(years: int) -> str:
    today = date.today()
    return today.replace(year=today.year - years, day=min(today.day, 28)).isoformat()


def cli(config: Path, *args: str):
    return runner.invoke(app, ["--config", str(config), *args])


def text(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def library(tmp_path, demo_data, engine, monkeypatch):
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    monkeypatch.delenv("CONSENTRY_KEY", raising=False)
    lib = tmp_path / "photos"
    lib.mkdir()
    for name, (source, _) in PHOTOS.items():
        shutil.copy(demo_data / "library" / source, lib / name)
    config = tmp_path / "consentry.toml"
    result = cli(config, "init", "--photos", str(lib))
    assert result.exit_code == 0, result.output
    doc = tmp_path / "quitclaim.pdf"
    doc.write_bytes(b"%PDF signed quitclaim")
    return config, lib, doc


def consent_args(doc: Path) -> list[str]:
    return ["--document", str(doc), "--biometric", "--channels", "all", "--until", "2099-01-01"]


def guardian_consents(config: Path) -> list[tuple[bool, str | None]]:
    with App.open(config) as a:
        return [(c.guardian, c.signed_by) for c in a.state.consents()]


def test_flagged_minor_needs_a_guardian_signature(library):
    config, _, doc = library
    assert cli(config, "subjects", "add", "Barack Obama", "--minor").exit_code == 0
    refused = cli(config, "consents", "add", "Barack Obama", *consent_args(doc))
    assert refused.exit_code == 2 and "guardian" in text(refused)
    unnamed = cli(config, "consents", "add", "Barack Obama", *consent_args(doc), "--guardian")
    assert unnamed.exit_code == 2, unnamed.output  # a clear refusal, not a traceback
    assert "signed-by" in text(unnamed)
    assert guardian_consents(config) == []
    ok = cli(config, "consents", "add", "Barack Obama", *consent_args(doc),
             "--guardian", "--signed-by", "Ann Guardian")
    assert ok.exit_code == 0, ok.output
    assert guardian_consents(config) == [(True, "Ann Guardian")]


def test_minor_by_birth_date_needs_a_guardian_signature(library):
    config, _, doc = library
    assert cli(config, "subjects", "add", "Megawati Sukarnoputri",
               "--birth-date", years_ago(12)).exit_code == 0
    refused = cli(config, "consents", "add", "Megawati Sukarnoputri", *consent_args(doc))
    assert refused.exit_code == 2 and "guardian" in text(refused), refused.output
    assert guardian_consents(config) == []


def test_adult_by_birth_date_signs_alone(library):
    config, _, doc = library
    assert cli(config, "subjects", "add", "George Clooney", "--birth-date", "1961-05-06"
               ).exit_code == 0
    result = cli(config, "consents", "add", "George Clooney", *consent_args(doc))
    assert result.exit_code == 0, result.output
    assert guardian_consents(config) == [(False, None)]


def test_identified_minor_gets_the_minor_age_disclosure(library, demo_data):
    config, lib, doc = library
    people = [("Barack Obama", ["--minor"]),
              ("Megawati Sukarnoputri", ["--birth-date", years_ago(12)]),
              ("George Clooney", ["--birth-date", "1961-05-06"])]
    for name, flags in people:
        assert cli(config, "subjects", "add", name, *flags).exit_code == 0
        guardian = [] if name == "George Clooney" else ["--guardian", "--signed-by",
                                                        "Ann Guardian"]
        added = cli(config, "consents", "add", name, *consent_args(doc), *guardian)
        assert added.exit_code == 0, added.output
        folder = name.replace(" ", "_")
        enrolled = cli(config, "subjects", "enroll", name,
                       str(demo_data / "people" / folder / "ref-1.jpg"),
                       str(demo_data / "people" / folder / "ref-2.jpg"))
        assert enrolled.exit_code == 0, enrolled.output
    result = cli(config, "scan")
    assert result.exit_code == 0, result.output

    out = subprocess.run(["exiftool", "-j", "-G1", "-n", *map(str, sorted(lib.iterdir()))],
                         check=True, capture_output=True, text=True).stdout
    meta = {Path(m["SourceFile"]).name: m for m in json.loads(out)}
    for file, (_, person) in PHOTOS.items():
        names = meta[file].get("XMP-iptcExt:PersonInImage")
        assert (names if isinstance(names, list) else [names]) == [person.replace("_", " ")]
        assert meta[file]["XMP-consentry:Status"] == "cleared", file
    age = {f: (m.get("XMP-plus:MinorModelAgeDisclosure") or "").removeprefix(PLUS)
           for f, m in meta.items()}
    assert age == {"obama.jpg": "AG-UNK", "megawati.jpg": "AG-UNK", "clooney.jpg": ""}
