"""Exports for the privacy officer: one person's data (GDPR Art. 15 access, Art. 20 portability)
and the audit log as JSON lines.

Subject export: `DIR/<subject-id>.json` (valid against `config/export.schema.json`) and
`DIR/<subject-id>.html` (the same, readable, escaped text, no external resources). It holds that
person only: of a photo that shows two people it lists this person's face alone, and audit
details lose every id (subject, consent, grant) that is not this person's, so a co-depicted
person's identity never reaches someone else's access request. Both files are created 0600:
they are personal data.

Audit export: one JSON object per line with the chain fields (seq, at, actor, action,
subject_id, asset, details, prev_mac, mac). `details` is the parsed object; its canonical text
(`json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`) is what the
MAC covers, so a holder of the key can re-verify every line and the links between lines.
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa

from plugin import schema as t
from plugin.audit import AuditLog
from plugin.consent import standing
from plugin.models import Consent, FaceState, Grant, Subject
from plugin.state import StateStore
from plugin.vault import Vault

EXPORT_FORMAT = "consentry.subject-export"
EXPORT_VERSION = 1
# config/export.schema.json in a checkout; the wheel carries a copy inside the package.
_PACKAGED_SCHEMA = Path(__file__).resolve().with_name("export.schema.json")
SCHEMA_FILE = (
    _PACKAGED_SCHEMA
    if _PACKAGED_SCHEMA.is_file()
    else Path(__file__).resolve().parents[1] / "config" / "export.schema.json"
)
TEMPLATE_PROTECTION = (
    "AES-256-GCM under a data key of this person alone, wrapped by the installation's "
    "key-encryption key; erasure destroys the data key (crypto-shredding)"
)
AUDIT_FIELDS = ("seq", "at", "actor", "action", "subject_id", "asset", "details", "prev_mac",
                "mac")

_IDENTIFIED = (FaceState.AUTO.value, FaceState.CONFIRMED.value)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DROP = object()
_REDACTED = "(another record)"


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def grant_state(grant: Grant, now: datetime) -> str:
    if grant.active_at(now):
        return "active"
    if grant.withdrawn_at is not None and grant.withdrawn_at <= now:
        return "withdrawn"
    if now < grant.valid_from:
        return "not_yet"
    return "expired"


# -- subject export ----------------------------------------------------------------------
def subject_document(state: StateStore, vault: Vault, audit: AuditLog, subject: Subject, *,
                     now: datetime) -> dict[str, Any]:
    """Everything Consentry holds about `subject`, as the schema in config/ describes it."""
    consents = state.consents(subject.id)
    own_ids = {str(subject.id)} | {str(c.id) for c in consents} | {
        str(g.id) for c in consents for g in c.grants}
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "generated_at": _ts(now),
        "subject": {
            "id": str(subject.id),
            "display_name": subject.display_name,
            "birth_date": subject.birth_date.isoformat() if subject.birth_date else None,
            "minor": standing(subject, consents, now).minor,
            "external_ids": dict(subject.external_ids),
        },
        "consents": [_consent(c, now) for c in consents],
        "biometric_templates": {"count": len(vault.templates(subject.id)),
                                "protection": TEMPLATE_PROTECTION},
        "assets": identified_assets(state, subject.id),
        "processing_history": list(history(audit, subject.id, own_ids)),
    }


def _consent(consent: Consent, now: datetime) -> dict[str, Any]:
    return {
        "id": str(consent.id),
        "document_ref": consent.document_ref,
        "document_sha256": consent.document_sha256,
        "signed_at": _ts(consent.signed_at),
        "signed_by": consent.signed_by,
        "guardian": consent.guardian,
        "grants": [{
            "id": str(g.id), "kind": g.kind.value, "channels": list(g.channels),
            "valid_from": _ts(g.valid_from), "valid_until": _ts(g.valid_until),
            "withdrawn_at": _ts(g.withdrawn_at), "state": grant_state(g, now),
        } for g in consent.grants],
    }


def identified_assets(state: StateStore, subject_id: uuid.UUID) -> list[dict[str, Any]]:
    """Assets with a face identified as the subject (auto or confirmed), with those faces only."""
    f, a = t.faces, t.assets
    query = (
        sa.select(f.c.connector, f.c.asset_id, f.c.top, f.c.right, f.c.bottom, f.c.left,
                  f.c.state, f.c.distance, a.c.name, a.c.status, a.c.stored_width,
                  a.c.stored_height, a.c.orientation)
        .join(a, sa.and_(a.c.connector == f.c.connector, a.c.asset_id == f.c.asset_id))
        .where(f.c.subject_id == str(subject_id), f.c.state.in_(_IDENTIFIED))
        .order_by(f.c.connector, f.c.asset_id, f.c.idx)
    )
    assets: dict[tuple[str, str], dict[str, Any]] = {}
    with state.engine.connect() as conn:
        for r in conn.execute(query):
            key = (r.connector, r.asset_id)
            if key not in assets:
                orientation = r.orientation or 1
                width, height = r.stored_width or 1, r.stored_height or 1
                if orientation >= 5:  # EXIF 5-8 turn the image a quarter: the axes swap
                    width, height = height, width
                assets[key] = {
                    "connector": r.connector, "asset_id": r.asset_id, "name": r.name,
                    "status": r.status,
                    "image": {"width": width, "height": height, "orientation": orientation},
                    "faces": [],
                }
            assets[key]["faces"].append({
                "box": {"top": r.top, "right": r.right, "bottom": r.bottom, "left": r.left},
                "state": r.state, "distance": r.distance,
            })
    return list(assets.values())


def history(audit: AuditLog, subject_id: uuid.UUID,
            own_ids: set[str]) -> Iterator[dict[str, Any]]:
    """Audit entries about the subject: theirs by subject id, and asset entries naming them.

    Entries of another subject are left out whole; in the rest, every id that is not one of
    `own_ids` is removed from the details (a co-depicted person's id and consents).
    """
    sid = str(subject_id)
    for entry in audit.entries():
        about = entry["subject_id"] == sid or (
            entry["subject_id"] is None and _mentions(entry["details"], sid))
        if not about:
            continue
        details = _scrub(entry["details"], own_ids)
        yield {"seq": entry["seq"], "at": entry["at"], "actor": entry["actor"],
               "action": entry["action"], "asset": entry["asset"],
               "details": details if isinstance(details, dict) else {}}


def _mentions(value: Any, sid: str) -> bool:
    if isinstance(value, str):
        return sid in value.lower()
    if isinstance(value, Mapping):
        return any(_mentions(v, sid) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, sid) for v in value)
    return False


def _scrub(value: Any, own: set[str]) -> Any:
    if isinstance(value, str):
        if _UUID.fullmatch(value):
            return value if value.lower() in own else _DROP
        return _UUID.sub(lambda m: m.group(0) if m.group(0).lower() in own else _REDACTED, value)
    if isinstance(value, Mapping):
        kept = {k: _scrub(v, own) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, list):
        return [v for v in (_scrub(i, own) for i in value) if v is not _DROP]
    return value


@dataclass(frozen=True, slots=True)
class ExportFiles:
    json_path: Path
    html_path: Path
    assets: int
    history: int


def write_subject_export(state: StateStore, vault: Vault, audit: AuditLog, subject: Subject, *,
                         out_dir: Path, now: datetime) -> ExportFiles:
    """Write `<id>.json` and `<id>.html` into `out_dir` (made 0700 if missing), files 0600."""
    document = subject_document(state, vault, audit, subject, now=now)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    json_path = out_dir / f"{subject.id}.json"
    html_path = out_dir / f"{subject.id}.html"
    _write_private(json_path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    _write_private(html_path, render_html(document))
    # The disclosure itself is processing: record that it happened, by id and counts.
    audit.append("subject.exported", actor="admin", subject_id=subject.id,
                 details={"assets": len(document["assets"]),
                          "history_entries": len(document["processing_history"])})
    return ExportFiles(json_path, html_path, len(document["assets"]),
                       len(document["processing_history"]))


def _write_private(path: Path, text: str) -> None:
    """Temp file 0600 + rename: a reader never sees half a file, nor a world-readable one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- the readable summary ----------------------------------------------------------------
_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
code { font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return html.escape(", ".join(str(v) for v in value), quote=True) or "–"
    return html.escape(str(value), quote=True)


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(doc: Mapping[str, Any]) -> str:
    """A self-contained page: every value escaped, no script, no link, no remote resource."""
    s = doc["subject"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched when the page is opened: no tracking of who reads it.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>Personal data held by Consentry: {_e(s['display_name'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Personal data held by Consentry: {_e(s['display_name'])}</h1>",
        f"<p>Generated {_e(doc['generated_at'])}. The machine-readable copy of this summary is "
        f"<code>{_e(s['id'])}.json</code>. Photos that show other people list only your "
        "face; other people are not named here.</p>",
        "<h2>You</h2>",
        _table(("field", "value"), [
            ("id", s["id"]), ("name", s["display_name"]), ("birth date", s["birth_date"]),
            ("minor", s["minor"]),
            ("ids on platforms", [f"{k}: {v}" for k, v in sorted(s["external_ids"].items())]),
        ]),
        "<h2>Consents</h2>",
    ]
    if doc["consents"]:
        rows = []
        for c in doc["consents"]:
            for g in c["grants"]:
                rows.append((c["id"], c["document_ref"], c["document_sha256"], c["signed_at"],
                             c["signed_by"], c["guardian"], g["kind"], g["channels"],
                             g["valid_from"], g["valid_until"], g["withdrawn_at"], g["state"]))
        parts.append(_table(("consent", "document", "sha256", "signed", "signed by",
                             "guardian", "grant", "channels", "from", "until", "withdrawn",
                             "state"), rows))
    else:
        parts.append("<p>No consent is recorded.</p>")
    templates = doc["biometric_templates"]
    parts += [
        "<h2>Face templates</h2>",
        f"<p>{_e(templates['count'])} template(s) stored. Protection: "
        f"{_e(templates['protection'])}.</p>",
        f"<h2>Photos in which you were identified ({len(doc['assets'])})</h2>",
    ]
    if doc["assets"]:
        rows = []
        for a in doc["assets"]:
            for face in a["faces"]:
                b = face["box"]
                rows.append((a["connector"], a["name"], a["status"],
                             f"{b['top']}, {b['right']}, {b['bottom']}, {b['left']}",
                             f"{a['image']['width']} × {a['image']['height']}",
                             face["state"], face["distance"]))
        parts.append(_table(("library", "photo", "status", "face (top, right, bottom, left)",
                             "image size", "identified", "distance"), rows))
    else:
        parts.append("<p>None.</p>")
    parts.append(f"<h2>Processing history ({len(doc['processing_history'])})</h2>")
    parts.append(_table(("#", "when", "by", "action", "photo", "details"), (
        (h["seq"], h["at"], h["actor"], h["action"], h["asset"],
         json.dumps(h["details"], ensure_ascii=False, sort_keys=True))
        for h in doc["processing_history"])))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# -- audit export ------------------------------------------------------------------------
def audit_lines(audit: AuditLog, *, since: datetime | None = None) -> Iterator[str]:
    """One JSON line per entry (at >= since), the chain fields in chain order."""
    for entry in audit.entries(since=since):
        yield json.dumps({name: entry[name] for name in AUDIT_FIELDS}, ensure_ascii=False,
                         separators=(",", ":"))


def write_audit_export(audit: AuditLog, out: TextIO, *, since: datetime | None = None) -> int:
    count = 0
    for line in audit_lines(audit, since=since):
        out.write(line + "\n")
        count += 1
    return count


def open_private(path: Path) -> TextIO:
    """A new or truncated text file with mode 0600 (an audit export names people by id)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "w", encoding="utf-8")
