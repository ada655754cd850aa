"""The `consentry` command. Exit codes scripts can trust: 0 all done, 1 some assets failed (or
the audit chain is broken), 2 usage or configuration error.

Typer (on Click) gives the command tree and help; rich gives the progress bar and tables.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections import Counter
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from plugin import people
from plugin.errors import AuditChainError, AuthError, ConsentryError, UnavailableError
from plugin.models import Consent, Grant, GrantKind, Subject
from plugin.pipeline import AssetResult, Outcome

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
subjects_app = typer.Typer(no_args_is_help=True, help="People: register, list, enroll.")
consents_app = typer.Typer(no_args_is_help=True, help="Quitclaims and their grants.")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
app.add_typer(subjects_app, name="subjects")
app.add_typer(consents_app, name="consents")
app.add_typer(audit_app, name="audit")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="CONSENTRY_CONFIG",
                 help="settings file [default: ./consentry.toml]"),
]


class _State:
    config: Path = Path("consentry.toml")


_state = _State()


@app.callback()
def _main(config: ConfigOption = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _state.config = config or Path("consentry.toml")


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def open_app(**kwargs):
    from plugin.app import App

    return App.open(_state.config, **kwargs)


def parse_when(value: str | None, *, field: str) -> datetime | None:
    """YYYY-MM-DD (midnight UTC) or an ISO date-time (UTC when no zone is given)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError as err:
        raise fail(f"{field}: {value!r} is not a date (YYYY-MM-DD) or ISO date-time") from err
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# -- init --------------------------------------------------------------------------------
@app.command()
def init(
    photos: Annotated[Path | None, typer.Option(help="library folder to connect")] = None,
    write_mode: Annotated[str, typer.Option(help="embed | sidecar")] = "embed",
) -> None:
    """Create the settings file, the key (0600), the vault and the state database."""
    from plugin.setup import initialise

    try:
        created = initialise(_state.config, photos=photos, write_mode=write_mode)
    except ConsentryError as err:
        raise fail(str(err)) from err
    for path in created:
        console.print(f"created {path}")
    console.print("Keep the key file safe: without it the vault and the audit chain are lost.")


# -- subjects ----------------------------------------------------------------------------
@subjects_app.command("add")
def subjects_add(
    name: Annotated[str, typer.Argument(help="display name as people write it")],
    birth_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD")] = None,
    minor: Annotated[bool, typer.Option(help="the person is a minor")] = False,
) -> None:
    """Register a person (no right to process follows from this)."""
    with _guard(), open_app() as a:
        subject = Subject(display_name=name, minor=minor,
                          birth_date=date.fromisoformat(birth_date) if birth_date else None)
        people.add_subject(a.state, a.audit, subject)
        console.print(str(subject.id))


@subjects_app.command("list")
def subjects_list() -> None:
    """Subjects with their consent state now."""
    from plugin.consent import standing

    with _guard(), open_app() as a:
        now = a.pipeline.clock()
        consents = a.state.consents_by_subject()
        templates = set(a.vault.subjects())
        table = Table("id", "name", "biometric", "publication", "templates")
        for s in a.state.subjects():
            st = standing(s, consents.get(s.id, []), now)
            pub = ",".join(sorted({c for _, g in st.publication for c in g.channels}))
            table.add_row(str(s.id), s.display_name, "active" if st.biometric_active else "-",
                          pub or (st.ended_status.value if st.ended_status else "-"),
                          "yes" if s.id in templates else "-")
        console.print(table)


@subjects_app.command("enroll")
def subjects_enroll(
    subject: Annotated[str, typer.Argument(help="subject id or exact name")],
    photos: Annotated[list[Path], typer.Argument(help="reference photos, one face each")],
) -> None:
    """Store face templates from reference photos (needs an active biometric consent)."""
    with _guard(), open_app() as a:
        target = a.state.resolve_subject(subject)
        result = people.enroll(a.state, a.vault, a.audit, a.engine, target, photos,
                               now=a.pipeline.clock(),
                               decode_options=a.pipeline.decode_options)
        console.print(f"enrolled {result.added} photo(s); {result.total} template(s) stored; "
                      f"{result.marked_for_analysis} asset(s) will be analysed again")


