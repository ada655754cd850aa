"""The Immich connector against FakeImmichServer (a real server on 127.0.0.1): windows and
paging, preview + original geometry, people/faces/tags written exactly once, withdrawal and
erasure, missing permissions, faults; and the whole pipeline on real demo photos."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from connectors.base import ConnectorContext
from connectors.immich import ImmichConfig, ImmichConnector
from plugin.errors import AssetError, AuthError, UnavailableError
from plugin.http import HttpClient, RetryPolicy
from plugin.links import StateLinks
from plugin.models import (
    AssetVerdict,
    FaceBox,
    FaceVerdict,
    Geometry,
    ModelRelease,
    Status,
)
from plugin.state import StateStore
from tests.fakes.immich import ALL, FakeImmichServer

KEY = "immich-secret-key-42"


@pytest.fixture
def fake():
    server = FakeImmichServer(keys={KEY: ALL})
    yield server
    server.close()
    assert server.invalid == [], "requests that do not match immich-openapi.json"


# The state database each test's connectors keep their links in (by tmp_path; see `make`).
STATES: dict[Path, StateStore] = {}


@pytest.fixture(autouse=True)
def state(tmp_path):
    store = STATES[tmp_path] = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield store
    STATES.pop(tmp_path).close()


def make(fake, tmp_path, *, key=KEY, attempts=5, timeout=5.0, work_dir=None, links=None,
         **options):
    config = ImmichConfig(url=fake.url, api_key=key, timeout=timeout, **options)
    context = ConnectorContext(writer=None, engine_version="t",
                               work_dir=work_dir or tmp_path / "work",
                               links=links or StateLinks.of(STATES[tmp_path]))
    connector = ImmichConnector(config, context)
    # Same session and policy, no real sleeping between retries in tests.
    connector.http = HttpClient(connector.name, connector.http.session,
                                base_url=connector.http.base_url, timeout=timeout,
                                policy=RetryPolicy(attempts=attempts), sleep=lambda s: None)
    return connector


SUBJECT = uuid.UUID("11111111-1111-4111-8111-111111111111")
BOX = FaceBox(top=100, right=300, bottom=300, left=100)
GEO = Geometry(stored_width=1000, stored_height=800)


def verdict(status=Status.CLEARED, *, named=True, box=BOX):
    face = FaceVerdict(box=box, status=status, subject_id=SUBJECT if named else None,
                       name="Jane Doe" if named else None)
    return AssetVerdict(status=status, model_release=ModelRelease.UNLIMITED, faces=(face,))


def jpeg(width=400, height=300, orientation=None):
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new("RGB", (width, height), (120, 90, 60)).save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


# -- change detection ----------------------------------------------------------------------
def test_window_pages_2500_assets_and_second_run_sees_only_changes(fake, tmp_path):
    ids = [fake.add_asset(name=f"IMG_{i:04}.jpg") for i in range(2500)]
    trashed = fake.add_asset(name="gone.jpg")
    fake.touch(trashed, isTrashed=True)
    c = make(fake, tmp_path)
    refs, cursor = c.changes(None)
    assert sorted(r.id for r in refs) == sorted(ids)  # trashed one left out, none twice
    searches = [p for m, p in fake.log if p == "/api/search/metadata"]
    assert len(searches) == 3  # 1000 + 1000 + 500, until nextPage is null
    assert {r.version for r in refs} == {fake.assets[i]["checksum"] for i in ids}

    fake.touch(ids[5])
    fake.touch(ids[2000])
    time.sleep(0.002)  # windows end on a millisecond, as Immich's timestamps do
    again, cursor2 = c.changes(cursor)
    assert sorted(r.id for r in again) == sorted([ids[5], ids[2000]])
    assert cursor2 > cursor
    assert c.changes(cursor2)[0] == []


def test_window_failing_midway_moves_no_cursor(fake, tmp_path):
    for i in range(30):
        fake.add_asset(name=f"{i}.jpg")
    c = make(fake, tmp_path, page_size=10)
    fake.fail_next = [0] + [503] * 5  # page 1 answers, page 2 is down for good
    with pytest.raises(UnavailableError):
        c.changes(None)  # no refs and no cursor: the pipeline stores nothing
    assert len(c.changes(None)[0]) == 30


def test_albums_limit_the_assets_and_are_united(fake, tmp_path):
    a = fake.add_asset(name="a.jpg", album="11111111-2222-4333-8444-555555555555")
    b = fake.add_asset(name="b.jpg", album="66666666-2222-4333-8444-555555555555")
    fake.add_asset(name="elsewhere.jpg")
    c = make(fake, tmp_path, album_ids=("11111111-2222-4333-8444-555555555555",
                                        "66666666-2222-4333-8444-555555555555"))
    assert sorted(r.id for r in c.changes(None)[0]) == sorted([a, b])


def test_the_fake_refuses_requests_outside_the_openapi_description(fake):
    api = fake.openapi
    assert api.problems("POST", "/api/faces", {}, {"assetId": "x", "x": 1}) != []
    assert api.problems("GET", "/api/nope", {}, None) == ["GET /api/nope: no such operation"]
    assert api.problems("PUT", "/api/tags", {}, {"tags": ["Consent/Cleared"]}) == []


def test_own_tag_writes_come_back_with_the_same_version(fake, tmp_path):
    asset = fake.add_asset(jpeg())
    c = make(fake, tmp_path)
    refs, cursor = c.changes(None)
    written = c.write_back(refs[0], verdict(Status.MISSING, named=False), GEO)
    assert written.version == refs[0].version
    time.sleep(0.002)
    again, _ = c.changes(cursor)  # the tag write bumped updatedAt ...
    assert [r.id for r in again] == [asset]
    assert again[0].version == refs[0].version  # ... but the processing key will not move


# -- content -------------------------------------------------------------------------------
def test_fetch_gives_the_preview_and_the_originals_stored_geometry(fake, tmp_path):
    asset = fake.add_asset(jpeg(1200, 900, orientation=6))
    c = make(fake, tmp_path)
    refs, _ = c.changes(None)
    fetched = c.fetch(refs[0], "analysis")
    with Image.open(fetched.path) as img:
        assert max(img.size) <= fake.preview_side and img.size[1] > img.size[0]  # upright
    assert fetched.original == Geometry(stored_width=1200, stored_height=900, orientation=6)
    assert ("GET", f"/api/assets/{asset}/thumbnail") in fake.log
    # The pipeline fetches ahead: earlier downloads stay until written back or closed.
    other = c.fetch(refs[0].model_copy(update={"id": fake.add_asset(jpeg())}), "analysis")
    assert fetched.path.exists() and other.path.exists()
    c.write_back(refs[0], AssetVerdict(status=Status.NO_FACES,
                                       model_release=ModelRelease.NOT_APPLICABLE), GEO)
    assert not fetched.path.exists() and other.path.exists()
    c.close()
    assert not other.path.exists()


# -- write-back ----------------------------------------------------------------------------
def test_person_face_and_tag_written_exactly_once(fake, tmp_path):
    asset = fake.add_asset(jpeg())
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    for _ in range(2):
        c.write_back(ref, verdict(), GEO)
    # A new connector (a new run) reads its links from the state database.
    c2 = make(fake, tmp_path)
    c2.write_back(ref, verdict(), GEO)
    assert [p["name"] for p in fake.people.values()] == ["Jane Doe"]
    faces = fake.faces_of(asset)
    assert len(faces) == 1 and faces[0]["sourceType"] == "manual"
    f = faces[0]
    assert (f["boundingBoxX1"], f["boundingBoxY1"], f["boundingBoxX2"], f["boundingBoxY2"],
            f["imageWidth"], f["imageHeight"]) == (100, 100, 300, 300, 1000, 800)
    assert fake.tag_values(asset) == {"Consent/Cleared"}

    c2.write_back(ref, verdict(Status.EXPIRED), GEO)
    assert fake.tag_values(asset) == {"Consent/Expired"}  # stale status removed
    c2.write_back(ref, AssetVerdict(status=Status.NO_FACES,
                                    model_release=ModelRelease.NOT_APPLICABLE), GEO)
    assert fake.tag_values(asset) == set() and fake.faces_of(asset) == []


def test_rotated_original_gets_its_face_in_the_upright_frame(fake, tmp_path):
    asset = fake.add_asset(jpeg(1000, 800, orientation=6))
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    geometry = c.fetch(ref, "analysis").original
    c.write_back(ref, verdict(), geometry)
    (face,) = fake.faces_of(asset)
    assert (face["imageWidth"], face["imageHeight"]) == (800, 1000)


def test_withdrawal_removes_created_faces_only_and_erasure_deletes_the_person(fake, tmp_path,
                                                                           state):
    asset = fake.add_asset(jpeg())
    foreign = fake.add_face(asset, (600, 100, 700, 200), width=1000, height=800,
                            person=fake.add_person("Someone"))
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    c.write_back(ref, verdict(), GEO)
    assert len(fake.faces_of(asset)) == 2
    # Withdrawal: the policy removes the name; our face goes, the foreign one stays.
    c.write_back(ref, verdict(Status.WITHDRAWN, named=False), GEO)
    assert [f["id"] for f in fake.faces_of(asset)] == [foreign]
    assert fake.tag_values(asset) == {"Consent/Withdrawn"}

    c.write_back(ref, verdict(), GEO)
    result = c.forget_subject(SUBJECT)
    assert result == {"faces_deleted": 1, "faces_returned": 0, "people_deleted": 1}
    assert [p["name"] for p in fake.people.values()] == ["Someone"]
    assert [f["id"] for f in fake.faces_of(asset)] == [foreign]
    links = StateLinks.of(state)  # the subject's link rows went with the person
    assert links.people("immich") == {} and links.assets_of("immich", str(SUBJECT)) == []
    assert links.faces("immich", asset) == []
    assert c.forget_subject(SUBJECT) == {"faces_deleted": 0, "faces_returned": 0,
                                         "people_deleted": 0}


def test_a_write_failing_midway_keeps_the_faces_already_made(fake, tmp_path, state):
    # Two people; Immich refuses the second face. The first was made: it must stay ours, so a
    # withdrawal later still removes it (a forgotten face would keep the name in Immich).
    asset = fake.add_asset(jpeg())
    other = uuid.UUID("22222222-2222-4222-8222-222222222222")
    second = FaceBox(top=400, right=700, bottom=600, left=500)
    both = AssetVerdict(status=Status.CLEARED, model_release=ModelRelease.UNLIMITED, faces=(
        FaceVerdict(box=BOX, status=Status.CLEARED, subject_id=SUBJECT, name="Jane Doe"),
        FaceVerdict(box=second, status=Status.CLEARED, subject_id=other, name="John Roe")))
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    fake.fail_on[("POST", "/api/faces")] = [0, 400]
    with pytest.raises(AssetError, match="HTTP 400"):
        c.write_back(ref, both, GEO)
    (made,) = fake.faces_of(asset)
    assert [(r["id"], r["subject"], r["created"]) for r in StateLinks.of(state).faces(
        "immich", asset)] == [(made["id"], str(SUBJECT), True)]

    c.write_back(ref, both, GEO)  # the retry completes without a duplicate
    assert len(fake.faces_of(asset)) == 2
    c.write_back(ref, verdict(Status.WITHDRAWN, named=False), GEO)
    assert fake.faces_of(asset) == []


def test_face_at_the_same_place_is_reassigned_not_duplicated(fake, tmp_path):
    asset = fake.add_asset(jpeg())
    cluster = fake.add_person("")  # an unnamed machine-learning cluster
    # Immich's machine faces live in their own frame (here half the size): compared scaled.
    ml = fake.add_face(asset, (55, 52, 152, 155), width=500, height=400, person=cluster)
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    c.write_back(ref, verdict(), GEO)
    c.write_back(ref, verdict(), GEO)
    (face,) = fake.faces_of(asset)
    assert face["id"] == ml and fake.people[face["personId"]]["name"] == "Jane Doe"
    # Withdrawal hands the machine face back to its cluster; it is never deleted.
    c.write_back(ref, verdict(Status.WITHDRAWN, named=False), GEO)
    assert fake.faces[ml]["personId"] == cluster


def test_an_asset_gone_before_write_back_fails_alone(fake, tmp_path):
    asset = fake.add_asset(jpeg())
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    del fake.assets[asset]
    with pytest.raises(AssetError, match=r"HTTP 400|no longer exists"):
        c.write_back(ref, verdict(), GEO)


def test_select_takes_asset_ids(fake, tmp_path):
    asset = fake.add_asset(jpeg(1200, 900))
    c = make(fake, tmp_path)
    (ref,) = c.select([Path(asset)])
    assert ref.id == asset and ref.version == fake.assets[asset]["checksum"]
    assert c.fetch(ref, "analysis").original == Geometry(stored_width=1200, stored_height=900)


def test_face_of_another_named_person_is_left_alone(fake, tmp_path):
    asset = fake.add_asset(jpeg())
    other = fake.add_person("Named In Immich")
    fake.add_face(asset, (100, 100, 300, 300), width=1000, height=800, person=other)
    c = make(fake, tmp_path)
    c.write_back(c.changes(None)[0][0], verdict(), GEO)
    (face,) = fake.faces_of(asset)
    assert face["personId"] == other


# -- links shared by every worker of every machine ----------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")  # skips without a server


def test_two_machines_sharing_the_state_database_create_one_person_and_no_duplicate_face(
        fake, tmp_path, shared_url):
    """Two workers with their own work dirs (two machines) and their own connections to one
    state database write the same assets at the same moment: one Immich person, one face per
    asset; and each knows the faces the other created."""
    assets = [fake.add_asset(jpeg(400 + i, 300)) for i in range(3)]
    stores = [StateStore(shared_url) for _ in range(2)]
    machines = [make(fake, tmp_path, work_dir=tmp_path / name / "work",
                     links=StateLinks.of(store))
                for name, store in zip("ab", stores, strict=True)]
    try:
        refs = machines[0].changes(None)[0]
        barrier, errors = threading.Barrier(2), []

        def run(connector):
            try:
                barrier.wait(timeout=10)
                for ref in refs:
                    connector.write_back(ref, verdict(), GEO)
            except Exception as err:  # reported by the assert below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(c,)) for c in machines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert [p["name"] for p in fake.people.values()] == ["Jane Doe"]
        assert sum(1 for m, p in fake.log if (m, p) == ("POST", "/api/people")) == 1
        assert all(len(fake.faces_of(a)) == 1 for a in assets)
        assert not (tmp_path / "a" / "work" / "immich-immich" / "links.json").exists()

        # Machine b re-processes what both wrote: nothing added.
        for ref in refs:
            machines[1].write_back(ref, verdict(), GEO)
        assert len(fake.people) == 1 and all(len(fake.faces_of(a)) == 1 for a in assets)
        # Withdrawal on machine a removes every face Consentry created, whoever created it.
        for ref in refs:
            machines[0].write_back(ref, verdict(Status.WITHDRAWN, named=False), GEO)
        assert all(fake.faces_of(a) == [] for a in assets)
        machines[1].write_back(refs[0], verdict(), GEO)
        # Erasure on machine a undoes what machine b wrote.
        assert machines[0].forget_subject(SUBJECT) == {"faces_deleted": 1, "faces_returned": 0,
                                                        "people_deleted": 1}
        assert fake.people == {} and fake.faces == {}
        links = StateLinks.of(stores[1])
        assert links.people("immich") == {} and links.assets_of("immich", str(SUBJECT)) == []
    finally:
        for connector in machines:
            connector.close()
        for store in stores:
            store.close()


def test_links_json_of_an_earlier_version_is_imported_once(fake, tmp_path, state):
    asset = fake.add_asset(jpeg())
    person = fake.add_person("Jane Doe")
    face = fake.add_face(asset, (100, 100, 300, 300), width=1000, height=800, person=person,
                         source="manual")
    other = str(uuid.UUID("22222222-2222-4222-8222-222222222222"))
    legacy = tmp_path / "work" / "immich-immich" / "links.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({
        "people": {str(SUBJECT): person, other: "gone-person"},
        "faces": {asset: [{"id": face, "subject": str(SUBJECT), "created": True,
                           "previous": None}]},
    }))
    links = StateLinks.of(state)
    links.set_person("immich", other, "recorded-person")  # what the database holds wins
    c = make(fake, tmp_path)
    ref = c.changes(None)[0][0]
    c.write_back(ref, verdict(), GEO)
    assert not legacy.exists() and not legacy.with_name("links.json.imported").exists()
    assert links.people("immich") == {str(SUBJECT): person, other: "recorded-person"}
    assert list(fake.people) == [person] and [f["id"] for f in fake.faces_of(asset)] == [face]
    # Another worker (or a later run) finds nothing left to import and the links in place.
    c2 = make(fake, tmp_path)
    c2.write_back(ref, verdict(), GEO)
    assert [f["id"] for f in fake.faces_of(asset)] == [face]
    # The imported face is known as created by Consentry: withdrawal deletes it.
    c2.write_back(ref, verdict(Status.WITHDRAWN, named=False), GEO)
    assert fake.faces_of(asset) == []
    assert c2.forget_subject(SUBJECT)["people_deleted"] == 1
    assert list(links.people("immich")) == [other]


def test_without_a_link_store_faces_are_refused_not_forgotten(fake, tmp_path):
    fake.add_asset(jpeg())
    c = make(fake, tmp_path)
    c._links = None  # a context built without the state database
    with pytest.raises(AssetError, match="state database"):
        c.write_back(c.changes(None)[0][0], verdict(), GEO)
    assert fake.people == {}


def test_missing_face_permission_falls_back_to_tags_only(fake, tmp_path, caplog):
    fake.keys = {KEY: ALL - {"all"} | {"asset.read", "asset.view", "person.read",
                                       "person.create", "face.read", "tag.create", "tag.read",
                                       "tag.asset"}}
    a, b = fake.add_asset(jpeg()), fake.add_asset(jpeg(300, 200))
    c = make(fake, tmp_path)
    refs = c.changes(None)[0]
    with caplog.at_level(logging.WARNING):
        for ref in refs:
            c.write_back(ref, verdict(), GEO)
    assert "face.create" in caplog.text and "tags only" in caplog.text
    assert fake.tag_values(a) == fake.tag_values(b) == {"Consent/Cleared"}
    assert sum(1 for m, p in fake.log if (m, p) == ("POST", "/api/faces")) == 1
    assert any(not ok and "face.create" in detail for _, ok, detail in c.check())


def test_check_reports_each_permission(fake, tmp_path):
    c = make(fake, tmp_path)
    assert all(ok for _, ok, _ in c.check())
    fake.keys = {KEY: frozenset({"asset.read", "tag.read"})}
    lines = {what: detail for what, ok, detail in c.check() if not ok}
    assert lines == {"people readable (person.read)": "missing permission person.read"}
    bad = make(fake, tmp_path, key="wrong")
    assert any("401" in detail for _, ok, detail in bad.check() if not ok)


# -- faults --------------------------------------------------------------------------------
def test_every_asset_processed_once_under_20_percent_failures(fake, tmp_path, caplog):
    ids = [fake.add_asset(jpeg(200 + i, 150)) for i in range(12)]
    c = make(fake, tmp_path, attempts=8, page_size=5)
    fake.fail_rate = 0.2
    with caplog.at_level(logging.DEBUG):
        refs, _ = c.changes(None)
        for ref in refs:
            c.fetch(ref, "analysis")
            c.write_back(ref, verdict(), GEO)
    fake.fail_rate = 0.0
    assert sorted(r.id for r in refs) == sorted(ids)
    assert all(len(fake.faces_of(i)) == 1 for i in ids)
    assert len(fake.people) == 1
    assert all(fake.tag_values(i) == {"Consent/Cleared"} for i in ids)
    assert fake.faults > 5  # faults did happen and were absorbed
    assert KEY not in caplog.text


def test_429_honours_retry_after_then_recovers(fake, tmp_path):
    fake.add_asset(jpeg())
    slept = []
    c = make(fake, tmp_path)
    c.http._sleep = slept.append
    fake.fail_next, fake.retry_after = [429], "2"
    assert len(c.changes(None)[0]) == 1
    assert slept == [2.0]


def test_401_and_timeouts_never_show_the_key(fake, tmp_path, caplog):
    fake.add_asset(jpeg())
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthError) as auth:
            make(fake, tmp_path, key="not-" + KEY).changes(None)
        fake.delay = 0.3
        with pytest.raises(UnavailableError) as outage:
            make(fake, tmp_path, attempts=2, timeout=0.1).changes(None)
        fake.delay = 0.0
    for text in (str(auth.value), str(outage.value), caplog.text):
        assert KEY not in text


# -- the whole pipeline on real photos -------------------------------------------------------
T0 = datetime(2026, 11, 26, 12, tzinfo=UTC)
DAY = timedelta(days=1)
PHOTOS = ["library/portraits/IMG_3301.jpg",           # Barack Obama alone
          "library/events/2024-summit/IMG_2041.jpg",  # Obama and Joe Biden (no consent)
          "library/portraits/IMG_3302.jpg"]           # George Clooney (not registered)


def test_pipeline_writes_consented_people_into_immich(fake, tmp_path, demo_data,
                                                      counting_engine, monkeypatch):
    from plugin import people
    from plugin.app import App
    from plugin.models import DEFAULT_CHANNELS, Consent, Grant, GrantKind, Subject
    from plugin.setup import initialise

    monkeypatch.setenv("CONSENTRY_MATCHING__THRESHOLD", "0.45")
    monkeypatch.setenv("CONSENTRY_MATCHING__MARGIN", "0.05")
    ids = {rel: fake.add_asset((demo_data / rel).read_bytes(), name=rel.rsplit("/", 1)[1])
           for rel in PHOTOS}
    config = tmp_path / "consentry.toml"
    initialise(config)
    with config.open("a") as handle:
        handle.write(f'\n[[connectors]]\nkind = "immich"\nname = "immich"\nurl = "{fake.url}"\n'
                     f'api_key = "{KEY}"\n')
    with App.open(config, clock=lambda: T0) as app:
        obama = people.add_subject(app.state, app.audit, Subject(display_name="Barack Obama"))
        consent = people.add_consent(app.state, app.audit, Consent(
            subject_id=obama.id, document_ref="q.pdf", document_sha256="0" * 64,
            signed_at=T0 - 30 * DAY, grants=(
                Grant(kind=GrantKind.BIOMETRIC, valid_from=T0 - 30 * DAY),
                Grant(kind=GrantKind.PUBLICATION, channels=DEFAULT_CHANNELS,
                      valid_from=T0 - 30 * DAY))))
        refs = sorted((demo_data / "people" / "Barack_Obama").glob("ref-*.jpg"))
        people.enroll(app.state, app.vault, app.audit, app.engine, obama, refs, now=T0)
        results = app.pipeline.scan("immich")
        assert [r.outcome.value for r in results] == ["processed"] * 3, results

        names = {p["id"]: p["name"] for p in fake.people.values()}
        assert list(names.values()) == ["Barack Obama"]
        portrait, summit, clooney = (ids[rel] for rel in PHOTOS)
        assert [names[f["personId"]] for f in fake.faces_of(portrait)] == ["Barack Obama"]
        assert [names[f["personId"]] for f in fake.faces_of(summit)] == ["Barack Obama"]
        assert fake.faces_of(clooney) == []
        assert fake.tag_values(portrait) == {"Consent/Cleared"}
        assert fake.tag_values(summit) == {"Consent/Missing"}  # Biden has no consent
        assert fake.tag_values(clooney) == {"Consent/Missing"}
        # The box lands on Obama's face in the original's frame (manifest: top,right,bottom,left).
        (face,) = fake.faces_of(summit)
        assert (face["imageWidth"], face["imageHeight"]) == (1126, 661)
        truth = FaceBox(top=44, right=396, bottom=213, left=226)
        got = FaceBox(top=face["boundingBoxY1"], right=face["boundingBoxX2"],
                      bottom=face["boundingBoxY2"], left=face["boundingBoxX1"])
        assert got.iou(truth) > 0.5

        # Second run: our tag writes bumped updatedAt, but nothing is analysed again.
        calls = counting_engine.detect_calls
        again = app.pipeline.scan("immich")
        assert counting_engine.detect_calls == calls
        assert [r.outcome.value for r in again] == ["skipped"] * 3
        assert len(fake.faces) == 2 and len(fake.people) == 1

        # Withdrawal of every grant: faces Consentry created go, the status follows.
        people.withdraw_consent(app.state, app.vault, app.audit, consent, at=T0, now=T0)
        app.pipeline.reevaluate(subject_ids=[obama.id])
        assert fake.faces_of(portrait) == fake.faces_of(summit) == []
        assert fake.tag_values(portrait) == {"Consent/Withdrawn"}
        assert app.connectors["immich"].forget_subject(obama.id)["people_deleted"] == 1
        assert fake.people == {}


def test_api_key_from_the_environment_read_on_first_use(fake, tmp_path, monkeypatch, caplog):
    from plugin.errors import ConfigError

    monkeypatch.delenv("CONSENTRY_IMMICH_API_KEY", raising=False)
    fake.add_asset(name="IMG_0001.jpg")
    c = make(fake, tmp_path, key=None)  # built without any key: nothing contacted yet
    with pytest.raises(ConfigError, match="CONSENTRY_IMMICH_API_KEY"):
        c.changes(None)
    monkeypatch.setenv("CONSENTRY_IMMICH_API_KEY", KEY)
    with caplog.at_level(logging.DEBUG):
        refs, _ = c.changes(None)
    assert len(refs) == 1
    assert KEY not in caplog.text and KEY not in repr(c.http.session.auth.__dict__)
