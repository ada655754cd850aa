"""The Nextcloud connector against FakeNextcloudServer (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from connectors.base import ConnectorContext
from connectors.nextcloud import NextcloudConfig, NextcloudConnector
from plugin.errors import AssetError, AuthError, ConfigError, ConnectorError
from plugin.models import AssetVerdict, FaceBox, FaceVerdict, Geometry, ModelRelease, Status
from plugin.xmp import XmpWriter
from tests.fakes.nextcloud import FakeNextcloudServer

PASSWORD = "app-secret-0001"
SECRET = "hook-secret-0002"
EXIFTOOL = shutil.which("exiftool")


def jpeg(width: int = 64, height: int = 48, color=(200, 120, 80), orientation: int | None = None,
         quality: int = 85) -> bytes:
    image = Image.new("RGB", (width, height), color)
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, "JPEG", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def verdict(status: Status) -> AssetVerdict:
    faces = () if status == Status.NO_FACES else (
        FaceVerdict(box=FaceBox(top=4, right=30, bottom=30, left=4), status=status),)
    release = ModelRelease.NOT_APPLICABLE if status == Status.NO_FACES else ModelRelease.NONE
    return AssetVerdict(status=status, model_release=release, faces=faces,
                        unidentified=len(faces))


GEOMETRY = Geometry(stored_width=64, stored_height=48)


@pytest.fixture
def fake():
    server = FakeNextcloudServer(password=PASSWORD)
    server.add_file("Photos/Team day/ß ünïcode.jpg", jpeg(64, 48), mtime=1262304000)
    server.add_file("Photos/a b.jpg", jpeg(80, 40, orientation=6))
    server.add_file("Photos/50% #1?.jpg", jpeg())
    server.add_file("Photos/notes.txt", b"not a photo")
    server.add_file("Photos/Private/secret.jpg", jpeg())
    server.add_file("Documents/scan.jpg", jpeg())
    yield server
    server.close()


@pytest.fixture(scope="module")
def writer():
    with XmpWriter() as w:
        yield w


def make(fake, tmp_path, writer=None, **cfg) -> NextcloudConnector:
    config = NextcloudConfig(**{"url": fake.url, "user": "admin", "app_password": PASSWORD,
                                "exclude": ("Photos/Private",), "webhook_secret": SECRET,
                                "write_mode": "sidecar" if writer else "tags-only", **cfg})
    context = ConnectorContext(writer=writer, engine_version="test-engine",
                               work_dir=tmp_path / "work")
    return NextcloudConnector(config, context, sleep=lambda s: None)


def requested(fake, method: str | None = None) -> list[str]:
    return [p for m, p in fake.log if method is None or m == method]


def exif(data: bytes, tmp_path: Path, *tags: str) -> dict:
    path = tmp_path / "read.bin"
    path.write_bytes(data)
    out = subprocess.run([EXIFTOOL, "-config", "config/exiftool.config", "-j", "-G1",
                          *tags, str(path)], capture_output=True, check=True, text=True)
    return json.loads(out.stdout)[0]


# -- config ------------------------------------------------------------------------------
def test_config_validates_and_building_contacts_nothing(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("CONSENTRY_NEXTCLOUD_PASSWORD", raising=False)
    with pytest.raises(ValidationError):
        NextcloudConfig(url=fake.url, user="admin", tags={"famous": "Consent: famous"})
    with pytest.raises(ValidationError):
        NextcloudConfig(url=fake.url, user="admin", include=("../etc",))
    c = make(fake, tmp_path, app_password=None, tags={"missing": "No consent"})
    assert c.config.tags["missing"] == "No consent" and c.config.tags["cleared"]
    assert c.config.verify_tls is True and c.config.write_mode == "tags-only"
    assert fake.raw == []  # the constructor made no request
    with pytest.raises(ConfigError, match="CONSENTRY_NEXTCLOUD_PASSWORD"):
        c.changes(None)
    monkeypatch.setenv("CONSENTRY_NEXTCLOUD_PASSWORD", PASSWORD)
    assert len(c.changes(None)[0]) == 3


# -- change detection ----------------------------------------------------------------------
def test_first_scan_walks_only_the_selected_folders(fake, tmp_path):
    c = make(fake, tmp_path)
    refs, cursor = c.changes(None)
    by_name = {r.name: r for r in refs}
    assert set(by_name) == {"Photos/Team day/ß ünïcode.jpg", "Photos/a b.jpg",
                            "Photos/50% #1?.jpg"}
    assert c.fetch(by_name["Photos/50% #1?.jpg"], "original").path.read_bytes() \
        == fake.files["Photos/50% #1?.jpg"].data
    ref = by_name["Photos/a b.jpg"]
    assert ref.id == str(fake.files["Photos/a b.jpg"].fileid)
    assert ref.version == fake.files["Photos/a b.jpg"].etag and ref.mime == "image/jpeg"
    # data minimisation: the excluded and unselected folders were never even listed
    assert not [p for p in requested(fake) if "Private" in p or "Documents" in p]
    assert json.loads(cursor) == {"since": int(fake.now), "walked": int(fake.now)}
    fake.advance(25 * 3600)  # past full_scan_hours: walk again, not SEARCH
    fake.log.clear()
    assert len(c.changes(cursor)[0]) == 3 and "SEARCH" not in {m for m, _ in fake.log}
    assert len(c.changes("garbage")[0]) == 3  # an unreadable cursor: walk


def test_incremental_scan_finds_new_uploads_with_old_dates_and_edits(fake, tmp_path):
    c = make(fake, tmp_path, overlap_seconds=60)
    fake.advance(600)  # the fixture's uploads are older than the overlap window
    _, cursor = c.changes(None)
    fake.advance(3600)
    old_capture = fake.add_file("Photos/2010/IMG_1.jpg", jpeg(), mtime=1262304000)
    fake.add_file("Photos/a b.jpg", jpeg(color=(1, 2, 3)))  # an edit
    fake.add_file("Photos/Private/new.jpg", jpeg())  # excluded
    fake.add_file("Photos/IMG_1.jpg.xmp", b"<x:xmpmeta/>")  # not an image
    fake.advance(120)  # past the overlap window of the next scan
    fake.log.clear()
    refs, cursor2 = c.changes(cursor)
    assert sorted(r.name for r in refs) == ["Photos/2010/IMG_1.jpg", "Photos/a b.jpg"]
    assert str(old_capture.fileid) in {r.id for r in refs}
    assert [m for m, _ in fake.log].count("SEARCH") == 2
    assert requested(fake, "GET") == []  # listing downloads nothing
    fake.advance(3600)
    assert c.changes(cursor2)[0] == []


def test_search_pages_and_deduplicates_by_fileid_and_etag(fake, tmp_path):
    c = make(fake, tmp_path, page_size=2, overlap_seconds=0)
    _, cursor = c.changes(None)
    fake.advance(10)
    for i in range(5):
        fake.add_file(f"Photos/new/{i}.jpg", jpeg())  # both new (upload) and edited (mtime)
    fake.log.clear()
    refs, _ = c.changes(cursor)
    assert len(refs) == len({r.id for r in refs}) == 5
    assert [m for m, _ in fake.log].count("SEARCH") == 6  # 3 pages for each of the 2 queries


def test_search_literals_are_understood_by_the_server(fake, tmp_path):
    """An unparsable date literal would silently match every file: the old files must not."""
    c = make(fake, tmp_path, overlap_seconds=0)
    _, cursor = c.changes(None)
    fake.advance(100)
    assert c.changes(cursor)[0] == []


# -- fetch --------------------------------------------------------------------------------
def test_fetch_uses_the_preview_with_the_originals_geometry(fake, tmp_path):
    fake.add_file("Photos/big.jpg", jpeg(3000, 2000, orientation=6))
    c = make(fake, tmp_path, preview_size=300)
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/big.jpg")
    fake.log.clear()
    got = c.fetch(ref, "analysis")
    with Image.open(got.path) as im:
        assert max(im.size) <= 300 and im.size[1] > im.size[0]  # upright preview
    assert got.original == Geometry(stored_width=3000, stored_height=2000, orientation=6)
    assert not [p for p in requested(fake, "GET") if "big.jpg" in p]  # original not downloaded


def test_fetch_falls_back_to_the_original(fake, tmp_path):
    fake.knobs.photo_metadata = False
    c = make(fake, tmp_path)
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/a b.jpg")
    got = c.fetch(ref, "analysis")  # geometry read from the downloaded original
    assert got.original == Geometry(stored_width=80, stored_height=40, orientation=6)
    fake.knobs.previews = False
    got = c.fetch(ref, "analysis")
    assert got.original is None and got.path.read_bytes() == fake.files["Photos/a b.jpg"].data


def test_fetch_refuses_oversized_downloads(fake, tmp_path):
    fake.knobs.previews = False
    fake.add_file("Photos/huge.jpg", jpeg(2000, 2000, quality=100) + os.urandom(1 << 20))
    c = make(fake, tmp_path, max_download_mb=1)
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/huge.jpg")
    with pytest.raises(AssetError, match="larger than 1 MB"):
        c.fetch(ref, "analysis")


# -- write-back: tags ------------------------------------------------------------------------
def test_tags_follow_the_current_verdict_exactly(fake, tmp_path):
    c = make(fake, tmp_path)
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/a b.jpg")
    fake.tags[50] = "Holiday"
    fake.relations[int(ref.id)] = {50}
    assert c.write_back(ref, verdict(Status.MISSING), GEOMETRY) == ref
    assert fake.tags_of("Photos/a b.jpg") == ["Consent: missing", "Holiday"]
    for status in (Status.CLEARED, Status.WITHDRAWN, Status.CLEARED):
        c.write_back(ref, verdict(status), GEOMETRY)
        assert fake.tags_of("Photos/a b.jpg") == [f"Consent: {status.value}", "Holiday"]
    c.write_back(ref, verdict(Status.NO_FACES), GEOMETRY)
    assert fake.tags_of("Photos/a b.jpg") == ["Holiday"]
    assert sorted(fake.tags.values()) == ["Consent: cleared", "Consent: missing",
                                          "Consent: withdrawn", "Holiday"]
    # tagging changes neither etag nor listing: no rescan of our own write
    assert fake.files["Photos/a b.jpg"].etag == ref.version


def test_tag_created_by_someone_else_meanwhile_is_reused(fake, tmp_path):
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    c.write_back(ref, verdict(Status.CLEARED), GEOMETRY)  # tag list now cached
    fake.tags[99] = "Consent: review"
    c.write_back(ref, verdict(Status.REVIEW), GEOMETRY)  # POST answers 409, list re-read
    assert sorted(fake.tags.values()).count("Consent: review") == 1
    assert fake.relations[int(ref.id)] == {99}


# -- write-back: sidecar ----------------------------------------------------------------------
@pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed")
def test_sidecar_uploaded_next_to_the_file(fake, tmp_path, writer):
    c = make(fake, tmp_path, writer)
    fake.advance(600)
    refs, cursor = c.changes(None)
    ref = next(r for r in refs if r.name.endswith("ünïcode.jpg"))
    before = fake.files[ref.name].data
    assert c.write_back(ref, verdict(Status.MISSING), GEOMETRY) == ref
    sidecar = fake.files[ref.name + ".xmp"]
    assert exif(sidecar.data, tmp_path, "-XMP-consentry:Status")["XMP-consentry:Status"] \
        == "missing"
    assert fake.files[ref.name].data == before  # the photo itself is untouched
    assert fake.tags_of(ref.name) == ["Consent: missing"]
    etag = sidecar.etag
    fake.log.clear()
    c.write_back(ref, verdict(Status.MISSING), GEOMETRY)  # same verdict: nothing uploaded
    assert requested(fake, "PUT") == [] and fake.files[ref.name + ".xmp"].etag == etag
    fake.advance(600)
    assert c.changes(cursor)[0] == []  # our own sidecar write is no change


# -- write-back: embedded ----------------------------------------------------------------------
@pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed")
def test_embedded_write_returns_the_new_etag(fake, tmp_path, writer):
    c = make(fake, tmp_path, writer, write_mode="embed")
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/a b.jpg")
    new = c.write_back(ref, verdict(Status.CLEARED), GEOMETRY)
    assert new.id == ref.id and new.version == fake.files[ref.name].etag != ref.version
    assert exif(fake.files[ref.name].data, tmp_path, "-XMP-consentry:Status") \
        ["XMP-consentry:Status"] == "cleared"
    fake.log.clear()
    assert c.write_back(new, verdict(Status.CLEARED), GEOMETRY).version == new.version
    assert requested(fake, "PUT") == []


def edited_by_someone_else(data: bytes, tmp_path: Path) -> bytes:
    path = tmp_path / "other.jpg"
    path.write_bytes(data)
    subprocess.run([EXIFTOOL, "-q", "-overwrite_original", "-XMP-dc:Title=Edited by Alice",
                    str(path)], check=True)
    return path.read_bytes()


@pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed")
@pytest.mark.parametrize("race", ["412 at upload", "same etag after download"])
def test_concurrent_edit_is_merged_never_overwritten(fake, tmp_path, writer, race):
    c = make(fake, tmp_path, writer, write_mode="embed")
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/a b.jpg")
    other = edited_by_someone_else(fake.files[ref.name].data, tmp_path)
    if race == "412 at upload":
        fake.knobs.before_put[ref.name] = other
    else:  # nextcloud/server#63994: a second write in the same second keeps the etag
        fake.knobs.sticky_etag = True
        fake.knobs.after_get[ref.name] = other
    new = c.write_back(ref, verdict(Status.MISSING), GEOMETRY)
    final = exif(fake.files[ref.name].data, tmp_path, "-XMP-dc:Title", "-XMP-consentry:Status")
    assert final["XMP-dc:Title"] == "Edited by Alice"
    assert final["XMP-consentry:Status"] == "missing"
    assert new.version == fake.files[ref.name].etag
    assert [p for p in requested(fake, "GET") if p.endswith("a b.jpg")].__len__() == 2


# -- webhooks ------------------------------------------------------------------------------
def test_webhook_created_and_own_writes(fake, tmp_path):
    c = make(fake, tmp_path)
    fake.add_file("Photos/new.jpg", jpeg())
    refs = c.parse_webhook(*fake.webhook("Created", "Photos/new.jpg", secret=SECRET))
    assert [r.name for r in refs] == ["Photos/new.jpg"]
    fake.add_file("Photos/new.jpg.xmp", b"<x/>")
    assert c.parse_webhook(*fake.webhook("Written", "Photos/new.jpg.xmp", secret=SECRET)) == []
    assert c.parse_webhook(*fake.webhook("Written", "Photos/Private/secret.jpg",
                                         secret=SECRET)) == []
    headers, body = fake.webhook("Created", "Photos/new.jpg", secret="wrong")
    with pytest.raises(AuthError) as err:
        c.parse_webhook(headers, body)
    assert SECRET not in str(err.value)
    with pytest.raises(AuthError):
        c.parse_webhook({}, body)
    with pytest.raises(ConnectorError, match="not a webhook_listeners event"):
        c.parse_webhook({"x-consentry-secret": SECRET}, b"[]")


@pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed")
def test_rename_keeps_the_fileid_and_moves_the_sidecar(fake, tmp_path, writer):
    c = make(fake, tmp_path, writer)
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/a b.jpg")
    c.write_back(ref, verdict(Status.MISSING), GEOMETRY)
    fake.rename("Photos/a b.jpg", "Photos/Team day/renamed.jpg")
    refs = c.parse_webhook(*fake.webhook("Renamed", "Photos/Team day/renamed.jpg",
                                         source="Photos/a b.jpg", secret=SECRET,
                                         fileid=int(ref.id)))
    assert [(r.id, r.version, r.name) for r in refs] == [
        (ref.id, ref.version, "Photos/Team day/renamed.jpg")]
    assert "Photos/Team day/renamed.jpg.xmp" in fake.files and "Photos/a b.jpg.xmp" \
        not in fake.files
    # a full walk finds it under its new name with the same id: its face records still match
    assert ref.id in {r.id for r in c.changes(None)[0] if r.name.endswith("renamed.jpg")}
    fake.rename("Photos/Team day/renamed.jpg", "Documents/moved.jpg")
    assert c.parse_webhook(*fake.webhook("Renamed", "Documents/moved.jpg",
                                         source="Photos/Team day/renamed.jpg", secret=SECRET,
                                         fileid=int(ref.id))) == []
    assert c.deleted == [ref.id]  # left the selection: treated as gone


def test_select_for_scan_paths(fake, tmp_path):
    c = make(fake, tmp_path)
    assert sorted(r.name for r in c.select([Path("Photos/Team day"), Path("/Photos/a b.jpg")])) \
        == ["Photos/Team day/ß ünïcode.jpg", "Photos/a b.jpg"]
    with pytest.raises(ConfigError, match="not inside"):
        c.select([Path("Photos/Private")])


@pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed")
def test_delete_removes_our_sidecar_and_is_remembered(fake, tmp_path, writer):
    c = make(fake, tmp_path, writer)
    ref = next(r for r in c.changes(None)[0] if r.name == "Photos/a b.jpg")
    c.write_back(ref, verdict(Status.MISSING), GEOMETRY)
    fake.delete("Photos/a b.jpg")
    assert c.parse_webhook(*fake.webhook("Deleted", "Photos/a b.jpg", secret=SECRET,
                                         fileid=int(ref.id))) == []
    assert c.deleted == [ref.id] and "Photos/a b.jpg.xmp" not in fake.files


def test_register_webhooks_is_idempotent(fake, tmp_path):
    c = make(fake, tmp_path)
    assert c.register_webhooks("https://consentry.example.org/hooks/nextcloud") == (4, 0)
    assert c.register_webhooks("https://consentry.example.org/hooks/nextcloud") == (0, 4)
    assert len(fake.webhooks) == 4
    hook = fake.webhooks[0]
    assert hook["authMethod"] == "header" and hook["authData"] == {"X-Consentry-Secret": SECRET}
    assert hook["eventFilter"] == {"event.node.path": r"/^(\/admin\/files\/Photos\/)/"}
    assert all(h["userIdFilter"] == "admin" for h in fake.webhooks)


# -- check -------------------------------------------------------------------------------------
def test_check_reports_reachable_auth_and_folders(fake, tmp_path):
    lines = make(fake, tmp_path, include=("Photos", "Missing")).check()
    assert [(w, ok) for w, ok, _ in lines] == [("server", True), ("folder Photos", True),
                                               ("folder Missing", False), ("system tags", True)]
    fake.password = "changed"
    (_, ok, detail), = make(fake, tmp_path).check()
    assert not ok and "credentials refused" in detail and PASSWORD not in detail
    fake.close()
    (_, ok, detail), = make(fake, tmp_path, timeout=0.5, max_attempts=1).check()
    assert not ok and "not reachable" in detail


# -- faults ----------------------------------------------------------------------------------
def test_500_files_with_20_percent_failures(tmp_path):
    fake = FakeNextcloudServer(password=PASSWORD, seed=3)
    try:
        data = jpeg(16, 16)
        for i in range(500):
            fake.add_file(f"Photos/{i // 100}/{i}.jpg", data)
        fake.knobs.fail_rate, fake.knobs.timeout_rate, fake.knobs.timeout_sleep = 0.18, 0.02, 0.3
        c = make(fake, tmp_path, max_attempts=12, timeout=0.1)
        refs, _ = c.changes(None)
        assert len(refs) == len({r.id for r in refs}) == 500
        statuses = [Status.MISSING, Status.CLEARED, Status.NO_FACES]
        for i, ref in enumerate(refs):
            c.fetch(ref, "analysis")
            c.write_back(ref, verdict(statuses[i % 3]), GEOMETRY)
        fake.knobs.fail_rate = fake.knobs.timeout_rate = 0
        assert sorted(fake.tags.values()) == ["Consent: cleared", "Consent: missing"]
        for i, ref in enumerate(refs):
            want = [] if i % 3 == 2 else [f"Consent: {statuses[i % 3].value}"]
            assert fake.tags_of(ref.name) == want
        faults = sum(1 for m, p, _ in fake.raw) - len(fake.log)
        assert faults > 200  # the knobs really fired (about 20% of ~1400 requests)
    finally:
        fake.close()


def test_401_after_password_change_stops_without_retries(fake, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    fake.password = "rotated"
    fake.raw.clear()
    with pytest.raises(AuthError, match="credentials refused") as err:
        c.fetch(ref, "analysis")
    assert len(fake.raw) == 1
    assert PASSWORD not in str(err.value) and PASSWORD not in caplog.text


def test_retry_after_is_honoured(fake, tmp_path):
    sleeps: list[float] = []
    c = make(fake, tmp_path)
    c.http._sleep = sleeps.append
    fake.knobs.retry_after = "3"
    fake.knobs.fail_next = [429, 503]
    assert len(c.changes(None)[0]) == 3
    assert sleeps[0] == 3.0 and len(sleeps) == 2


def test_malformed_xml_is_a_clear_error(fake, tmp_path):
    c = make(fake, tmp_path)
    refs, _ = c.changes(None)
    fake.knobs.truncate["PROPFIND"] = 1
    with pytest.raises(AssetError, match="malformed multi-status XML"):
        c.stat(refs[0].name)
    assert c.stat(refs[0].name) is not None  # only that one answer was broken
    fake.knobs.truncate["PROPFIND"] = 2
    with pytest.raises(ConnectorError, match="listing of Photos: malformed"):
        c.changes(None)


def test_no_secret_in_urls_or_logs(fake, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    c = make(fake, tmp_path)
    for ref in c.changes(None)[0]:
        c.fetch(ref, "analysis")
        c.write_back(ref, verdict(Status.MISSING), GEOMETRY)
    c.register_webhooks("https://x.example/hook")
    assert fake.raw
    for _, target, headers in fake.raw:
        assert PASSWORD not in target and SECRET not in target
        assert base64.b64encode(f"admin:{PASSWORD}".encode()).decode() in headers["Authorization"]
    assert PASSWORD not in caplog.text and SECRET not in caplog.text
    assert PASSWORD not in repr(c.config) and SECRET not in repr(c.config)


# -- the real pipeline against the fake --------------------------------------------------------
CONFIG = """
[store]
state_url = "sqlite:///state.db"
vault_path = "vault.db"
audit_head = "audit.head"