# -- consents ----------------------------------------------------------------------------
@consents_app.command("add")
def consents_add(
    subject: Annotated[str, typer.Argument(help="subject id or exact name")],
    document: Annotated[str, typer.Option(help="signed quitclaim: file path or URL")],
    sha256: Annotated[str | None, typer.Option(help="sha256 of the document (URL)")] = None,
    biometric: Annotated[bool, typer.Option(help="grant: automatic recognition")] = False,
    channels: Annotated[str | None, typer.Option(
        help="grant: publication on these channels (comma-separated, or 'all')")] = None,
    valid_from: Annotated[str | None, typer.Option("--from", help="start [default: now]")] = None,
    until: Annotated[str | None, typer.Option(help="end of every grant")] = None,
    biometric_until: Annotated[str | None, typer.Option(help="end of the biometric grant")] = None,
    publication_until: Annotated[str | None, typer.Option(help="end of publication")] = None,
    signed_at: Annotated[str | None, typer.Option(help="date of signature")] = None,
    signed_by: Annotated[str | None, typer.Option(help="signer, if not the subject")] = None,
    guardian: Annotated[bool, typer.Option(help="signed by a guardian (minor)")] = False,
) -> None:
    """Record a signed quitclaim with a biometric and/or a publication grant."""
    with _guard(), open_app() as a:
        target = a.state.resolve_subject(subject)
        now = a.pipeline.clock()
        start = parse_when(valid_from, field="--from") or now
        grants = []
        if biometric:
            grants.append(Grant(kind=GrantKind.BIOMETRIC, valid_from=start,
                                valid_until=parse_when(biometric_until or until,
                                                       field="--biometric-until")))
        if channels:
            vocab = a.settings.policy.channels
            chosen = tuple(vocab) if channels == "all" else tuple(
                c.strip() for c in channels.split(",") if c.strip())
            unknown = [c for c in chosen if c not in vocab]
            if unknown:
                raise fail(f"--channels: unknown channel(s) {unknown}; known: {list(vocab)}")
            grants.append(Grant(kind=GrantKind.PUBLICATION, channels=chosen, valid_from=start,
                                valid_until=parse_when(publication_until or until,
                                                       field="--publication-until")))
        if not grants:
            raise fail("a consent needs --biometric and/or --channels")
        if guardian and not signed_by:
            raise fail("--guardian needs --signed-by NAME: the guardian who signed")
        digest = sha256
        if digest is None:
            path = Path(document)
            if not path.is_file():
                raise fail("--document is not a readable file: give --sha256 for a URL")
            digest = people.document_sha256(path)
        consent = Consent(subject_id=target.id, document_ref=document,
                          document_sha256=digest.lower(),
                          signed_at=parse_when(signed_at, field="--signed-at") or now,
                          signed_by=signed_by, guardian=guardian, grants=tuple(grants))
        people.add_consent(a.state, a.audit, consent)
        console.print(str(consent.id))
        code = _apply_consent_change(a, target.id, reason="consent added")
    raise typer.Exit(code)


@consents_app.command("list")
def consents_list(
    subject: Annotated[str | None, typer.Argument(help="only this subject")] = None,
) -> None:
    """Consents with each grant's validity."""
    with _guard(), open_app() as a:
        now = a.pipeline.clock()
        sid = a.state.resolve_subject(subject).id if subject else None
        names = {s.id: s.display_name for s in a.state.subjects()}
        table = Table("consent", "subject", "grant", "channels", "from", "until", "state")
        for c in a.state.consents(sid):
            for g in c.grants:
                state = ("active" if g.active_at(now) else
                         "withdrawn" if g.withdrawn_at and g.withdrawn_at <= now else
                         "not yet" if g.valid_from > now else "expired")
                table.add_row(str(c.id), names.get(c.subject_id, "?"), g.kind.value,
                              ",".join(g.channels), g.valid_from.date().isoformat(),
                              g.valid_until.date().isoformat() if g.valid_until else "-", state)
        console.print(table)


