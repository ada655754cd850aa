"""`consentry subjects erase`: erasure (GDPR Art. 17) with a receipt, resumable after a crash.

The receipt names the subject by id only: it is kept as proof of the erasure, so it must not
become a new copy of the name.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from plugin import erasure
from plugin.cli import EXIT_FAILED, EXIT_OK, _guard, console, fail, open_app, subjects_app
from plugin.errors import ConsentError


@subjects_app.command("erase")
def subjects_erase(
    subject: Annotated[str | None, typer.Argument(
        help="subject id, id prefix or exact name; the id finishes an interrupted erasure")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="finish every interrupted erasure")] = False,
    receipt: Annotated[Path | None, typer.Option(
        "--receipt", help="also write the receipt as JSON to this file")] = None,
) -> None:
    """Erase a person: templates, name and ids in our metadata, faces, consents (Art. 17)."""
    if subject is None and not resume:
        raise fail("give a SUBJECT to erase, or --resume to finish interrupted erasures")
    with _guard(), open_app() as a:
        if subject is None:
            targets = erasure.pending(a)
            if not targets:
                console.print("no interrupted erasure")
        else:
            targets = [_target(a, subject, yes=yes)]
        batch = erasure.resume_all(a, targets)
    for r in batch.receipts:
        print_receipt(r)
    if receipt is not None and (batch.receipts or subject is None):
        # One erasure: one JSON object; --resume: a list (possibly empty).
        docs: Any = [r.as_dict() for r in batch.receipts]
        receipt.write_text(json.dumps(docs if subject is None else docs[0], indent=2) + "\n",
                           encoding="utf-8")
    for sid, why in batch.incomplete:
        console.print(f"[red]erasure of {sid} not finished:[/red] {escape(why)}",
                      highlight=False)
    raise typer.Exit(EXIT_FAILED if batch.incomplete else EXIT_OK)


def _target(a, ref: str, *, yes: bool) -> uuid.UUID:
    """An erasure already on record (its subject may be gone), else a subject to start on."""
    sid = erasure.find_erasure(a, ref)
    if sid is not None:
        return sid
    try:
        target = a.state.resolve_subject(ref)
    except ConsentError as err:
        raise ConsentError(f"{err}; an interrupted erasure is found by the subject id, "
                           "or use --resume") from err
    if not yes:
        # The name is shown here only, to the admin at the terminal: the receipt has the id.
        typer.confirm(f"Erase {target.display_name} ({target.id}) for good: face templates, "
                      "consents, and the name in the metadata Consentry wrote?", abort=True)
    erasure.start(a, target.id)
    return target.id


def print_receipt(r: erasure.Receipt) -> None:
    counts = r.as_dict()["removed"]
    table = Table(title=f"erasure receipt — subject {r.subject_id}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("started", r.started_at)
    table.add_row("finished", r.finished_at or f"not yet ({r.stage.value})")
    table.add_row("data key and face templates", f"destroyed ({counts['templates']} template(s))")
    table.add_row("consent records", f"{counts['consents']} deleted")
    table.add_row("faces now unknown", str(counts["faces_made_unknown"]))
    table.add_row("candidate links removed", str(counts["candidate_links"]))
    table.add_row("assets rewritten (name, PersonId, consent ids removed)", str(len(r.assets)))
    table.add_row("assets where others' fields still name the person", str(len(r.foreign)))
    console.print(table)
    if r.assets:
        assets = Table()
        assets.add_column("asset rewritten", overflow="fold")
        assets.add_column("faces", justify="right")
        assets.add_column("candidate faces", justify="right")
        for t in r.assets:
            assets.add_row(escape(t.label), str(t.faces), str(t.candidate_faces))
        console.print(assets)
    if r.foreign:
        foreign = Table(title="name still in fields others wrote (Consentry does not edit "
                              "them): check by hand")
        foreign.add_column("asset", overflow="fold")
        foreign.add_column("fields", overflow="fold")
        for m in r.foreign:
            foreign.add_row(escape(m.label), escape(", ".join(m.fields)))
        console.print(foreign)