[[connectors]]
kind = "nextcloud"
name = "nc"
url = "{url}"
user = "admin"
include = ["Photos/Summit 2024", "Photos/misc"]
"""


@pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed")
def test_pipeline_scans_tags_and_writes_sidecars(fake, tmp_path, demo_data, engine, monkeypatch):
    from typer.testing import CliRunner

    import plugin.cli_nextcloud  # noqa: F401  (registers `consentry nextcloud …`)
    from plugin import people
    from plugin.app import App
    from plugin.cli import app as cli
    from plugin.demo import consent_for
    from plugin.models import Subject

    monkeypatch.setenv("CONSENTRY_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("CONSENTRY_NEXTCLOUD_PASSWORD", PASSWORD)
    monkeypatch.setenv("CONSENTRY_NEXTCLOUD_WEBHOOK_SECRET", SECRET)
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    photos = {"Photos/Summit 2024/IMG_2041.jpg": "events/2024-summit/IMG_2041.jpg",
              "Photos/Summit 2024/IMG_2043.jpg": "events/2024-summit/IMG_2043.jpg",
              "Photos/misc/IMG_7001.jpg": "misc/IMG_7001.jpg"}
    for remote, local in photos.items():
        fake.add_file(remote, (demo_data / "library" / local).read_bytes())
    config = tmp_path / "consentry.toml"
    config.write_text(CONFIG.format(url=fake.url))
    from plugin.keys import load_kek
    from plugin.vault import Vault

    Vault.open(tmp_path / "vault.db", load_kek(key_file=None), create=True).close()
    with App.open(config) as a:
        now = a.pipeline.clock()
        obama = people.add_subject(a.state, a.audit, Subject(display_name="Barack Obama"))
        consent = consent_for("full", obama, now, tmp_path / "quitclaim.txt")
        people.add_consent(a.state, a.audit, consent)
        people.enroll(a.state, a.vault, a.audit, a.engine, obama,
                      [demo_data / "people/Barack_Obama/ref-1.jpg"], now=now,
                      decode_options=a.pipeline.decode_options)
        results = {r.ref.name: r for r in a.pipeline.scan("nc")}
        assert {n: r.outcome.value for n, r in results.items()} == dict.fromkeys(
            photos, "processed")
        for name, result in results.items():
            status = result.status
            assert fake.tags_of(name) == ([] if status == "no_faces" else [f"Consent: {status}"])
            read = exif(fake.files[name + ".xmp"].data, tmp_path, "-XMP-consentry:Status",
                        "-XMP-iptcExt:PersonInImage")
            assert read["XMP-consentry:Status"] == status
        solo = "Photos/Summit 2024/IMG_2043.jpg"
        assert results[solo].status == "cleared"
        assert results["Photos/misc/IMG_7001.jpg"].status == "no_faces"
        assert exif(fake.files[solo + ".xmp"].data, tmp_path, "-XMP-iptcExt:PersonInImage") \
            ["XMP-iptcExt:PersonInImage"] == "Barack Obama"
        # nothing changed: the incremental rescan fetches nothing
        fake.log.clear()
        assert {r.outcome.value for r in a.pipeline.scan("nc")} <= {"skipped"}
        assert not [p for p in requested(fake, "GET")]
        # a webhook-triggered scan: only the announced file is fetched
        new = "Photos/misc/IMG_7002 ü.jpg"
        fake.add_file(new, (demo_data / "library/misc/DSC_7002.jpg").read_bytes())
        fake.log.clear()
        refs = a.connectors["nc"].parse_webhook(*fake.webhook("Created", new, secret=SECRET))
        (hooked,) = a.pipeline.scan("nc", refs)
        assert hooked.outcome.value == "processed" and hooked.ref.name == new
        assert {p for p in requested(fake, "GET") if "Summit" in p} == set()
        assert new + ".xmp" in fake.files
        # withdrawal: stale tag removed, the name leaves the sidecar, no new detection
        a.state.withdraw(consent.id, a.pipeline.clock())
        a.pipeline.reevaluate(subject_ids=[obama.id])
        assert fake.tags_of(solo) == ["Consent: withdrawn"]
        assert "XMP-iptcExt:PersonInImage" not in exif(
            fake.files[solo + ".xmp"].data, tmp_path, "-XMP-iptcExt:PersonInImage")
    result = CliRunner().invoke(cli, ["--config", str(config), "nextcloud", "register-webhooks",
                                      "--url", "https://consentry.example.org/hooks/nc"])
    assert result.exit_code == 0, result.output
    assert "4 webhook(s) registered" in result.output and len(fake.webhooks) == 4
