"""Erasure of a data subject (GDPR Art. 17), resumable stage by stage.

One row of the `erasures` table follows each erasure through fixed stages; every stage commits
its work together with the row's new stage, so a run killed anywhere is finished by the next:

    started              the row exists; nothing is removed yet
    scanned              the assets whose face records link the subject (ids and counts), and
                         the assets where fields others wrote still name them, recorded
    templates_destroyed  the vault's data key and templates are gone (crypto-shredding)
    faces_cleared        their faces are unknown faces; their id left every candidate list
    metadata_rewritten   those assets re-labelled from the face records (no detection): name,
                         PersonId and consent ids leave everything Consentry wrote
    records_deleted      consents, grants and the subject row (the only copy of the name) deleted
    compacted            the state database VACUUMed and its WAL truncated, so no free page
                         keeps the name
    done                 the receipt is final; one pseudonymous audit entry closes it

Why this order: the foreign-field scan needs the name, so it runs first; recognition stops
(templates) before anything else changes; the subject row, which holds the name, goes only
after every file no longer carries it, so a failed rewrite can be retried with the same name.

Fields others wrote (captions, a foreign PersonInImage) are not Consentry's to edit
(DESIGN §7): the receipt lists the assets and fields where the name still stands. The
`erasures` row holds asset ids, tag names and counts, never the name.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import exiftool
import sqlalchemy as sa
from exiftool.exceptions import ExifToolException

from plugin import schema as t
from plugin.errors import ConsentError, ConsentryError, MetadataError
from plugin.models import AssetRef, FaceState
from plugin.pipeline import Outcome
from plugin.xmp import DEFAULT_CONFIG, XmpState

if TYPE_CHECKING:
    from plugin.app import App

log = logging.getLogger(__name__)

KILL_ENV = "CONSENTRY_TEST_KILL_AFTER"
PERSON_URN = "urn:uuid:"


class Stage(StrEnum):
    STARTED = "started"
    SCANNED = "scanned"
    TEMPLATES_DESTROYED = "templates_destroyed"
    FACES_CLEARED = "faces_cleared"
    METADATA_REWRITTEN = "metadata_rewritten"
    RECORDS_DELETED = "records_deleted"
    COMPACTED = "compacted"
    DONE = "done"


STAGES: tuple[Stage, ...] = tuple(Stage)


class ErasureIncomplete(ConsentryError):
    """A stage could not finish (an asset could not be rewritten); a later run resumes it."""


# -- the receipt ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TouchedAsset:
    """An asset whose metadata Consentry rewrote; `faces` linked the subject, `candidate_faces`
    proposed them for review; both 0 when only the file still carried them."""

    connector: str
    asset_id: str
    faces: int = 0
    candidate_faces: int = 0

    @property
    def label(self) -> str:
        return f"{self.connector}:{self.asset_id}"


@dataclass(frozen=True, slots=True)
class ForeignMention:
    """An asset where fields others wrote still name the subject: Consentry does not edit them."""

    connector: str
    asset_id: str
    fields: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.connector}:{self.asset_id}"


@dataclass(frozen=True, slots=True)
class Receipt:
    subject_id: uuid.UUID
    stage: Stage
    started_at: str
    finished_at: str | None
    templates_destroyed: int
    consents_deleted: int
    assets: tuple[TouchedAsset, ...] = ()
    foreign: tuple[ForeignMention, ...] = ()

    @property
    def faces_unknown(self) -> int:
        return sum(a.faces for a in self.assets)

    @property
    def candidate_links(self) -> int:
        return sum(a.candidate_faces for a in self.assets)

    def as_dict(self) -> dict[str, Any]:
        """The receipt as JSON-ready data: ids, counts and times; never the name."""
        return {
            "receipt": "consentry erasure (GDPR Art. 17)",
            "subject_id": str(self.subject_id),
            "stage": self.stage.value,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "removed": {
                "data_key": True,
                "templates": self.templates_destroyed,
                "consents": self.consents_deleted,
                "faces_made_unknown": self.faces_unknown,
                "candidate_links": self.candidate_links,
                "subject_record": self.stage in (Stage.RECORDS_DELETED, Stage.COMPACTED,
                                                 Stage.DONE),
            },
            "assets_rewritten": len(self.assets),
            "assets": [
                {"asset": a.label, "faces": a.faces, "candidate_faces": a.candidate_faces}
                for a in self.assets
            ],
            "name_in_foreign_fields": [
                {"asset": m.label, "fields": list(m.fields)} for m in self.foreign
            ],
            "note": "Consentry removed the name, PersonId and consent ids from the metadata it "
                    "wrote. Fields others wrote (captions, descriptions, their own person "
                    "tags) are not edited: the assets in name_in_foreign_fields still name the "
                    "person there.",
        }


# -- finding the name in a file's metadata ----------------------------------------------------
_SEPARATORS = re.compile(r"[\W_]+")
# Groups that describe exiftool itself or repeat other tags: never something someone wrote.
_SKIPPED_GROUPS = frozenset({"ExifTool", "Composite"})


def _normal(text: str) -> str:
    """Casefolded words separated by single spaces and padded, so a name matches whole words
    whatever the punctuation: "President Barack Obama's", "barack_obama.jpg"."""
    words = _SEPARATORS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return f" {words} "


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def names(value: Any, name: str) -> bool:
    """True when some text inside `value` contains `name` as whole words, case-insensitively."""
    needle = _normal(name)
    return needle.strip() != "" and any(needle in _normal(s) for s in _strings(value))


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def foreign_fields(tags: Mapping[str, Any], own: XmpState | None, name: str) -> list[str]:
    """Tags of one file (exiftool `-j -struct -G1` keys) whose foreign content names `name`.

    `own` is Consentry's reading of the file when Consentry writes into it: the entries it
    owns there (our regions and the names on them, our PersonInImageWDetails, our keywords and
    release ids, the consentry namespace) are left out, because the rewrite removes them — the
    same ownership rules as `plugin.xmp.plan`. With None (an image in sidecar mode, which
    Consentry never writes), every field counts.
    """
    found = []
    for key, value in tags.items():
        group, _, tag = key.partition(":")
        if not tag or group in _SKIPPED_GROUPS:
            continue
        if own is not None:
            value = _foreign_part(group, tag, value, own)
        if value is not None and names(value, name):
            found.append(key)
    return sorted(found)


def _foreign_part(group: str, tag: str, value: Any, own: XmpState) -> Any:
    """The part of one tag's value that Consentry does not own (None: all of it is ours)."""
    our_names = {r.name for r in own.our_regions if r.name}
    if group == "XMP-consentry":
        return None
    if (group, tag) == ("XMP-mwg-rs", "RegionInfo") and isinstance(value, Mapping):
        regions = _listed(value.get("RegionList"))
        if len(regions) == len(own.regions):
            regions = [r for r, seen in zip(regions, own.regions, strict=True) if not seen.ours]
        rest = {k: v for k, v in value.items() if k != "RegionList"}
        return [rest, regions]
    if (group, tag) == ("XMP-iptcExt", "PersonInImage"):
        return [p for p in _listed(value) if str(p) not in our_names]
    if (group, tag) == ("XMP-iptcExt", "PersonInImageWDetails"):
        def ours(d: Any) -> bool:
            return (isinstance(d, Mapping) and str(d.get("PersonName")) in our_names
                    and any(str(i).startswith(PERSON_URN) for i in _listed(d.get("PersonId"))))
        return [d for d in _listed(value) if not ours(d)]
    if (group, tag) in (("XMP-lr", "HierarchicalSubject"), ("XMP-digiKam", "TagsList")):
        sep = "|" if group == "XMP-lr" else "/"

        def our_keyword(k: Any) -> bool:
            text = str(k)
            person = text.removeprefix(f"People{sep}")
            return text.startswith(f"Consent{sep}") or (
                own.name_keywords and person != text and person in our_names)
        return [k for k in _listed(value) if not our_keyword(k)]
    if (group, tag) == ("XMP-plus", "ModelReleaseID"):
        return [i for i in _listed(value) if str(i) not in set(own.consent_ids)]
    return value