@consents_app.command("withdraw")
def consents_withdraw(
    consent: Annotated[str, typer.Argument(help="consent id (or unique prefix)")],
    kind: Annotated[str | None, typer.Option(help="biometric | publication [default: both]")
                    ] = None,
    at: Annotated[str | None, typer.Option(help="when [default: now]")] = None,
) -> None:
    """Withdraw a consent; templates go when no biometric grant is left."""
    with _guard(), open_app() as a:
        target = a.state.resolve_consent(consent)
        kinds = [GrantKind(kind)] if kind else None
        when = parse_when(at, field="--at") or a.pipeline.clock()
        destroyed = people.withdraw_consent(a.state, a.vault, a.audit, target, at=when,
                                            now=a.pipeline.clock(), kinds=kinds)
        console.print("withdrawn" + ("; face templates destroyed" if destroyed else ""))
        code = _apply_consent_change(a, target.subject_id, reason="consent withdrawn")
        from plugin.consent import standing

        subject = a.state.subject(target.subject_id)
        now = a.pipeline.clock()
        if subject and not standing(subject, a.state.consents(subject.id), now).any_active:
            # No grant left: platforms that keep person records drop the name too.
            a.pipeline.forget_on_platforms(subject.id, reason="consent withdrawn")
    raise typer.Exit(code)


def _apply_consent_change(a, subject_id, *, reason: str) -> int:
    """A consent change takes effect at once on the photos already analysed: re-labelled from
    the stored face records (no detection); `consentry reevaluate` does the same for all."""
    results = a.pipeline.reevaluate(subject_ids=[subject_id], reason=reason)
    if not results:
        return EXIT_OK
    return summary(results, title="photos re-labelled")


@consents_app.command("expiring")
def consents_expiring(
    days: Annotated[int, typer.Option(help="look this many days ahead")] = 30,
) -> None:
    """Consents with a grant that ends within N days, and how many photos each covers."""
    from plugin.sweep import expiring

    with _guard(), open_app() as a:
        names = {s.id: s.display_name for s in a.state.subjects()}
        table = Table("consent", "subject", "grant", "channels", "ends", "assets")
        for e in expiring(a.state, now=a.pipeline.clock(), days=days):
            table.add_row(str(e.consent.id), names.get(e.consent.subject_id, "?"),
                          e.grant.kind.value, ",".join(e.grant.channels),
                          e.ends.date().isoformat(), str(e.assets))
        console.print(table)


@app.command("sweep")
def sweep_command() -> None:
    """Apply consents that started, expired or were withdrawn since the last sweep (for cron)."""
    from plugin.alerts import ExpiryAlerts
    from plugin.sweep import sweep

    with _guard(), open_app() as a:
        result = sweep(a.pipeline, alerts=ExpiryAlerts.from_app(a))
        console.print(f"{len(result.subjects_changed)} subject(s) changed since "
                      f"{result.since.isoformat() if result.since else 'the first sweep'}; "
                      f"templates destroyed for {len(result.templates_destroyed)}")
        code = summary(list(result.results), title="sweep") if result.results else EXIT_OK
    raise typer.Exit(code)


# -- scanning ----------------------------------------------------------------------------
def _run_with_progress(label: str, total: int | None, run) -> list[AssetResult]:
    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err_console, transient=True)
    with progress:
        task = progress.add_task(label, total=total)
        return run(lambda _r: progress.advance(task))


def summary(results: list[AssetResult], *, title: str, out: Console | None = None) -> int:
    table = Table(title=title)
    table.add_column("outcome")
    table.add_column("status")
    table.add_column("assets", justify="right")
    for (outcome, status), n in sorted(Counter(
            (r.outcome.value, r.status or "-") for r in results).items()):
        table.add_row(outcome, status, str(n))
    (out or console).print(table)
    failed = [r for r in results if r.outcome == Outcome.FAILED]
    for r in failed:
        err_console.print(
            f"[red]failed[/red] {escape(f'{r.ref.connector}:{r.ref.name}: {r.reason}')}",
            highlight=False)
    return EXIT_FAILED if failed else EXIT_OK


@app.command()
def scan(
    paths: Annotated[list[Path] | None, typer.Argument(help="only these files/folders")] = None,
    connector: Annotated[str | None, typer.Option(help="only this connector")] = None,
) -> None:
    """Detect, recognise and tag new or changed photos."""
    with _guard(), open_app() as a:
        code = scan_app(a, paths=paths or [], connector=connector)
    raise typer.Exit(code)


