"""The flow of one asset (DESIGN §3), as a list of stages read top to bottom.

Every asset ends `processed`, `skipped` or `failed` with a reason; one bad asset never stops
the batch. Vectors live only in one photo's analysis (a pool worker's pipe, then `_analyse`):
they are matched and dropped, never stored.
Re-evaluation (consent changes) reuses the stored face records: no download, no detection.
At the end of a scan run, faces named on strong evidence may vouch for the same person's
unnamed faces of that run (plugin/corroboration.py); those assets are then re-labelled.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from connectors.base import Connector, Fetched
from plugin import crashpoints
from plugin.audit import AuditLog
from plugin.consent import POLICY_VERSION, asset_verdict, has_active_biometric
from plugin.corroboration import CorroborationSettings, RunCorroboration, Vouched, vouched_state
from plugin.engine import FaceEngine
from plugin.errors import (
    AssetError,
    AuthError,
    ConnectorError,
    ConsentryError,
    UnavailableError,
)
from plugin.forget import forget_reported
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
    # seconds per stage of a processed asset: fetch, analyse (detect+encode+match), write
    # (platform write + state commit); the job ledger keeps them for latency metrics
    timings: Mapping[str, float] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class Pending:
    """An asset fetched and being analysed (in the pool, or later in this process)."""

    row: AssetRow | None
    fetched: Fetched
    future: Future[RawAnalysis] | None
    fetch_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Analysis:
    geometry: Geometry
    faces: tuple[FaceRecord, ...]
    # face index -> encoding, for the faces that passed the quality gates; in memory only
    vectors: Mapping[int, Any] = field(default_factory=dict)


def _take_finished(window: list[tuple[AssetRef, Pending]]) -> list[tuple[AssetRef, Pending]]:
    """Remove and return the in-flight assets whose analysis is done, oldest first.

    Waits until at least one is; an asset analysed in this process (no future) is taken at once.
    """
    futures = [p.future for _, p in window if p.future is not None]
    if len(futures) == len(window) and not any(f.done() for f in futures):
        wait(futures, return_when=FIRST_COMPLETED)
    finished = [item for item in window if item[1].future is None or item[1].future.done()]
    taken = {id(item) for item in finished}
    window[:] = [item for item in window if id(item) not in taken]
    return finished


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
        corroboration: CorroborationSettings | None = None,
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
        self.corroboration = corroboration
        # Platform writes in parallel when re-labelling (see `reevaluate`).
        self.write_threads = min(4, os.cpu_count() or 1)

    # -- keys --------------------------------------------------------------------------
    def processing_key(self, ref: AssetRef) -> str:
        m, c = self.match_settings, self.corroboration
        parts = (ref.connector, ref.id, ref.version, self.engine.version, POLICY_VERSION,
                 f"{m.threshold}/{m.margin}/{m.review_threshold}/{m.templates}"
                 + (f"/vouch {c.anchor}/{c.threshold}" if c else ""),
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
            forget_reported(self.state, self.audit, connector, connector_name)
            refs = listed + self._failed_before(connector_name, listed, new_cursor)
        now = self.clock()
        matcher = self.build_matcher(now)
        subjects, consents = self._context()
        corroboration = (RunCorroboration(matcher, self.match_settings.margin,
                                          self.corroboration)
                         if self.corroboration and matcher.subject_count else None)
        context = {"matcher": matcher, "subjects": subjects, "consents": consents, "now": now,
                   "corroboration": corroboration}
        results: list[AssetResult] = []

        def done(result: AssetResult) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        # Up to two photos per worker in flight: the pool decodes and detects the next ones
        # while this process matches, writes XMP and records the previous one. Finished
        # analyses are completed as they come, not in listing order, so a crowd photo that
        # takes seconds does not leave the other workers idle behind it.
        window: list[tuple[AssetRef, Pending]] = []
        depth = 2 * self.pool.workers if self.pool else 0

        def complete(items: Sequence[tuple[AssetRef, Pending]]) -> None:
            for ref, pending in items:
                done(self._guarded(ref, lambda r=ref, p=pending: self._complete(
                    connector, r, p, **context)))

        for ref in refs:
            prepared = self._guarded(ref, lambda r=ref: self._prepare(connector, r))
            if isinstance(prepared, AssetResult):
                done(prepared)
                continue
            window.append((ref, prepared))
            if len(window) > depth:
                complete(_take_finished(window))
        while window:
            complete(_take_finished(window))
        if corroboration is not None:
            self._apply_vouches(corroboration.resolve(), results)
        if new_cursor != cursor:  # a job of given refs (service mode) leaves the cursor alone
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
        started = time.perf_counter()
        fetched = connector.fetch(ref, "analysis")
        fetch_seconds = time.perf_counter() - started
        crashpoints.hit("fetch")
        future = (self.pool.submit(fetched.path, asset=ref.name,
                                   decode_options=self.decode_options)
                  if self.pool else None)
        return Pending(row, fetched, future, fetch_seconds)

    def _complete(self, connector: Connector, ref: AssetRef, pending: Pending, *,
                  matcher: Matcher, subjects: Mapping[uuid.UUID, Subject],
                  consents: Mapping[uuid.UUID, Sequence[Consent]],
                  now: datetime, corroboration: RunCorroboration | None = None) -> AssetResult:
        row, fetched = pending.row, pending.fetched
        started = time.perf_counter()
        raw = (pending.future.result() if pending.future is not None else
               detect_and_encode(self.engine, fetched.path, asset=ref.name,
                                 decode_options=self.decode_options))
        analysis = self._analyse(raw, fetched, matcher)
        old_faces = self.state.faces(ref.connector, ref.id) if row else []
        faces = carry_decisions(analysis.faces, old_faces)
        verdict = asset_verdict(faces, subjects, consents, now, channels=self.channels)
        crashpoints.hit("detect")
        analysed = time.perf_counter()
        written = self._write(connector, ref, verdict, analysis.geometry,
                              previous=row.verdict_fingerprint if row else None)
        crashpoints.hit("write")
        with self.state.begin() as conn:
            self.state.save_analysis(written, geometry=analysis.geometry, faces=faces,
                                     processing_key=self.processing_key(written), conn=conn)
            self.state.save_written(written, status=verdict.status.value,
                                    verdict_fingerprint=self.verdict_fingerprint(verdict),
                                    conn=conn)
            self.audit.append("asset.analysed", asset=f"{ref.connector}:{ref.id}",
                              details=_audit_details(verdict, faces), conn=conn)
        self.audit.sync_head()
        if corroboration is not None:
            corroboration.observe((ref.connector, written.id), faces, analysis.vectors)
        timings = {"fetch": pending.fetch_seconds, "analyse": analysed - started,
                   "write": time.perf_counter() - analysed}
        return AssetResult(written, Outcome.PROCESSED, "", verdict.status.value, timings)

    def _analyse(self, raw: RawAnalysis, fetched: Fetched, matcher: Matcher) -> Analysis:
        """Match the encodings and map the boxes onto the original; the vectors go no further
        than this run's corroboration (memory only)."""
        detections = raw.detections
        matches = raw.matches(matcher)  # quality-gated faces: UNCERTAIN, never named
        geometry = fetched.original or raw.geometry
        to_original = preview_scale(raw.geometry, geometry)
        faces = tuple(
            FaceRecord(box=to_original(d.box), state=m.state, subject_id=m.subject_id,
                       distance=None if m.distance is None else round(m.distance, 4),
                       candidates=m.candidates)
            for d, m in zip(detections, matches, strict=True)
        )
        return Analysis(geometry=geometry, faces=faces, vectors=raw.vectors_by_detection())

    def _apply_vouches(self, vouches: Sequence[Vouched], results: list[AssetResult]) -> None:
        """Record the names the run's anchors vouch for and re-label those assets.

        The scan's result of a re-labelled asset is replaced (one result per asset stays);
        a face a reviewer decided before the run ended keeps the decision.
        """
        by_asset: dict[tuple[str, str], list[Vouched]] = defaultdict(list)
        for v in vouches:
            by_asset[v.asset].append(v)
        keys = list(by_asset)
        stored: dict[tuple[str, str], list[FaceRecord]] = {}
        for lo in range(0, len(keys), _RELABEL_GROUP):  # bounded IN lists
            stored.update(self.state.faces_of(keys[lo:lo + _RELABEL_GROUP]))
        changed, entries = [], []
        with self.state.begin() as conn:  # one transaction, one audit head sync for the run
            for (connector, asset_id), items in by_asset.items():
                faces = stored.get((connector, asset_id), [])
                updated = list(faces)
                for v in items:
                    face = vouched_state(faces[v.idx], v) if v.idx < len(faces) else None
                    if face is None:
                        continue
                    updated[v.idx] = face
                    entries.append({"action": "face.corroborated", "subject_id": v.subject_id,
                                    "asset": f"{connector}:{asset_id}",
                                    "details": {"face": v.idx, "distance": v.distance,
                                                "vouched_by": face.vouched_by}})
                if updated != faces:
                    self.state.set_faces_state(connector, asset_id, updated, conn)
                    changed.append((connector, asset_id))
            self.audit.append_many(entries, conn=conn)
        self.audit.sync_head()
        if not changed:
            return
        log.info("corroboration: %d face(s) named on %d asset(s) by faces of the same run",
                 len(entries), len(changed))
        relabelled = {(r.ref.connector, r.ref.id): r
                      for r in self.reevaluate(assets=changed, reason="corroborated")}
        for i, r in enumerate(results):
            again = relabelled.get((r.ref.connector, r.ref.id))
            if again is not None and again.outcome != Outcome.SKIPPED:
                results[i] = again

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
        """Recompute verdicts from stored face records and rewrite what changed.

        A consent change can touch thousands of photos, and a platform write (exiftool: ~5-8 ms
        of one core per file) is the cost: connectors that allow it (`concurrent_write_back`)
        get `_RELABEL_WRITES_PER_THREAD` writes in flight per write thread (the XMP writer has
        one exiftool process per core and sends the writes that queue up meanwhile to exiftool
        as one command), while this thread computes verdicts and records the results, up to
        `_RELABEL_GROUP` assets per transaction with one audit head sync per group. A crash in
        between loses only the records of files already written: the next run finds their
        verdict fingerprint stale, plans the same XMP, and the writer leaves the file alone.
        """
        now = self.clock()
        subjects, consents = self._context()
        rows = [r for r in self.state.assets(subject_ids=subject_ids, keys=assets)
                if r.geometry is not None and r.connector in self.connectors]
        results: list[AssetResult] = []
        written_group: list[tuple[AssetRow, AssetVerdict, str, AssetResult]] = []

        def report(result: AssetResult) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        def flush() -> None:
            if not written_group:
                return
            with self.state.begin() as conn:
                self._record_relabels(written_group, reason, conn)
            self.audit.sync_head()
            group = list(written_group)
            written_group.clear()
            for *_, done in group:
                report(done)

        def finish(row: AssetRow, verdict: AssetVerdict, fingerprint: str,
                   write: Callable[[], AssetRef]) -> None:
            result = self._guarded(row.ref, lambda: AssetResult(
                write(), Outcome.PROCESSED, reason, verdict.status.value))
            if result.outcome != Outcome.PROCESSED:
                report(result)
                return
            written_group.append((row, verdict, fingerprint, result))
            if len(written_group) >= _RELABEL_GROUP:
                flush()

        threads = max(1, self.write_threads) * _RELABEL_WRITES_PER_THREAD
        window: deque[tuple[AssetRow, AssetVerdict, str, Future[AssetRef]]] = deque()
        faces: dict[tuple[str, str], list[FaceRecord]] = {}
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="relabel") as pool:
            try:
                for i, row in enumerate(rows):
                    if i % _RELABEL_GROUP == 0:  # face records a group at a time, one query
                        faces = self.state.faces_of(
                            [(r.connector, r.asset_id) for r in rows[i:i + _RELABEL_GROUP]])
                    stored = faces.get((row.connector, row.asset_id), [])
                    planned = self._guarded(row.ref, lambda r=row, f=stored: self._plan_relabel(
                        r, f, subjects=subjects, consents=consents, now=now))
                    if isinstance(planned, AssetResult):
                        report(planned)
                        continue
                    verdict, fingerprint = planned
                    connector = self.connectors[row.connector]
                    if not getattr(connector, "concurrent_write_back", False):
                        finish(row, verdict, fingerprint, lambda c=connector, r=row, v=verdict:
                               c.write_back(r.ref, v, r.geometry))
                        continue
                    window.append((row, verdict, fingerprint, pool.submit(
                        connector.write_back, row.ref, verdict, row.geometry)))
                    while len(window) > 2 * threads:
                        r, v, f, fut = window.popleft()
                        finish(r, v, f, fut.result)
                while window:
                    r, v, f, fut = window.popleft()
                    finish(r, v, f, fut.result)
                flush()
            except BaseException:
                with contextlib.suppress(Exception):
                    flush()  # record the files already written before stopping
                raise
        return results

    def _plan_relabel(self, row: AssetRow, faces: Sequence[FaceRecord], *, subjects, consents,
                      now) -> AssetResult | tuple[AssetVerdict, str]:
        verdict = asset_verdict(faces, subjects, consents, now, channels=self.channels)
        fingerprint = self.verdict_fingerprint(verdict)
        if fingerprint == row.verdict_fingerprint:
            return AssetResult(row.ref, Outcome.SKIPPED, "verdict unchanged", verdict.status)
        return verdict, fingerprint

    def _record_relabels(self, group: Sequence[tuple[AssetRow, AssetVerdict, str, AssetResult]],
                         reason: str, conn: Any) -> None:
        """Record a group of written re-labels: state rows and audit entries, in `conn`."""
        # Our own write is not a change: the processing key follows the new version.
        self.state.save_relabelled(
            [(done.ref, verdict.status.value, fingerprint,
              self.processing_key(done.ref) if row.processing_key else None)
             for row, verdict, fingerprint, done in group], conn)
        self.audit.append_many(
            [{"action": "asset.relabelled", "asset": f"{row.connector}:{row.asset_id}",
              "details": {"reason": reason, "status": verdict.status.value,
                          "previous_status": row.status}}
             for row, verdict, _, _ in group], conn=conn)


# Re-labelled assets recorded per state transaction (one audit head sync each).
_RELABEL_GROUP = 64
# Concurrent platform writes per write thread when re-labelling: they mostly wait for exiftool,
# and the writes waiting together share one exiftool command (less of its fixed cost per file).
_RELABEL_WRITES_PER_THREAD = 4


def preview_scale(preview: Geometry, original: Geometry) -> Callable[[FaceBox], FaceBox]:
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