def carries_subject(own: XmpState, name: str | None, subject_id: uuid.UUID,
                    consent_ids: set[str]) -> bool:
    """True when what Consentry owns in the file still refers to the subject (name on our
    region, PersonId, consent id), whatever the face records say: such a file is rewritten."""
    urn = f"{PERSON_URN}{subject_id}"
    return (
        (name is not None and any(r.name == name for r in own.our_regions))
        or any(urn in d.ids for d in own.person_details)
        or bool(consent_ids & set(own.consent_ids))
    )


# -- files a connector keeps locally ---------------------------------------------------------
@runtime_checkable
class LocalFiles(Protocol):
    """A connector whose assets are local files (the folder connector)."""

    def path_of(self, ref: AssetRef) -> Path: ...

    def sidecar_of(self, path: Path) -> Path: ...


def _metadata_files(connector: LocalFiles, ref: AssetRef) -> list[tuple[Path, bool]]:
    """The asset's files holding metadata, each with whether Consentry writes into it."""
    image = connector.path_of(ref)
    config = getattr(connector, "config", None)
    sidecar_mode = getattr(config, "write_mode", "embed") == "sidecar"
    files = [(image, not sidecar_mode)] if image.is_file() else []
    sidecar = connector.sidecar_of(image)
    if sidecar_mode and sidecar.is_file():
        files.append((sidecar, True))
    return files


