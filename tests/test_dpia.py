"""`consentry dpia`: the draft's figures match the state, every data store is named, risks follow
the configuration, and no person is named in it.

The state is built directly (subjects, consents, face records, an erasure record, vault
templates) so every figure is known; the expected values are then recounted from the SQLite
file with plain SQL, apart from the code under test.
"""

from __future__ import annotations

import base64
import re
import shutil
import sqlite3
import uuid
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from typer.testing import CliRunner

import plugin.cli_records  # noqa: F401  (registers the commands)
from plugin import people
from plugin import schema as t
from plugin.app import App
from plugin.cli import app
from plugin.dpia import redact_url
from plugin.models import (
    AssetRef,
    Consent,
    FaceBox,
    FaceRecord,
    FaceState,
    Geometry,
    Grant,
    GrantKind,
    Subject,
)
from plugin.setup import initialise

runner = CliRunner()
PAST, FAR = datetime(2020, 1, 1, tzinfo=UTC), datetime(2099, 1, 1, tzinfo=UTC)
NAMES = ("Alice Zeller", "Bruno Minnaert", "Carla Quist", "Dora Vantongeren")
SHA = "ab" * 32


def grant(kind: GrantKind, start: datetime, end: datetime | None = None, *,
          withdrawn: datetime | None = None, channels: tuple[str, ...] = ()) -> Grant:
    return Grant(kind=kind, valid_from=start, valid_until=end, withdrawn_at=withdrawn,
                 channels=channels if kind == GrantKind.PUBLICATION else ())


def face(state: FaceState, subject: uuid.UUID | None = None, left: int = 0) -> FaceRecord:
    return FaceRecord(box=FaceBox(top=10, right=left + 50, bottom=60, left=left), state=state,
                      subject_id=subject, distance=0.4 if subject else None)


@pytest.fixture
def installation(tmp_path, demo_data, monkeypatch):
    monkeypatch.delenv("CONSENTRY_KEY", raising=False)
    lib = tmp_path / "photos"
    lib.mkdir()
    shutil.copy(demo_data / "library/portraits/IMG_3301.jpg", lib / "a1.jpg")
    config = tmp_path / "consentry.toml"
    initialise(config, photos=lib)
    return config


@pytest.fixture
def populated(installation):
    """Four subjects (two minors), four consents, four assets, one finished and one unfinished
    erasure, templates for an adult with consent and for a teen whose consent expired."""
    ids = {}
    with App.open(installation) as a:
        for name in NAMES:
            minor = name == "Bruno Minnaert"
            born = date.today() - timedelta(days=365 * 10) if name == "Carla Quist" else None
            ids[name] = people.add_subject(a.state, a.audit, Subject(
                display_name=name, minor=minor, birth_date=born)).id
        alice, bob, carla = ids["Alice Zeller"], ids["Bruno Minnaert"], ids["Carla Quist"]
        for consent in (
            Consent(subject_id=alice, document_ref="/docs/a.pdf", document_sha256=SHA,
                    signed_at=PAST, grants=(
                        grant(GrantKind.BIOMETRIC, PAST, FAR),
                        grant(GrantKind.PUBLICATION, PAST, FAR, channels=("internal",)))),
            Consent(subject_id=alice, document_ref="/docs/a2.pdf", document_sha256=SHA,
                    signed_at=PAST, grants=(grant(GrantKind.PUBLICATION, PAST, FAR,
                                                  withdrawn=PAST + timedelta(days=30),
                                                  channels=("website",)),)),
            Consent(subject_id=bob, document_ref="/docs/b.pdf", document_sha256=SHA,
                    signed_at=PAST, signed_by="a guardian", guardian=True,
                    grants=(grant(GrantKind.PUBLICATION, PAST, None, channels=("internal",)),)),
            Consent(subject_id=carla, document_ref="/docs/c.pdf", document_sha256=SHA,
                    signed_at=PAST, signed_by="a guardian", guardian=True,
                    grants=(grant(GrantKind.BIOMETRIC, PAST, PAST + timedelta(days=365)),)),
        ):
            people.add_consent(a.state, a.audit, consent)
        rng = np.random.default_rng(7)
        a.vault.add_templates(alice, rng.normal(size=(2, 128)))
        a.vault.add_templates(carla, rng.normal(size=(1, 128)))  # should have gone: a risk
        geometry = Geometry(stored_width=200, stored_height=100)
        analysed = {
            "a1.jpg": ([face(FaceState.AUTO, alice), face(FaceState.UNKNOWN, left=60)],
                       "missing"),
            "a2.jpg": ([face(FaceState.UNCERTAIN), face(FaceState.UNCERTAIN, left=60),
                        face(FaceState.CONFIRMED, bob, left=120)], "review"),
            "a3.jpg": ([], "no_faces"),
        }
        for name, (faces, status) in analysed.items():
            ref = AssetRef(connector="photos", id=name, version="v1", name=name)
            with a.state.begin() as conn:
                a.state.save_analysis(ref, geometry=geometry, faces=faces,
                                      processing_key="k", conn=conn)
                a.state.save_written(ref, status=status, verdict_fingerprint="f", conn=conn)
        a.state.mark_for_analysis([("photos", "a3.jpg")])
        a.state.record_failure(AssetRef(connector="photos", id="a4.jpg", version="v1",
                                        name="a4.jpg"), "ImageError: truncated")
        erased = [str(uuid.uuid4()), str(uuid.uuid4())]
        with a.state.begin() as conn:
            conn.execute(t.erasures.insert(), [
                {"subject_id": erased[0], "started_at": "2024-03-01T10:00:00+00:00",
                 "stage": "done", "assets": ["photos:x.jpg", "photos:y.jpg", "photos:z.jpg"],
                 "foreign_name_assets": ["photos:y.jpg"], "templates_destroyed": 2,
                 "consents_deleted": 1, "finished_at": "2024-03-01T10:05:00+00:00"},
                {"subject_id": erased[1], "started_at": "2024-05-02T10:00:00+00:00",
                 "stage": "metadata", "assets": ["photos:q.jpg"], "foreign_name_assets": [],
                 "templates_destroyed": 0, "consents_deleted": 0, "finished_at": None},
            ])
        settings = a.settings
    return {"config": installation, "ids": ids, "erased": erased, "settings": settings}


