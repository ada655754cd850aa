"""Consent forms: add (with the signed quitclaim uploaded and stored encrypted), correct,
withdraw. Every change re-labels the person's photos at once (as the CLI does)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugin.errors import ConsentryError
from plugin.models import GrantKind
from plugin.review import FaceRef, confirm
from plugin.web import security
from plugin.web.admin import forms, ops
from plugin.web.admin.forms import FormError
from plugin.web.app import console, flash, in_app, redirect, render

log = logging.getLogger(__name__)

DOCUMENT_TYPES = ("application/pdf", "image/jpeg", "image/png")


def _subject_page(request: Request, sid: uuid.UUID) -> str:
    return request.url_for("admin:person", sid=sid).path


async def _subject(request: Request, sid: uuid.UUID):  # type: ignore[no-untyped-def]
    subject = await in_app(request, lambda app: app.state.subject(sid))
    if subject is None:
        raise HTTPException(404)
    return subject


def _channels(request: Request) -> tuple[str, ...]:
    return tuple(console(request).settings.policy.channels)


@security.admin_only
async def consent_new(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    subject = await _subject(request, sid)
    return render(request, "admin/consent_form.html", {
        "subject": subject, "values": {}, "channels": _channels(request),
        "face": request.query_params.get("face", "")[:1000]})


@security.admin_only
async def consent_new_post(request: Request) -> Response:
    sid = forms.path_uuid(request.path_params["sid"])
    subject = await _subject(request, sid)
    form = request.state.form
    values: dict[str, Any] = {k: forms.text(form, k) for k in (
        "signed_at", "signed_by", "valid_from", "biometric_until", "publication_until",
        "document_ref", "document_sha256")}
    values.update(guardian=forms.checked(form, "guardian"),
                  biometric=forms.checked(form, "biometric"),
                  channels=[c for c in _channels(request) if forms.checked(form, f"ch_{c}")])
    face = forms.text(form, "face", limit=1000)
    context = {"subject": subject, "values": values, "channels": _channels(request),
               "face": face}
    try:
        data = ops.ConsentInput(
            signed_at=forms.day(form, "signed_at"), signed_by=values["signed_by"] or None,
            guardian=values["guardian"], valid_from=forms.day(form, "valid_from"),
            biometric=values["biometric"], biometric_until=forms.day(form, "biometric_until"),
            channels=tuple(values["channels"]),
            publication_until=forms.day(form, "publication_until"),
            document_ref=values["document_ref"], document_sha256=values["document_sha256"])
        upload = await _upload(request, form.get("document"))
    except FormError as err:
        return render(request, "admin/consent_form.html",
                      {**context, "error": err.key, "error_values": err.values},
                      status_code=422)
    admin = request.state.admin
    try:
        await in_app(request, lambda app: ops.add_consent(app, sid, data, actor=admin,
                                                          upload=upload))
    except (ConsentryError, ValueError) as err:
        log.info("consent refused for subject %s: %s", sid, type(err).__name__)
        return render(request, "admin/consent_form.html",
                      {**context, "error": "admin.consent.refused", "detail": str(err)},
                      status_code=422)
    flash(request, "admin.consent.added")
    if face:
        await _confirm_face(request, face, sid)
        return redirect(request.url_for("admin:review").path)
    return redirect(_subject_page(request, sid))


async def _upload(request: Request, field: Any) -> tuple[bytes, str, str] | None:
    if not isinstance(field, UploadFile) or not field.filename:
        return None
    limit = console(request).max_upload
    data = await field.read(limit + 1)
    if len(data) > limit:
        raise FormError("admin.consent.too_large")
    media_type = (field.content_type or "").split(";")[0].strip().lower()
    if media_type not in DOCUMENT_TYPES or not data:
        raise FormError("admin.consent.bad_type")
    return data, media_type, field.filename[:200]


async def _confirm_face(request: Request, face: str, sid: uuid.UUID) -> None:
    """The 'new person' path of the review queue ends here: name the face now."""
    try:
        ref = FaceRef.parse(face)

        def run(app):  # type: ignore[no-untyped-def]
            subject = app.state.subject(sid)
            return confirm(app.pipeline, ref, subject,
                           learn=app.settings.matching.learn_from_review)

        await in_app(request, run)
        flash(request, "admin.review.confirmed")
    except ConsentryError as err:
        log.info("review confirm after new person refused: %s", type(err).__name__)
        flash(request, "admin.review.refused")


async def _consent(request: Request):  # type: ignore[no-untyped-def]
    sid = forms.path_uuid(request.path_params["sid"])
    cid = forms.path_uuid(request.path_params["cid"])
    consent = await in_app(request, ops.consent_of, sid, cid)
    if consent is None:
        raise HTTPException(404)
    return sid, consent


@security.admin_only
async def consent_edit(request: Request) -> Response:
    sid, consent = await _consent(request)
    subject = await _subject(request, sid)
    return render(request, "admin/consent_edit.html", {
        "subject": subject, "consent": consent, "channels": _channels(request),
        "as_date": forms.as_date_input})


@security.admin_only
async def consent_edit_post(request: Request) -> Response:
    sid, consent = await _consent(request)
    form = request.state.form
    ends = {}
    try:
        for g in consent.grants:
            ends[g.kind] = forms.day(form, f"until_{g.kind.value}")
    except FormError as err:
        subject = await _subject(request, sid)
        return render(request, "admin/consent_edit.html", {
            "subject": subject, "consent": consent, "channels": _channels(request),
            "as_date": forms.as_date_input, "error": err.key}, status_code=422)
    has_pub = any(g.kind is GrantKind.PUBLICATION for g in consent.grants)
    channels = tuple(c for c in _channels(request) if forms.checked(form, f"ch_{c}")) \
        if has_pub else None
    admin = request.state.admin
    try:
        changed = await in_app(request, lambda app: ops.edit_consent(
            app, consent, actor=admin, ends=ends, channels=channels))
    except ConsentryError as err:
        subject = await _subject(request, sid)
        return render(request, "admin/consent_edit.html", {
            "subject": subject, "consent": consent, "channels": _channels(request),
            "as_date": forms.as_date_input, "error": "admin.consent.refused",
            "detail": str(err)}, status_code=422)
    flash(request, "admin.consent.corrected", n=changed)
    return redirect(_subject_page(request, sid))


@security.admin_only
async def consent_withdraw(request: Request) -> Response:
    sid, consent = await _consent(request)
    kind = forms.text(request.state.form, "kind", limit=20)
    kinds = [GrantKind(kind)] if kind in {k.value for k in GrantKind} else None
    destroyed = await in_app(request, lambda app: ops.withdraw(app, consent, kinds,
                                                             actor=request.state.admin))
    flash(request, "admin.consent.withdrawn_destroyed" if destroyed
          else "admin.consent.withdrawn")
    return redirect(_subject_page(request, sid))


routes = [
    Route("/people/{sid:uuid}/consents/new", consent_new, methods=["GET"], name="consent_new"),
    Route("/people/{sid:uuid}/consents/new", consent_new_post, methods=["POST"],
          name="consent_new_post"),
    Route("/people/{sid:uuid}/consents/{cid:uuid}/edit", consent_edit, methods=["GET"],
          name="consent_edit"),
    Route("/people/{sid:uuid}/consents/{cid:uuid}/edit", consent_edit_post, methods=["POST"],
          name="consent_edit_post"),
    Route("/people/{sid:uuid}/consents/{cid:uuid}/withdraw", consent_withdraw,
          methods=["POST"], name="consent_withdraw"),
]
