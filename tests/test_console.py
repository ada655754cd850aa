"""The admin console over real HTTP (uvicorn on 127.0.0.1 in a thread, requests; httpx is not
installed). Security first: CSRF on every form, every admin route closed to non-admins,
login rate limiting, no page showing another person's data; then the pages' work."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image
from starlette.routing import Route
from typer.testing import CliRunner

from plugin import people
from plugin.app import App
from plugin.models import (
    Consent,
    FaceBox,
    FaceRecord,
    FaceState,
    Geometry,
    Grant,
    GrantKind,
    Subject,
)
from plugin.settings import load
from plugin.setup import initialise
from plugin.web import i18n, security
from plugin.web.admin import PUBLIC
from plugin.web.admin import routes as admin_routes
from plugin.web.app import create_console_app, portal_routes
from tests.web_client import WebClient, csrf_of, serve

ADMIN, PASSWORD = "officer", "correct horse battery"
ALICE, BOB = "Alice Aardvark", "Bob Bandicoot"


def _consent(sid: uuid.UUID, *, biometric: bool = True, days: int = 365) -> Consent:
    now = datetime.now(UTC)
    grants = [Grant(kind=GrantKind.PUBLICATION, channels=("website",),
                    valid_from=now - timedelta(days=1), valid_until=now + timedelta(days=days))]
    if biometric:
        grants.append(Grant(kind=GrantKind.BIOMETRIC, valid_from=now - timedelta(days=1)))
    return Consent(subject_id=sid, document_ref="paper-archive/box-1", document_sha256="a" * 64,
                   signed_at=now - timedelta(days=1), grants=tuple(grants))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A library with one photo holding one uncertain face (Alice proposed), two people."""
    lib = tmp_path / "photos"
    lib.mkdir()
    Image.new("RGB", (400, 300), (120, 160, 200)).save(lib / "group.jpg", quality=90)
    cfg = tmp_path / "consentry.toml"
    initialise(cfg, photos=lib)
    settings = load(cfg)
    app = App(settings, config_file=cfg)
    alice = people.add_subject(app.state, app.audit, Subject(display_name=ALICE))
    bob = people.add_subject(app.state, app.audit, Subject(display_name=BOB))
    people.add_consent(app.state, app.audit, _consent(alice.id, days=10))
    people.add_consent(app.state, app.audit, _consent(bob.id))
    connector = app.connectors["photos"]
    ref = connector.ref_for(lib / "group.jpg")
    with app.state.begin() as conn:
        app.state.save_analysis(ref, geometry=Geometry(stored_width=400, stored_height=300),
                                faces=[FaceRecord(box=FaceBox(top=50, right=200, bottom=150,
                                                              left=100),
                                                  state=FaceState.UNCERTAIN, distance=0.5,
                                                  candidates=(alice.id,))],
                                processing_key="k", conn=conn)
    web = create_console_app(settings, config_file=cfg, app=app, secret="s" * 48)
    web.state.console.accounts.create(ADMIN, PASSWORD)
    with serve(web) as base:
        yield {"base": base, "app": app, "web": web, "alice": alice, "bob": bob, "ref": ref,
               "lib": lib, "cfg": cfg, "settings": settings}
    app.close()


def admin_client(site) -> WebClient:
    c = WebClient(site["base"])
    c.login(ADMIN, PASSWORD)
    return c


def concrete_paths(site) -> list[tuple[str, str]]:
    """(method, path) for every admin route, path parameters filled with real ids."""
    sid = site["alice"].id
    cid = site["app"].state.consents(sid)[0].id
    params = {"sid": sid, "cid": cid, "doc_id": "x"}
    out = []
    for route in admin_routes:
        assert isinstance(route, Route)
        path = "/admin" + route.path
        for name in route.param_convertors:
            path = path.replace("{" + name + ":" + _conv(route.path, name) + "}",
                                str(params[name]))
        for method in sorted(route.methods - {"HEAD"}):
            out.append((route.name, method, path))
    return out


