"""The dashboard (what needs attention, per connector) and the DPIA draft download."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugin import dpia
from plugin.web import security
from plugin.web.admin import ops
from plugin.web.app import in_app, render


@security.admin_only
async def dashboard(request: Request) -> Response:
    data = await in_app(request, ops.dashboard)
    return render(request, "admin/dashboard.html", data)


@security.admin_only
async def dpia_download(request: Request) -> Response:
    text = await in_app(request, dpia.generate)
    return Response(text, media_type="text/markdown; charset=utf-8", headers={
        "Content-Disposition": 'attachment; filename="consentry-dpia-draft.md"'})


routes = [
    Route("/", dashboard, methods=["GET"], name="dashboard"),
    Route("/dpia", dpia_download, methods=["GET"], name="dpia"),
]