class _Reader:
    """Every tag of a file through one stay-open exiftool, for the foreign-field scan."""

    def __init__(self) -> None:
        self._et = exiftool.ExifToolHelper(
            config_file=DEFAULT_CONFIG, common_args=["-G1", "-struct", "-a"], encoding="utf-8")

    def tags(self, path: Path) -> dict[str, Any]:
        try:
            return dict(self._et.get_metadata(str(path))[0])
        except (ExifToolException, OSError, ValueError, IndexError) as err:
            raise MetadataError(str(path), f"exiftool could not read it ({type(err).__name__})"
                                ) from err

    def close(self) -> None:
        if self._et.running:
            self._et.terminate()


# -- the erasure ------------------------------------------------------------------------------
def _now_text(app: App) -> str:
    return app.pipeline.clock().astimezone(UTC).isoformat()


def _kill_point(stage: Stage) -> None:
    """Tests kill the process for real right after a stage commits (CONSENTRY_TEST_KILL_AFTER)."""
    if os.environ.get(KILL_ENV) == stage.value:
        os._exit(137)


def _row(conn: sa.Connection, subject_id: uuid.UUID) -> sa.Row | None:
    return conn.execute(
        t.erasures.select().where(t.erasures.c.subject_id == str(subject_id))).first()


def receipt_of(app: App, subject_id: uuid.UUID) -> Receipt | None:
    """The receipt as recorded so far (final once the stage is `done`)."""
    with app.state.engine.connect() as conn:
        row = _row(conn, subject_id)
    if row is None:
        return None
    return Receipt(
        subject_id=uuid.UUID(row.subject_id), stage=Stage(row.stage),
        started_at=row.started_at, finished_at=row.finished_at,
        templates_destroyed=row.templates_destroyed, consents_deleted=row.consents_deleted,
        assets=tuple(TouchedAsset(**a) for a in row.assets or ()),
        foreign=tuple(ForeignMention(m["connector"], m["asset_id"], tuple(m["fields"]))
                      for m in row.foreign_name_assets or ()),
    )


def pending(app: App) -> list[uuid.UUID]:
    """Subjects whose erasure was started and not finished, oldest first."""
    with app.state.engine.connect() as conn:
        rows = conn.execute(sa.select(t.erasures.c.subject_id)
                            .where(t.erasures.c.stage != Stage.DONE.value)
                            .order_by(t.erasures.c.started_at)).all()
    return [uuid.UUID(r.subject_id) for r in rows]


def find_erasure(app: App, ref: str) -> uuid.UUID | None:
    """An erasure row by subject id or unique id prefix (>= 4 chars): the subject row may be
    gone already, so a resumed erasure is found by its id."""
    ref = ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f-]{4,36}", ref):
        return None
    with app.state.engine.connect() as conn:
        ids = [r.subject_id for r in conn.execute(sa.select(t.erasures.c.subject_id))]
    matches = [i for i in ids if i == ref or (len(ref) >= 4 and i.startswith(ref))]
    if len(matches) > 1:
        raise ConsentError("several erasures match; use the full subject id")
    return uuid.UUID(matches[0]) if matches else None


