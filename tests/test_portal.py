"""The consent portal over real HTTP (uvicorn on 127.0.0.1): invitation links that are signed,
expiring and single-use; CSRF; selfies checked with the real face engine; separate biometric
consent; the guardian flow; withdrawal through the receipt link; mail through a local SMTP sink;
`consentry invite`; the admin's invitation page."""

from __future__ import annotations

import json
import re
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from itsdangerous import TimestampSigner
from typer.testing import CliRunner

from plugin import invitations, people
from plugin.app import App
from plugin.cli import app as cli_app
from plugin.mailer import Mailer, MailError
from plugin.models import Consent, Grant, GrantKind, Subject
from plugin.settings import MailSettings, load
from plugin.setup import initialise
from tests.conftest import CountingEngine
from tests.fakes.smtp import FakeSmtpServer
from tests.web_client import WebClient, csrf_of, serve

ONE_FACE = "people/Barack_Obama/ref-1.jpg"
TWO_FACES = "library/events/2024-summit/IMG_2041.jpg"   # Obama and Biden
NO_FACE = "library/misc/IMG_7001.jpg"                   # horses
MESSAGES = Path(__file__).resolve().parents[1] / "plugin" / "web" / "messages"


@pytest.fixture
def portal(tmp_path, engine):
    from plugin.web.app import create_console_app

    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    settings = load(cfg)
    counting = CountingEngine(engine)
    with App(settings, config_file=cfg, engine=counting) as a:
        web = create_console_app(settings, config_file=cfg, app=a, secret="s" * 40)
        with serve(web) as base:
            yield SimpleNamespace(app=a, web=web, base=base, cfg=cfg, engine=counting,
                                  client=WebClient(base))


def person(a, name="Jane Doe", **kw) -> Subject:
    return people.add_subject(a.state, a.audit, Subject(display_name=name, **kw))


def invite(a, subject, **kw) -> invitations.Created:
    kw.setdefault("channels", ("internal", "intranet", "website"))
    return invitations.create_invitation(a, subject, **kw)


def sign(c: WebClient, path: str, *, channels=(), biometric="no", name="Jane Doe",
         confirm=True, selfie: Path | None = None, csrf: str | None = "page", extra=None):
    page = c.get(path)
    assert page.status_code == 200, page.text[:300]
    data: list[tuple[str, str]] = [("channel", ch) for ch in channels]
    data += [("biometric", biometric), ("signed_name", name)]
    if confirm:
        data.append(("confirm", "yes"))
    if csrf == "page":
        data.append(("csrf", csrf_of(page.text)))
    elif csrf:
        data.append(("csrf", csrf))
    data += list((extra or {}).items())
    files = {"selfie": (selfie.name, selfie.read_bytes(), "image/jpeg")} if selfie else \
        {"selfie": ("", b"", "application/octet-stream")}
    return c.post(path, data=data, files=files)


def consents_of(a, subject):
    return a.state.consents(subject.id)


