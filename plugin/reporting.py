"""Per-asset report rows, computed from the stored face records with the policy of now."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from plugin.consent import asset_verdict
from plugin.state import StateStore


def report_rows(state: StateStore, *, now: datetime,
                channels: Sequence[str]) -> list[dict[str, Any]]:
    subjects = {s.id: s for s in state.subjects()}
    consents = state.consents_by_subject()
    rows = []
    for asset in state.assets():
        if asset.geometry is None:
            rows.append({"asset": f"{asset.connector}:{asset.name}", "status": "failed",
                         "names": [], "channels": [], "valid_until": None,
                         "unidentified": None, "error": asset.last_error})
            continue
        verdict = asset_verdict(state.faces(asset.connector, asset.asset_id), subjects,
                                consents, now, channels=channels)
        rows.append({
            "asset": f"{asset.connector}:{asset.name}",
            "status": verdict.status.value,
            "names": list(verdict.names),
            "channels": list(verdict.channels),
            "valid_until": verdict.valid_until.date().isoformat() if verdict.valid_until
            else None,
            "unidentified": verdict.unidentified,
            "error": asset.last_error,
        })
    return rows
