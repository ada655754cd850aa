"""The flow of one asset (DESIGN §3), as a list of stages read top to bottom.

Every asset ends `processed`, `skipped` or `failed` with a reason; one bad asset never stops
the batch. Vectors live only in one photo's analysis (a pool worker's pipe, then `_analyse`):
they are matched and dropped, never stored.
Re-evaluation (consent changes) reuses the stored face records: no download, no detection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from connectors.base import Connector, Fetched
from plugin.audit import AuditLog
from plugin.consent import POLICY_VERSION, asset_verdict, has_active_biometric
from plugin.engine import FaceEngine
from plugin.errors import (
    AssetError,
    AuthError,
    ConnectorError,
    ConsentryError,
    UnavailableError,
)
from plugin.matcher import Matcher, MatchSettings
from plugin.models import (
    AssetRef,
    AssetVerdict,
    Consent,
    FaceBox,
    FaceRecord,
    FaceState,
    Geometry,
    Subject,
)
from plugin.state import AssetRow, StateStore, now_utc
from plugin.vault import Vault
from plugin.workers import AnalysisPool, RawAnalysis, detect_and_encode

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    PROCESSED = "processed"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AssetResult:
    ref: AssetRef
    outcome: Outcome
    reason: str = ""
    status: str | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    """An asset fetched and being analysed (in the pool, or later in this process)."""

    row: AssetRow | None
    fetched: Fetched
    future: Future[RawAnalysis] | None


@dataclass(frozen=True, slots=True)
class Analysis:
    geometry: Geometry
    faces: tuple[FaceRecord, ...]


def carry_decisions(new: Sequence[FaceRecord], old: Sequence[FaceRecord]) -> list[FaceRecord]:
    """Keep human review decisions on re-detected faces (matched by overlap, IoU >= 0.5)."""
    decided = [f for f in old if f.state in (FaceState.CONFIRMED, FaceState.REJECTED)]
    result = []
    for face in new:
        best = max(decided, key=lambda d: d.box.iou(face.box), default=None)
        if best is not None and best.box.iou(face.box) >= 0.5:
            if best.state == FaceState.CONFIRMED:
                face = face.model_copy(update={"state": best.state,
                                               "subject_id": best.subject_id})
            elif face.state != FaceState.AUTO or face.subject_id == best.subject_id:
                # A rejected match is never proposed again for that face, also after a rescan
                # that found it unknown; only a confident match to someone else replaces it.
                face = face.model_copy(update={"state": FaceState.REJECTED,
                                               "subject_id": best.subject_id,
                                               "candidates": ()})
        result.append(face)
    return result


class Pipeline:
    """Scan and re-evaluate assets of the configured connectors."""

    def __init__(
        self,
        *,
        state: StateStore,
        vault: Vault,
        audit: AuditLog,
        engine: FaceEngine,
        connectors: Mapping[str, Connector],
        match_settings: MatchSettings,
        channels: Sequence[str],
        fingerprint_key: bytes,
        decode_options: Mapping[str, Any] | None = None,
        clock: Callable[[], datetime] = now_utc,
        raise_errors: bool = False,
        pool: AnalysisPool | None = None,
    ) -> None:
        self.state, self.vault, self.audit, self.engine = state, vault, audit, engine
        self.connectors = dict(connectors)
        self.match_settings = match_settings
        self.channels = tuple(channels)
        self._fingerprint_key = fingerprint_key
        self.decode_options = dict(decode_options or {})
        self.clock = clock
        self.raise_errors = raise_errors
        self.pool = pool

    # -- keys --------------------------------------------------------------------------
    def processing_key(self, ref: AssetRef) -> str:
        m = self.match_settings
        parts = (ref.connector, ref.id, ref.version, self.engine.version, POLICY_VERSION,
                 f"{m.threshold}/{m.margin}/{m.review_threshold}/{m.templates}",
                 json.dumps(self.decode_options, sort_keys=True))
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def verdict_fingerprint(self, verdict: AssetVerdict) -> str:
        # Keyed, so the state database holds nothing a name list could be checked against.
        payload = verdict.model_dump_json().encode() + self.engine.version.encode()
        return hmac.new(self._fingerprint_key, payload, hashlib.sha256).hexdigest()

    # -- consent context ---------------------------------------------------------------
    def _context(self) -> tuple[dict[uuid.UUID, Subject], dict[uuid.UUID, list[Consent]]]:
        return {s.id: s for s in self.state.subjects()}, self.state.consents_by_subject()

    def build_matcher(self, now: datetime) -> Matcher:
        """Templates of subjects with an active biometric grant, and only those."""
        _, consents = self._context()
        allowed = {sid for sid, cs in consents.items() if has_active_biometric(cs, now)}
        ids, matrix = self.vault.all_templates()
        keep = [i for i, sid in enumerate(ids) if sid in allowed]
        return Matcher([ids[i] for i in keep], matrix[keep], self.match_settings)

    # -- scanning ----------------------------------------------------------------------
    def scan(
        self,
        connector_name: str,
        refs: Iterable[AssetRef] | None = None,
        *,
        on_result: Callable[[AssetResult], None] | None = None,
    ) -> list[AssetResult]:
        connector = self.connectors[connector_name]
        cursor = self.state.cursor(connector_name)
        new_cursor = cursor
        if refs is None:
            listed, new_cursor = connector.changes(cursor)
            refs = listed + self._failed_before(connector_name, listed, new_cursor)
        now = self.clock()
        matcher = self.build_matcher(now)
        subjects, consents = self._context()
        context = {"matcher": matcher, "subjects": subjects, "consents": consents, "now": now}
        results: list[AssetResult] = []

        def done(result: AssetResult) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        # Up to two photos per worker in flight: the pool decodes and detects the next ones
        # while this process matches, writes XMP and records the previous one.
        window: deque[tuple[AssetRef, Pending]] = deque()
        depth = 2 * self.pool.workers if self.pool else 0
        for ref in refs:
            prepared = self._guarded(ref, lambda r=ref: self._prepare(connector, r))
            if isinstance(prepared, AssetResult):
                done(prepared)
                continue
            window.append((ref, prepared))
            while len(window) > depth:
                first, pending = window.popleft()
                done(self._guarded(first, lambda r=first, p=pending: self._complete(
                    connector, r, p, **context)))
        while window:
            first, pending = window.popleft()
            done(self._guarded(first, lambda r=first, p=pending: self._complete(
                connector, r, p, **context)))
        self.state.set_cursor(connector_name, new_cursor)
        return results

    def _failed_before(self, connector_name: str, listed: Sequence[AssetRef],
                       cursor: str | None) -> list[AssetRef]:
        """Assets that failed on an earlier run of a cursor-based connector.

        A cursor moves past an asset whether or not it was processed, so an incremental
        listing would never offer it again; a full listing (cursor None) does by itself.
        """
        if cursor is None:
            return []
        seen = {r.id for r in listed}
        return [row.ref for row in self.state.assets(connector=connector_name)
                if row.last_error and row.asset_id not in seen]

    def _guarded(self, ref: AssetRef, work: Callable[[], AssetResult]) -> AssetResult:
        try:
            return work()
        except AssetError as err:
            reason = err.cause
        except (AuthError, UnavailableError):
            raise  # credentials refused or platform down: stop this connector, retry later
        except ConnectorError as err:
            reason = str(err)  # the platform refused this one asset (404, 409, ...)
        except ConsentryError:
            raise  # engine, key, state, config: the whole run is wrong, not this asset
        except Exception as err:  # one odd asset must not stop the batch
            if self.raise_errors:
                raise
            log.debug("unexpected failure on %s", ref.name, exc_info=True)
            reason = f"{type(err).__name__}: {err}"
        if self.raise_errors:
            raise
        log.warning("failed: %s: %s", ref.name, reason)
        self.state.record_failure(ref, reason)
        self.audit.append("asset.failed", asset=f"{ref.connector}:{ref.id}",
                          details={"reason": reason[:300]})
        return AssetResult(ref, Outcome.FAILED, reason)

    def _prepare(self, connector: Connector, ref: AssetRef) -> AssetResult | Pending:
        """Skip an unchanged asset, or fetch it and start its analysis."""
        row = self.state.asset(ref.connector, ref.id)
        if row and row.processing_key == self.processing_key(ref) and not row.needs_analysis:
            return AssetResult(ref, Outcome.SKIPPED, "unchanged", row.status)
        fetched = connector.fetch(ref, "analysis")
        future = (self.pool.submit(fetched.path, asset=ref.name,
                                   decode_options=self.decode_options)
                  if self.pool else None)
        return Pending(row, fetched, future)

    def _complete(self, connector: Connector, ref: AssetRef, pending: Pending, *,
                  matcher: Matcher, subjects: Mapping[uuid.UUID, Subject],
                  consents: Mapping[uuid.UUID, Sequence[Consent]],
                  now: datetime) -> AssetResult:
        row, fetched = pending.row, pending.fetched
        raw = (pending.future.result() if pending.future is not None else
               detect_and_encode(self.engine, fetched.path, asset=ref.name,
                                 decode_options=self.decode_options))
        analysis = self._analyse(raw, fetched, matcher)
        old_faces = self.state.faces(ref.connector, ref.id) if row else []
        faces = carry_decisions(analysis.faces, old_faces)
        verdict = asset_verdict(faces, subjects, consents, now, channels=self.channels)
        written = self._write(connector, ref, verdict, analysis.geometry,
                              previous=row.verdict_fingerprint if row else None)
        with self.state.begin() as conn:
            self.state.save_analysis(written, geometry=analysis.geometry, faces=faces,
                                     processing_key=self.processing_key(written), conn=conn)
            self.state.save_written(written, status=verdict.status.value,
                                    verdict_fingerprint=self.verdict_fingerprint(verdict),
                                    conn=conn)
            self.audit.append("asset.analysed", asset=f"{ref.connector}:{ref.id}",
                              details=_audit_details(verdict, faces), conn=conn)
        self.audit.sync_head()
        return AssetResult(written, Outcome.PROCESSED, "", verdict.status.value)

    def _analyse(self, raw: RawAnalysis, fetched: Fetched, matcher: Matcher) -> Analysis:
        """Match the encodings and map the boxes onto the original; drop the vectors."""
        detections = raw.detections
        matches = matcher.match(raw.vectors) if len(detections) else []
        geometry = fetched.original or raw.geometry
        to_original = _preview_scale(raw.geometry, geometry)
        faces = tuple(
            FaceRecord(box=to_original(d.box), state=m.state, subject_id=m.subject_id,
                       distance=None if m.distance is None else round(m.distance, 4),
                       candidates=m.candidates)
            for d, m in zip(detections, matches, strict=True)
        )
        return Analysis(geometry=geometry, faces=faces)

    def _write(self, connector: Connector, ref: AssetRef, verdict: AssetVerdict,
               geometry: Geometry, *, previous: str | None) -> AssetRef:
        if previous is not None and previous == self.verdict_fingerprint(verdict):
            return ref
        return connector.write_back(ref, verdict, geometry)

    def forget_on_platforms(self, subject_id: uuid.UUID, *, reason: str) -> dict[str, dict]:
        """Let each platform that keeps its own people (Immich) drop what Consentry created
        for this subject: its faces and the person record, which would keep the name."""
        done: dict[str, dict] = {}
        for name, connector in self.connectors.items():
            forget = getattr(connector, "forget_subject", None)
            if forget is None:
                continue
            counts = forget(subject_id)
            done[name] = counts
            self.audit.append("platform.subject_forgotten", subject_id=subject_id,
                              details={"connector": name, "reason": reason, **counts})
        return done

    # -- re-evaluation -----------------------------------------------------------------
    def reevaluate(
        self,
        *,
        subject_ids: Sequence[uuid.UUID] | None = None,
        assets: Sequence[tuple[str, str]] | None = None,
        on_result: Callable[[AssetResult], None] | None = None,
        reason: str = "reevaluate",
    ) -> list[AssetResult]:
        """Recompute verdicts from stored face records and rewrite what changed."""
        now = self.clock()
        subjects, consents = self._context()
        rows = self.state.assets(subject_ids=subject_ids, keys=assets)
        results = []
        for row in rows:
            if row.geometry is None or row.connector not in self.connectors:
                continue
            result = self._guarded(row.ref, lambda r=row: self._relabel(
                r, subjects=subjects, consents=consents, now=now, reason=reason))
            results.append(result)
            if on_result:
                on_result(result)
        return results

    def _relabel(self, row, *, subjects, consents, now, reason: str) -> AssetResult:
        faces = self.state.faces(row.connector, row.asset_id)
        verdict = asset_verdict(faces, subjects, consents, now, channels=self.channels)
        fingerprint = self.verdict_fingerprint(verdict)
        if fingerprint == row.verdict_fingerprint:
            return AssetResult(row.ref, Outcome.SKIPPED, "verdict unchanged", verdict.status)
        connector = self.connectors[row.connector]
        written = connector.write_back(row.ref, verdict, row.geometry)
        with self.state.begin() as conn:
            # Our own write is not a change: the processing key follows the new version.
            self.state.save_written(written, status=verdict.status.value,
                                    verdict_fingerprint=fingerprint, conn=conn,
                                    processing_key=self.processing_key(written)
                                    if row.processing_key else None)
            self.audit.append("asset.relabelled", asset=f"{row.connector}:{row.asset_id}",
                              details={"reason": reason, "status": verdict.status.value,
                                       "previous_status": row.status}, conn=conn)
        self.audit.sync_head()
        return AssetResult(written, Outcome.PROCESSED, reason, verdict.status.value)


def _preview_scale(preview: Geometry, original: Geometry) -> Callable[[FaceBox], FaceBox]:
    """Map a box on the (upright) preview onto the original's displayed grid.

    Previews from DAMs are rendered upright, so their displayed grid is the original's
    displayed grid scaled; each axis is scaled on its own to absorb rounding of the preview size.
    """
    if preview == original:
        return lambda box: box
    pw, ph = preview.displayed_size
    ow, oh = original.displayed_size
    sx, sy = ow / pw, oh / ph

    def scale(box: FaceBox) -> FaceBox:
        return FaceBox(top=min(oh, round(box.top * sy)), right=min(ow, round(box.right * sx)),
                       bottom=min(oh, round(box.bottom * sy)), left=min(ow, round(box.left * sx)))

    return scale


def _audit_details(verdict: AssetVerdict, faces: Sequence[FaceRecord]) -> dict[str, Any]:
    return {
        "status": verdict.status.value,
        "faces": len(faces),
        "identified": sorted({str(f.subject_id) for f in faces if f.subject_id}),
        "uncertain": sum(1 for f in faces if f.state == FaceState.UNCERTAIN),
        "consent_ids": [str(c) for c in verdict.consent_ids],
    }
