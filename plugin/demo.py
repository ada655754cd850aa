"""`consentry demo`: the whole product on real photos in one command.

Copies the demo library (originals untouched), registers the manifest's people with the
consents it suggests (dates relative to today, as the data's README defines them), enrolls the
ones allowed, scans, and prints each photo's verdict. A second run reuses the folder and finds
nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from plugin import people
from plugin.errors import ConfigError, ConsentryError
from plugin.models import DEFAULT_CHANNELS, Consent, Grant, GrantKind, Subject

TESTDATA_ENV = "CONSENTRY_TESTDATA"
LIMITED_CHANNELS = ("internal", "intranet")


def testdata_dir() -> Path:
    """`CONSENTRY_TESTDATA`, else `../shared/testdata` beside the checkout."""
    configured = os.environ.get(TESTDATA_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


def display_name(folder_name: str) -> str:
    return folder_name.replace("_", " ")


def consent_for(kind: str, subject: Subject, now, document: Path) -> Consent | None:
    """The consent the data's README suggests, dated relative to `now`."""
    start, two_years = now - timedelta(days=30), now + timedelta(days=730)
    bio = Grant(kind=GrantKind.BIOMETRIC, valid_from=start, valid_until=two_years)
    grants = {
        "full": (bio, Grant(kind=GrantKind.PUBLICATION, channels=DEFAULT_CHANNELS,
                            valid_from=start, valid_until=two_years)),
        "limited": (bio, Grant(kind=GrantKind.PUBLICATION, channels=LIMITED_CHANNELS,
                               valid_from=start, valid_until=two_years)),
        "expired": (bio, Grant(kind=GrantKind.PUBLICATION, channels=DEFAULT_CHANNELS,
                               valid_from=now - timedelta(days=400),
                               valid_until=now - timedelta(days=10))),
        "publication_only": (Grant(kind=GrantKind.PUBLICATION, channels=DEFAULT_CHANNELS,
                                   valid_from=start, valid_until=two_years),),
    }.get(kind)
    if grants is None:
        return None
    document.parent.mkdir(parents=True, exist_ok=True)
    if not document.exists():
        document.write_text(
            f"Demo quitclaim ({kind}) for subject {subject.id}.\n"
            "Stands in for the signed document an admin would keep.\n", encoding="utf-8")
    return Consent(subject_id=subject.id, document_ref=str(document),
                   document_sha256=people.document_sha256(document),
                   signed_at=start, grants=grants)


def _source(photos: Path | None) -> Path:
    if photos is not None:
        source = photos
    else:
        source = testdata_dir() / "demo"
        if not source.is_dir():
            raise ConfigError(
                f"demo photos not found at {source}: set {TESTDATA_ENV} to the test data "
                "folder, or pass --photos DIR (a folder with manifest.json, people/, library/)"
            )
    if not (source / "manifest.json").is_file() or not (source / "library").is_dir():
        raise ConfigError(f"{source} has no manifest.json and library/ (see the data README)")
    return source


def run_demo(*, out: Path, photos: Path | None, console: Console) -> int:
    from plugin.app import App
    from plugin.cli import scan_app
    from plugin.setup import initialise

    source = _source(photos)
    manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
    library = out / "library"
    if not library.exists():
        shutil.copytree(source / "library", library)
        console.print(f"copied the demo library to {library}")
    config = out / "consentry.toml"
    initialise(config, photos=library, write_mode="embed")
    with App.open(config) as a:
        known = {s.display_name for s in a.state.subjects()}
        now = a.pipeline.clock()
        for person in manifest["people"]:
            name = display_name(person["name"])
            if name in known:
                continue
            subject = people.add_subject(a.state, a.audit, Subject(display_name=name))
            consent = consent_for(person["suggested_consent"], subject, now,
                                  out / "quitclaims" / f"{person['name']}.txt")
            if consent:
                people.add_consent(a.state, a.audit, consent)
            refs = [source / r for r in person["refs"]]
            try:
                people.enroll(a.state, a.vault, a.audit, a.engine, subject, refs, now=now,
                              decode_options=a.pipeline.decode_options)
                console.print(f"enrolled {name} ({person['suggested_consent']})")
            except ConsentryError as err:
                console.print(f"[yellow]not enrolled[/yellow] {name} "
                              f"({person['suggested_consent']}): {escape(str(err))}")
        code = scan_app(a, paths=[], out=console)
        _print_verdicts(a, console)
    return code


def _print_verdicts(a, console: Console) -> None:
    from plugin.reporting import report_rows

    table = Table(title="verdicts")
    table.add_column("photo", no_wrap=True)
    for column in ("status", "names", "channels", "until", "unknown"):
        table.add_column(column)
    vocabulary = list(a.settings.policy.channels)
    for row in report_rows(a.state, now=a.pipeline.clock(), channels=vocabulary):
        channels = "all" if row["channels"] == vocabulary else ", ".join(row["channels"])
        table.add_row(row["asset"].split(":", 1)[1], row["status"], ", ".join(row["names"]),
                      channels, row["valid_until"] or "",
                      "" if row["unidentified"] is None else str(row["unidentified"]))
    console.print(table)
