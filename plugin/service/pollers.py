"""Pollers: one thread per connector lists what changed and queues it.

Polling is the safety net under the webhooks (Nextcloud delivers them from a background job,
minutes late with cron; folder, Immich and ResourceSpace have none). A poll asks the connector
for changes since its cursor, leaves out assets whose processing key is unchanged (a full walk
would otherwise queue the whole library only to skip it), adds the assets that failed before
(a cursor moves past them), queues the rest and only then stores the new cursor: a crash
between the two re-lists, never loses a change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from plugin.errors import AuthError, ConnectorError, UnavailableError
from plugin.forget import forget_reported
from plugin.models import AssetRef
from plugin.service.health import ConnectorState, HealthBoard
from plugin.service.scheduler import Every

log = logging.getLogger(__name__)

Submit = Callable[[str, Sequence[AssetRef], str], int]


def poll_once(pipeline: Any, name: str, submit: Submit) -> int:
    """List the changes of connector `name`, queue the ones that need work; jobs queued."""
    connector = pipeline.connectors[name]
    state = pipeline.state
    cursor = state.cursor(name)
    listed, new_cursor = connector.changes(cursor)
    forget_reported(state, pipeline.audit, connector, name)
    seen = {r.id for r in listed}
    refs = [r for r in listed if needs_work(pipeline, r)]
    if cursor is not None:
        refs += [row.ref for row in state.assets(connector=name)
                 if row.last_error and row.asset_id not in seen]
    queued = submit(name, refs, "poll") if refs else 0
    state.set_cursor(name, new_cursor)
    return queued


def needs_work(pipeline: Any, ref: AssetRef) -> bool:
    row = pipeline.state.asset(ref.connector, ref.id)
    return not (row and row.processing_key == pipeline.processing_key(ref)
                and not row.needs_analysis and not row.last_error)


def guarded(board: HealthBoard, name: str, work: Callable[[], int], *,
            polled: bool) -> int | None:
    """Run `work` for connector `name`, keeping its health; None when it failed."""
    try:
        found = work()
    except AuthError:
        board.failed(name, ConnectorState.AUTH_FAILED, "credentials refused", polled=polled)
    except UnavailableError:
        board.failed(name, ConnectorState.UNAVAILABLE, "platform unreachable", polled=polled)
    except ConnectorError as err:
        board.failed(name, ConnectorState.UNAVAILABLE, type(err).__name__, polled=polled)
        log.debug("poll of %s failed", name, exc_info=True)
    else:
        board.ok(name, polled=polled, found=found)
        return found
    return None


class Poller(Every):
    """The poll thread of one connector; `trigger()` polls at once (a webhook arrived)."""

    def __init__(self, name: str, interval: float, *, pipeline: Any, submit: Submit,
                 board: HealthBoard) -> None:
        self.connector = name
        self._pipeline, self._submit, self._board = pipeline, submit, board
        super().__init__(f"poll-{name}", interval, self._poll, run_first=interval > 0)

    def _poll(self) -> None:
        guarded(self._board, self.connector,
                lambda: poll_once(self._pipeline, self.connector, self._submit), polled=True)