def _conv(path: str, name: str) -> str:
    return re.search(r"\{" + name + r":(\w+)\}", path).group(1)


def portal_admin_paths(site) -> list[tuple[str, str]]:
    """The portal's admin pages (/p/admin/...), when the portal is there."""
    out = []
    for route in portal_routes():
        if isinstance(route, Route) and route.path.startswith("/admin"):
            path = "/p" + re.sub(r"\{\w+(:\w+)?\}", str(site["alice"].id), route.path)
            out += [(m, path) for m in sorted(route.methods - {"HEAD"})]
    return out


# -- security ------------------------------------------------------------------------------


def test_every_admin_route_but_login_is_wrapped_in_admin_only():
    for route in admin_routes:
        if route.name in PUBLIC:
            continue
        assert getattr(route.endpoint, "admin_only", False), route.name


def test_non_admin_session_cannot_reach_any_admin_page(site):
    anonymous = WebClient(site["base"])
    anonymous.get("/admin/login")  # a session with a CSRF token, but no admin
    token = anonymous.csrf()
    for name, method, path in concrete_paths(site):
        if name in PUBLIC:
            continue
        if method == "GET":
            r = anonymous.get(path)
            assert r.status_code == 303, (path, r.status_code)
            assert r.headers["location"].startswith("/admin/login"), path
        else:
            r = anonymous.post(path, {"csrf": token, "confirm_name": ALICE, "kind": ""})
            assert r.status_code == 403, (path, r.status_code)
    for method, path in portal_admin_paths(site):
        r = anonymous.get(path) if method == "GET" else anonymous.post(path, {"csrf": token})
        assert r.status_code in (303, 403), (path, r.status_code)
        if method == "GET":
            assert r.headers["location"].startswith("/admin/login"), path
    # Nothing happened: Alice is still there with her consent.
    assert site["app"].state.subject(site["alice"].id) is not None
    assert site["app"].state.consents(site["alice"].id)[0].grants[0].withdrawn_at is None


def test_forged_or_revoked_sessions_are_refused(site):
    c = admin_client(site)
    assert c.get("/admin/").status_code == 200
    cookie = c.http.cookies.get(security.SESSION_COOKIE)
    forged = WebClient(site["base"])
    forged.http.cookies.set(security.SESSION_COOKIE, cookie[:-3] + "AAA")
    assert forged.get("/admin/").status_code == 303
    # Logout ends the session server-side: a copied cookie is useless afterwards.
    stolen = WebClient(site["base"])
    stolen.http.cookies.set(security.SESSION_COOKIE, cookie)
    assert stolen.get("/admin/").status_code == 200
    r = c.post("/admin/logout", {"csrf": c.csrf("/admin/")})
    assert r.status_code == 303
    assert stolen.get("/admin/").status_code == 303


def test_forms_without_a_valid_csrf_token_are_refused(site):
    c = admin_client(site)
    posts = [(n, p) for n, m, p in concrete_paths(site) if m == "POST"]
    assert len(posts) >= 8
    for name, path in posts:
        for data in ({}, {"csrf": "forged-token"}):
            r = c.post(path, {**data, "username": ADMIN, "password": PASSWORD,
                              "confirm_name": ALICE, "display_name": "Mallory"})
            assert r.status_code == 403, (name, data, r.status_code)
    # Login without a token is refused too (and no session was started).
    fresh = WebClient(site["base"])
    assert fresh.post("/admin/login", {"username": ADMIN, "password": PASSWORD}).status_code == 403
    assert site["app"].state.subject(site["alice"].id) is not None
    assert [s.display_name for s in site["app"].state.subjects()] == [ALICE, BOB]