def scan_app(a, *, paths: list[Path], connector: str | None = None,
             out: Console | None = None) -> int:
    names = [connector] if connector else list(a.connectors)
    if not names:
        raise fail("no connector configured (see `[[connectors]]` in the settings file)")
    results: list[AssetResult] = []
    stopped = False
    for name in names:
        if name not in a.connectors:
            raise fail(f"no connector named {name!r}")
        c = a.connectors[name]
        try:
            if paths:
                refs = c.select(paths)
                results += _run_with_progress(
                    f"scan {name}", len(refs),
                    lambda tick, c=name, refs=refs: a.pipeline.scan(c, refs, on_result=tick))
            else:
                # The connector lists its own changes and the cursor moves only after them.
                results += _run_with_progress(
                    f"scan {name}", None,
                    lambda tick, c=name: a.pipeline.scan(c, on_result=tick))
        except (AuthError, UnavailableError) as err:
            # One platform down or refusing the credentials must not stop the others.
            err_console.print(f"[red]connector {escape(name)} stopped:[/red] {escape(str(err))}",
                              highlight=False)
            stopped = True
    code = summary(results, title="scan", out=out)
    return EXIT_FAILED if stopped else code


@app.command()
def reevaluate() -> None:
    """Recompute verdicts from stored face records and rewrite changed metadata (no detection)."""
    with _guard(), open_app() as a:
        results = _run_with_progress("reevaluate", None,
                                     lambda tick: a.pipeline.reevaluate(on_result=tick))
        code = summary(results, title="reevaluate")
    raise typer.Exit(code)


@app.command()
def report(
    format: Annotated[str, typer.Option("--format", help="csv | json")] = "csv",
    out: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
) -> None:
    """Per asset: status, names, channels, earliest expiry, unidentified faces."""
    from plugin.reporting import report_rows

    if format not in ("csv", "json"):
        raise fail("--format must be csv or json")
    with _guard(), open_app() as a:
        rows = report_rows(a.state, now=a.pipeline.clock(), channels=a.settings.policy.channels)
    if format == "json":
        text = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["asset"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ";".join(v) if isinstance(v, list) else v
                             for k, v in row.items()})
        text = buffer.getvalue()
    if out:
        out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


@app.command()
def check() -> None:
    """Check the installation and every connector: reachable, credentials, permissions."""
    from connectors.base import Checkable

    with _guard(), open_app() as a:
        table = Table("what", "result", "detail")
        lines: list[tuple[str, bool, str]] = [
            ("key and vault", True, f"{len(a.vault.subjects())} subject(s) with templates"),
        ]
        try:
            load = getattr(a.engine, "load", None)
            if load is not None:
                load()
            lines.append(("face engine", True, a.engine.version))
        except ConsentryError as err:
            lines.append(("face engine", False, str(err)))
        for name, connector in a.connectors.items():
            if isinstance(connector, Checkable):
                lines += [(f"{name}: {what}", ok, detail)
                          for what, ok, detail in connector.check()]
            else:
                lines.append((name, True, "local connector"))
        for what, ok, detail in lines:
            table.add_row(what, "[green]ok[/green]" if ok else "[red]failed[/red]",
                          escape(detail))
        console.print(table)
    raise typer.Exit(EXIT_OK if all(ok for _, ok, _ in lines) else EXIT_FAILED)


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the audit chain: an edited entry or a cut tail fails (exit 1)."""
    with _guard(), open_app() as a:
        try:
            count = a.audit.verify()
        except AuditChainError as err:
            raise fail(f"audit log does not verify: {err}", EXIT_FAILED) from err
    console.print(f"audit log intact: {count} entries")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="demo folder (reused on a second run)")] = Path(
        "consentry-demo"),
    photos: Annotated[Path | None, typer.Option(
        help="demo data folder (manifest.json, people/, library/) [default: "
             "$CONSENTRY_TESTDATA/demo]")] = None,
) -> None:
    """Copy the demo library, register people and consents, enroll, scan, show verdicts."""
    from plugin.demo import run_demo

    with _guard():
        code = run_demo(out=out, photos=photos, console=console)
    raise typer.Exit(code)


class _guard:
    """Turn Consentry's own errors into a clear message and exit code 2."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, ConsentryError):
            raise fail(str(exc)) from exc
        return False


def main() -> None:
    app()



# Commands of the privacy-officer side live in their own modules and register on the apps
# above when imported (keeps this module about the core workflow).
from plugin import (  # noqa: E402, F401
    cli_console,
    cli_erasure,
    cli_nextcloud,
    cli_portal,
    cli_queue,
    cli_records,
    cli_resourcespace,
    cli_review,
    cli_service,
)
