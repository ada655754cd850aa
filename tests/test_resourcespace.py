"""ResourceSpace connector against FakeResourceSpaceServer: signed calls, the log cursor,
previews mapped to the original, exact field write-back, consent manager records, faults."""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from PIL import Image
from typer.testing import CliRunner

from connectors.base import ConnectorContext
from connectors.resourcespace import ConsentLink, ResourceSpaceConfig, ResourceSpaceConnector
from connectors.resourcespace_api import RsCallError, _failure, _unwrap, as_int, sign
from plugin.errors import AssetError, AuthError, ConfigError, UnavailableError
from plugin.models import (
    AssetVerdict,
    FaceBox,
    FaceVerdict,
    Geometry,
    GrantKind,
    ModelRelease,
    Status,
)
from tests.fakes.resourcespace import NAMED_PERSONS, FakeResourceSpaceServer

KEY = "k3y-" + "a" * 60
EDITOR_KEY = "k3y-" + "e" * 60
BOX = FaceBox(top=10, right=60, bottom=60, left=10)


@pytest.fixture
def rs():
    server = FakeResourceSpaceServer(users={"admin": (KEY, True), "editor": (EDITOR_KEY, False)})
    yield server
    server.close()


def make(rs, tmp_path, **overrides) -> ResourceSpaceConnector:
    raw = {"kind": "resourcespace", "name": "dam", "base_url": rs.url, "user": "admin",
           "private_key": KEY, "retry_initial_seconds": 0.0, "timeout_seconds": 5,
           "consent_manager": True, **overrides}
    context = ConnectorContext(writer=None, engine_version="test", work_dir=tmp_path / "work")
    return ResourceSpaceConnector(ResourceSpaceConfig.model_validate(raw), context)


def jpeg(width: int, height: int, *, orientation: int = 1, color=(120, 90, 60)) -> bytes:
    out = io.BytesIO()
    img = Image.new("RGB", (width, height), color)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def verdict(status=Status.CLEARED, *, names=(), consent_ids=(), until=None) -> AssetVerdict:
    faces = tuple(FaceVerdict(box=BOX, status=status, subject_id=sid, name=name,
                              consent_ids=tuple(consent_ids), valid_until=until)
                  for name, sid in names)
    return AssetVerdict(status=status, model_release=ModelRelease.UNLIMITED,
                        consent_ids=tuple(consent_ids), valid_until=until, faces=faces)


# -- the signed client ---------------------------------------------------------------------------
def test_signature_is_sha256_of_key_and_exact_query():
    query = "user=admin&function=do_search&search=%21last100"
    assert sign("secret", query) == hashlib.sha256(b"secret" + query.encode()).hexdigest()


def test_calls_travel_in_the_body_and_answers_are_normalised(rs, tmp_path):
    c = make(rs, tmp_path)
    rs.upload(jpeg(64, 48))
    assert c.api.call_rows("resource_log_last_rows", minref=0, days=1, maxrecords=0)
    assert all("sign=" not in line.split(" ")[1] for line in rs.requests)  # never in a URL
    # false (unknown function), JSend success, numeric strings, FAILED strings, JSend fail.
    with pytest.raises(RsCallError, match="returned false"):
        c.api.call("no_such_function")
    assert c.api.call_int("create_resource_type_field", name="X", restype="1", type=0) > 0
    assert c.api.call_int("set_node", ref="", resource_type_field=29, name="A",
                          returnexisting=1) == as_int(rs.api_set_node(
                              {"resource_type_field": "29", "name": "A",
                               "returnexisting": "1"}, admin=True)[1])
    assert [as_int(v) for v in (7, "7", 7.0, "x", True, None)] == [7, 7, 7, None, None, None]
    assert _failure("FAILED: no access") == "FAILED: no access"
    assert _failure({"status": "fail", "data": {"message": "no"}}).startswith("fail")
    assert _failure(True) is None and _failure(0) is None
    assert _unwrap({"status": "success", "data": {"ref": 88}}) == 88