def test_login_is_rate_limited_per_ip_and_user(site):
    c = WebClient(site["base"])
    for _ in range(5):
        r = c.post_form("/admin/login", {"username": ADMIN, "password": "wrong password"})
        assert r.status_code == 401
    r = c.post_form("/admin/login", {"username": ADMIN, "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert c.get("/admin/").status_code == 303
    # Another username from the same address is not blocked.
    site["web"].state.console.accounts.create("second", "another long password")
    assert c.post_form("/admin/login", {"username": "second",
                                        "password": "another long password"}).status_code == 303
    failed = [e for e in site["app"].audit.entries() if e["action"] == "console.login_failed"]
    assert len(failed) == 5


def test_names_are_escaped_and_next_cannot_leave_the_console(site):
    people.add_subject(site["app"].state, site["app"].audit,
                       Subject(display_name='<script>alert("x")</script>'))
    c = WebClient(site["base"])
    r = c.post_form("/admin/login", {"username": ADMIN, "password": PASSWORD,
                                     "next": "https://evil.example/admin"})
    assert r.headers["location"] == "/admin/"
    page = c.get("/admin/people").text
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_limiter_window_slides():
    now = [0.0]
    limiter = security.LoginLimiter(attempts=2, window=60, clock=lambda: now[0])
    limiter.failed("1.2.3.4", "a")
    limiter.failed("1.2.3.4", "A")
    assert limiter.retry_after("1.2.3.4", "a") > 0
    assert limiter.retry_after("1.2.3.5", "a") == 0
    now[0] = 61
    assert limiter.retry_after("1.2.3.4", "a") == 0


def test_cookie_flags_and_security_headers(site, tmp_path):
    c = WebClient(site["base"])
    r = c.get("/admin/login")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    secure = site["settings"].model_copy(update={"console": site["settings"].console.model_copy(
        update={"secure_cookies": True})})
    web = create_console_app(secure, config_file=site["cfg"], app=site["app"], secret="t" * 48)
    with serve(web) as base:
        r = WebClient(base).get("/admin/login")
        assert "; secure" in r.headers["set-cookie"].lower()


def test_pages_do_not_show_another_persons_data(site):
    c = admin_client(site)
    alice, bob = site["alice"], site["bob"]
    page = c.get(f"/admin/people/{alice.id}").text
    assert ALICE in page and BOB not in page and str(bob.id) not in page
    export = c.get(f"/admin/people/{alice.id}/export?format=json")
    assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
    assert ALICE in export.text and BOB not in export.text and str(bob.id) not in export.text
    html = c.get(f"/admin/people/{alice.id}/export?format=html").text
    assert BOB not in html
    found = c.get("/admin/people?q=alice").text
    assert ALICE in found and BOB not in found
    # A consent id of Bob under Alice's URL is not found (ids are checked together).
    bob_consent = site["app"].state.consents(bob.id)[0].id
    r = c.get(f"/admin/people/{alice.id}/consents/{bob_consent}/edit")
    assert r.status_code == 404
    r = c.post(f"/admin/people/{alice.id}/consents/{bob_consent}/withdraw",
               {"csrf": c.csrf("/admin/"), "kind": ""})
    assert r.status_code == 404
    assert site["app"].state.consents(bob.id)[0].grants[0].withdrawn_at is None


# -- the pages' work -------------------------------------------------------------------------


def test_dashboard_dpia_and_languages(site):
    site["app"].state.record_failure(site["ref"], "cannot decode image (truncated)")
    c = admin_client(site)
    page = c.get("/admin/")
    assert page.status_code == 200
    assert "cannot decode image (truncated)" in page.text
    assert "photos" in page.text and "1 face(s) waiting for review" in page.text
    assert ALICE in page.text  # her publication grant ends within 30 days
    dutch = c.get("/admin/?lang=nl").text
    assert '<html lang="nl">' in dutch and "Overzicht" in dutch
    assert 'lang="nl"' in c.get("/admin/people").text  # remembered in the session
    dpia = c.get("/admin/dpia")
    assert dpia.status_code == 200 and dpia.headers["content-type"].startswith("text/markdown")


def test_add_person_consent_with_upload_correct_and_withdraw(site):
    app = site["app"]
    if not hasattr(app.vault, "put_document"):
        pytest.skip("Vault.put_document is not there yet (storage helper)")
    c = admin_client(site)
    r = c.post_form("/admin/people/new", {"display_name": "Carol Caracal", "birth_date": ""},
                    page_path="/admin/people/new")
    assert r.status_code == 303
    carol = next(s for s in app.state.subjects() if s.display_name == "Carol Caracal")
    pdf = b"%PDF-1.4 signed quitclaim of Carol Caracal\n%%EOF\n"
    form_page = f"/admin/people/{carol.id}/consents/new"
    token = c.csrf(form_page)
    r = c.post(f"/admin/people/{carol.id}/consents/new",
               {"csrf": token, "biometric": "on", "ch_website": "on",
                "publication_until": "2099-01-01"},
               files={"document": ("carol-caracal.pdf", pdf, "application/pdf")})
    assert r.status_code == 303, r.text[:800]
    consent = app.state.consents(carol.id)[0]
    assert consent.document_sha256 == hashlib.sha256(pdf).hexdigest()
    page = c.get(f"/admin/people/{carol.id}").text
    assert consent.document_sha256 in page
    doc_id = consent.document_ref.removeprefix("vault:")
    got = c.get(f"/admin/people/{carol.id}/documents/{doc_id}")
    assert got.content == pdf and "Caracal" not in got.headers["content-disposition"]
    # Another person's URL does not give Carol's document.
    assert c.get(f"/admin/people/{site['bob'].id}/documents/{doc_id}").status_code == 404

    edit = f"/admin/people/{carol.id}/consents/{consent.id}/edit"
    r = c.post(edit, {"csrf": c.csrf(edit), "until_publication": "2030-06-30",
                      "until_biometric": "", "ch_website": "on", "ch_print": "on"})
    assert r.status_code == 303
    pub = next(g for g in app.state.consents(carol.id)[0].grants
               if g.kind is GrantKind.PUBLICATION)
    assert pub.valid_until.date().isoformat() == "2030-06-30"
    assert set(pub.channels) == {"website", "print"}

    r = c.post(f"/admin/people/{carol.id}/consents/{consent.id}/withdraw",
               {"csrf": c.csrf(f"/admin/people/{carol.id}"), "kind": "biometric"})
    assert r.status_code == 303
    bio = next(g for g in app.state.consents(carol.id)[0].grants
               if g.kind is GrantKind.BIOMETRIC)
    assert bio.withdrawn_at is not None
    entries = [e for e in app.audit.entries() if e["subject_id"] == str(carol.id)]
    actions = [e["action"] for e in entries]
    for expected in ("subject.added", "document.stored", "consent.added", "consent.corrected",
                     "consent.withdrawn"):
        assert expected in actions
    # Every change is accountable to the admin who made it, not to a generic "admin".
    changes = ("subject.added", "document.stored", "consent.added", "consent.corrected",
               "consent.withdrawn")
    assert {e["actor"] for e in entries if e["action"] in changes} == {ADMIN}
    assert "Caracal" not in json.dumps(list(app.audit.entries()))


def test_consent_form_refusals_render_the_form_again(site):
    c = admin_client(site)
    sid = site["alice"].id
    page = f"/admin/people/{sid}/consents/new"
    r = c.post(page, {"csrf": c.csrf(page), "signed_at": "not-a-date", "biometric": "on"})
    assert r.status_code == 422 and "Not a valid date" in r.text
    r = c.post(page, {"csrf": c.csrf(page), "biometric": "on"})  # no document at all
    assert r.status_code == 422
    r = c.post(page, {"csrf": c.csrf(page), "biometric": "on"},
               files={"document": ("x.exe", b"MZ", "application/octet-stream")})
    assert r.status_code == 422
    assert len(site["app"].state.consents(sid)) == 1
    # A minor's consent without a guardian is refused before the document is stored.
    kid = people.add_subject(site["app"].state, site["app"].audit,
                             Subject(display_name="Kid Example", minor=True))
    page = f"/admin/people/{kid.id}/consents/new"
    r = c.post(page, {"csrf": c.csrf(page), "ch_website": "on"},
               files={"document": ("q.pdf", b"%PDF-1.4 x", "application/pdf")})
    assert r.status_code == 422 and "guardian" in r.text
    if hasattr(site["app"].vault, "documents"):
        assert site["app"].vault.documents(kid.id) == []


def test_review_crop_is_rendered_not_stored_and_confirm_names_the_face(site, tmp_path):
    c = admin_client(site)
    before = {p for p in tmp_path.rglob("*")}
    page = c.get("/admin/review").text
    assert "group.jpg" in page and ALICE in page
    img = re.search(r'<img src="(/admin/assets/thumb\?[^"]+)"', page).group(1).replace("&amp;", "&")
    crop = c.get(img)
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(crop.content)).size) <= 200
    new_files = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in new_files if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    r = c.post("/admin/review/decide", {"csrf": csrf_of(page), "face": f"photos:{site['ref'].id}#0",
                                        "subject": str(site["alice"].id), "action": "confirm"})
    assert r.status_code == 303
    faces = site["app"].state.faces("photos", site["ref"].id)
    assert faces[0].state is FaceState.CONFIRMED and faces[0].subject_id == site["alice"].id
    assert "Nothing to review" in c.get("/admin/review").text
    # Alice's page now shows the photo, rendered from the connector on request.
    person = c.get(f"/admin/people/{site['alice'].id}").text
    thumb = re.search(r'<img src="(/admin/assets/thumb\?[^"]+)"', person).group(1)
    got = c.get(thumb.replace("&amp;", "&"))
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (320, 240)
    assert c.get("/admin/assets/thumb?connector=photos&asset=nope.jpg").status_code == 404


