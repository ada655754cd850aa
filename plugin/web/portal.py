"""The consent portal (issue #9), mounted at /p: pages for data subjects, plus the admin's
invitation page.

For the person (no account; the signed link is the credential):
    GET/POST /p/i/{token}   the request in plain language, choices per channel, biometric
                            consent apart, optional selfie, typed-name signature
    GET      /p/r/{wtoken}  the receipt, with the permanent withdrawal link
    GET/POST /p/w/{wtoken}  withdrawal (same path as `consentry consents withdraw`)
For the admin (admin session + CSRF, like every /admin page):
    GET/POST /p/admin/invite/{subject_id}   create an invitation, copy it or e-mail it
    GET      /p/admin/expiring              consents expiring soon, with alert state

The decisions live in plugin/invitations.py; here are only forms and pages. A link that is
invalid, expired, used, or whose person was erased gets a page saying so, never a stack trace.
Uploaded selfies stay in memory and a private temporary file for the face check only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from datetime import datetime, timedelta

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from plugin import alerts, invitations
from plugin.consent import is_minor
from plugin.errors import ConsentError, ConsentryError
from plugin.invitations import AnswerError, InvitationError
from plugin.mailer import Mailer
from plugin.models import GrantKind
from plugin.web import i18n, security
from plugin.web.app import in_app, redirect, render, request_lang

log = logging.getLogger(__name__)

_REFUSED_STATUS = {"invalid": 404, "unknown": 410, "expired": 410, "used": 410}
# The texts that make up the request a person signs; their hash goes into the signed document.
_STATEMENT_PREFIXES = ("portal.invite.", "portal.ask.", "portal.channel.", "portal.face.",
                       "portal.selfie.", "portal.withdraw_info.", "portal.sign.")


def statement_sha256(lang: str) -> str:
    texts = {k: v for k, v in i18n.catalog(lang).items() if k.startswith(_STATEMENT_PREFIXES)}
    return hashlib.sha256(json.dumps(texts, sort_keys=True, ensure_ascii=False)
                          .encode()).hexdigest()


def channel_label(lang: str, channel: str) -> str:
    key = f"portal.channel.{channel}"
    return i18n.catalog(lang).get(key) or i18n.catalog(i18n.DEFAULT_LANG).get(key) or channel


def _date(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value else "-"


Endpoint = Callable[[Request], Awaitable[Response]]


def _refused(request: Request, err: InvitationError) -> Response:
    return render(request, "portal/refused.html", {"reason": err.reason},
                  status_code=_REFUSED_STATUS.get(err.reason, 400))


def _refusing(endpoint: Endpoint) -> Endpoint:
    """A portal page whose link is refused (expired, tampered, used, other key) shows the
    refusal page, wherever in the page the invitation or receipt turns out refused."""

    @functools.wraps(endpoint)
    async def page(request: Request) -> Response:
        try:
            return await endpoint(request)
        except InvitationError as err:
            return _refused(request, err)

    return page


def _portal_lang(request: Request, default: str) -> str:
    """The invitation's language unless the person chose one (query or session)."""
    if request.query_params.get("lang") not in i18n.LANGS and "lang" not in request.session:
        request.session["lang"] = default
    return request_lang(request)


# -- invitation ---------------------------------------------------------------------------
def _invite_view(a, token: str) -> dict:
    now = a.pipeline.clock()
    inv = invitations.open_invitation(a, token, now=now)
    subject = a.state.subject(inv.subject_id)
    assert subject is not None  # open_invitation refuses erased subjects
    return {
        "inv": inv, "name": subject.display_name,
        "guardian": inv.guardian or is_minor(subject, now),
        "until": _date(now + timedelta(days=inv.valid_days)),
        "expires": _date(inv.expires_at),
        "mb": a.settings.portal.max_upload_bytes // 1_000_000,
        "max_bytes": a.settings.portal.max_upload_bytes,
    }


def _form_context(view: dict, lang: str, *, chosen=None, error: str | None = None,
                  biometric: str | None = None, signed_name: str = "") -> dict:
    inv = view["inv"]
    return {
        **view,
        "channels": [(c, channel_label(lang, c)) for c in inv.channels],
        "chosen": set(chosen if chosen is not None else ()),
        "biometric_choice": biometric,
        "signed_name": signed_name,
        "error": error,
    }


@_refusing
async def invite(request: Request) -> Response:
    token = request.path_params["token"]
    view = await in_app(request, _invite_view, token)
    lang = _portal_lang(request, view["inv"].lang)
    return render(request, "portal/invite.html", _form_context(view, lang))


class _InMemoryParser(MultiPartParser):
    """Starlette spools uploads over 1 MB to a temporary file; a selfie stays in memory."""

    spool_max_size = 101_000_000  # above portal.max_upload_bytes' ceiling