# -- links ----------------------------------------------------------------------------------
def test_happy_path_records_consent_enrolls_selfie_and_gives_a_withdrawal_link(portal,
                                                                              demo_data):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    page = c.get(created.path)
    assert page.status_code == 200
    assert "Jane Doe" in page.text and "Our public website" in page.text
    assert "What face recognition means" in page.text and "How to withdraw" in page.text

    r = sign(c, created.path, channels=("internal", "website"), biometric="yes",
             selfie=demo_data / ONE_FACE)
    assert r.status_code == 303, r.text[:500]
    receipt_path = r.headers["location"]
    assert receipt_path.startswith("/p/r/")

    [consent] = consents_of(a, jane)
    kinds = {g.kind: g for g in consent.grants}
    assert kinds[GrantKind.PUBLICATION].channels == ("internal", "website")
    assert GrantKind.BIOMETRIC in kinds
    assert consent.signed_by == "Jane Doe" and not consent.guardian
    assert consent.document_ref == f"portal:invitation:{created.invitation.id}"
    inv = invitations.get(a.state, created.invitation.id)
    assert inv.used_at is not None and inv.consent_id == consent.id
    assert inv.request_sha256 == consent.document_sha256
    assert a.vault.templates(jane.id).shape[0] == 1
    # The signed request itself is kept encrypted under Jane's key (erasure destroys it).
    [doc] = a.vault.documents(jane.id)
    assert doc["sha256"] == consent.document_sha256 and doc["media_type"] == "application/json"
    signed = json.loads(a.vault.document(jane.id, doc["id"])[0])
    assert signed["given"] == {"channels": ["internal", "website"], "biometric": True,
                               "reference_photo": True}
    assert signed["signed_by"] == "Jane Doe" and signed["lang"] == "en"
    # The selfie's transient file is gone (and the upload never went to a spool file).
    for tmp in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        assert not list(tmp.glob("consentry-selfie-*")) if tmp.is_dir() else True

    receipt = c.get(receipt_path)
    assert receipt.status_code == 200
    assert consent.document_sha256 in receipt.text
    assert "face template" in receipt.text  # "the photo itself was not kept"
    withdraw_url = re.search(r'id="withdraw-link" href="([^"]+)"', receipt.text).group(1)
    assert withdraw_url.startswith(portal.base + "/p/w/")  # absolute: it is to be kept
    actions = [e["action"] for e in a.audit.entries()]
    assert {"invitation.created", "invitation.answered", "consent.added",
            "subject.enrolled"} <= set(actions)


def test_reused_link_is_refused_with_a_clear_page(portal):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    token = csrf_of(c.get(created.path).text)
    assert sign(c, created.path, channels=("internal",)).status_code == 303
    again = c.get(created.path)
    assert again.status_code == 410
    assert "already been used" in again.text
    # A second POST (e.g. a second tab) is refused too, and records nothing more.
    r = c.post(created.path, data={"channel": "internal", "signed_name": "x", "confirm": "yes",
                                   "csrf": token})
    assert r.status_code == 410
    assert len(consents_of(a, jane)) == 1


def test_tampered_link_is_refused(portal):
    a, c = portal.app, portal.client
    created = invite(a, person(a))
    token = created.token
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    for path in (invitations.invitation_path(tampered), "/p/i/not-a-token",
                 invitations.invitation_path(invitations.Links(b"k" * 32)
                                             .invitation_token(created.invitation.id))):
        r = c.get(path)
        assert r.status_code == 404, path
        assert "This link is not valid" in r.text


def test_expired_link_is_refused(portal, monkeypatch):
    a, c = portal.app, portal.client
    jane = person(a)
    # Expired by the database (created 20 days ago, portal.invitation_days = 14) ...
    old = invite(a, jane, now=datetime.now(UTC) - timedelta(days=20))
    r = c.get(old.path)
    assert r.status_code == 410 and "This link has expired" in r.text
    # ... and by the signature's own timestamp.
    fresh = invite(a, jane)
    real = TimestampSigner.get_timestamp
    monkeypatch.setattr(TimestampSigner, "get_timestamp",
                        lambda self: int(time.time()) - 15 * 86400)
    stale_token = invitations.links_for(a).invitation_token(fresh.invitation.id)
    monkeypatch.setattr(TimestampSigner, "get_timestamp", real)
    r = c.get(invitations.invitation_path(stale_token))
    assert r.status_code == 410 and "This link has expired" in r.text
    assert consents_of(a, jane) == []


def test_erased_person_link_says_the_request_no_longer_exists(portal):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    with a.state.begin() as conn:
        a.state.delete_subject(jane.id, conn)
    r = c.get(created.path)
    assert r.status_code == 410 and "no longer exists" in r.text