def test_review_new_person_then_consent_confirms_the_face(site):
    if not hasattr(site["app"].vault, "put_document"):
        pytest.skip("Vault.put_document is not there yet (storage helper)")
    c = admin_client(site)
    face = f"photos:{site['ref'].id}#0"
    r = c.post("/admin/review/decide", {"csrf": c.csrf("/admin/review"), "face": face,
                                        "action": "new", "subject": ""})
    assert r.status_code == 303 and r.headers["location"].startswith("/admin/people/new?face=")
    r = c.post_form("/admin/people/new", {"display_name": "Dave Dugong", "face": face},
                    page_path=r.headers["location"])
    assert r.status_code == 303 and "face=" in r.headers["location"]
    form_page = r.headers["location"]
    token = c.csrf(form_page)
    r = c.post(form_page.split("?")[0], {"csrf": token, "ch_website": "on", "face": face},
               files={"document": ("q.png", b"\x89PNG\r\n\x1a\nxx", "image/png")})
    assert r.status_code == 303 and r.headers["location"] == "/admin/review"
    dave = next(s for s in site["app"].state.subjects() if s.display_name == "Dave Dugong")
    assert site["app"].state.faces("photos", site["ref"].id)[0].subject_id == dave.id


def test_erasure_needs_the_typed_name_and_gives_a_receipt(site):
    c = admin_client(site)
    bob = site["bob"]
    page = f"/admin/people/{bob.id}/erase"
    r = c.post(page, {"csrf": c.csrf(page), "confirm_name": "Bob"})
    assert r.status_code == 422 and site["app"].state.subject(bob.id) is not None
    r = c.post(page, {"csrf": c.csrf(page), "confirm_name": BOB.upper()})
    assert r.status_code == 303 and r.headers["location"] == f"/admin/erasures/{bob.id}"
    assert site["app"].state.subject(bob.id) is None
    assert c.get(f"/admin/people/{bob.id}").status_code == 404
    receipt = c.get(f"/admin/erasures/{bob.id}/receipt.json")
    assert receipt.status_code == 200 and receipt.json()["subject_id"] == str(bob.id)
    assert BOB not in receipt.text and BOB not in c.get(f"/admin/erasures/{bob.id}").text


