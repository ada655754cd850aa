"""Expiry alerts: the sweep reports each consent that runs out within `portal.alert_days` once,
by e-mail to `mail.alerts_to` (through a local SMTP sink) and on the dashboard list; a mail
failure records nothing, so the next sweep tries again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from plugin import alerts, people
from plugin.alerts import ExpiryAlerts
from plugin.app import App
from plugin.cli import app as cli_app
from plugin.mailer import Mailer
from plugin.models import Consent, Grant, GrantKind, Subject
from plugin.settings import MailSettings
from plugin.setup import initialise
from plugin.sweep import sweep
from tests.fakes.smtp import FakeSmtpServer

T0 = datetime(2026, 11, 26, 6, tzinfo=UTC)
DAY = timedelta(days=1)


def add(a, name, *, pub_end, bio_end=None):
    s = people.add_subject(a.state, a.audit, Subject(display_name=name))
    grants = [Grant(kind=GrantKind.PUBLICATION, channels=("internal",),
                    valid_from=T0 - 30 * DAY, valid_until=pub_end)]
    if bio_end:
        grants.append(Grant(kind=GrantKind.BIOMETRIC, valid_from=T0 - 30 * DAY,
                            valid_until=bio_end))
    c = Consent(subject_id=s.id, document_ref="q.pdf", document_sha256="0" * 64,
                signed_at=T0 - 30 * DAY, grants=tuple(grants))
    people.add_consent(a.state, a.audit, c)
    return c


def mail_settings(port):
    return MailSettings.model_validate({"host": "127.0.0.1", "port": port,
                                        "from": "consentry@example.org", "starttls": False,
                                        "alerts_to": ["dpo@example.org"]})


def test_sweep_alerts_once_per_consent(tmp_path):
    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    clock = {"now": T0}
    with FakeSmtpServer() as smtp, App.open(cfg, clock=lambda: clock["now"]) as a:
        soon = add(a, "Jane Doe", pub_end=T0 + 10 * DAY, bio_end=T0 + 20 * DAY)
        later = add(a, "John Roe", pub_end=T0 + 90 * DAY)
        add(a, "Open Ended", pub_end=None)
        box = ExpiryAlerts(a.state, a.audit, Mailer(mail_settings(smtp.port)), days=30,
                           to=["dpo@example.org"], console_url="https://photos.example.org")
        first = sweep(a.pipeline, alerts=box)
        assert first.alerts_sent == 1
        [m] = smtp.messages
        assert m.recipients == ["dpo@example.org"]
        assert str(soon.id) in m.body and "publication (internal) ends 2026-12-06" in m.body
        assert "biometric ends 2026-12-16" in m.body  # one message per consent, all its grants
        assert "Jane Doe" not in m.body and "Jane Doe" not in m.message["Subject"]
        assert "https://photos.example.org/" in m.body

        # Next day: nothing new, no mail.
        clock["now"] = T0 + DAY
        assert sweep(a.pipeline, alerts=box).alerts_sent == 0
        assert len(smtp.messages) == 1

        # Two months later the other consent comes within reach: only it is reported.
        clock["now"] = T0 + 65 * DAY
        assert sweep(a.pipeline, alerts=box).alerts_sent == 1
        assert str(later.id) in smtp.messages[-1].body
        assert str(soon.id) not in smtp.messages[-1].body

        listed = alerts.due(a.state, now=T0 + 2 * DAY, days=30)
        assert [d.consent_id for d in listed] == [soon.id]
        assert listed[0].alerted_at == T0 and listed[0].mailed
        assert listed[0].ends == T0 + 10 * DAY
        entries = [e for e in a.audit.entries() if e["action"] == "consents.expiry_alert"]
        assert len(entries) == 2


def test_mail_failure_is_retried_at_the_next_sweep(tmp_path):
    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    with FakeSmtpServer() as smtp, App.open(cfg, clock=lambda: T0) as a:
        consent = add(a, "Jane Doe", pub_end=T0 + 5 * DAY)
        box = ExpiryAlerts(a.state, a.audit, Mailer(mail_settings(smtp.port)), days=30,
                           to=["dpo@example.org"])
        smtp.refuse("451 4.3.0 try later")
        run = box.run(T0)
        assert run.new == () and run.error and "refused" in run.error
        assert alerts.due(a.state, now=T0, days=30)[0].alerted_at is None
        smtp.refuse(None)
        assert [d.consent_id for d in box.run(T0).new] == [consent.id]
        assert box.run(T0).new == ()
        assert len(smtp.messages) == 1


def test_without_mail_the_dashboard_list_is_the_channel(tmp_path):
    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    with App.open(cfg, clock=lambda: T0) as a:
        add(a, "Jane Doe", pub_end=T0 + 5 * DAY)
        run = ExpiryAlerts.from_app(a).run(T0)
        assert len(run.new) == 1 and not run.mailed
        [d] = alerts.due(a.state, now=T0, days=30)
        assert d.alerted_at == T0 and not d.mailed
        assert ExpiryAlerts.from_app(a).run(T0).new == ()


def test_cli_sweep_mails_the_admin(tmp_path, monkeypatch):
    cfg = tmp_path / "consentry.toml"
    initialise(cfg)
    now = datetime.now(UTC)
    with App.open(cfg) as a:
        s = people.add_subject(a.state, a.audit, Subject(display_name="Jane Doe"))
        people.add_consent(a.state, a.audit, Consent(
            subject_id=s.id, document_ref="q.pdf", document_sha256="0" * 64, signed_at=now,
            grants=(Grant(kind=GrantKind.PUBLICATION, channels=("internal",),
                          valid_from=now - DAY, valid_until=now + 3 * DAY),)))
    with FakeSmtpServer() as smtp:
        for key, value in {"HOST": "127.0.0.1", "PORT": str(smtp.port),
                           "FROM": "consentry@example.org", "STARTTLS": "false",
                           "ALERTS_TO": '["dpo@example.org"]'}.items():
            monkeypatch.setenv(f"CONSENTRY_MAIL__{key}", value)
        runner = CliRunner()
        for _ in range(2):
            r = runner.invoke(cli_app, ["--config", str(cfg), "sweep"])
            assert r.exit_code == 0, r.output
        assert len(smtp.messages) == 1
        assert smtp.messages[0].recipients == ["dpo@example.org"]
