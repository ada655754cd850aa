"""The HTTP face of `consentry serve`: POST /hooks/{connector}, GET /healthz, GET /metrics.

Starlette, served by uvicorn. The handlers are thin: webhooks.py decides, health.py and
metrics.py report. Bodies are read with a hard limit (413 past `max_body_bytes`, whether or
not the sender announced a Content-Length) before anything else looks at them. Blocking work
(a webhook's stat call to the platform, a metrics query) runs in the thread pool.

`build_http_app(..., routes=[...])` takes extra routes/mounts, so the admin console can be
served from the same process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from plugin.service.health import ConnectorState, HealthBoard
from plugin.service.webhooks import Webhooks


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    announced = request.headers.get("content-length")
    if announced is not None and (not announced.isdigit() or int(announced) > limit):
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def build_http_app(*, webhooks: Webhooks, board: HealthBoard, registry: CollectorRegistry,
                   max_body_bytes: int, queue_depth: Callable[[], dict[str, int]] | None = None,
                   routes: Sequence[BaseRoute] = ()) -> Starlette:
    async def hook(request: Request) -> Response:
        name = request.path_params["connector"]
        if not webhooks.known(name):
            return JSONResponse({"error": "no such connector"}, status_code=404)
        try:
            body = await _read_body(request, max_body_bytes)
        except _TooLarge:
            return JSONResponse({"error": f"body larger than {max_body_bytes} bytes"},
                                status_code=413)
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = await run_in_threadpool(webhooks.handle, name, headers, body)
        return JSONResponse(answer.body, status_code=answer.status)

    async def healthz(request: Request) -> Response:
        connectors: dict[str, Any] = {}
        for name, h in board.snapshot().items():
            connectors[name] = {"state": h.state.value, "since": h.since,
                                "last_poll": h.last_poll}
            if h.state is not ConnectorState.OK:
                connectors[name]["detail"] = h.detail
        healthy = all(c["state"] == ConnectorState.OK.value for c in connectors.values())
        payload: dict[str, Any] = {"status": "ok" if healthy else "degraded",
                                   "connectors": connectors}
        if queue_depth is not None:
            try:
                payload["queue"] = await run_in_threadpool(queue_depth)
            except Exception:
                healthy = False
                payload["status"] = "degraded"
                payload["queue"] = "unavailable"
        return JSONResponse(payload, status_code=200 if healthy else 503)

    async def metrics(request: Request) -> Response:
        data = await run_in_threadpool(generate_latest, registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/hooks/{connector}", hook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *routes,
    ])
