"""Webhook calls: authenticate, parse, queue. Transport-free (http.py speaks HTTP).

A call to `/hooks/{connector}` is accepted when it carries the connector's secret either in
its header (`webhook_header`, default X-Consentry-Secret: what Nextcloud's webhook_listeners
sends) or as an HMAC-SHA256 of the body in `X-Consentry-Signature: sha256=<hex>` (for senders
that sign). Both are compared in constant time. A connector without a secret refuses every
call. Nothing is queued unless the call was authentic and well-formed.

Connectors that can read a platform's event (`parse_webhook`) turn it into the refs to queue;
for the others a valid call triggers an immediate poll of that connector.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connectors.base import WebhookSource
from plugin.errors import AuthError, ConnectorError, UnavailableError
from plugin.models import AssetRef
from plugin.service.health import ConnectorState, HealthBoard
from plugin.settings import ConnectorService

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-consentry-signature"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]


def authenticate(service: ConnectorService, headers: Mapping[str, str],
                 body: bytes) -> str | None:
    """"header" or "signature" when the call carries the connector's secret or a valid body
    signature, else None. `headers` must have lower-case names (as Starlette gives them)."""
    secret = service.secret()
    if not secret:
        return None
    given = headers.get(service.webhook_header.lower(), "")
    by_header = hmac.compare_digest(given.encode(), secret.encode())
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    signed = hmac.compare_digest(headers.get(SIGNATURE_HEADER, "").encode(), expected.encode())
    return "header" if by_header else "signature" if signed else None


class Webhooks:
    def __init__(self, *, connectors: Mapping[str, Any], services: Mapping[str, ConnectorService],
                 submit: Callable[[str, Sequence[AssetRef], str], int],
                 trigger: Callable[[str], None], board: HealthBoard,
                 needs_work: Callable[[AssetRef], bool] = lambda ref: True,
                 forget: Callable[[str, Any], int] | None = None) -> None:
        self._connectors = connectors
        self._forget = forget
        self._needs_work = needs_work
        self._services = services
        self._submit = submit
        self._trigger = trigger
        self._board = board
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def known(self, name: str) -> bool:
        return name in self._connectors

    def handle(self, name: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """One call; `headers` with lower-case names. Blocking (parsing may call the platform)."""
        service = self._services[name]
        how = authenticate(service, headers, body)
        if how is None:
            self._warn_once(name, service)
            return Answer(401, {"error": "missing or wrong webhook secret"})
        try:
            event = json.loads(body) if body.strip() else None
        except (ValueError, UnicodeDecodeError):
            return Answer(400, {"error": "body is not JSON"})
        connector = self._connectors[name]
        if not isinstance(connector, WebhookSource):
            self._trigger(name)
            return Answer(202, {"queued": 0, "poll": "triggered"})
        if not isinstance(event, dict):
            return Answer(400, {"error": "body is not an event object"})
        try:
            refs = connector.parse_webhook(dict(headers), body)
        except AuthError:
            if how != "header":  # the connector itself wants the secret header
                return Answer(401, {"error": "missing or wrong webhook secret"})
            self._board.failed(name, ConnectorState.AUTH_FAILED, "credentials refused")
            return Answer(503, {"error": "the platform refused our credentials"})
        except UnavailableError:
            self._board.failed(name, ConnectorState.UNAVAILABLE, "platform unreachable")
            return Answer(503, {"error": "platform unreachable; the poller will catch up"})
        except ConnectorError as err:
            log.info("webhook for %s refused: %s", name, type(err).__name__)
            return Answer(400, {"error": "not an event this connector understands"})
        self._board.ok(name)  # the platform answered (what ends a webhooks-only outage)
        if self._forget is not None:
            self._forget(name, connector)  # a delete event: drop our records of that asset
        # Our own write-back fires events too: an asset whose processing key is unchanged
        # is not queued (the worker would only skip it).
        work = [ref for ref in refs if self._needs_work(ref)]
        queued = self._submit(name, work, "webhook") if work else 0
        return Answer(202, {"queued": queued, "assets": len(refs)})

    def _warn_once(self, name: str, service: ConnectorService) -> None:
        if service.secret():
            return
        with self._lock:
            if name in self._warned:
                return
            self._warned.add(name)
        log.warning("webhook for %s refused: no webhook secret configured (set webhook_secret "
                    "or webhook_secret_env in its [[connectors]] table)", name)
