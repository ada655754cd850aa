"""Forget assets the platform deleted: their face records say who was in a photo that no
longer exists, and keeping that has no purpose (GDPR storage limitation).

Connectors learn of deletions in their own way and report them through `DeletionSource`:
Nextcloud from its NodeDeletedEvent webhooks (and files moved out of the selection), the folder
connector from a full listing in which a known file is missing while the library root is there.
Only Consentry's records go: the platform's copy is the platform's business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from connectors.base import DeletionSource
from plugin.audit import AuditLog
from plugin.state import StateStore

log = logging.getLogger(__name__)


def forget_assets(state: StateStore, audit: AuditLog, connector: str, asset_ids: Iterable[str],
                  *, reason: str) -> int:
    """Delete the state rows of these assets (one transaction each, audited); returns how many
    were known. Unknown ids are ignored: a deletion may be reported twice."""
    forgotten = 0
    for asset_id in dict.fromkeys(asset_ids):
        with state.begin() as conn:
            if state.delete_asset(connector, asset_id, conn):
                audit.append("asset.forgotten", asset=f"{connector}:{asset_id}",
                             details={"reason": reason}, conn=conn)
                forgotten += 1
    if forgotten:
        audit.sync_head()
        log.info("%s: forgot %d deleted asset(s)", connector, forgotten)
    return forgotten


def forget_reported(state: StateStore, audit: AuditLog, connector: object, name: str) -> int:
    """Drain what a connector learnt was deleted, if it can tell."""
    if not isinstance(connector, DeletionSource):
        return 0
    return forget_assets(state, audit, name, connector.take_deleted(state),
                         reason="deleted on the platform")