def start(app: App, subject_id: uuid.UUID, *, actor: str = "admin") -> None:
    """Record the erasure (stage `started`); a second call for the same subject changes nothing."""
    if app.state.subject(subject_id) is None:
        raise ConsentError("no such subject (see `consentry subjects list`)")
    with app.state.begin() as conn:
        if _row(conn, subject_id) is not None:
            return
        conn.execute(t.erasures.insert().values(
            subject_id=str(subject_id), started_at=_now_text(app), stage=Stage.STARTED.value,
            assets=[], foreign_name_assets=[], templates_destroyed=0, consents_deleted=0))
        app.audit.append("subject.erasure_started", actor=actor, subject_id=subject_id,
                         details={}, conn=conn)
    app.audit.sync_head()
    log.info("erasure of subject %s started", subject_id)
    _kill_point(Stage.STARTED)


def run(app: App, subject_id: uuid.UUID) -> Receipt:
    """Carry a started erasure through its remaining stages and return the final receipt.

    Raises ErasureIncomplete when an asset cannot be rewritten; the stage is kept and a later
    run continues from there.
    """
    steps = {
        Stage.STARTED: _scan,
        Stage.SCANNED: _destroy_templates,
        Stage.TEMPLATES_DESTROYED: _clear_faces,
        Stage.FACES_CLEARED: _rewrite_metadata,
        Stage.METADATA_REWRITTEN: _delete_records,
        Stage.RECORDS_DELETED: _compact,
        Stage.COMPACTED: _finish,
    }
    while True:
        receipt = receipt_of(app, subject_id)
        if receipt is None:
            raise ConsentError("no erasure was started for this subject")
        if receipt.stage is Stage.DONE:
            return receipt
        steps[receipt.stage](app, receipt)
        done = STAGES[STAGES.index(receipt.stage) + 1]
        log.info("erasure of subject %s: %s", subject_id, done.value)
        _kill_point(done)


def erase(app: App, subject_id: uuid.UUID, *, actor: str = "admin") -> Receipt:
    """Start (if needed) and finish the erasure of one subject."""
    with app.state.engine.connect() as conn:
        started = _row(conn, subject_id) is not None
    if not started:
        start(app, subject_id, actor=actor)
    return run(app, subject_id)


def _advance(conn: sa.Connection, receipt: Receipt, stage: Stage, **values: Any) -> None:
    """Move the row from the receipt's stage to `stage`; refuses if another run moved it."""
    result = conn.execute(t.erasures.update().where(
        t.erasures.c.subject_id == str(receipt.subject_id),
        t.erasures.c.stage == receipt.stage.value,
    ).values(stage=stage.value, **values))
    if result.rowcount != 1:
        raise ErasureIncomplete("another run is advancing this erasure; let it finish")


def _links(app: App, subject_id: uuid.UUID) -> dict[tuple[str, str], list[int]]:
    """Per asset: [faces linked to the subject, faces proposing them as a candidate]."""
    sid = str(subject_id)
    f = t.faces
    query = sa.select(f.c.connector, f.c.asset_id, f.c.subject_id, f.c.candidates).where(
        sa.or_(f.c.subject_id == sid, sa.cast(f.c.candidates, sa.Text).like(f"%{sid}%")))
    counts: dict[tuple[str, str], list[int]] = {}
    with app.state.engine.connect() as conn:
        for row in conn.execute(query):
            entry = counts.setdefault((row.connector, row.asset_id), [0, 0])
            if row.subject_id == sid:
                entry[0] += 1
            elif sid in (row.candidates or ()):
                entry[1] += 1
    return {k: v for k, v in counts.items() if any(v)}


def _scan(app: App, receipt: Receipt) -> None:
    """Record the assets to rewrite and, while the name still exists, where others wrote it."""
    sid = receipt.subject_id
    subject = app.state.subject(sid)
    name = subject.display_name if subject else None
    consent_ids = {str(c.id) for c in app.state.consents(sid)}
    links = _links(app, sid)
    stale: set[tuple[str, str]] = set()
    foreign: list[ForeignMention] = []
    if name is None:
        log.warning("erasure of subject %s: the subject record is gone, fields others wrote "
                    "cannot be searched", sid)
    else:
        rows = app.state.assets()
        unscanned = sorted({r.connector for r in rows
                            if not isinstance(app.connectors.get(r.connector), LocalFiles)})
        if unscanned:
            log.warning("erasure of subject %s: fields others wrote are not searched on "
                        "connector(s) %s (no local files)", sid, ", ".join(unscanned))
        reader = _Reader()
        try:
            for row in rows:
                connector = app.connectors.get(row.connector)
                if not isinstance(connector, LocalFiles):
                    continue
                fields, ours = _inspect(reader, app, connector, row.ref, name=name,
                                        subject_id=sid, consent_ids=consent_ids)
                if fields:
                    foreign.append(ForeignMention(row.connector, row.asset_id, tuple(fields)))
                if ours:
                    stale.add((row.connector, row.asset_id))
        finally:
            reader.close()
    touched = [
        TouchedAsset(c, a, *links.get((c, a), (0, 0)))
        for c, a in sorted(set(links) | stale)
    ]
    with app.state.begin() as conn:
        _advance(conn, receipt, Stage.SCANNED,
                 assets=[{"connector": a.connector, "asset_id": a.asset_id, "faces": a.faces,
                          "candidate_faces": a.candidate_faces} for a in touched],
                 foreign_name_assets=[{"connector": m.connector, "asset_id": m.asset_id,
                                       "fields": list(m.fields)} for m in foreign])