def test_post_without_csrf_token_is_refused_and_records_nothing(portal):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    for csrf in (None, "forged-token"):
        r = sign(c, created.path, channels=("internal",), csrf=csrf)
        assert r.status_code == 403
        assert "The form expired or was sent from elsewhere" in r.text
    assert consents_of(a, jane) == []
    assert invitations.get(a.state, created.invitation.id).used_at is None
    # A fresh client (no session at all) is refused as well.
    r = WebClient(portal.base).post(created.path, data={"channel": "internal",
                                                        "signed_name": "x", "confirm": "yes"})
    assert r.status_code == 403


@pytest.mark.parametrize(("photo", "found"), [(NO_FACE, 0), (TWO_FACES, 2)])
def test_selfie_without_exactly_one_face_is_refused(portal, demo_data, photo, found):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    r = sign(c, created.path, channels=("internal",), biometric="yes",
             selfie=demo_data / photo)
    assert r.status_code == 400
    assert f"exactly one face; we found {found}" in r.text
    # Nothing recorded, the link still works, the choices are kept in the form.
    assert consents_of(a, jane) == []
    assert a.vault.subjects() == []
    assert invitations.get(a.state, created.invitation.id).used_at is None
    assert 'value="internal" id="ch-internal"\n               checked' in r.text or \
        re.search(r'id="ch-internal"\s+checked', r.text)


def test_selfie_is_never_analysed_without_biometric_consent(portal, demo_data):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    before = portal.engine.detect_calls
    r = sign(c, created.path, channels=("internal",), biometric="no",
             selfie=demo_data / ONE_FACE)
    assert r.status_code == 303
    assert portal.engine.detect_calls == before
    assert a.vault.subjects() == []
    [consent] = consents_of(a, jane)
    assert [g.kind for g in consent.grants] == [GrantKind.PUBLICATION]
    receipt = c.get(r.headers["location"])
    assert "discarded without being analysed" in receipt.text


def test_incomplete_signature_is_refused(portal):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    assert sign(c, created.path, channels=("internal",), name="  ").status_code == 400
    r = sign(c, created.path, channels=("internal",), confirm=False)
    assert r.status_code == 400 and "tick the box" in r.text
    r = sign(c, created.path, channels=("internal", "advertising"))  # not asked
    assert r.status_code == 303
    [consent] = consents_of(a, jane)
    assert consent.grants[0].channels == ("internal",)


def test_refusing_everything_records_no_consent(portal):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    r = sign(c, created.path, channels=(), biometric="no")
    assert r.status_code == 200
    assert "You did not grant anything" in r.text
    assert consents_of(a, jane) == []
    inv = invitations.get(a.state, created.invitation.id)
    assert inv.used_at is not None and inv.consent_id is None and inv.request_sha256


def test_withdrawal_link_withdraws_through_the_cli_path(portal, demo_data):
    a, c = portal.app, portal.client
    jane = person(a)
    created = invite(a, jane)
    r = sign(c, created.path, channels=("internal",), biometric="yes",
             selfie=demo_data / ONE_FACE)
    receipt = c.get(r.headers["location"])
    withdraw_url = re.search(r'id="withdraw-link" href="([^"]+)"', receipt.text).group(1)
    withdraw_path = withdraw_url[len(portal.base):]
    assert a.vault.subjects() == [jane.id]

    other = WebClient(portal.base)  # the link works from any browser, later
    page = other.get(withdraw_path)
    assert page.status_code == 200 and "Withdraw your consent" in page.text
    r = other.post(withdraw_path, data={"csrf": csrf_of(page.text)})
    assert r.status_code == 400  # the confirmation box is required
    r = other.post(withdraw_path, data={"csrf": csrf_of(page.text), "confirm": "yes"})
    assert r.status_code == 200 and "Your consent is withdrawn" in r.text
    assert "Your face template has been destroyed" in r.text
    [consent] = consents_of(a, jane)
    assert all(g.withdrawn_at is not None for g in consent.grants)
    assert a.vault.subjects() == []
    actions = [e["action"] for e in a.audit.entries()]
    assert "consent.withdrawn" in actions and "templates.destroyed" in actions
    assert "portal.withdrawal" in actions
    # What the person did through the portal is theirs in the audit log, not an admin's.
    by = {e["action"]: e["actor"] for e in a.audit.entries() if e["subject_id"] == str(jane.id)}
    assert by["consent.added"] == by["subject.enrolled"] == by["consent.withdrawn"] == "subject"
    again = other.get(withdraw_path)
    assert "already been withdrawn" in again.text
    bad = other.get(withdraw_path[:-4] + "AAAA")
    assert bad.status_code == 404


