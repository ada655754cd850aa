"""Commands for the privacy officer's records: a person's data export (Art. 15/20), the draft
DPIA (Art. 35/30) and the audit log as JSON lines. Registered on the apps of plugin.cli when
this module is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from plugin.cli import (
    _guard,
    app,
    audit_app,
    console,
    fail,
    open_app,
    parse_when,
    subjects_app,
)


@subjects_app.command("export")
def subjects_export(
    subject: Annotated[str, typer.Argument(help="subject id or exact name")],
    out: Annotated[Path, typer.Option(help="folder for <subject-id>.json and .html")],
) -> None:
    """Everything held about one person (GDPR Art. 15 access, Art. 20 portability)."""
    from plugin.export import write_subject_export

    with _guard(), open_app() as a:
        target = a.state.resolve_subject(subject)
        try:
            files = write_subject_export(a.state, a.vault, a.audit, target, out_dir=out,
                                         now=a.pipeline.clock())
        except OSError as err:
            raise fail(f"--out: cannot write into {out}: {err.strerror}") from err
    console.print(f"{files.json_path}\n{files.html_path}")
    entries = "entry" if files.history == 1 else "entries"
    console.print(f"{files.assets} photo(s), {files.history} audit {entries}; both files are "
                  "personal data (mode 0600)", highlight=False)


@app.command("dpia")
def dpia_command(
    out: Annotated[Path | None, typer.Option(help="write the Markdown here instead of stdout")
                   ] = None,
) -> None:
    """Draft DPIA and record of processing from the configuration and state in force."""
    from plugin.dpia import generate

    with _guard(), open_app() as a:
        text = generate(a)
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise fail(f"--out: cannot write {out}: {err.strerror}") from err
    console.print(f"draft DPIA written to {out}", highlight=False)


@audit_app.command("export")
def audit_export(
    since: Annotated[str | None, typer.Option(
        help="only entries at or after this date (YYYY-MM-DD, UTC) or ISO date-time "
             "[default: from the first entry]")] = None,
    out: Annotated[Path | None, typer.Option(help="write here (mode 0600) instead of stdout")
                   ] = None,
) -> None:
    """Audit entries as JSON lines with their chain fields, so they can be re-verified."""
    from plugin.export import open_private, write_audit_export

    start = parse_when(since, field="--since")
    with _guard(), open_app() as a:
        if out is None:
            try:
                write_audit_export(a.audit, sys.stdout, since=start)
                sys.stdout.flush()
            except BrokenPipeError:
                # `consentry audit export | head`: the reader has all it wanted.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        try:
            handle = open_private(out)
        except OSError as err:
            raise fail(f"--out: cannot write {out}: {err.strerror}") from err
        with handle:
            count = write_audit_export(a.audit, handle, since=start)
    console.print(f"{count} audit entr{'y' if count == 1 else 'ies'} written to {out}",
                  highlight=False)
