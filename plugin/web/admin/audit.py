"""The audit log viewer (filters, newest first) and its JSON-lines export."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugin.export import AUDIT_FIELDS
from plugin.web import security
from plugin.web.admin import ops
from plugin.web.admin.forms import FormError, parse_day
from plugin.web.app import in_app, render

SHOWN = 500


def _filter(request: Request) -> tuple[ops.AuditFilter, dict[str, str], str | None]:
    p = request.query_params
    values = {k: p.get(k, "")[:200].strip() for k in (
        "action", "subject_id", "asset", "actor", "since", "until")}
    error = None
    try:
        since = parse_day(values["since"], field="since")
        until = parse_day(values["until"], field="until")
    except FormError as err:
        since = until = None
        error = err.key
    return ops.AuditFilter(action=values["action"], subject_id=values["subject_id"].lower(),
                           asset=values["asset"], actor=values["actor"], since=since,
                           until=until), values, error


@security.admin_only
async def audit_page(request: Request) -> Response:
    flt, values, error = _filter(request)
    entries = await in_app(request, ops.audit_entries, flt, limit=SHOWN + 1)
    return render(request, "admin/audit.html", {
        "entries": entries[:SHOWN], "more": len(entries) > SHOWN, "values": values,
        "error": error, "query": request.url.query})


@security.admin_only
async def audit_export(request: Request) -> Response:
    """Matching entries in chain order, one JSON object per line, with the chain fields, so
    an unfiltered export can be re-verified."""
    flt, _values, _error = _filter(request)
    entries = await in_app(request, ops.audit_entries, flt, limit=None)
    entries.reverse()
    body = "".join(json.dumps({n: e[n] for n in AUDIT_FIELDS}, ensure_ascii=False,
                              separators=(",", ":")) + "\n" for e in entries)
    await in_app(request, lambda app: app.audit.append(
        "audit.exported", actor=request.state.admin, details={"entries": len(entries)}))
    return Response(body, media_type="application/x-ndjson", headers={
        "Content-Disposition": 'attachment; filename="consentry-audit.jsonl"'})


routes = [
    Route("/audit", audit_page, methods=["GET"], name="audit"),
    Route("/audit/export.jsonl", audit_export, methods=["GET"], name="audit_export"),
]