def test_guardian_signs_for_a_minor(portal):
    a, c = portal.app, portal.client
    ana = person(a, "Ana Example", birth_date=date.today() - timedelta(days=365 * 10))
    created = invite(a, ana)
    assert created.invitation.guardian
    page = c.get(created.path)
    assert "parent or legal guardian of Ana Example" in page.text
    r = sign(c, created.path, channels=("internal",), name="Maria Example")
    assert r.status_code == 400 and "legal guardian" in r.text
    r = sign(c, created.path, channels=("internal",), name="Maria Example",
             extra={"guardian_confirm": "yes"})
    assert r.status_code == 303
    [consent] = consents_of(a, ana)
    assert consent.guardian and consent.signed_by == "Maria Example"
    receipt = c.get(r.headers["location"])
    assert "Signed as parent or legal guardian" in receipt.text


def test_dutch_is_complete_and_is_the_invitations_language(portal):
    en = json.loads((MESSAGES / "portal.en.json").read_text(encoding="utf-8"))
    nl = json.loads((MESSAGES / "portal.nl.json").read_text(encoding="utf-8"))
    assert set(en) == set(nl)
    assert all(nl[k].strip() for k in nl)
    assert all(k.startswith("portal.") for k in en)
    a, c = portal.app, portal.client
    created = invite(a, person(a), lang="nl")
    page = c.get(created.path)
    assert 'lang="nl"' in page.text and "Wat gezichtsherkenning betekent" in page.text
    english = c.get(created.path + "?lang=en")
    assert "What face recognition means" in english.text


# -- mail and CLI ---------------------------------------------------------------------------
def test_mailer_talks_smtp_and_reports_failures(monkeypatch):
    with FakeSmtpServer() as smtp:
        settings = MailSettings.model_validate({
            "host": "127.0.0.1", "port": smtp.port, "from": "consent@example.org",
            "starttls": False, "user": "mailer", "password_env": "TEST_SMTP_PASSWORD"})
        with pytest.raises(MailError, match="TEST_SMTP_PASSWORD"):
            Mailer(settings, env={}).send("jane@example.org", "s", "b")
        mailer = Mailer(settings, env={"TEST_SMTP_PASSWORD": "pw"})
        mailer.send("jane@example.org", "Hello", "Body text")
        [m] = smtp.messages
        assert m.recipients == ["jane@example.org"] and m.message["Subject"] == "Hello"
        assert "Body text" in m.body and smtp.logins == [("mailer", "pw")]
        smtp.refuse("554 5.7.1 rejected")
        with pytest.raises(MailError, match="refused"):
            mailer.send("jane@example.org", "Hello", "Body")
        port = smtp.port
    closed = MailSettings.model_validate({"host": "127.0.0.1", "port": port,
                                          "from": "a@example.org", "starttls": False,
                                          "timeout": 2})
    with pytest.raises(MailError, match="unreachable"):
        Mailer(closed).send("x@example.org", "s", "b")
    assert not Mailer(MailSettings()).configured


