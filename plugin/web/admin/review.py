"""The review queue: uncertain faces with their crops (rendered on the fly, never stored);
confirm a candidate, reject the proposal, or register a new person for the face."""

from __future__ import annotations

import logging
import uuid

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugin import review
from plugin.errors import ConsentError, ConsentryError
from plugin.web import security
from plugin.web.admin import forms
from plugin.web.app import flash, in_app, redirect, render

log = logging.getLogger(__name__)
PAGE = 50


@security.admin_only
async def queue(request: Request) -> Response:
    include_unknown = request.query_params.get("unknown") == "1"

    def load(app):  # type: ignore[no-untyped-def]
        items = review.queue(app.state, include_unknown=include_unknown)
        subjects = sorted(app.state.subjects(), key=lambda s: s.display_name.casefold())
        return items, subjects

    items, subjects = await in_app(request, load)
    return render(request, "admin/review.html", {
        "items": items[:PAGE], "total": len(items), "subjects": subjects,
        "include_unknown": include_unknown})


@security.admin_only
async def decide(request: Request) -> Response:
    form = request.state.form
    action = forms.text(form, "action", limit=20)
    try:
        ref = review.FaceRef.parse(forms.text(form, "face", limit=1000))
    except ConsentryError as err:
        raise HTTPException(404) from err
    if action == "new":
        target = request.url_for("admin:person_new").path
        from urllib.parse import quote

        return redirect(f"{target}?face={quote(str(ref), safe='')}")
    raw = forms.text(form, "subject", limit=64)
    try:
        sid = uuid.UUID(raw) if raw else None
    except ValueError as err:
        raise HTTPException(404) from err

    admin = request.state.admin

    def run(app):  # type: ignore[no-untyped-def]
        subject = app.state.subject(sid) if sid else None
        if sid and subject is None:
            raise HTTPException(404)
        if action == "confirm":
            if subject is None:
                raise ConsentError("choose the person to confirm")
            return review.confirm(app.pipeline, ref, subject, actor=admin,
                                  learn=app.settings.matching.learn_from_review)
        if action == "reject":
            return review.reject(app.pipeline, ref, subject, actor=admin)
        raise HTTPException(400)

    try:
        await in_app(request, run)
        flash(request, f"admin.review.{'confirmed' if action == 'confirm' else 'rejected'}")
    except ConsentryError as err:
        log.info("review decision refused for %s: %s", ref, type(err).__name__)
        flash(request, "admin.review.refused")
    return redirect(request.url_for("admin:review").path)


routes = [
    Route("/review", queue, methods=["GET"], name="review"),
    Route("/review/decide", decide, methods=["POST"], name="review_decide"),
]
