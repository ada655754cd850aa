"""`consentry resourcespace …`: ResourceSpace consent manager records as Consentry quitclaims.

A record is mapped to a subject only by an explicit admin decision (`link-consent`): names in
ResourceSpace are free text, and guessing who signed would be the opposite of consent. Imported
records give publication grants only; biometric consent is recorded in Consentry itself.
"""

from __future__ import annotations

from typing import Annotated

import typer

from plugin import people
from plugin.cli import _apply_consent_change, _guard, app, console, fail, open_app
from plugin.models import GrantKind

resourcespace_app = typer.Typer(no_args_is_help=True,
                                help="ResourceSpace: consent manager records and links.")
app.add_typer(resourcespace_app, name="resourcespace")

ConnectorOption = Annotated[str | None, typer.Option(
    help="the resourcespace connector to use (default: the only one)")]


def _connector(a, name: str | None):
    from connectors.resourcespace import ResourceSpaceConnector

    found = {n: c for n, c in a.connectors.items() if isinstance(c, ResourceSpaceConnector)}
    if name is not None and name not in found:
        raise fail(f"no resourcespace connector named {name!r}")
    if name is None and len(found) != 1:
        raise fail("configure exactly one resourcespace connector, or pass --connector"
                   if found else "no resourcespace connector configured")
    connector = found[name] if name is not None else next(iter(found.values()))
    if not connector.config.consent_manager:
        raise fail(f"[{connector.name}] consent_manager = false: enable it to use its records")
    return connector


def import_record(a, connector, consent_ref: int, subject_id, record=None) -> bool:
    """Bring Consentry in line with one record; True when a consent was added or replaced.
    A changed record (usage, expiry, guardian) withdraws the imported consent it replaces."""
    consent = connector.import_consent(consent_ref, subject_id, record)
    now = a.pipeline.clock()
    current = [c for c in a.state.consents(subject_id) if c.document_ref == consent.document_ref
               and any(g.withdrawn_at is None for g in c.grants)]
    if any(c.document_sha256 == consent.document_sha256 for c in current):
        kept = next(c for c in current if c.document_sha256 == consent.document_sha256)
        connector.map_consent(consent_ref, _link(subject_id, kept.id))
        return False
    for old in current:
        people.withdraw_consent(a.state, a.vault, a.audit, old, at=now, now=now,
                                kinds=[GrantKind.PUBLICATION])
    people.add_consent(a.state, a.audit, consent)
    connector.map_consent(consent_ref, _link(subject_id, consent.id))
    return True


def _link(subject_id, consent_id):
    from connectors.resourcespace import ConsentLink

    return ConsentLink(subject_id, consent_id)


@resourcespace_app.command("link-consent")
def link_consent(
    consent_id: Annotated[int, typer.Argument(help="ResourceSpace consent record id")],
    subject: Annotated[str, typer.Argument(help="Consentry subject (id or name)")],
    connector: ConnectorOption = None,
) -> None:
    """Map a consent manager record to a subject and import it as a publication consent."""
    with _guard(), open_app() as a:
        c = _connector(a, connector)
        who = a.state.resolve_subject(subject)
        record = c.consent_record(consent_id)
        if record.get("parent_guardian_name") and not who.minor and who.birth_date is None:
            console.print("[yellow]warning:[/yellow] the record was signed by a guardian: "
                          "register the subject as a minor (--minor or --birth-date)")
        import_record(a, c, consent_id, who.id, record)
        console.print(f"consent record {consent_id} → subject {who.id} (publication only; "
                      "biometric consent must be recorded with `consentry consents add`)")
        code = _apply_consent_change(a, who.id, reason="resourcespace consent linked")
    raise typer.Exit(code)


@resourcespace_app.command("unlink-consent")
def unlink_consent(
    consent_id: Annotated[int, typer.Argument(help="ResourceSpace consent record id")],
    connector: ConnectorOption = None,
) -> None:
    """Drop a mapping: the imported consent is withdrawn and the record unlinked everywhere."""
    with _guard(), open_app() as a:
        c = _connector(a, connector)
        link = c.consent_mapping().get(consent_id)
        if link is None:
            raise fail(f"consent record {consent_id} is not linked to a subject")
        now = a.pipeline.clock()
        for consent in a.state.consents(link.subject_id):
            if consent.id == link.consent_id:
                people.withdraw_consent(a.state, a.vault, a.audit, consent, at=now, now=now,
                                        kinds=[GrantKind.PUBLICATION])
        c.map_consent(consent_id, None)
        code = _apply_consent_change(a, link.subject_id, reason="resourcespace consent unlinked")
    raise typer.Exit(code)


@resourcespace_app.command("sync-consents")
def sync_consents(connector: ConnectorOption = None) -> None:
    """Re-read every mapped record (for cron): changed ones are re-imported, deleted ones
    withdrawn, and the photos of the people concerned re-labelled."""
    from connectors.resourcespace_api import RsCallError

    with _guard(), open_app() as a:
        c = _connector(a, connector)
        changed = set()
        now = a.pipeline.clock()
        for ref, link in c.consent_mapping().items():
            try:
                record = c.consent_record(ref)
            except RsCallError:
                for consent in a.state.consents(link.subject_id):
                    if consent.id == link.consent_id:
                        people.withdraw_consent(a.state, a.vault, a.audit, consent, at=now,
                                                now=now, kinds=[GrantKind.PUBLICATION])
                c.map_consent(ref, None)
                changed.add(link.subject_id)
                continue
            if import_record(a, c, ref, link.subject_id, record):
                changed.add(link.subject_id)
        code = 0
        for subject_id in sorted(changed, key=str):
            code = max(code, _apply_consent_change(a, subject_id, reason="resourcespace sync"))
        console.print(f"{len(changed)} subject(s) changed")
    raise typer.Exit(code)


@resourcespace_app.command("scan")
def scan(
    full: Annotated[bool, typer.Option(
        "--full", help="walk the whole library again (retries resources that failed)")] = False,
    connector: Annotated[str | None, typer.Option(help="the resourcespace connector")] = None,
) -> None:
    """Analyse what the resource log shows as new since the last run, and keep the log cursor.

    Resources that failed are not in the log again until they change: `--full` re-offers
    every resource, and the pipeline still skips those already done."""
    from connectors.resourcespace import ResourceSpaceConnector
    from plugin.cli import _run_with_progress, summary

    with _guard(), open_app() as a:
        names = [n for n, c in a.connectors.items() if isinstance(c, ResourceSpaceConnector)
                 and (connector is None or n == connector)]
        if not names:
            raise fail("no matching resourcespace connector configured")
        results = []
        for name in names:
            if full:
                a.state.set_cursor(name, None)
            results += _run_with_progress(
                f"scan {name}", None,
                lambda tick, name=name: a.pipeline.scan(name, on_result=tick))
        code = summary(results, title="scan")
    raise typer.Exit(code)
