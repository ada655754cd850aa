"""The state database: subjects, consents, assets and their face records, cursors, audit.

SQLAlchemy Core over SQLite by default (PostgreSQL when workers share it); the schema is
built and upgraded by Alembic migrations in plugin/migrations. It never holds a vector, and
names only in `subjects` (DESIGN §6). SQLite files are created 0600 with secure_delete on, so
deleted rows (an erased subject's name) are overwritten, not left in free pages.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from plugin import schema as t
from plugin.errors import ConsentError, StateError
from plugin.models import (
    AssetRef,
    Consent,
    FaceBox,
    FaceRecord,
    FaceState,
    Geometry,
    Grant,
    GrantKind,
    Subject,
)

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_MIGRATION_LOCK = int.from_bytes(b"cnsntry\x03", "big")  # audit uses ...\x01, vault ...\x02
_ALEMBIC_LOCK = threading.Lock()


def now_utc() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True, slots=True)
class AssetRow:
    connector: str
    asset_id: str
    name: str
    version: str
    fingerprint: str | None
    processing_key: str | None
    geometry: Geometry | None
    status: str | None
    verdict_fingerprint: str | None
    needs_analysis: bool
    last_error: str | None

    @property
    def ref(self) -> AssetRef:
        return AssetRef(connector=self.connector, id=self.asset_id, version=self.version,
                        name=self.name, fingerprint=self.fingerprint)


def _prepare_sqlite_file(url: sa.URL) -> None:
    db = url.database
    if not db or db == ":memory:":
        return
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


class StateStore:
    """All reads and writes of the state database go through here."""

    def __init__(self, url: str) -> None:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as err:
            raise StateError(f"invalid state database URL: {err}") from err
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            _prepare_sqlite_file(parsed)
        # Where, for messages: the URL without its password.
        self.location = parsed.render_as_string(hide_password=True)
        # pre_ping: a long-running worker survives a database server restart.
        self.engine = sa.create_engine(parsed, future=True, pool_pre_ping=not self.is_sqlite)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", self._sqlite_pragmas)
        self._migrate()

    @staticmethod
    def _sqlite_pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA secure_delete=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    def _migrate(self) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Workers starting together: one migrates, the others wait and find it done
                    # (PostgreSQL's DDL is transactional).
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"),
                                 {"id": _PG_MIGRATION_LOCK})
                cfg.attributes["connection"] = conn
                with _ALEMBIC_LOCK:  # alembic's context is module-global: one thread at a time
                    command.upgrade(cfg, "head")
        except sa.exc.SQLAlchemyError as err:
            cause = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise StateError(
                f"cannot open or migrate the state database {self.location}: {cause}"
            ) from err

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- subjects ----------------------------------------------------------------------
    def add_subject(self, subject: Subject) -> None:
        with self.begin() as conn:
            conn.execute(t.subjects.insert().values(
                id=str(subject.id), display_name=subject.display_name,
                birth_date=subject.birth_date.isoformat() if subject.birth_date else None,
                minor=subject.minor, external_ids=dict(subject.external_ids),
                created_at=_ts(now_utc()),
            ))

    @staticmethod
    def _subject(row: sa.Row) -> Subject:
        return Subject(
            id=uuid.UUID(row.id), display_name=row.display_name,
            birth_date=date.fromisoformat(row.birth_date) if row.birth_date else None,
            minor=row.minor, external_ids=row.external_ids or {},
        )

    def subjects(self) -> list[Subject]:
        with self.engine.connect() as conn:
            rows = conn.execute(t.subjects.select().order_by(t.subjects.c.created_at))
            return [self._subject(r) for r in rows]

    def subject(self, subject_id: uuid.UUID) -> Subject | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                t.subjects.select().where(t.subjects.c.id == str(subject_id))
            ).first()
        return self._subject(row) if row else None

    def resolve_subject(self, ref: str) -> Subject:
        """A subject by id, unique id prefix (>= 4 chars) or exact display name."""
        matches = [
            s for s in self.subjects()
            if str(s.id) == ref
            or (len(ref) >= 4 and str(s.id).startswith(ref.lower()))
            or s.display_name.casefold() == ref.casefold()
        ]
        if not matches:
            raise ConsentError("no such subject (see `consentry subjects list`)")
        if len(matches) > 1:
            raise ConsentError("several subjects match; use the subject id")
        return matches[0]

    def delete_subject(self, subject_id: uuid.UUID, conn: sa.Connection) -> None:
        sid = str(subject_id)
        consent_ids = sa.select(t.consents.c.id).where(t.consents.c.subject_id == sid)
        conn.execute(t.grants.delete().where(t.grants.c.consent_id.in_(consent_ids)))
        conn.execute(t.consents.delete().where(t.consents.c.subject_id == sid))
        conn.execute(t.subjects.delete().where(t.subjects.c.id == sid))

    # -- consents ----------------------------------------------------------------------
    def add_consent(self, consent: Consent, conn: sa.Connection | None = None) -> None:
        with self._conn(conn) as c:
            c.execute(t.consents.insert().values(
                id=str(consent.id), subject_id=str(consent.subject_id),
                document_ref=consent.document_ref, document_sha256=consent.document_sha256,
                signed_at=_ts(consent.signed_at), signed_by=consent.signed_by,
                guardian=consent.guardian, created_at=_ts(now_utc()),
            ))
            for g in consent.grants:
                c.execute(t.grants.insert().values(
                    id=str(g.id), consent_id=str(consent.id), kind=g.kind.value,
                    channels=list(g.channels), valid_from=_ts(g.valid_from),
                    valid_until=_ts(g.valid_until), withdrawn_at=_ts(g.withdrawn_at),
                ))

    @contextmanager
    def _conn(self, conn: sa.Connection | None) -> Iterator[sa.Connection]:
        if conn is not None:
            yield conn
        else:
            with self.begin() as fresh:
                yield fresh

    def consents(self, subject_id: uuid.UUID | None = None) -> list[Consent]:
        query = t.consents.select().order_by(t.consents.c.signed_at)
        if subject_id is not None:
            query = query.where(t.consents.c.subject_id == str(subject_id))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            grant_rows = conn.execute(t.grants.select()).all()
        by_consent: dict[str, list[Grant]] = {}
        for g in grant_rows:
            by_consent.setdefault(g.consent_id, []).append(Grant(
                id=uuid.UUID(g.id), kind=GrantKind(g.kind), channels=tuple(g.channels),
                valid_from=_dt(g.valid_from), valid_until=_dt(g.valid_until),
                withdrawn_at=_dt(g.withdrawn_at),
            ))
        return [
            Consent(
                id=uuid.UUID(r.id), subject_id=uuid.UUID(r.subject_id),
                document_ref=r.document_ref, document_sha256=r.document_sha256,
                signed_at=_dt(r.signed_at), signed_by=r.signed_by, guardian=r.guardian,
                grants=tuple(by_consent.get(r.id, ())),
            )
            for r in rows
        ]

    def consents_by_subject(self) -> dict[uuid.UUID, list[Consent]]:
        grouped: dict[uuid.UUID, list[Consent]] = {}
        for c in self.consents():
            grouped.setdefault(c.subject_id, []).append(c)
        return grouped

    def resolve_consent(self, ref: str) -> Consent:
        matches = [c for c in self.consents()
                   if str(c.id) == ref or (len(ref) >= 4 and str(c.id).startswith(ref.lower()))]
        if len(matches) != 1:
            raise ConsentError("no such consent" if not matches else "ambiguous consent id")
        return matches[0]

    def withdraw(self, consent_id: uuid.UUID, at: datetime,
                 kinds: Iterable[GrantKind] | None = None) -> int:
        """Mark the consent's grants (of `kinds`, default all) withdrawn at `at`."""
        wanted = [k.value for k in (kinds or GrantKind)]
        with self.begin() as conn:
            result = conn.execute(
                t.grants.update()
                .where(t.grants.c.consent_id == str(consent_id))
                .where(t.grants.c.kind.in_(wanted))
                .where(t.grants.c.withdrawn_at.is_(None))
                .values(withdrawn_at=_ts(at))
            )
        return result.rowcount

    # -- assets and faces --------------------------------------------------------------
    def known_version(self, connector: str, asset_id: str) -> tuple[str | None, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.assets.c.fingerprint, t.assets.c.version)
                .where(t.assets.c.connector == connector, t.assets.c.asset_id == asset_id)
            ).first()
        return (row.fingerprint, row.version) if row else None

    @staticmethod
    def _asset(row: sa.Row) -> AssetRow:
        geometry = None
        if row.stored_width and row.stored_height:
            geometry = Geometry(stored_width=row.stored_width, stored_height=row.stored_height,
                                orientation=row.orientation or 1)
        return AssetRow(
            connector=row.connector, asset_id=row.asset_id, name=row.name, version=row.version,
            fingerprint=row.fingerprint, processing_key=row.processing_key, geometry=geometry,
            status=row.status, verdict_fingerprint=row.verdict_fingerprint,
            needs_analysis=row.needs_analysis, last_error=row.last_error,
        )

    def asset(self, connector: str, asset_id: str) -> AssetRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(t.assets.select().where(
                t.assets.c.connector == connector, t.assets.c.asset_id == asset_id)).first()
        return self._asset(row) if row else None

    def assets(self, connector: str | None = None,
               subject_ids: Sequence[uuid.UUID] | None = None,
               keys: Sequence[tuple[str, str]] | None = None) -> list[AssetRow]:
        query = t.assets.select().order_by(t.assets.c.connector, t.assets.c.asset_id)
        if connector is not None:
            query = query.where(t.assets.c.connector == connector)
        if keys is not None:
            query = query.where(sa.tuple_(t.assets.c.connector, t.assets.c.asset_id)
                                .in_([tuple(k) for k in keys]))
        if subject_ids is not None:
            with_subject = sa.select(t.faces.c.connector, t.faces.c.asset_id).where(
                t.faces.c.subject_id.in_([str(s) for s in subject_ids]))
            query = query.where(sa.tuple_(t.assets.c.connector, t.assets.c.asset_id)
                                .in_(with_subject))
        with self.engine.connect() as conn:
            return [self._asset(r) for r in conn.execute(query)]

    def faces(self, connector: str, asset_id: str) -> list[FaceRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(t.faces.select().where(
                t.faces.c.connector == connector, t.faces.c.asset_id == asset_id,
            ).order_by(t.faces.c.idx)).all()
        return [_face(r) for r in rows]

    def faces_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[FaceRecord]]:
        """The face records of many assets in one query, keyed (connector, asset_id).

        Assets without faces are absent. Re-labelling reads them a chunk at a time instead of
        one query per asset.
        """
        found: dict[tuple[str, str], list[FaceRecord]] = {}
        if not keys:
            return found
        with self.engine.connect() as conn:
            rows = conn.execute(t.faces.select().where(
                sa.tuple_(t.faces.c.connector, t.faces.c.asset_id).in_([tuple(k) for k in keys])
            ).order_by(t.faces.c.connector, t.faces.c.asset_id, t.faces.c.idx))
            for r in rows:
                found.setdefault((r.connector, r.asset_id), []).append(_face(r))
        return found

    def save_analysis(self, ref: AssetRef, *, geometry: Geometry, faces: Sequence[FaceRecord],
                      processing_key: str, conn: sa.Connection) -> None:
        """Replace the asset's face records with a fresh analysis."""
        key = (t.faces.c.connector == ref.connector, t.faces.c.asset_id == ref.id)
        conn.execute(t.faces.delete().where(*key))
        for i, f in enumerate(faces):
            conn.execute(t.faces.insert().values(
                connector=ref.connector, asset_id=ref.id, idx=i,
                top=f.box.top, right=f.box.right, bottom=f.box.bottom, left=f.box.left,
                state=f.state.value,
                subject_id=str(f.subject_id) if f.subject_id else None,
                distance=f.distance, candidates=[str(c) for c in f.candidates],
                region_written=False, vouched_by=f.vouched_by,
            ))
        self._upsert_asset(conn, ref, processing_key=processing_key,
                           stored_width=geometry.stored_width,
                           stored_height=geometry.stored_height,
                           orientation=geometry.orientation, needs_analysis=False,
                           last_error=None)

    def set_faces_state(self, connector: str, asset_id: str, faces: Sequence[FaceRecord],
                        conn: sa.Connection) -> None:
        """Rewrite subject/state of existing records (erasure, review), boxes unchanged."""
        for i, f in enumerate(faces):
            conn.execute(t.faces.update().where(
                t.faces.c.connector == connector, t.faces.c.asset_id == asset_id,
                t.faces.c.idx == i,
            ).values(state=f.state.value,
                     subject_id=str(f.subject_id) if f.subject_id else None,
                     distance=f.distance, candidates=[str(c) for c in f.candidates],
                     vouched_by=f.vouched_by))

    def save_written(self, ref: AssetRef, *, status: str, verdict_fingerprint: str,
                     conn: sa.Connection, processing_key: str | None = None) -> None:
        """Record the verdict written and the asset's version after our own write."""
        extra = {"processing_key": processing_key} if processing_key else {}
        self._upsert_asset(conn, ref, status=status, verdict_fingerprint=verdict_fingerprint,
                           **extra)
        conn.execute(t.faces.update().where(
            t.faces.c.connector == ref.connector, t.faces.c.asset_id == ref.id,
        ).values(region_written=True))

    def save_relabelled(self, items: Sequence[tuple[AssetRef, str, str, str | None]],
                        conn: sa.Connection) -> None:
        """`save_written` for many known assets at once: (ref, status, verdict fingerprint,
        processing key or None to keep it). Two statements per kind of item, not three per
        asset; an asset forgotten meanwhile stays forgotten."""
        if not items:
            return
        stamp = _ts(now_utc())
        where = (t.assets.c.connector == sa.bindparam("k_connector"),
                 t.assets.c.asset_id == sa.bindparam("k_asset"))
        for with_key in (True, False):
            params = [
                {"k_connector": ref.connector, "k_asset": ref.id, "name": ref.name,
                 "version": ref.version, "fingerprint": ref.fingerprint, "updated_at": stamp,
                 "status": status, "verdict_fingerprint": fingerprint,
                 **({"processing_key": key} if with_key else {})}
                for ref, status, fingerprint, key in items if (key is not None) == with_key
            ]
            if params:
                conn.execute(t.assets.update().where(*where), params)
        conn.execute(t.faces.update().where(
            t.faces.c.connector == sa.bindparam("k_connector"),
            t.faces.c.asset_id == sa.bindparam("k_asset"),
        ).values(region_written=True), [{"k_connector": ref.connector, "k_asset": ref.id}
                                        for ref, *_ in items])

    def asset_ids(self, connector: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(t.assets.c.asset_id)
                                     .where(t.assets.c.connector == connector)).scalars())

    def delete_asset(self, connector: str, asset_id: str, conn: sa.Connection) -> bool:
        """Drop an asset and its face records (the platform deleted it); True if it was known."""
        conn.execute(t.faces.delete().where(t.faces.c.connector == connector,
                                            t.faces.c.asset_id == asset_id))
        gone = conn.execute(t.assets.delete().where(t.assets.c.connector == connector,
                                                    t.assets.c.asset_id == asset_id))
        return gone.rowcount > 0

    def record_failure(self, ref: AssetRef, error: str) -> None:
        with self.begin() as conn:
            self._upsert_asset(conn, ref, last_error=error, processing_key=None)

    def mark_for_analysis(self, assets: Iterable[tuple[str, str]]) -> int:
        count = 0
        with self.begin() as conn:
            for connector, asset_id in assets:
                count += conn.execute(t.assets.update().where(
                    t.assets.c.connector == connector, t.assets.c.asset_id == asset_id,
                ).values(needs_analysis=True)).rowcount
        return count

    def assets_with_open_faces(self) -> list[tuple[str, str]]:
        """Assets with unknown or uncertain faces: a newly enrolled subject may be there."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.faces.c.connector, t.faces.c.asset_id).where(
                t.faces.c.state.in_([FaceState.UNKNOWN.value, FaceState.UNCERTAIN.value])
            ).distinct()).all()
        return [(r.connector, r.asset_id) for r in rows]

    def _upsert_asset(self, conn: sa.Connection, ref: AssetRef, **values) -> None:
        where = (t.assets.c.connector == ref.connector, t.assets.c.asset_id == ref.id)
        base = {"name": ref.name, "version": ref.version, "fingerprint": ref.fingerprint,
                "updated_at": _ts(now_utc())}
        if conn.execute(sa.select(t.assets.c.asset_id).where(*where)).first():
            conn.execute(t.assets.update().where(*where).values(**base, **values))
        else:
            values.setdefault("needs_analysis", False)
            conn.execute(t.assets.insert().values(
                connector=ref.connector, asset_id=ref.id, **base, **values))

    # -- cursors -----------------------------------------------------------------------
    def cursor(self, connector: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.cursors.c.value)
                               .where(t.cursors.c.connector == connector)).first()
        return row.value if row else None

    def set_cursor(self, connector: str, value: str | None) -> None:
        if value is None:
            return
        with self.begin() as conn:
            conn.execute(t.cursors.delete().where(t.cursors.c.connector == connector))
            conn.execute(t.cursors.insert().values(connector=connector, value=value))

    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == key)).first()
        return row.value if row else None

    def set_meta(self, key: str, value: str, conn: sa.Connection | None = None) -> None:
        with self._conn(conn) as c:
            c.execute(t.meta.delete().where(t.meta.c.key == key))
            c.execute(t.meta.insert().values(key=key, value=value))

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for name, table in (("subjects", t.subjects), ("consents", t.consents),
                                    ("assets", t.assets), ("faces", t.faces))
            }


def _face(r: sa.Row) -> FaceRecord:
    return FaceRecord(
        box=FaceBox(top=r.top, right=r.right, bottom=r.bottom, left=r.left),
        state=FaceState(r.state),
        subject_id=uuid.UUID(r.subject_id) if r.subject_id else None,
        distance=r.distance,
        candidates=tuple(uuid.UUID(c) for c in r.candidates),
        vouched_by=r.vouched_by,
    )


def dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