def test_an_interrupted_erasure_is_resumed_from_its_page(site):
    from plugin import erasure

    c = admin_client(site)
    alice = site["alice"]
    erasure.start(site["app"], alice.id)  # as if the process died right after starting
    assert site["app"].state.subject(alice.id) is not None
    page = f"/admin/erasures/{alice.id}"
    r = c.post(f"{page}/resume", {"csrf": c.csrf(page)})
    assert r.status_code == 303 and r.headers["location"] == page
    assert site["app"].state.subject(alice.id) is None
    assert erasure.receipt_of(site["app"], alice.id).stage.value == "done"


def test_audit_viewer_filters_and_exports_json_lines(site):
    c = admin_client(site)
    sid = str(site["alice"].id)
    page = c.get(f"/admin/audit?action=consent.&subject_id={sid}").text
    assert "consent.added" in page and "subject.added" not in page
    export = c.get(f"/admin/audit/export.jsonl?subject_id={sid}")
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert lines and all(e["subject_id"] == sid for e in lines)
    assert {"seq", "mac", "prev_mac"} <= set(lines[0])
    assert [e["seq"] for e in lines] == sorted(e["seq"] for e in lines)
    assert c.get("/admin/audit?since=yesterday").status_code == 200
    assert any(e["action"] == "audit.exported" for e in site["app"].audit.entries())