def _inspect(reader: _Reader, app: App, connector: LocalFiles, ref: AssetRef, *, name: str,
             subject_id: uuid.UUID, consent_ids: set[str]) -> tuple[list[str], bool]:
    """(fields others wrote that name the subject, whether our own fields still refer to them)."""
    fields: list[str] = []
    ours = False
    for path, written_by_us in _metadata_files(connector, ref):
        suffix = " (sidecar)" if path.suffix.lower() == ".xmp" else ""
        try:
            own = app.writer.read(path) if written_by_us else None
            tags = reader.tags(path)
        except MetadataError as err:
            # Unread is not clean: the officer checks this one by hand.
            log.warning("erasure: cannot read the metadata of %s: %s", ref.name, err.cause)
            fields.append(f"(unreadable){suffix}")
            continue
        fields += [f"{f}{suffix}" for f in foreign_fields(tags, own, name)]
        if own is not None and carries_subject(own, name, subject_id, consent_ids):
            ours = True
    return fields, ours


def _destroy_templates(app: App, receipt: Receipt) -> None:
    # Erasure also shreds the subject's documents (signed quitclaims): they hold the name.
    destroyed = app.vault.erase(receipt.subject_id, documents=True)
    with app.state.begin() as conn:
        # A rerun after the vault commit finds nothing left: keep the first count.
        _advance(conn, receipt, Stage.TEMPLATES_DESTROYED,
                 templates_destroyed=max(destroyed, receipt.templates_destroyed))
        app.audit.append("templates.destroyed", subject_id=receipt.subject_id,
                         details={"reason": "erasure", "templates": destroyed}, conn=conn)
    app.audit.sync_head()


def _clear_faces(app: App, receipt: Receipt) -> None:
    """Their faces become unknown faces; their id leaves other faces' candidate lists. An
    uncertain face left without candidates is unknown too (nobody is close any more)."""
    sid = str(receipt.subject_id)
    f = t.faces
    with app.state.begin() as conn:
        rows = conn.execute(sa.select(f.c.id, f.c.state, f.c.subject_id, f.c.candidates).where(
            sa.or_(f.c.subject_id == sid, sa.cast(f.c.candidates, sa.Text).like(f"%{sid}%"))
        )).all()
        for row in rows:
            candidates = [c for c in (row.candidates or ()) if c != sid]
            values: dict[str, Any] = {"candidates": candidates}
            if row.subject_id == sid or (row.state == FaceState.UNCERTAIN.value
                                         and not candidates):
                # vouched_by too: "this face is the same person as that one" is theirs
                values.update(state=FaceState.UNKNOWN.value, subject_id=None, distance=None,
                              vouched_by=None)
            conn.execute(f.update().where(f.c.id == row.id).values(**values))
        _advance(conn, receipt, Stage.FACES_CLEARED)


