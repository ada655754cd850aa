"""Connector links in the state database: which platform person Consentry created for which
subject, and which faces it created (or took over) on which asset (connectors.base.LinkStore).

Every worker of every machine reads and writes the same rows, so a subject gets one Immich
person however many workers meet it, and a worker re-processing an asset another one wrote knows
the faces already there. `hold(connector, key)` makes read-check-create-record exclusive:

- PostgreSQL: a transaction-level advisory lock (`pg_advisory_xact_lock`) per key, held on its
  own connection until the block ends; a crashed worker's lock goes with its connection.
- SQLite (one machine by nature): an flock on a file beside the database, one for all keys,
  so no database write lock is held while the platform is called. Re-entrant per thread.

Ids only, never a name (DESIGN §6); forgetting a subject deletes its rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from plugin.state import StateStore

# Mirror of the tables migration 0006 creates (plugin/schema.py holds the core ones).
_metadata = sa.MetaData()
connector_people = sa.Table(
    "connector_people",
    _metadata,
    sa.Column("connector", sa.String(64), primary_key=True),
    sa.Column("subject_id", sa.String(36), primary_key=True),
    sa.Column("person_id", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)
connector_faces = sa.Table(
    "connector_faces",
    _metadata,
    sa.Column("connector", sa.String(64), primary_key=True),
    sa.Column("asset_id", sa.Text, primary_key=True),
    sa.Column("face_id", sa.Text, primary_key=True),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("subject_id", sa.String(36), nullable=False),
    sa.Column("created", sa.Boolean, nullable=False),
    sa.Column("previous", sa.Text),
)

# Locks held by this thread, by lock file: a nested hold (a person inside an asset) goes through.
_held = threading.local()


def _lock_id(connector: str, key: str) -> int:
    """A signed 64-bit advisory lock id for the key (namespaced: no clash with other locks)."""
    digest = hashlib.blake2b(f"{connector}\0{key}".encode(), digest_size=8,
                             person=b"consentry-links").digest()
    return int.from_bytes(digest, "big", signed=True)


def _now() -> str:
    from plugin.state import now_utc

    return now_utc().isoformat()


class StateLinks:
    """connectors.base.LinkStore over the state database's engine."""

    def __init__(self, engine: sa.Engine, *, lock_file: Path | None = None) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._lock_file = lock_file
        self._local_lock = threading.RLock()  # an in-memory SQLite database: one process

    @classmethod
    def of(cls, state: StateStore) -> StateLinks:
        lock_file = None
        database = state.engine.url.database
        if state.is_sqlite and database and database != ":memory:":
            path = Path(database)
            lock_file = path.with_name(path.name + ".links.lock")
        return cls(state.engine, lock_file=lock_file)

    # -- exclusivity -------------------------------------------------------------------------
    @contextmanager
    def hold(self, connector: str, key: str) -> Iterator[None]:
        if self._postgres:
            with self.engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"),
                             {"id": _lock_id(connector, key)})
                yield
        elif self._lock_file is None:
            with self._local_lock:
                yield
        else:
            with self._file_lock(self._lock_file):
                yield

    @staticmethod
    @contextmanager
    def _file_lock(path: Path) -> Iterator[None]:
        held: set[str] = _held.__dict__.setdefault("files", set())
        name = str(path)
        if name in held:
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.add(name)
            try:
                yield
            finally:
                held.discard(name)
        finally:
            os.close(fd)  # closing lets go of the flock

    # -- people ------------------------------------------------------------------------------
    def person(self, connector: str, subject: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(connector_people.c.person_id).where(
                connector_people.c.connector == connector,
                connector_people.c.subject_id == subject)).scalar()

    def people(self, connector: str) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(connector_people.c.subject_id,
                                          connector_people.c.person_id)
                                .where(connector_people.c.connector == connector)).all()
        return {r.subject_id: r.person_id for r in rows}

    def set_person(self, connector: str, subject: str, person: str | None) -> None:
        where = (connector_people.c.connector == connector,
                 connector_people.c.subject_id == subject)
        with self.engine.begin() as conn:
            conn.execute(connector_people.delete().where(*where))
            if person is not None:
                conn.execute(connector_people.insert().values(
                    connector=connector, subject_id=subject, person_id=person,
                    created_at=_now()))

    # -- faces -------------------------------------------------------------------------------
    def faces(self, connector: str, asset: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(connector_faces.select().where(
                connector_faces.c.connector == connector, connector_faces.c.asset_id == asset,
            ).order_by(connector_faces.c.idx)).all()
        return [{"id": r.face_id, "subject": r.subject_id, "created": bool(r.created),
                 "previous": r.previous} for r in rows]

    def set_faces(self, connector: str, asset: str,
                  records: Sequence[Mapping[str, Any]]) -> None:
        with self.engine.begin() as conn:
            self._replace_faces(conn, connector, asset, records)

    @staticmethod
    def _replace_faces(conn: sa.Connection, connector: str, asset: str,
                       records: Sequence[Mapping[str, Any]]) -> None:
        conn.execute(connector_faces.delete().where(connector_faces.c.connector == connector,
                                                    connector_faces.c.asset_id == asset))
        seen: set[str] = set()
        for i, record in enumerate(records):
            face = str(record["id"])
            if face in seen:
                continue
            seen.add(face)
            conn.execute(connector_faces.insert().values(
                connector=connector, asset_id=asset, face_id=face, idx=i,
                subject_id=str(record["subject"]), created=bool(record.get("created")),
                previous=record.get("previous")))

    def assets_of(self, connector: str, subject: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(
                sa.select(connector_faces.c.asset_id).where(
                    connector_faces.c.connector == connector,
                    connector_faces.c.subject_id == subject,
                ).distinct().order_by(connector_faces.c.asset_id)).scalars())

    # -- links kept elsewhere before ---------------------------------------------------------
    def import_links(self, connector: str, people: Mapping[str, str],
                     faces: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[int, int]:
        added_people = added_faces = 0
        with self.engine.begin() as conn:
            known = {r.subject_id for r in conn.execute(
                sa.select(connector_people.c.subject_id)
                .where(connector_people.c.connector == connector))}
            for subject, person in people.items():
                if subject in known or not person:
                    continue
                conn.execute(connector_people.insert().values(
                    connector=connector, subject_id=str(subject), person_id=str(person),
                    created_at=_now()))
                added_people += 1
            for asset, records in faces.items():
                rows = conn.execute(connector_faces.select().where(
                    connector_faces.c.connector == connector,
                    connector_faces.c.asset_id == asset).order_by(connector_faces.c.idx)).all()
                merged: list[Mapping[str, Any]] = [
                    {"id": r.face_id, "subject": r.subject_id, "created": r.created,
                     "previous": r.previous} for r in rows]
                have = {r.face_id for r in rows}
                new = [r for r in records if r.get("id") and str(r["id"]) not in have
                       and r.get("subject")]
                if new:
                    self._replace_faces(conn, connector, asset, merged + new)
                    added_faces += len({str(r["id"]) for r in new})
        return added_people, added_faces