async def _read_form(request: Request, limit: int) -> FormData:
    """The form, with the selfie (the only file) held in memory; 413 when far too large."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + 256 * 1024:
        raise HTTPException(413)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await request.form(max_files=0, max_fields=64)
    try:
        async with aclosing(request.stream()) as stream:
            return await _InMemoryParser(request.headers, stream, max_files=1,
                                         max_fields=64).parse()
    except MultiPartException as err:
        raise HTTPException(400, err.message) from err


@_refusing
async def invite_post(request: Request) -> Response:
    token = request.path_params["token"]
    view = await in_app(request, _invite_view, token)
    inv = view["inv"]
    lang = _portal_lang(request, inv.lang)
    form = await _read_form(request, view["max_bytes"])
    chosen = [c for c in form.getlist("channel") if isinstance(c, str)]
    bio_raw = form.get("biometric")
    biometric = bio_raw if isinstance(bio_raw, str) else None
    signed_name = str(form.get("signed_name") or "")[:300]
    again = {"chosen": chosen, "biometric": biometric, "signed_name": signed_name}
    try:
        security.check_csrf(request, form)
    except HTTPException:
        return render(request, "portal/invite.html", _form_context(
            view, lang, error=i18n.t(lang, "portal.error.csrf"), **again), status_code=403)
    upload = form.get("selfie")
    selfie = None
    if isinstance(upload, UploadFile) and upload.filename:
        selfie = await upload.read(view["max_bytes"] + 1)
        await upload.close()
        selfie = selfie or None
    answer = invitations.Answer(
        channels=tuple(c for c in inv.channels if c in set(chosen)),
        biometric=biometric == "yes",
        signed_name=signed_name,
        confirmed=form.get("confirm") == "yes",
        guardian_confirmed=form.get("guardian_confirm") == "yes",
    )
    try:
        receipt = await in_app(request, invitations.accept, token, answer, selfie=selfie,
                               statement_sha256=statement_sha256(lang), lang=lang)
    except AnswerError as err:
        message = i18n.t(lang, err.key, **err.values)
        return render(request, "portal/invite.html", _form_context(
            view, lang, error=message, **again), status_code=400)
    if receipt.withdraw_token is None:
        return render(request, "portal/receipt.html", _receipt_context(
            lang, receipt=None, consent=None, inv=receipt.invitation, name=view["name"]))
    request.session["portal"] = {"consent": str(receipt.consent.id) if receipt.consent else "",
                                 "enrolled": receipt.enrolled,
                                 "discarded": receipt.selfie_discarded}
    return redirect(request.url_for("portal:receipt", token=receipt.withdraw_token).path)


# -- receipt and withdrawal -----------------------------------------------------------------
def _withdrawal_view(a, token: str) -> dict:
    view = invitations.open_withdrawal(a, token)
    return {"view": view, "inv": invitations.by_consent(a.state, view.consent.id),
            "base": invitations._base_url(a)}


def _receipt_context(lang: str, *, receipt, consent, inv, name: str, outcome=None,
                     withdraw_url: str = "") -> dict:
    pub = [g for g in consent.grants if g.kind == GrantKind.PUBLICATION] if consent else []
    bio = [g for g in consent.grants if g.kind == GrantKind.BIOMETRIC] if consent else []
    ends = [g.valid_until for g in (consent.grants if consent else ()) if g.valid_until]
    return {
        "consent": consent, "inv": inv, "name": name,
        "channels": ", ".join(channel_label(lang, c) for g in pub for c in g.channels),
        "biometric": bool(bio),
        "until": _date(max(ends)) if ends else "-",
        "signed_at": consent.signed_at.strftime("%Y-%m-%d %H:%M UTC") if consent else "",
        "sha": inv.request_sha256 if inv else "",
        "outcome": outcome or {},
        "withdraw_url": withdraw_url,
    }


@_refusing
async def receipt(request: Request) -> Response:
    token = request.path_params["token"]
    data = await in_app(request, _withdrawal_view, token)
    view = data["view"]
    lang = request_lang(request)
    outcome = request.session.get("portal") or {}
    if outcome.get("consent") != str(view.consent.id):
        outcome = {}
    path = request.url_for("portal:withdraw", token=token).path
    base = data["base"] or str(request.base_url).rstrip("/")
    return render(request, "portal/receipt.html", _receipt_context(
        lang, receipt=True, consent=view.consent, inv=data["inv"], name=view.subject.display_name,
        outcome=outcome, withdraw_url=invitations.absolute(base, path)))


@_refusing
async def withdraw(request: Request) -> Response:
    token = request.path_params["token"]
    data = await in_app(request, _withdrawal_view, token)
    view = data["view"]
    return render(request, "portal/withdraw.html", {
        "name": view.subject.display_name, "signed": _date(view.consent.signed_at),
        "active": view.active, "error": None})


@_refusing
async def withdraw_post(request: Request) -> Response:
    token = request.path_params["token"]
    data = await in_app(request, _withdrawal_view, token)
    view = data["view"]
    lang = request_lang(request)
    context = {"name": view.subject.display_name, "signed": _date(view.consent.signed_at),
               "active": view.active, "error": None}
    form = await request.form(max_files=0, max_fields=8)
    try:
        security.check_csrf(request, form)
    except HTTPException:
        return render(request, "portal/withdraw.html",
                      {**context, "error": i18n.t(lang, "portal.error.csrf")}, status_code=403)
    if not view.active:
        return render(request, "portal/withdraw.html", context)
    if form.get("confirm") != "yes":
        return render(request, "portal/withdraw.html",
                      {**context, "error": i18n.t(lang, "portal.withdraw.error.confirm")},
                      status_code=400)
    result = await in_app(request, invitations.withdraw, token)
    return render(request, "portal/withdrawn.html", {
        "date": _date(result.at), "destroyed": result.templates_destroyed})


# -- admin: invitations and expiring consents -----------------------------------------------
def _subject_or_404(a, raw: str):
    try:
        subject = a.state.subject(uuid.UUID(raw))
    except ValueError:
        subject = None
    if subject is None:
        raise HTTPException(404)
    return subject


def _admin_invite_view(a, raw_id: str) -> dict:
    subject = _subject_or_404(a, raw_id)
    now = a.pipeline.clock()
    return {
        "subject": subject, "minor": is_minor(subject, now),
        "vocab": list(a.settings.policy.channels),
        "consent_days": a.settings.portal.consent_days,
        "invitation_days": a.settings.portal.invitation_days,
        "mail_on": Mailer(a.settings.mail).configured,
        "history": [(i, i.state(now)) for i in invitations.of_subject(a.state, subject.id)],
        "channel_label": channel_label,
    }


@security.admin_only
async def admin_invite(request: Request) -> Response:
    view = await in_app(request, _admin_invite_view, request.path_params["subject_id"])
    return render(request, "portal/admin_invite.html", {**view, "created": None, "error": None})


def _create(a, raw_id: str, *, channels, biometric, days, guardian, lang, email, admin):
    subject = _subject_or_404(a, raw_id)
    created = invitations.create_invitation(
        a, subject, channels=channels, biometric=biometric, valid_days=days,
        guardian=guardian, lang=lang, created_by=admin)
    mail_error = None
    if email:
        try:
            created = invitations.send_invitation(a, Mailer(a.settings.mail), created, to=email)
        except ConsentryError as err:
            mail_error = str(err)
    return created, mail_error


@security.admin_only
async def admin_invite_post(request: Request) -> Response:
    form = request.state.form
    raw_id = request.path_params["subject_id"]
    lang = request_lang(request)
    days_raw = str(form.get("days") or "").strip()
    try:
        days = int(days_raw) if days_raw else None
    except ValueError:
        days = -1
    try:
        created, mail_error = await in_app(
            request, _create, raw_id,
            channels=[c for c in form.getlist("channel") if isinstance(c, str)],
            biometric=form.get("biometric") == "yes",
            days=days, guardian=form.get("guardian") == "yes",
            lang=str(form.get("lang") or "en"),
            email=str(form.get("email") or "").strip() or None,
            admin=request.state.admin)
    except ConsentError as err:
        view = await in_app(request, _admin_invite_view, raw_id)
        return render(request, "portal/admin_invite.html",
                      {**view, "created": None, "error": str(err)}, status_code=400)
    view = await in_app(request, _admin_invite_view, raw_id)
    url = created.url
    if not url.startswith("http"):
        url = str(request.base_url).rstrip("/") + created.path
    return render(request, "portal/admin_invite.html", {
        **view, "created": created, "link": url, "error": None, "mail_error": mail_error,
        "flash": i18n.t(lang, "portal.admin.created")})


def _expiring_view(a) -> dict:
    now = a.pipeline.clock()
    days = a.settings.portal.alert_days
    names = {s.id: s.display_name for s in a.state.subjects()}
    return {"days": days, "items": [(d, names.get(d.subject_id, "?"))
                                    for d in alerts.due(a.state, now=now, days=days)]}


@security.admin_only
async def admin_expiring(request: Request) -> Response:
    view = await in_app(request, _expiring_view)
    return render(request, "portal/admin_expiring.html", view)


routes: list[BaseRoute] = [
    Route("/i/{token}", invite, methods=["GET"], name="invite"),
    Route("/i/{token}", invite_post, methods=["POST"], name="invite_post"),
    Route("/r/{token}", receipt, methods=["GET"], name="receipt"),
    Route("/w/{token}", withdraw, methods=["GET"], name="withdraw"),
    Route("/w/{token}", withdraw_post, methods=["POST"], name="withdraw_post"),
    Route("/admin/invite/{subject_id}", admin_invite, methods=["GET"], name="admin_invite"),
    Route("/admin/invite/{subject_id}", admin_invite_post, methods=["POST"],
          name="admin_invite_post"),
    Route("/admin/expiring", admin_expiring, methods=["GET"], name="admin_expiring"),
]