def _rewrite_metadata(app: App, receipt: Receipt) -> None:
    """Re-label the recorded assets from their face records (Pipeline.reevaluate, no detection).

    Their verdict fingerprints are cleared first, so every file is read and rewritten where it
    still differs (also a file that carries the subject although the state says otherwise); a
    file that already holds the verdict is left byte for byte.
    """
    wanted = [(a.connector, a.asset_id) for a in receipt.assets]
    missing = sorted({c for c, _ in wanted if c not in app.connectors})
    if missing:
        raise ErasureIncomplete(
            f"connector(s) {', '.join(missing)} hold assets of this subject but are not "
            "configured; configure them and run `consentry subjects erase --resume`")
    if wanted:
        with app.state.begin() as conn:
            for connector, asset_id in wanted:
                conn.execute(t.assets.update().where(
                    t.assets.c.connector == connector, t.assets.c.asset_id == asset_id,
                ).values(verdict_fingerprint=None))
        results = app.pipeline.reevaluate(assets=wanted, reason="erasure")
        failed = [r for r in results if r.outcome is Outcome.FAILED]
        if failed:
            listed = "; ".join(f"{r.ref.connector}:{r.ref.name}: {r.reason}" for r in failed)
            raise ErasureIncomplete(
                f"{len(failed)} asset(s) could not be rewritten ({listed}); fix them and run "
                "`consentry subjects erase --resume`")
    # Platforms with their own person records (Immich) delete the faces and the person
    # Consentry created: a faceless person would keep the name.
    app.pipeline.forget_on_platforms(receipt.subject_id, reason="erasure")
    with app.state.begin() as conn:
        _advance(conn, receipt, Stage.METADATA_REWRITTEN)


def _delete_records(app: App, receipt: Receipt) -> None:
    sid = receipt.subject_id
    with app.state.begin() as conn:
        consents = conn.execute(sa.select(sa.func.count()).select_from(t.consents)
                                .where(t.consents.c.subject_id == str(sid))).scalar_one()
        _delete_side_records(conn, sid)
        app.state.delete_subject(sid, conn)
        _advance(conn, receipt, Stage.RECORDS_DELETED,
                 consents_deleted=max(consents, receipt.consents_deleted))


def _delete_side_records(conn: sa.Connection, sid: uuid.UUID) -> None:
    """Invitations, expiry-alert marks and platform links (which Immich person or face was this
    subject's) hold ids only, but still say that this person was asked, when, and where they
    were: erasure leaves no such trace. Links of a configured platform are already gone (the
    platform was told to forget the person); these are the leftovers of a removed connector."""
    from plugin.alerts import expiry_alerts
    from plugin.invitations import invitations
    from plugin.links import connector_faces, connector_people

    consent_ids = sa.select(t.consents.c.id).where(t.consents.c.subject_id == str(sid))
    conn.execute(expiry_alerts.delete().where(expiry_alerts.c.consent_id.in_(consent_ids)))
    conn.execute(invitations.delete().where(invitations.c.subject_id == str(sid)))
    conn.execute(connector_people.delete().where(connector_people.c.subject_id == str(sid)))
    conn.execute(connector_faces.delete().where(connector_faces.c.subject_id == str(sid)))


def _compact(app: App, receipt: Receipt) -> None:
    """Rebuild the state database so no freed page or WAL frame keeps the deleted rows."""
    engine = app.state.engine
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.exec_driver_sql("VACUUM")
        elif engine.dialect.name == "postgresql":
            conn.exec_driver_sql("VACUUM FULL subjects, consents, grants, faces")
    with app.state.begin() as conn:
        _advance(conn, receipt, Stage.COMPACTED)


def _finish(app: App, receipt: Receipt) -> None:
    with app.state.begin() as conn:
        _advance(conn, receipt, Stage.DONE, finished_at=_now_text(app))
        app.audit.append("subject.erased", actor="admin", subject_id=receipt.subject_id,
                         details=_counts(receipt), conn=conn)
    app.audit.sync_head()


def _counts(receipt: Receipt) -> dict[str, int]:
    return {
        "templates": receipt.templates_destroyed,
        "consents": receipt.consents_deleted,
        "faces_made_unknown": receipt.faces_unknown,
        "candidate_links": receipt.candidate_links,
        "assets_rewritten": len(receipt.assets),
        "assets_with_name_in_foreign_fields": len(receipt.foreign),
    }


@dataclass
class Batch:
    """Receipts of several erasures (`--resume`), and the ones that could not finish."""

    receipts: list[Receipt] = field(default_factory=list)
    incomplete: list[tuple[uuid.UUID, str]] = field(default_factory=list)


def resume_all(app: App, subject_ids: Sequence[uuid.UUID] | None = None) -> Batch:
    """Finish every pending erasure (or the given ones); one failure does not stop the others."""
    batch = Batch()
    for sid in subject_ids if subject_ids is not None else pending(app):
        try:
            batch.receipts.append(run(app, sid))
        except ErasureIncomplete as err:
            batch.incomplete.append((sid, str(err)))
    return batch