@pytest.mark.parametrize("legacy", [False, True], ids=["401", "200-body"])
def test_wrong_key_is_one_clear_error_naming_user_and_url(rs, tmp_path, caplog, legacy):
    rs.legacy_auth = legacy
    c = make(rs, tmp_path, private_key="wrong-" + "b" * 40)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthError) as err:
        c.changes(None)
    message = str(err.value)
    assert "'admin'" in message and rs.url in message and "wrong-" not in message
    assert rs.calls == {}  # refused before any function ran
    assert "wrong-" not in caplog.text and "bbbb" not in caplog.text


def test_truncated_answer_is_an_outage_not_data(rs, tmp_path):
    c = make(rs, tmp_path)
    rs.truncate_next = 1
    with pytest.raises(UnavailableError, match="not JSON"):
        c.changes(None)


# -- change detection ----------------------------------------------------------------------------
def test_first_scan_walks_everything_then_the_log_cursor_lists_only_new_pixels(rs, tmp_path):
    c = make(rs, tmp_path, page_size=2)
    refs = [rs.upload(jpeg(64, 48)) for _ in range(5)]
    rs.upload(jpeg(64, 48), resource_type=2)  # a document type: not configured
    listed, cursor = c.changes(None)
    assert [r.id for r in listed] == [str(r) for r in refs]
    assert rs.calls["do_search"] == 3  # paged by 2
    assert c.changes(cursor) == ([], cursor)

    c.write_back(listed[0], verdict(Status.NO_FACES), Geometry(stored_width=64,
                                                               stored_height=48))
    again, cursor2 = c.changes(cursor)
    assert again == [] and int(cursor2) > int(cursor)  # our own field edits are no change

    rs.replace_file(refs[2], jpeg(80, 60))
    changed, cursor3 = c.changes(cursor2)
    assert [r.id for r in changed] == [str(refs[2])]
    assert changed[0].version != listed[2].version
    assert c.changes(cursor3)[0] == []


def test_collections_limit_the_walk(rs, tmp_path):
    refs = [rs.upload(jpeg(32, 32)) for _ in range(3)]
    rs.collections[5] = {refs[1]}
    c = make(rs, tmp_path, collections=[5])
    assert [r.id for r in c.changes(None)[0]] == [str(refs[1])]


# -- content ----------------------------------------------------------------------------------
def test_analysis_uses_the_scr_preview_with_the_originals_geometry(rs, tmp_path):
    c = make(rs, tmp_path)
    ref = rs.upload(jpeg(2000, 1500))
    [asset], _ = c.changes(None)
    fetched = c.fetch(asset, "analysis")
    with Image.open(fetched.path) as img:
        assert img.size == (1400, 1050)
    assert fetched.original == Geometry(stored_width=2000, stored_height=1500)
    assert rs.downloads == {(ref, "scr"): 1}  # the original was not needed


@pytest.mark.parametrize("with_sizes", [True, False])
def test_rotated_or_unsized_original_is_read_for_its_geometry(rs, tmp_path, with_sizes):
    rs.sizes_with_dimensions = with_sizes
    c = make(rs, tmp_path)
    ref = rs.upload(jpeg(1600, 1200, orientation=6))
    [asset], _ = c.changes(None)
    fetched = c.fetch(asset, "analysis")
    with Image.open(fetched.path) as img:
        assert img.size == (1050, 1400)  # previews are upright
    assert fetched.original == Geometry(stored_width=1600, stored_height=1200, orientation=6)
    assert rs.downloads[(ref, "")] == 1


def test_html_answer_to_a_download_is_a_per_resource_error(rs, tmp_path):
    c = make(rs, tmp_path)
    rs.upload(jpeg(64, 48))
    [asset], _ = c.changes(None)
    rs.html_downloads = True
    with pytest.raises(AssetError, match="web page"):
        c.fetch(asset, "analysis")
    assert not list((tmp_path / "work").rglob("*.jpg"))  # nothing stored as an "image"


