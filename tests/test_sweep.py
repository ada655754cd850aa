"""Consents that run out with time: `sweep` re-labels exactly the photos of the people whose
consent changed, from stored faces (0 detector calls), and leaves every other file alone."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from plugin import people
from plugin.app import App
from plugin.cli import scan_app
from plugin.models import DEFAULT_CHANNELS, Consent, Grant, GrantKind, Subject
from plugin.setup import initialise
from plugin.sweep import expiring, sweep

T0 = datetime(2026, 11, 26, 12, tzinfo=UTC)
DAY = timedelta(days=1)
PHOTOS = {  # photo -> the person the manifest says is in it (alone)
    "library/portraits/IMG_3301.jpg": "Barack Obama",
    "library/events/2024-summit/IMG_2043.jpg": "Barack Obama",
    "library/portraits/IMG_3302.jpg": "George Clooney",
    "library/events/2024-summit/IMG_2045.jpg": "Megawati Sukarnoputri",
    "library/portraits/IMG_3307.jpg": "Megawati Sukarnoputri",
}
REFS = {"Barack Obama": "Barack_Obama", "George Clooney": "George_Clooney",
        "Megawati Sukarnoputri": "Megawati_Sukarnoputri"}


def grants(bio_end, pub_end):
    return (Grant(kind=GrantKind.BIOMETRIC, valid_from=T0 - 30 * DAY, valid_until=bio_end),
            Grant(kind=GrantKind.PUBLICATION, channels=DEFAULT_CHANNELS,
                  valid_from=T0 - 30 * DAY, valid_until=pub_end))


def read(files):
    out = subprocess.run(["exiftool", "-j", "-struct", "-G1", "-n", *map(str, files)],
                         check=True, capture_output=True, text=True).stdout
    return {m["SourceFile"]: m for m in json.loads(out)}


@pytest.fixture
def library(tmp_path, demo_data, counting_engine, monkeypatch):
    # This test is about time and consent, not about accuracy: a fixed threshold keeps the
    # five portraits named whatever the shipped default is.
    monkeypatch.setenv("CONSENTRY_MATCHING__THRESHOLD", "0.45")
    monkeypatch.setenv("CONSENTRY_MATCHING__MARGIN", "0.05")
    lib = tmp_path / "photos"
    for rel in PHOTOS:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data / rel, lib / rel)
    config = tmp_path / "consentry.toml"
    initialise(config, photos=lib)
    ends = {"Barack Obama": (T0 + 700 * DAY, T0 + 700 * DAY),
            "George Clooney": (T0 + 700 * DAY, T0 + 50 * DAY),   # only publication ends
            "Megawati Sukarnoputri": (T0 + 100 * DAY, T0 + 100 * DAY)}  # everything ends
    with App.open(config, clock=lambda: T0) as a:
        for name, (bio_end, pub_end) in ends.items():
            s = people.add_subject(a.state, a.audit, Subject(display_name=name))
            people.add_consent(a.state, a.audit, Consent(
                subject_id=s.id, document_ref="q.pdf", document_sha256="0" * 64,
                signed_at=T0 - 30 * DAY, grants=grants(bio_end, pub_end)))
            refs = sorted((demo_data / "people" / REFS[name]).glob("ref-*.jpg"))
            people.enroll(a.state, a.vault, a.audit, a.engine, s, refs, now=T0)
        assert scan_app(a, paths=[], out=Console(file=io.StringIO())) == 0
    files = {rel: lib / rel for rel in PHOTOS}
    meta = read(files.values())
    for rel, person in PHOTOS.items():
        assert person in meta[str(files[rel])]["XMP-iptcExt:PersonInImage"], rel
    return config, files


def test_sweep_relabels_exactly_the_people_whose_consent_ended(library, counting_engine):
    config, files = library
    by_person = {p: [files[r] for r, who in PHOTOS.items() if who == p] for p in REFS}
    snapshot = {f: f.read_bytes() for f in files.values()}
    counting_engine.detect_calls = 0

    # Day 51: Clooney's publication grant has ended, his biometric one runs on.
    with App.open(config, clock=lambda: T0 + 51 * DAY) as a:
        first = sweep(a.pipeline)
    meta = read(files.values())
    [clooney] = by_person["George Clooney"]
    assert meta[str(clooney)]["XMP-consentry:Status"] == "expired"
    assert meta[str(clooney)]["XMP-iptcExt:PersonInImage"] == ["George Clooney"]  # name kept
    for f in files.values():
        if f != clooney:
            assert f.read_bytes() == snapshot[f], f"{f.name} changed"
    assert [r.ref.name for r in first.results if r.outcome == "processed"] == [
        "library/portraits/IMG_3302.jpg"]

    # Day 101: every grant of Megawati has ended: her photos lose the name, others stay.
    snapshot = {f: f.read_bytes() for f in files.values()}
    with App.open(config, clock=lambda: T0 + 101 * DAY) as a:
        second = sweep(a.pipeline)
        megawati = a.state.resolve_subject("Megawati Sukarnoputri")
        assert second.templates_destroyed == (megawati.id,)
        assert a.vault.templates(megawati.id).shape == (0, 128)
    meta = read(files.values())
    for f in by_person["Megawati Sukarnoputri"]:
        m = meta[str(f)]
        assert "Megawati" not in json.dumps({k: v for k, v in m.items()
                                             if k.startswith(("XMP-mwg-rs", "XMP-iptcExt"))})
        assert m["XMP-consentry:Status"] == "expired"
    for f in by_person["Barack Obama"] + [clooney]:
        assert f.read_bytes() == snapshot[f], f"{f.name} changed"
    assert counting_engine.detect_calls == 0

    # Idempotent: the same sweep again changes nothing.
    snapshot = {f: f.read_bytes() for f in files.values()}
    with App.open(config, clock=lambda: T0 + 101 * DAY) as a:
        again = sweep(a.pipeline)
        assert a.audit.verify() > 0
    assert again.subjects_changed == () and again.results == ()
    assert {f: f.read_bytes() for f in files.values()} == snapshot
    assert counting_engine.detect_calls == 0


def test_expiring_lists_consents_with_their_asset_counts(library):
    config, _ = library
    with App.open(config, clock=lambda: T0) as a:
        soon = expiring(a.state, now=T0, days=60)
        names = {s.id: s.display_name for s in a.state.subjects()}
        assert [(names[e.consent.subject_id], e.grant.kind.value, e.assets) for e in soon] == [
            ("George Clooney", "publication", 1)]
        later = expiring(a.state, now=T0, days=120)
        assert {names[e.consent.subject_id] for e in later} == {
            "George Clooney", "Megawati Sukarnoputri"}
        assert {e.assets for e in later if names[e.consent.subject_id] != "George Clooney"} == {2}