# -- setup pieces ----------------------------------------------------------------------------


def test_catalogs_are_complete_in_both_languages():
    for path in sorted(i18n.MESSAGES.glob("*.en.json")):
        area = path.name.split(".")[0]
        en, nl = i18n.area_catalog(area, "en"), i18n.area_catalog(area, "nl")
        assert set(en) == set(nl), (area, set(en) ^ set(nl))
        assert all(v.strip() for v in nl.values())
    templates = Path(i18n.__file__).with_name("templates")
    used = set()
    for tpl in [*templates.glob("*.html"), *templates.glob("admin/*.html")]:
        used |= set(re.findall(r"""\bt\(["']([a-z0-9_.]+)["']""", tpl.read_text()))
    missing = {k for k in used if not k.endswith(".") and k not in i18n.catalog("nl")}
    assert not missing


def test_create_admin_cli_stores_an_argon2_hash(tmp_path):
    from plugin.cli import app as cli

    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    runner = CliRunner()
    r = runner.invoke(cli, ["-c", str(cfg), "console", "create-admin", "Officer",
                            "--password-stdin"], input="a very long password\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["-c", str(cfg), "console", "create-admin", "officer",
                            "--password-stdin"], input="short\n")
    assert r.exit_code == 2
    with App.open(cfg) as app:
        from plugin.web.accounts import Accounts, admin_users

        with app.state.engine.connect() as conn:
            row = conn.execute(admin_users.select()).one()
        assert row.username == "officer" and row.password_hash.startswith("$argon2id$")
        assert "a very long password" not in json.dumps(list(app.audit.entries()))
        accounts = Accounts(app.state)
        assert accounts.verify("officer", "a very long password") == "officer"
        assert accounts.verify("officer", "wrong") is None


def test_session_secret_from_env_or_a_private_file(tmp_path):
    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    settings = load(cfg)
    first = security.load_secret(settings, env={})
    path = settings.resolve(settings.console.secret_file)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert security.load_secret(settings, env={}) == first
    with_env = settings.model_copy(update={"console": settings.console.model_copy(
        update={"session_secret_env": "CONSOLE_SECRET"})})
    assert security.load_secret(with_env, env={"CONSOLE_SECRET": "z" * 40}) == "z" * 40
    from plugin.errors import ConfigError

    with pytest.raises(ConfigError):
        security.load_secret(with_env, env={"CONSOLE_SECRET": "short"})