# -- write-back ------------------------------------------------------------------------------------
def test_fields_are_exact_on_every_reevaluation(rs, tmp_path):
    c = make(rs, tmp_path)
    ref = rs.upload(jpeg(64, 48))
    rs.resources[ref].fields[NAMED_PERSONS] = []  # the faces plugin's guesses would sit here
    rs.api_update_field({"resource": str(ref), "field": "29", "value": "Joe Biden"},
                        admin=True)
    [asset], _ = c.changes(None)
    a, b = uuid.uuid4(), uuid.uuid4()
    cid = uuid.uuid4()
    until = datetime(2027, 6, 30, tzinfo=UTC)
    c.write_back(asset, verdict(names=[("Ann Example", a), ("Bo Example", b)],
                                consent_ids=[cid], until=until), Geometry(stored_width=64,
                                                                          stored_height=48))
    status = rs.field_by_name("Consent status")
    text = rs.field_by_name("Consent records (Consentry)")
    assert rs.fields[status]["type"] == 3
    assert rs.field_value(ref, status) == ["cleared"]
    assert rs.field_value(ref, NAMED_PERSONS) == ["Ann Example", "Bo Example"]
    assert rs.field_value(ref, text) == f"consents: {cid}; valid until: 2027-06-30"

    c.write_back(asset, verdict(Status.WITHDRAWN, names=[("Bo Example", b)]),
                 Geometry(stored_width=64, stored_height=48))
    assert rs.field_value(ref, status) == ["withdrawn"]
    assert rs.field_value(ref, NAMED_PERSONS) == ["Bo Example"]
    assert rs.field_value(ref, text) == ""

    # A new connector (next run) reuses the fields it created instead of creating more.
    fields = dict(rs.fields)
    make(rs, tmp_path).write_back(asset, verdict(Status.NO_FACES), Geometry(
        stored_width=64, stored_height=48))
    assert rs.fields == fields
    assert rs.field_value(ref, NAMED_PERSONS) == [] and rs.field_value(ref, status) == [
        "no_faces"]


def test_non_admin_key_needs_configured_fields_and_says_which(rs, tmp_path):
    ref = rs.upload(jpeg(64, 48))
    c = make(rs, tmp_path, user="editor", private_key=EDITOR_KEY)
    [asset], _ = c.changes(None)
    with pytest.raises(ConfigError, match="status_field") as err:
        c.write_back(asset, verdict(Status.NO_FACES), Geometry(stored_width=64,
                                                               stored_height=48))
    assert "'editor'" in str(err.value) and EDITOR_KEY not in str(err.value)
    # The admin created them by hand, with the options: configured by id it works.
    status = rs.api_create_resource_type_field({"name": "Consent status", "type": "3"},
                                               admin=True)[1]["data"]["ref"]
    for s in Status:
        rs.api_set_node({"resource_type_field": str(status), "name": s.value}, admin=True)
    rs.api_create_resource_type_field({"name": "Consents", "type": "0"}, admin=True)
    c = make(rs, tmp_path, user="editor", private_key=EDITOR_KEY, status_field=status,
             consent_field="consents")
    c.write_back(asset, verdict(Status.NO_FACES), Geometry(stored_width=64, stored_height=48))
    assert rs.field_value(ref, status) == ["no_faces"]


# -- consent manager ---------------------------------------------------------------------------
def test_record_becomes_a_publication_consent_never_biometric(rs, tmp_path):
    c = make(rs, tmp_path)
    ref = rs.add_consent(name="Kid Example", parent_guardian_name="Parent Example",
                         consent_usage="Print, Social Media, Billboards",
                         date_of_consent="2026-01-05", expires="2027-01-05")
    subject = uuid.uuid4()
    consent = c.import_consent(ref, subject)
    [grant] = consent.grants
    assert grant.kind == GrantKind.PUBLICATION
    assert grant.channels == ("print", "social")
    assert grant.valid_from == datetime(2026, 1, 5, tzinfo=UTC)
    assert grant.valid_until == datetime(2027, 1, 6, tzinfo=UTC)  # the expiry day counts
    assert consent.guardian and consent.signed_by == "Parent Example"
    assert consent.subject_id == subject
    assert c.import_consent(ref, subject).document_sha256 == consent.document_sha256
    rs.consents[ref]["expires"] = "2028-01-05"
    assert c.import_consent(ref, subject).document_sha256 != consent.document_sha256


