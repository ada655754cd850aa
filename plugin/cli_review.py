"""`consentry review`: list the faces the matcher was unsure of, confirm or reject them.

The admin sees candidate names here (they administer the people); logs and the audit log
carry subject ids only.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from plugin import review
from plugin.cli import EXIT_OK, _guard, app, console, fail, open_app, summary
from plugin.pipeline import Outcome

review_app = typer.Typer(no_args_is_help=True,
                         help="Human review of uncertain faces: list, confirm, reject.")
app.add_typer(review_app, name="review")

FaceArg = Annotated[str, typer.Argument(
    help="face reference CONNECTOR:ASSET#INDEX, as `consentry review list` shows it")]


@review_app.command("list")
def review_list(
    format: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    unknown: Annotated[bool, typer.Option(
        "--unknown", help="also faces nobody was proposed for (e.g. to name a person whose "
                          "consent covers publication only)")] = False,
    vouched: Annotated[bool, typer.Option(
        "--vouched", help="also faces named because a face of the same scan run vouched for "
                          "them (matching.corroborate), to check them; rejecting one, or the "
                          "face that vouched, takes the name back")] = False,
) -> None:
    """Faces waiting for a decision, with asset, box, distance and candidate subjects."""
    if format not in ("table", "json"):
        raise fail("--format must be table or json")
    with _guard(), open_app() as a:
        items = review.queue(a.state, include_unknown=unknown, include_vouched=vouched)
    if format == "json":
        sys.stdout.write(json.dumps([i.as_json() for i in items], indent=2,
                                    ensure_ascii=False) + "\n")
        return
    table = Table(title=f"review queue: {len(items)} face(s)")
    table.add_column("face", overflow="fold")
    table.add_column("asset", overflow="fold")
    table.add_column("box (t,r,b,l)", overflow="fold")
    table.add_column("distance", justify="right")
    table.add_column("candidates", overflow="fold")
    if vouched:
        table.add_column("vouched by", overflow="fold")
    for i in items:
        table.add_row(
            str(i.ref), i.asset_name, ",".join(map(str, i.box.as_css())),
            "-" if i.distance is None else f"{i.distance:.3f}",
            # A short id is enough to confirm by (`resolve_subject` takes unique prefixes).
            "; ".join(f"{c.name} ({str(c.id)[:8]})" for c in i.candidates) or "-",
            *([i.vouched_by or "-"] if vouched else []),
        )
    console.print(table)


@review_app.command("confirm")
def review_confirm(
    face: FaceArg,
    subject: Annotated[str, typer.Argument(help="subject id or exact name")],
) -> None:
    """Name the face as SUBJECT (any active consent suffices) and re-label the photo now."""
    with _guard(), open_app() as a:
        ref = review.FaceRef.parse(face)
        target = a.state.resolve_subject(subject)
        decision = review.confirm(a.pipeline, ref, target,
                                  learn=a.settings.matching.learn_from_review)
        console.print(f"confirmed {ref} as {target.display_name} ({target.id})",
                      highlight=False, markup=False)
        if decision.learned is not None:
            console.print(f"template: {decision.learned.reason} "
                          f"({decision.learned.templates} in all)", highlight=False, markup=False)
        code = _relabelled(decision)
    raise typer.Exit(code)


@review_app.command("reject")
def review_reject(
    face: FaceArg,
    subject: Annotated[str | None, typer.Argument(
        help="subject id or exact name [default: the proposed subject]")] = None,
) -> None:
    """Record that the face is not SUBJECT: later scans never propose that match again."""
    with _guard(), open_app() as a:
        ref = review.FaceRef.parse(face)
        target = a.state.resolve_subject(subject) if subject else None
        decision = review.reject(a.pipeline, ref, target)
        rejected = a.state.subject(decision.subject_id)
        who = f"{rejected.display_name} ({rejected.id})" if rejected else str(decision.subject_id)
        console.print(f"rejected {who} for {ref}", highlight=False, markup=False)
        code = _relabelled(decision)
    raise typer.Exit(code)


def _relabelled(decision: review.Decision) -> int:
    result = decision.relabel
    if result is None:
        console.print("the photo is not re-labelled now (its connector is not configured or "
                      "it was never analysed); the decision holds for the next scan")
        return EXIT_OK
    if result.outcome == Outcome.SKIPPED:
        console.print(f"photo unchanged: status {result.status}", highlight=False)
        return EXIT_OK
    return summary([result], title="photo re-labelled")