def test_cli_invite_prints_the_link_and_mails_it(tmp_path, monkeypatch):
    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    runner = CliRunner()
    with App.open(cfg) as a:
        person(a)
    r = runner.invoke(cli_app, ["--config", str(cfg), "invite", "Jane Doe",
                                "--channels", "internal,website", "--no-biometric"])
    assert r.exit_code == 0, r.output
    assert "/p/i/" in r.output and "works once" in r.output
    r = runner.invoke(cli_app, ["--config", str(cfg), "invite", "Jane Doe",
                                "--channels", "nowhere"])
    assert r.exit_code == 2 and "unknown channel" in r.output
    with FakeSmtpServer() as smtp:
        for key, value in {"HOST": "127.0.0.1", "PORT": str(smtp.port),
                           "FROM": "consent@example.org", "STARTTLS": "false"}.items():
            monkeypatch.setenv(f"CONSENTRY_MAIL__{key}", value)
        monkeypatch.setenv("CONSENTRY_CONSOLE__PUBLIC_URL", "https://photos.example.org")
        r = runner.invoke(cli_app, ["--config", str(cfg), "invite", "Jane Doe", "--lang", "nl",
                                    "--email", "jane@example.org"])
        assert r.exit_code == 0, r.output
        [m] = smtp.messages
    link = re.search(r"https://photos\.example\.org/p/i/\S+", m.body).group(0)
    assert link in r.output.replace("\n", "")
    assert m.message["Subject"] == "Uw toestemming voor het gebruik van foto's"
    assert "jane@example.org" not in json.dumps(list(_audit(cfg)))


def _audit(cfg):
    with App.open(cfg) as a:
        yield from a.audit.entries()


# -- admin side -----------------------------------------------------------------------------
def test_admin_creates_an_invitation_on_the_person_page(portal):
    a, c = portal.app, portal.client
    jane = person(a)
    path = f"/p/admin/invite/{jane.id}"
    r = c.get(path)
    assert r.status_code in (302, 303, 307) and "/admin/login" in r.headers["location"]
    portal.web.state.console.accounts.create("admin", "a-long-password-123")
    c.login("admin", "a-long-password-123")
    page = c.get(path)
    assert page.status_code == 200 and "Consent invitation for Jane Doe" in page.text
    r = c.post(path, data={"channel": ["internal", "social"], "biometric": "yes",
                           "days": "365", "lang": "en", "csrf": csrf_of(page.text)})
    assert r.status_code == 200, r.text[:500]
    link = re.search(r'id="invite-link" value="([^"]+)"', r.text).group(1)
    assert link.startswith(portal.base + "/p/i/")
    [inv] = invitations.of_subject(a.state, jane.id)
    assert inv.channels == ("internal", "social") and inv.valid_days == 365
    assert inv.created_by == "admin"
    person_page = WebClient(portal.base).get(link[len(portal.base):])
    assert person_page.status_code == 200
    assert c.post(path, data={"channel": "internal"}).status_code == 403  # no CSRF token
    assert c.get(f"/p/admin/invite/{uuid.uuid4()}").status_code == 404
    expiring = c.get("/p/admin/expiring")
    assert expiring.status_code == 200


def test_invitation_needs_a_question_and_known_channels(portal):
    a = portal.app
    jane = person(a)
    from plugin.errors import ConsentError

    with pytest.raises(ConsentError, match="at least one"):
        invite(a, jane, channels=(), biometric=False)
    with pytest.raises(ConsentError, match="unknown channel"):
        invite(a, jane, channels=("billboards",))
    people.add_consent(a.state, a.audit, Consent(
        subject_id=jane.id, document_ref="q.pdf", document_sha256="0" * 64,
        signed_at=datetime.now(UTC), grants=(Grant(kind=GrantKind.BIOMETRIC,
                                                   valid_from=datetime.now(UTC)),)))
    assert invite(a, jane, channels=("internal",)).invitation.channels == ("internal",)