def test_records_are_linked_where_identified_and_unlinked_after_withdrawal(rs, tmp_path):
    c = make(rs, tmp_path)
    r1, _r2 = rs.upload(jpeg(64, 48)), rs.upload(jpeg(64, 48))
    other = rs.add_consent(name="Someone", date_of_consent="2026-01-01")
    rs.links.add((other, r1))  # a link Consentry does not manage stays untouched
    rec = rs.add_consent(name="Ann", consent_usage="Websites", date_of_consent="2026-01-01")
    subject, cid = uuid.uuid4(), uuid.uuid4()
    c.map_consent(rec, ConsentLink(subject, cid))
    a1, a2 = c.changes(None)[0]
    geo = Geometry(stored_width=64, stored_height=48)
    c.write_back(a1, verdict(names=[("Ann", subject)], consent_ids=[cid]), geo)
    c.write_back(a2, verdict(Status.MISSING), geo)
    assert rs.links == {(other, r1), (rec, r1)}
    c.write_back(a1, verdict(Status.EXPIRED, names=[("Ann", subject)]), geo)
    assert (rec, r1) in rs.links  # expired: ResourceSpace's own expiry views need the link
    c.write_back(a1, verdict(Status.WITHDRAWN, names=[("Ann", subject)]), geo)
    assert rs.links == {(other, r1)}
    # An unmapped record is still cleaned up on the next write.
    c.write_back(a1, verdict(names=[("Ann", subject)], consent_ids=[cid]), geo)
    c.map_consent(rec, None)
    c.write_back(a1, verdict(names=[("Ann", subject)], consent_ids=[cid]), geo)
    assert rs.links == {(other, r1)}


