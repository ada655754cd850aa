"""People: list and search, add, the person page, Art. 15 export, erasure (Art. 17), the
signed documents and the thumbnails of the assets a person appears in."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugin import erasure
from plugin.errors import ConsentryError
from plugin.export import render_html, subject_document
from plugin.models import FaceBox
from plugin.web import security
from plugin.web.admin import forms, media, ops
from plugin.web.app import flash, in_app, redirect, render

log = logging.getLogger(__name__)


@security.admin_only
async def people_list(request: Request) -> Response:
    query = request.query_params.get("q", "")[:100]
    rows = await in_app(request, ops.people_list, query)
    return render(request, "admin/people.html", {"rows": rows, "q": query})


@security.admin_only
async def person_new(request: Request) -> Response:
    return render(request, "admin/person_new.html", {"values": {}})


@security.admin_only
async def person_new_post(request: Request) -> Response:
    form = request.state.form
    values = {"display_name": forms.text(form, "display_name", limit=200),
              "birth_date": forms.text(form, "birth_date", limit=10),
              "minor": forms.checked(form, "minor")}
    try:
        subject = await in_app(request, lambda app: ops.add_person(
            app, **values, actor=request.state.admin))
    except (ConsentryError, ValueError):
        return render(request, "admin/person_new.html",
                      {"values": values, "error": "admin.person.invalid"}, status_code=422)
    flash(request, "admin.person.added")
    face = forms.text(form, "face", limit=1000)
    target = request.url_for("admin:consent_new", sid=subject.id).path
    return redirect(target + (f"?face={_q(face)}" if face else ""))


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


async def _person_or_404(request: Request, sid: uuid.UUID) -> dict:
    data = await in_app(request, ops.person, sid)
    if data is None:
        raise HTTPException(404)
    return data


@security.admin_only
async def person_page(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    data = await _person_or_404(request, sid)
    return render(request, "admin/person.html", data)


@security.admin_only
async def person_export(request: Request) -> Response:
    """Art. 15: everything held about the person, as JSON or a readable page (download)."""
    sid = forms.path_uuid(request.path_params["sid"])
    fmt = request.query_params.get("format", "json")

    def build(app):  # type: ignore[no-untyped-def]
        subject = app.state.subject(sid)
        if subject is None:
            return None
        doc = subject_document(app.state, app.vault, app.audit, subject,
                               now=app.pipeline.clock())
        app.audit.append("subject.exported", actor=request.state.admin, subject_id=sid,
                         details={"assets": len(doc["assets"]), "format": fmt,
                                  "history_entries": len(doc["processing_history"]),
                                  "via": "console"})
        return doc

    doc = await in_app(request, build)
    if doc is None:
        raise HTTPException(404)
    if fmt == "html":
        return Response(render_html(doc), media_type="text/html; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="{sid}.html"'})
    body = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    return Response(body, media_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="{sid}.json"'})


@security.admin_only
async def document_download(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    doc_id = request.path_params["doc_id"]

    def fetch(app):  # type: ignore[no-untyped-def]
        reader = getattr(app.vault, "document", None)
        if reader is None or doc_id not in ops.documents_of(app, sid):
            return None
        return reader(sid, doc_id)

    found = await in_app(request, fetch)
    if found is None:
        raise HTTPException(404)
    data, media_type, _filename = found
    # The stored filename may hold a name: the download is named by ids only.
    ext = {"application/pdf": ".pdf", "image/jpeg": ".jpg", "image/png": ".png"}.get(
        media_type, ".bin")
    return Response(data, media_type=media_type, headers={
        "Content-Disposition": f'attachment; filename="quitclaim-{doc_id}{ext}"'})


@security.admin_only
async def erase_page(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    data = await _person_or_404(request, sid)
    return render(request, "admin/erase.html", data)


@security.admin_only
async def erase_post(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    data = await _person_or_404(request, sid)
    typed = forms.text(request.state.form, "confirm_name", limit=300)
    if typed.casefold() != data["subject"].display_name.strip().casefold():
        return render(request, "admin/erase.html",
                      {**data, "error": "admin.erase.mismatch"}, status_code=422)
    return await _erase_then_receipt(
        request, sid, lambda app: erasure.erase(app, sid, actor=request.state.admin))


@security.admin_only
async def erasure_page(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    receipt = await in_app(request, erasure.receipt_of, sid)
    if receipt is None:
        raise HTTPException(404)
    return render(request, "admin/erasure.html", {"receipt": receipt.as_dict(), "sid": sid})


@security.admin_only
async def erasure_resume(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    if await in_app(request, erasure.receipt_of, sid) is None:
        raise HTTPException(404)
    return await _erase_then_receipt(request, sid, lambda app: erasure.run(app, sid))


async def _erase_then_receipt(request: Request, sid: uuid.UUID,
                              work: Callable[[Any], object]) -> Response:
    """Run (or resume) an erasure, then show its receipt; an interrupted one says so there
    and can be resumed."""
    try:
        await in_app(request, work)
    except ConsentryError as err:
        log.warning("erasure of subject %s did not finish: %s", sid, type(err).__name__)
        flash(request, "admin.erase.incomplete")
    return redirect(request.url_for("admin:erasure", sid=sid).path)


@security.admin_only
async def erasure_receipt(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    receipt = await in_app(request, erasure.receipt_of, sid)
    if receipt is None:
        raise HTTPException(404)
    body = json.dumps(receipt.as_dict(), indent=2) + "\n"
    return Response(body, media_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="erasure-{sid}.json"'})


@security.admin_only
async def asset_thumb(request: Request) -> Response:
    """?connector=&asset= [&top=&right=&bottom=&left= for a face crop]."""
    params = request.query_params
    connector, asset = params.get("connector", ""), params.get("asset", "")
    box = None
    if "top" in params:
        try:
            box = FaceBox(**{k: int(params[k]) for k in ("top", "right", "bottom", "left")})
        except (KeyError, ValueError) as err:
            raise HTTPException(404) from err
    try:
        data = await in_app(request, media.thumbnail, connector, asset, box=box)
    except media.MediaError as err:
        log.info("no thumbnail: %s", err)
        raise HTTPException(404) from err
    return Response(data, media_type="image/jpeg")


routes = [
    Route("/people", people_list, methods=["GET"], name="people"),
    Route("/people/new", person_new, methods=["GET"], name="person_new"),
    Route("/people/new", person_new_post, methods=["POST"], name="person_new_post"),
    Route("/people/{sid:uuid}", person_page, methods=["GET"], name="person"),
    Route("/people/{sid:uuid}/export", person_export, methods=["GET"], name="person_export"),
    Route("/people/{sid:uuid}/documents/{doc_id:str}", document_download, methods=["GET"],
          name="document"),
    Route("/people/{sid:uuid}/erase", erase_page, methods=["GET"], name="erase"),
    Route("/people/{sid:uuid}/erase", erase_post, methods=["POST"], name="erase_post"),
    Route("/erasures/{sid:uuid}", erasure_page, methods=["GET"], name="erasure"),
    Route("/erasures/{sid:uuid}/resume", erasure_resume, methods=["POST"],
          name="erasure_resume"),
    Route("/erasures/{sid:uuid}/receipt.json", erasure_receipt, methods=["GET"],
          name="erasure_receipt"),
    Route("/assets/thumb", asset_thumb, methods=["GET"], name="thumb"),
]
