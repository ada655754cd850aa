"""CLI behaviour an admin relies on: refusals with clear messages, exit codes, key checks."""

from __future__ import annotations

import base64
import os
import shutil

import pytest
from typer.testing import CliRunner

from plugin.cli import app

runner = CliRunner()


@pytest.fixture
def setup(tmp_path, demo_data, engine, monkeypatch):
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    monkeypatch.delenv("CONSENTRY_KEY", raising=False)
    lib = tmp_path / "photos"
    lib.mkdir()
    shutil.copy(demo_data / "library/portraits/IMG_3301.jpg", lib / "obama.jpg")
    config = tmp_path / "consentry.toml"
    result = runner.invoke(app, ["--config", str(config), "init", "--photos", str(lib)])
    assert result.exit_code == 0, result.output
    doc = tmp_path / "quitclaim.pdf"
    doc.write_bytes(b"%PDF signed")
    return config, lib, doc


def cli(config, *args):
    return runner.invoke(app, ["--config", str(config), *args])


def test_init_creates_private_files(setup):
    config, _, _ = setup
    store = config.parent / ".consentry"
    for name in ("key", "vault.db", "state.db"):
        assert (store / name).stat().st_mode & 0o777 == 0o600


def test_enroll_refused_without_biometric_consent(setup, demo_data):
    config, _, doc = setup
    assert cli(config, "subjects", "add", "Laura Bush").exit_code == 0
    assert cli(config, "consents", "add", "Laura Bush", "--document", str(doc),
               "--channels", "all").exit_code == 0
    result = cli(config, "subjects", "enroll", "Laura Bush",
                 str(demo_data / "people/Laura_Bush/ref-1.jpg"))
    assert result.exit_code == 2
    assert "no active biometric consent" in " ".join(result.output.split())


def test_enroll_refuses_photos_with_zero_or_several_faces(setup, demo_data):
    config, _, doc = setup
    cli(config, "subjects", "add", "Barack Obama")
    assert cli(config, "consents", "add", "Barack Obama", "--document", str(doc),
               "--biometric", "--channels", "all").exit_code == 0
    for photo, count in [("library/misc/IMG_7001.jpg", 0),
                         ("library/events/2024-summit/IMG_2041.jpg", 2)]:
        result = cli(config, "subjects", "enroll", "Barack Obama",
                     str(demo_data / "people/Barack_Obama/ref-1.jpg"), str(demo_data / photo))
        assert result.exit_code == 2
        assert f"exactly one face; found {count}" in " ".join(result.output.split())
    listing = cli(config, "subjects", "list")
    assert "Barack Obama" in listing.output and "yes" not in listing.output  # nothing stored
    ok = cli(config, "subjects", "enroll", "Barack Obama",
             str(demo_data / "people/Barack_Obama/ref-1.jpg"))
    assert ok.exit_code == 0 and "1 template(s) stored" in ok.output


def test_wrong_or_missing_key_changes_nothing(setup, monkeypatch):
    config, lib, _ = setup
    store = config.parent / ".consentry"
    before = {p.name: p.read_bytes() for p in [*store.iterdir(), *lib.iterdir()] if p.is_file()}
    monkeypatch.setenv("CONSENTRY_KEY", base64.b64encode(os.urandom(32)).decode())
    result = cli(config, "scan")
    assert result.exit_code == 2 and "does not open the vault" in " ".join(result.output.split())
    monkeypatch.delenv("CONSENTRY_KEY")
    (store / "key").rename(store / "key.away")
    result = cli(config, "scan")
    assert result.exit_code == 2 and "key" in result.output
    (store / "key.away").rename(store / "key")
    after = {p.name: p.read_bytes() for p in [*store.iterdir(), *lib.iterdir()]
             if p.is_file() and p.name in before}
    assert after == before


def test_config_error_exit_code(tmp_path):
    bad = tmp_path / "consentry.toml"
    bad.write_text("[matching]\nthreshold = 'x'\n")
    result = cli(bad, "scan")
    assert result.exit_code == 2 and "[matching.threshold]" in result.output


def test_unknown_channel_refused(setup):
    config, _, doc = setup
    cli(config, "subjects", "add", "Jane Doe")
    result = cli(config, "consents", "add", "Jane Doe", "--document", str(doc),
                 "--channels", "billboard")
    assert result.exit_code == 2 and "unknown channel" in result.output


def test_scan_then_report(setup, demo_data):
    config, _, doc = setup
    cli(config, "subjects", "add", "Barack Obama")
    cli(config, "consents", "add", "Barack Obama", "--document", str(doc), "--biometric",
        "--channels", "internal,website", "--until", "2099-01-01")
    assert cli(config, "subjects", "enroll", "Barack Obama",
               str(demo_data / "people/Barack_Obama/ref-1.jpg")).exit_code == 0
    result = cli(config, "scan")
    assert result.exit_code == 0, result.output
    report = cli(config, "report", "--format", "json")
    import json

    [row] = json.loads(report.output)
    assert row["asset"] == "photos:obama.jpg" and row["status"] == "limited"
    assert row["names"] == ["Barack Obama"] and row["channels"] == ["internal", "website"]
    assert row["valid_until"] == "2099-01-01" and row["unidentified"] == 0
    csv_out = cli(config, "report", "--format", "csv").output
    assert csv_out.splitlines()[0].startswith("asset,status,names,channels")


def test_check_reports_engine_and_connectors(setup):
    config, _, _ = setup
    result = cli(config, "check")
    assert result.exit_code == 0, result.output
    assert "face engine" in result.output and "local connector" in result.output