def test_admin_page_emails_the_link(tmp_path, engine, monkeypatch):
    from plugin.web.app import create_console_app

    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    with FakeSmtpServer() as smtp:
        for key, value in {"MAIL__HOST": "127.0.0.1", "MAIL__PORT": str(smtp.port),
                           "MAIL__FROM": "consent@example.org", "MAIL__STARTTLS": "false",
                           "CONSOLE__PUBLIC_URL": "https://consent.example.org"}.items():
            monkeypatch.setenv(f"CONSENTRY_{key}", value)
        settings = load(cfg)
        with App(settings, config_file=cfg, engine=engine) as a:
            jane = person(a)
            web = create_console_app(settings, config_file=cfg, app=a, secret="m" * 40)
            web.state.console.accounts.create("admin", "a-long-password-123")
            with serve(web) as base:
                c = WebClient(base)
                c.login("admin", "a-long-password-123")
                path = f"/p/admin/invite/{jane.id}"
                page = c.get(path)
                assert 'id="email"' in page.text
                r = c.post(path, data={"channel": "internal", "lang": "en",
                                       "email": "jane@example.org", "csrf": csrf_of(page.text)})
                assert r.status_code == 200 and "The link was sent by e-mail" in r.text
                [m] = smtp.messages
                assert m.recipients == ["jane@example.org"]
                link = re.search(r'id="invite-link" value="([^"]+)"', r.text).group(1)
                assert link.startswith("https://consent.example.org/p/i/") and link in m.body
                smtp.refuse("554 5.7.1 rejected")
                r = c.post(path, data={"channel": "internal", "lang": "en",
                                       "email": "jane@example.org", "csrf": csrf_of(page.text)})
                assert r.status_code == 200 and "could not be sent" in r.text
                assert len(invitations.of_subject(a.state, jane.id)) == 2
            entries = list(a.audit.entries())
            assert "jane@example.org" not in json.dumps(entries)


def test_invitations_and_alerts_on_postgresql(tmp_path, postgres_url, monkeypatch):
    """The portal's tables and its single-use claim work on PostgreSQL (distributed mode)."""
    from plugin.alerts import ExpiryAlerts

    monkeypatch.setenv("CONSENTRY_STORE__STATE_URL", postgres_url)
    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    with App.open(cfg) as a:
        jane = person(a)
        created = invite(a, jane, valid_days=10)
        answer = invitations.Answer(channels=("internal",), biometric=False,
                                    signed_name="Jane Doe", confirmed=True)
        receipt = invitations.accept(a, created.token, answer)
        assert receipt.consent is not None and receipt.withdraw_token
        with pytest.raises(invitations.InvitationError) as err:
            invitations.accept(a, created.token, answer)
        assert err.value.reason == "used"
        run = ExpiryAlerts.from_app(a).run(datetime.now(UTC))
        assert [d.consent_id for d in run.new] == [receipt.consent.id]
        assert ExpiryAlerts.from_app(a).run(datetime.now(UTC)).new == ()
        assert not invitations.withdraw(a, receipt.withdraw_token).already
        assert invitations.withdraw(a, receipt.withdraw_token).already


def test_erasure_removes_the_persons_invitations(portal):
    from plugin import erasure
    from plugin.links import StateLinks

    a, c = portal.app, portal.client
    jane, john = person(a), person(a, "John Roe")
    gone, kept = invite(a, jane), invite(a, john)
    # Links left by a platform connector that has since been removed from the settings.
    links = StateLinks.of(a.state)
    links.set_person("old-immich", str(jane.id), "person-1")
    links.set_person("old-immich", str(john.id), "person-2")
    erasure.erase(a, jane.id)
    assert links.people("old-immich") == {str(john.id): "person-2"}
    assert invitations.get(a.state, gone.invitation.id) is None
    assert invitations.get(a.state, kept.invitation.id) is not None
    assert c.get(gone.path).status_code in (404, 410)
    assert c.get(kept.path).status_code == 200