def dpia(config, *extra: str, env: dict | None = None) -> str:
    out = config.parent / "dpia.md"
    result = runner.invoke(app, ["--config", str(config), "dpia", "--out", str(out), *extra],
                           env=env)
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8")


def section(text: str, number: int) -> str:
    start = text.index(f"\n## {number}.")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def figures(text: str) -> dict[str, str]:
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", section(text, 6), flags=re.M)
    return {k: v for k, v in rows if k not in ("figure", "---")}


def expected_figures(db_path, now: datetime) -> dict[str, int]:
    db = sqlite3.connect(db_path)
    one = lambda sql, *a: db.execute(sql, a).fetchone()[0]  # noqa: E731
    n = now.isoformat()
    active = ("select count(*) from grants where kind = ? and valid_from <= ? and "
              "(valid_until is null or valid_until > ?) and (withdrawn_at is null or "
              "withdrawn_at > ?)")
    exp = {
        "subjects": one("select count(*) from subjects"),
        "consents": one("select count(*) from consents"),
        "consents signed by a guardian": one("select count(*) from consents where guardian"),
        "active biometric grants": one(active, "biometric", n, n, n),
        "active publication grants": one(active, "publication", n, n, n),
        "assets": one("select count(*) from assets"),
        "assets with an error": one("select count(*) from assets where last_error is not null"),
        "assets waiting for analysis": one("select count(*) from assets where needs_analysis"),
        "assets: not analysed yet": one("select count(*) from assets where status is null"),
        "faces": one("select count(*) from faces"),
        "review items (uncertain faces)": one(
            "select count(*) from faces where state = 'uncertain'"),
        "audit entries": one("select count(*) from audit"),
        "erasures completed": one("select count(*) from erasures where finished_at not null"),
        "erasures unfinished": one("select count(*) from erasures where finished_at is null"),
    }
    for status in ("no_faces", "cleared", "limited", "review", "missing", "expired",
                   "withdrawn"):
        exp[f"assets: {status}"] = one("select count(*) from assets where status = ?", status)
    for state in ("auto", "confirmed", "rejected", "unknown", "uncertain"):
        exp[f"faces: {state}"] = one("select count(*) from faces where state = ?", state)
    db.close()
    return exp