# -- faults ------------------------------------------------------------------------------------
def test_every_resource_processed_once_under_transient_failures(rs, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    refs = [rs.upload(jpeg(300, 200)) for _ in range(8)]
    c = make(rs, tmp_path, retry_attempts=8)
    rs.fail_rate = 0.2
    listed, _ = c.changes(None)
    for asset in listed:
        fetched = c.fetch(asset, "analysis")
        c.write_back(asset, verdict(Status.NO_FACES), fetched.original)
    rs.fail_rate = 0.0
    status = rs.field_by_name("Consent status")
    assert [r.id for r in listed] == [str(r) for r in refs]
    assert all(rs.downloads[(r, "scr")] == 1 for r in refs)
    assert all(rs.field_value(r, status) == ["no_faces"] for r in refs)
    assert KEY not in caplog.text and "sign=" not in caplog.text
    assert rs.access_keys and not any(k in caplog.text for k in rs.access_keys)


def test_429_with_retry_after_and_a_timeout_are_retried(rs, tmp_path):
    rs.upload(jpeg(64, 48))
    c = make(rs, tmp_path, timeout_seconds=0.3)
    rs.fail_next = [429, 503]
    rs.retry_after = "0"
    rs.delay_next = 1.0
    assert len(c.changes(None)[0]) == 1


def test_outage_after_retries_is_unavailable(rs, tmp_path):
    c = make(rs, tmp_path, retry_attempts=2)
    rs.fail_next = [503, 503]
    with pytest.raises(UnavailableError):
        c.changes(None)


def test_check_reports_api_plugin_and_faces_warning(rs, tmp_path):
    lines = {what: (ok, detail) for what, ok, detail in
             make(rs, tmp_path, faces_plugin_enabled=True).check()}
    assert lines["api"][0] and "'admin'" in lines["api"][1]
    assert lines["consent manager"][0]
    assert not lines["faces plugin"][0] and "without any consent" in lines["faces plugin"][1]
    bad = make(rs, tmp_path, private_key="nope-" + "c" * 30).check()
    assert bad[0][1] is False and "nope-" not in bad[0][2]


# -- the real pipeline, on demo photos ---------------------------------------------------------
PHOTOS = {"library/events/2024-summit/IMG_2042.jpg": ["Barack Obama"],  # + Biden, unknown
          "library/portraits/IMG_3301.jpg": ["Barack Obama"],
          "library/portraits/IMG_3302.jpg": ["George Clooney"]}
REFS = {"Barack Obama": "Barack_Obama", "George Clooney": "George_Clooney"}


@pytest.fixture
def dam(tmp_path, demo_data, manifest, rs, counting_engine, monkeypatch):
    from plugin import people
    from plugin.app import App
    from plugin.models import DEFAULT_CHANNELS, Consent, Grant, Subject
    from plugin.setup import initialise

    monkeypatch.setenv("CONSENTRY_MATCHING__THRESHOLD", "0.45")
    monkeypatch.setenv("CONSENTRY_MATCHING__MARGIN", "0.05")
    config = tmp_path / "consentry.toml"
    initialise(config)
    config.write_text(config.read_text() + f"""
[[connectors]]
kind = "resourcespace"
name = "dam"
base_url = "{rs.url}"
user = "admin"
private_key = "{KEY}"
retry_initial_seconds = 0
consent_manager = true
""")
    refs = {rel: rs.upload((demo_data / rel).read_bytes()) for rel in PHOTOS}
    now = datetime.now(UTC)
    with App.open(config) as a:
        for name, folder in REFS.items():
            s = people.add_subject(a.state, a.audit, Subject(display_name=name))
            people.add_consent(a.state, a.audit, Consent(
                subject_id=s.id, document_ref="q.pdf", document_sha256="0" * 64,
                signed_at=now - timedelta(days=30),
                grants=(Grant(kind=GrantKind.BIOMETRIC, valid_from=now - timedelta(days=30)),
                        Grant(kind=GrantKind.PUBLICATION, channels=DEFAULT_CHANNELS,
                              valid_from=now - timedelta(days=30)))))
            people.enroll(a.state, a.vault, a.audit, a.engine, s,
                          sorted((demo_data / "people" / folder).glob("ref-*.jpg")), now=now)
        results = a.pipeline.scan("dam")
        assert [r.outcome.value for r in results] == ["processed"] * 3, results
    return config, refs


def test_pipeline_writes_exact_fields_and_follows_consent_changes(dam, rs, manifest, demo_data,
                                                                   counting_engine):
    import plugin.cli_resourcespace  # noqa: F401  (registers the commands)
    from plugin import people
    from plugin.app import App
    from plugin.cli import app

    config, refs = dam
    status = rs.field_by_name("Consent status")
    text = rs.field_by_name("Consent records (Consentry)")
    for rel, names in PHOTOS.items():
        assert rs.field_value(refs[rel], NAMED_PERSONS) == names, rel
    group = refs["library/events/2024-summit/IMG_2042.jpg"]
    assert rs.field_value(group, status) == ["missing"]  # Biden and a stranger: no consent
    assert rs.field_value(refs["library/portraits/IMG_3301.jpg"], status) == ["cleared"]
    assert rs.field_value(refs["library/portraits/IMG_3301.jpg"], text).startswith("consents: ")
    for rel in PHOTOS:  # names live in fields only: originals stay byte-identical
        assert rs.resources[refs[rel]].original == (demo_data / rel).read_bytes()

    # Boxes found on the 1400 px preview are stored on the original's 2000 px grid.
    with App.open(config) as a:
        row = a.state.asset("dam", str(group))
        assert row.geometry == Geometry(stored_width=2000, stored_height=1428)
        obama = a.state.resolve_subject("Barack Obama")
        [face] = [f for f in a.state.faces("dam", str(group)) if f.subject_id == obama.id]
        truth = next(p for p in manifest["photos"]
                     if p["path"].endswith("IMG_2042.jpg"))["faces"][1]["box"]
        assert face.box.iou(FaceBox(top=truth[0], right=truth[1], bottom=truth[2],
                                    left=truth[3])) > 0.5

    # The admin maps a consent manager record to Clooney: it is imported and linked.
    record = rs.add_consent(name="G. C.", consent_usage="Print,Websites",
                            date_of_consent="2026-01-01", expires="2030-12-31")
    runner = CliRunner()
    result = runner.invoke(app, ["-c", str(config), "resourcespace", "link-consent",
                                 str(record), "George Clooney"])
    assert result.exit_code == 0, result.output
    clooney_photo = refs["library/portraits/IMG_3302.jpg"]
    assert rs.links == {(record, clooney_photo)}
    assert rs.downloads[(clooney_photo, "scr")] == 1  # re-labelled, not re-analysed

    # Withdrawing every consent of Clooney: name gone, record unlinked, status withdrawn.
    with App.open(config) as a:
        clooney = a.state.resolve_subject("George Clooney")
        now = datetime.now(UTC)
        for consent in a.state.consents(clooney.id):
            people.withdraw_consent(a.state, a.vault, a.audit, consent, at=now, now=now)
        a.pipeline.reevaluate(subject_ids=[clooney.id])
    assert rs.field_value(clooney_photo, NAMED_PERSONS) == []
    assert rs.field_value(clooney_photo, status) == ["withdrawn"]
    assert rs.field_value(clooney_photo, text) == ""
    assert rs.links == set()
    assert counting_engine.detect_calls == 3 + 4  # 3 photos + 4 reference photos, no rescans

    # The log cursor: our own edits and links are no change; a replaced file is.
    result = runner.invoke(app, ["-c", str(config), "resourcespace", "scan"])
    assert result.exit_code == 0, result.output
    with App.open(config) as a:
        assert int(a.state.cursor("dam")) == len(rs.log)
    rs.replace_file(group, (demo_data / "library/portraits/IMG_3301.jpg").read_bytes())
    downloads = sum(rs.downloads.values())
    result = runner.invoke(app, ["-c", str(config), "resourcespace", "scan"])
    assert result.exit_code == 0, result.output
    assert rs.downloads[(group, "scr")] == 2 and sum(rs.downloads.values()) == downloads + 1
    assert rs.field_value(group, NAMED_PERSONS) == ["Barack Obama"]
    assert rs.field_value(group, status) == ["cleared"]  # now only Obama is in it


def test_sync_follows_changed_and_deleted_records(dam, rs):
    import plugin.cli_resourcespace  # noqa: F401
    from plugin.app import App
    from plugin.cli import app

    config, refs = dam
    photo = refs["library/portraits/IMG_3302.jpg"]
    record = rs.add_consent(name="G. C.", consent_usage="Print", date_of_consent="2026-01-01",
                            expires="2030-12-31")
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["-c", str(config), "resourcespace", *args])
        assert result.exit_code == 0, result.output
        return result.output

    run("link-consent", str(record), "George Clooney")
    assert "0 subject(s) changed" in run("sync-consents")  # nothing moved: nothing re-imported

    rs.consents[record]["expires"] = "2031-12-31"
    assert "1 subject(s) changed" in run("sync-consents")
    with App.open(config) as a:
        clooney = a.state.resolve_subject("George Clooney")
        imported = [c for c in a.state.consents(clooney.id)
                    if c.document_ref.startswith("resourcespace:")]
        assert [c.grants[0].valid_until.year for c in imported] == [2031, 2032]
        assert imported[0].grants[0].withdrawn_at is not None
        assert imported[1].grants[0].withdrawn_at is None
        assert all(g.kind == GrantKind.PUBLICATION for c in imported for g in c.grants)
    assert rs.links == {(record, photo)}

    assert rs.api_consentmanager_delete_consent({"ref": str(record)}, admin=True)[1] is True
    assert "1 subject(s) changed" in run("sync-consents")
    assert rs.links == set()
    with App.open(config) as a:
        clooney = a.state.resolve_subject("George Clooney")
        assert all(g.withdrawn_at is not None for c in a.state.consents(clooney.id)
                   if c.document_ref.startswith("resourcespace:") for g in c.grants)


def test_downloads_do_not_pile_up(rs, tmp_path, monkeypatch):
    monkeypatch.setattr("connectors.resourcespace.KEEP_DOWNLOADS", 2)
    for _ in range(4):
        rs.upload(jpeg(64, 48))
    c = make(rs, tmp_path)
    paths = [c.fetch(asset, "analysis").path for asset in c.changes(None)[0]]
    assert [p.exists() for p in paths] == [False, False, True, True]  # look-ahead kept
    c.close()
    assert not any(p.exists() for p in paths)


def test_private_key_from_the_environment_read_on_first_use(rs, tmp_path, monkeypatch):
    monkeypatch.delenv("CONSENTRY_RESOURCESPACE_KEY", raising=False)
    rs.upload(jpeg(64, 48))
    c = make(rs, tmp_path, private_key=None)
    with pytest.raises(ConfigError, match="CONSENTRY_RESOURCESPACE_KEY"):
        c.changes(None)
    monkeypatch.setenv("CONSENTRY_RESOURCESPACE_KEY", KEY)
    listed, _ = c.changes(None)
    assert len(listed) == 1