def test_figures_match_the_state(populated):
    text = dpia(populated["config"])
    got = figures(text)
    db_path = populated["config"].parent / ".consentry" / "state.db"
    expected = expected_figures(db_path, datetime.now(UTC))
    assert {k: int(got[k]) for k in expected} == expected
    # And they are the numbers the fixture built, not just whatever both sides count.
    assert expected["active biometric grants"] == 1
    assert expected["active publication grants"] == 2
    assert expected["review items (uncertain faces)"] == 2
    assert expected["assets: not analysed yet"] == 1 and expected["assets: review"] == 1
    assert got["subjects who are minors"] == "2"
    assert got["subjects with face templates"] == "2"
    assert got["last sweep"] == "never"


def test_every_data_store_is_named_and_no_person(populated):
    text = dpia(populated["config"])
    s = populated["settings"]
    stores = section(text, 3)
    for where in (str(s.vault_path), str(s.key_file), str(s.audit_head),
                  str(populated["config"].parent / "photos")):
        assert where in stores, where
    assert re.search(r"sqlite:////\S+/\.consentry/state\.db", stores)
    for what in ("key-encryption key", "face template vault", "state database", "audit log",
                 "photo library `photos` (folder)", "signed consent documents",
                 "AES-256-GCM", "XMP embedded", "HMAC-SHA256"):
        assert what in stores, what
    assert "write mode: embed" in stores
    for name in NAMES:
        for word in name.split():
            assert word not in text
    for sid in [*map(str, populated["ids"].values()), *populated["erased"]]:
        assert sid not in text
    erasures = section(text, 7)
    assert "| 2024-03-01 | 2024-03-01 | 3 | 1 | 2 | 1 |" in erasures
    assert "| 2024-05-02 | unfinished (metadata) | 1 | 0 | 0 | 0 |" in erasures
    thresholds = section(text, 5)
    assert f"| matching.threshold | {s.matching.threshold} |" in thresholds
    assert f"| matching.margin | {s.matching.margin} |" in thresholds
    assert f"| matching.review_threshold | {s.matching.review_threshold} |" in thresholds


def test_risks_derived_from_the_state(populated):
    risks = section(dpia(populated["config"]), 8)
    for expected in ("1 subject(s) have face templates without an active biometric grant",
                     "1 erasure(s) are unfinished", "2 face(s) wait for review",
                     "2 registered subject(s) are minors", "1 photo(s) could not be analysed",
                     "The sweep is not running", "Names are embedded in the photo files of "
                     "`photos`", "The key file sits beside the vault"):
        assert expected in risks, expected
    for absent in ("keywords", "environment", "readable by others", "looser", "password",
                   "does not verify"):
        assert absent not in risks, absent


def test_risks_follow_the_configuration(installation, tmp_path):
    config = installation
    text = config.read_text(encoding="utf-8")
    text = text.replace("names_as_keywords = false", "names_as_keywords = true")
    text = re.sub(r"^threshold = .*$", "threshold = 0.55", text, flags=re.MULTILINE)
    text = text.replace('write_mode = "embed"', 'write_mode = "sidecar"')
    config.write_text(text, encoding="utf-8")
    key_file = config.parent / ".consentry" / "key"
    key_file.chmod(0o644)
    draft = dpia(config)
    risks = section(draft, 8)
    assert "Names are written as keywords" in risks
    assert "is readable by others (mode 0644)" in risks
    assert "Recognition is looser than the measured defaults (threshold 0.55" in risks
    assert "embedded" not in risks
    assert "XMP sidecar files beside the photos (<photo>.jpg.xmp)" in section(draft, 3)
    # The key from the environment: named as the key's store, and a risk of its own.
    key_file.chmod(0o600)
    env_key = key_file.read_text(encoding="ascii").strip()
    base64.b64decode(env_key, validate=True)
    draft = dpia(config, env={"CONSENTRY_KEY": env_key})
    assert "environment variable `CONSENTRY_KEY`" in section(draft, 3)
    assert "The key-encryption key is in the environment" in section(draft, 8)
    assert "The key file sits beside the vault" not in section(draft, 8)


def test_database_password_is_redacted():
    redacted = redact_url("postgresql+psycopg://consentry:s3cret@db.internal:5432/consentry")
    assert "s3cret" not in redacted
    assert redacted == "postgresql+psycopg://consentry:***@db.internal:5432/consentry"


def test_dpia_to_stdout_reads_without_writing(populated):
    db = populated["config"].parent / ".consentry" / "state.db"
    before = sqlite3.connect(db).execute("select count(*) from audit").fetchone()[0]
    result = runner.invoke(app, ["--config", str(populated["config"]), "dpia"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# Consentry: draft DPIA and record of processing")
    assert sqlite3.connect(db).execute("select count(*) from audit").fetchone()[0] == before
