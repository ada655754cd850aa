"""The vault: face vectors and signed documents of subjects, encrypted, erasable per person.

Apart from the state database (DESIGN §6): a SQLite file of its own (the embedded default,
created 0600; SQLite gives its -journal the mode of the database file) or, in distributed mode,
a PostgreSQL database (`postgresql+psycopg://.../vault`) or schema (`...?schema=vault`), which
every worker shares. SQLAlchemy Core speaks both; the layout is the same:

    meta           format version; the key check (a constant sealed under the "vault-check" key)
    subject_keys   subject id -> its template data key (DEK), AES-256-GCM-wrapped under the
                   "vault-wrap" key with AAD = subject id
    templates      row id, subject id, nonce, AES-256-GCM(DEK, float32 vector, AAD = subject id +
                   row id) -- one 128-d vector per row
    document_keys  subject id -> its document DEK, wrapped like the template DEK but with
                   AAD = "document key" + subject id, so the two cannot be swapped
    documents      id (uuid), subject id, nonce, AES-256-GCM(document DEK, header + bytes,
                   AAD = "document" + subject id + document id), and the sha256, media type,
                   size and time for listings. The file name is only in the sealed header:
                   it may hold the person's name.

Both wrapping keys are HKDF-derived from the KEK (plugin.keys). Binding the AAD to the subject and
row means a ciphertext copied into another subject's or row's place fails authentication instead
of decrypting into somebody else's data. Templates and documents have separate data keys because
they end at different times: templates when the biometric grant ends (`erase`), the signed
quitclaim -- the proof of consent -- only when the subject is erased (`erase(documents=True)`).

Erasure is crypto-shredding: the subject's wrapped DEK and every row it sealed go in one
transaction. On SQLite `secure_delete` zeroes the freed bytes and VACUUM rebuilds the file, so
neither the wrapped key nor the ciphertext survives anywhere in it. On PostgreSQL the rows are
deleted and VACUUM FULL rewrites the tables; the server's write-ahead log and old table files keep
the deleted bytes until they are recycled. What neither can control: copies made before erasure
(backups, WAL archives, unlinked journals). All of these hold only ciphertext under a DEK wrapped
by the KEK; rotating the KEK (re-wrapping the remaining DEKs) is what makes those copies useless.

Writers are serialized (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-level advisory lock),
so two workers enrolling the same subject cannot both create its data key.

No vector, key, ciphertext, file name or database password appears in a log line or an
exception message (errors show the database's own message, never the SQL or its parameters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import numpy as np
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plugin.errors import KeyMaterialError, VaultError
from plugin.keys import derive_key

log = logging.getLogger(__name__)

DIM = 128
FORMAT_VERSION = 1
NONCE_BYTES = 12
WRAP_PURPOSE = "vault-wrap"
CHECK_PURPOSE = "vault-check"
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
_MAX_LABEL = 255  # media type and file name

_CHECK_PLAINTEXT = b"consentry vault key check v1"
_CHECK_AAD = b"consentry vault check"
_DOCUMENT_KEY_AAD = b"consentry document key v1\n"
_DOCUMENT_AAD = b"consentry document v1\n"
_VECTOR_DTYPE = np.dtype("<f4")
# One PostgreSQL advisory lock orders the vault's writers across workers (audit uses ...\x01).
_PG_LOCK_ID = int.from_bytes(b"cnsntry\x02", "big")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# The SQLite DDL of these tables is that of format 1 vault files, so old files open unchanged.
metadata = sa.MetaData()
meta = sa.Table(
    "meta", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)
subject_keys = sa.Table(
    "subject_keys", metadata,
    sa.Column("subject_id", sa.Text, primary_key=True),
    sa.Column("nonce", sa.LargeBinary, nullable=False),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
)
# Row ids are taken before the insert (they are part of the AAD): a sequence on PostgreSQL,
# SQLite's AUTOINCREMENT counter there (never reused, even after erasure).
template_ids = sa.Sequence("template_ids", metadata=metadata)
templates = sa.Table(
    "templates", metadata,
    sa.Column("id", sa.Integer, template_ids, primary_key=True),
    sa.Column("subject_id", sa.Text, sa.ForeignKey("subject_keys.subject_id"), nullable=False),
    sa.Column("nonce", sa.LargeBinary, nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Index("templates_subject", "subject_id"),
    sqlite_autoincrement=True,
)
document_keys = sa.Table(
    "document_keys", metadata,
    sa.Column("subject_id", sa.Text, primary_key=True),
    sa.Column("nonce", sa.LargeBinary, nullable=False),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
)
documents_table = sa.Table(
    "documents", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("subject_id", sa.Text, sa.ForeignKey("document_keys.subject_id"), nullable=False),
    sa.Column("nonce", sa.LargeBinary, nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("media_type", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Index("documents_subject", "subject_id"),
)
_DOCUMENT_TABLES = (document_keys, documents_table)


class DocumentNotFoundError(VaultError, LookupError):
    """No such document for this subject (never stored, or erased)."""


def template_aad(subject_id: uuid.UUID, row_id: int) -> bytes:
    """Associated data of one template row: the subject's 16 bytes + the row id (8, big-endian)."""
    return subject_id.bytes + row_id.to_bytes(8, "big")


def document_aad(subject_id: uuid.UUID, doc_id: uuid.UUID) -> bytes:
    return _DOCUMENT_AAD + subject_id.bytes + doc_id.bytes


class Vault:
    """Encrypted per-subject templates and documents; open with `Vault.open`, use as a context
    manager. Safe to share between threads (one operation at a time, behind a lock)."""

    def __init__(self, target: _Target, engine: sa.Engine, wrap_key: bytes) -> None:
        self._target = target
        self._engine: sa.Engine | None = engine
        self._wrap = AESGCM(wrap_key)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, location: Path | str, kek: bytes, *, create: bool = False) -> Vault:
        """Open the vault at `location` (a SQLite file path, or a sqlite:// or postgresql://
        URL) with the KEK; with `create`, make it first if it is missing.

        A key that does not open the vault raises KeyMaterialError and leaves it untouched.
        """
        target = _Target.parse(location)
        wrap_key = derive_key(kek, WRAP_PURPOSE)
        check_key = derive_key(kek, CHECK_PURPOSE)
        if target.path is not None:
            if not target.path.exists():
                if not create:
                    raise VaultError(
                        f"no vault at {target} (create it with `consentry init`)"
                    )
                _create_file(target.path, check_key)
            else:
                _warn_if_loose(target.path)
        engine = target.engine()
        try:
            if target.path is None:
                _prepare_postgres(engine, target, check_key, create=create)
            _check_key(engine, target, check_key)
            _add_missing_tables(engine, target)
        except BaseException:
            engine.dispose()
            raise
        return cls(target, engine, wrap_key)

    @property
    def path(self) -> Path | None:
        """The SQLite file; None for a vault on a database server."""
        return self._target.path

    @property
    def location(self) -> str:
        """Where the vault is, fit for messages: the path, or the URL without its password."""
        return str(self._target)

    # -- templates ---------------------------------------------------------------------
    def add_templates(self, subject_id: uuid.UUID, vectors: np.ndarray) -> int:
        """Store `vectors`, shape (n, 128), as float32; return the subject's template count."""
        matrix = _as_matrix(vectors)
        sid = str(subject_id)
        with self._session(write=True) as conn:
            dek = self._data_key(conn, subject_keys, subject_id, create=len(matrix) > 0)
            if dek is not None and len(matrix):
                aes = AESGCM(dek)
                ids = self._new_template_ids(conn, len(matrix))
                rows = []
                for row_id, vector in zip(ids, matrix, strict=True):
                    nonce = os.urandom(NONCE_BYTES)
                    sealed = aes.encrypt(nonce, vector.tobytes(), template_aad(subject_id, row_id))
                    rows.append({"id": row_id, "subject_id": sid, "nonce": nonce,
                                 "ciphertext": sealed})
                conn.execute(templates.insert(), rows)
            count: int = conn.execute(
                sa.select(sa.func.count()).select_from(templates)
                .where(templates.c.subject_id == sid)
            ).scalar_one()
        log.debug("vault: %d template(s) added, subject %s now has %d", len(matrix), sid, count)
        return count

    def templates(self, subject_id: uuid.UUID) -> np.ndarray:
        """The subject's vectors as an (n, 128) float32 array; (0, 128) when there are none."""
        with self._session() as conn:
            dek = self._data_key(conn, subject_keys, subject_id, create=False)
            if dek is None:
                return np.empty((0, DIM), dtype=np.float32)
            rows = conn.execute(
                sa.select(templates.c.id, templates.c.nonce, templates.c.ciphertext)
                .where(templates.c.subject_id == str(subject_id)).order_by(templates.c.id)
            ).all()
        aes = AESGCM(dek)
        return _stack(self._open_row(aes, subject_id, *row) for row in rows)

    def all_templates(self) -> tuple[list[uuid.UUID], np.ndarray]:
        """Every stored vector, for the matcher: one subject id per row and the (N, 128) matrix."""
        with self._session() as conn:
            keys = conn.execute(sa.select(subject_keys)).all()
            rows = conn.execute(
                sa.select(templates.c.id, templates.c.subject_id, templates.c.nonce,
                          templates.c.ciphertext).order_by(templates.c.id)
            ).all()
        ciphers: dict[str, tuple[uuid.UUID, AESGCM]] = {}
        for sid, nonce, wrapped in keys:
            subject_id = uuid.UUID(sid)
            ciphers[sid] = (subject_id, AESGCM(self._unwrap(subject_id, nonce, wrapped)))
        owners: list[uuid.UUID] = []
        vectors: list[np.ndarray] = []
        for row_id, sid, nonce, sealed in rows:
            if sid not in ciphers:
                raise VaultError(f"vault {self._target}: template {row_id} has no data key")
            subject_id, aes = ciphers[sid]
            owners.append(subject_id)
            vectors.append(self._open_row(aes, subject_id, row_id, nonce, sealed))
        return owners, _stack(vectors)

    def subjects(self) -> list[uuid.UUID]:
        """Subjects that have templates, in the order they were enrolled.

        Subjects with only documents are not listed: their templates' lifetime (the biometric
        grant) is what callers of this method manage.
        """
        first = (
            sa.select(sa.func.min(templates.c.id))
            .where(templates.c.subject_id == subject_keys.c.subject_id)
            .scalar_subquery()
        )
        with self._session() as conn:
            rows = conn.execute(
                sa.select(subject_keys.c.subject_id).order_by(first, subject_keys.c.subject_id)
            ).all()
        return [uuid.UUID(sid) for (sid,) in rows]

    # -- documents ---------------------------------------------------------------------
    def put_document(
        self, subject_id: uuid.UUID, data: bytes, *, media_type: str, filename: str
    ) -> str:
        """Seal a document (a signed quitclaim) under the subject's document key; return its id.

        The file name goes only into the sealed header (it may hold the person's name); the
        sha256, media type and size are kept in clear for listings.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError("a document must be bytes")
        data = bytes(data)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ValueError(
                f"a document may have at most {MAX_DOCUMENT_BYTES} bytes, this one has {len(data)}"
            )
        media_type = _doc_label("media type", media_type)
        filename = _doc_label("file name", filename)
        doc_id = uuid.uuid4()
        header = json.dumps({"filename": filename, "media_type": media_type},
                            ensure_ascii=False, sort_keys=True).encode("utf-8")
        plain = len(header).to_bytes(4, "big") + header + data
        row = {
            "id": str(doc_id), "subject_id": str(subject_id),
            "sha256": hashlib.sha256(data).hexdigest(), "media_type": media_type,
            "size": len(data), "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        }
        with self._session(write=True) as conn:
            dek = self._data_key(conn, document_keys, subject_id, create=True)
            assert dek is not None
            nonce = os.urandom(NONCE_BYTES)
            sealed = AESGCM(dek).encrypt(nonce, plain, document_aad(subject_id, doc_id))
            conn.execute(documents_table.insert().values(**row, nonce=nonce, ciphertext=sealed))
        log.debug("vault: document %s stored for subject %s (%d bytes)", doc_id, subject_id,
                  len(data))
        return str(doc_id)

    def document(self, subject_id: uuid.UUID, doc_id: str) -> tuple[bytes, str, str]:
        """(data, media type, file name) of one of the subject's documents.

        DocumentNotFoundError when the subject has no such document (or it was erased).
        """
        try:
            doc_uuid = uuid.UUID(str(doc_id))
        except ValueError:
            raise DocumentNotFoundError(
                f"subject {subject_id} has no document {doc_id!r} in the vault"
            ) from None
        d = documents_table.c
        with self._session() as conn:
            row = conn.execute(
                sa.select(d.nonce, d.ciphertext, d.sha256)
                .where(d.id == str(doc_uuid), d.subject_id == str(subject_id))
            ).first()
            dek = None if row is None else self._data_key(
                conn, document_keys, subject_id, create=False
            )
        if row is None or dek is None:
            raise DocumentNotFoundError(
                f"subject {subject_id} has no document {doc_uuid} in the vault"
            )
        try:
            plain = AESGCM(dek).decrypt(row.nonce, row.ciphertext,
                                        document_aad(subject_id, doc_uuid))
            size = int.from_bytes(plain[:4], "big")
            header = json.loads(plain[4:4 + size].decode("utf-8"))
            data = plain[4 + size:]
            media_type, filename = str(header["media_type"]), str(header["filename"])
        except InvalidTag:
            raise VaultError(
                f"vault {self._target}: document {doc_uuid} of subject {subject_id} fails"
                " authentication (the vault was altered)"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise VaultError(
                f"vault {self._target}: document {doc_uuid} has a damaged header"
            ) from None
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise VaultError(
                f"vault {self._target}: the listed sha256 of document {doc_uuid} was altered"
            )
        return data, media_type, filename

    def documents(self, subject_id: uuid.UUID) -> list[dict[str, Any]]:
        """The subject's documents, oldest first: id, sha256, media_type, size, created_at."""
        d = documents_table.c
        with self._session() as conn:
            rows = conn.execute(
                sa.select(d.id, d.sha256, d.media_type, d.size, d.created_at)
                .where(d.subject_id == str(subject_id))
                .order_by(d.created_at, d.id)
            ).all()
        return [
            {**row._asdict(), "created_at": datetime.fromisoformat(row.created_at)}
            for row in rows
        ]

    # -- erasure -----------------------------------------------------------------------
    def erase(self, subject_id: uuid.UUID, *, documents: bool = False) -> int:
        """Crypto-shred a subject's templates (and, with `documents`, its documents): destroy
        the data key and the rows it sealed; return how many templates went.

        Ending a biometric grant erases templates only: the signed quitclaim is the record of
        that consent. Erasing the subject (GDPR Art. 17) passes documents=True.
        The deletion is one transaction; then the storage is rebuilt (module docstring).
        Idempotent: erasing an unknown or already erased subject returns 0.
        """
        sid = str(subject_id)
        with self._session(write=True) as conn:
            erased: int = conn.execute(
                templates.delete().where(templates.c.subject_id == sid)
            ).rowcount
            keys = conn.execute(
                subject_keys.delete().where(subject_keys.c.subject_id == sid)
            ).rowcount
            docs = 0
            if documents:
                docs = conn.execute(
                    documents_table.delete().where(documents_table.c.subject_id == sid)
                ).rowcount
                keys += conn.execute(
                    document_keys.delete().where(document_keys.c.subject_id == sid)
                ).rowcount
        self._compact(changed=bool(erased or keys or docs))
        if erased or keys or docs:
            log.info("vault: erased subject %s (data key, %d template(s), %d document(s))",
                     sid, erased, docs)
        return erased

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def __enter__(self) -> Vault:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vault({str(self._target)!r})"

    # -- internals ---------------------------------------------------------------------
    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[sa.Connection]:
        """A connection under the lock, in a transaction: writers serialized, readers on a
        consistent snapshot."""
        with self._lock:
            if self._engine is None:
                raise VaultError(f"the vault at {self._target} is closed")
            try:
                with _transaction(self._engine, write=write) as conn:
                    yield conn
            except sa.exc.SQLAlchemyError as err:
                raise VaultError(f"vault {self._target}: {_cause(err)}") from None

    def _compact(self, *, changed: bool) -> None:
        """Rewrite the storage so no free page keeps erased bytes (module docstring)."""
        with self._lock:
            if self._engine is None:
                raise VaultError(f"the vault at {self._target} is closed")
            try:
                with self._engine.connect() as conn:
                    if self._target.path is not None:
                        # Outside any transaction: the driver connection, not SQLAlchemy's.
                        raw = conn.connection.driver_connection
                        # Also run when an earlier erase was interrupted before its VACUUM.
                        if changed or raw.execute("PRAGMA freelist_count").fetchone()[0]:
                            raw.execute("VACUUM")
                    elif changed:
                        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                        names = ", ".join(self._target.qualified(t.name) for t in (
                            templates, subject_keys, documents_table, document_keys))
                        conn.exec_driver_sql(f"VACUUM FULL {names}")
            except (sa.exc.SQLAlchemyError, sqlite3.Error) as err:
                raise VaultError(
                    f"vault {self._target}: erased, but rebuilding the storage failed"
                    f" ({_cause(err)}); the next erase retries it"
                ) from None

    def _new_template_ids(self, conn: sa.Connection, n: int) -> list[int]:
        if conn.dialect.name == "sqlite":
            last = conn.exec_driver_sql(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence"
                " WHERE name = 'templates'), 0), COALESCE((SELECT MAX(id) FROM templates), 0))"
            ).scalar_one()
            return list(range(last + 1, last + 1 + n))
        return [conn.execute(template_ids.next_value()).scalar_one() for _ in range(n)]

    def _data_key(
        self, conn: sa.Connection, table: sa.Table, subject_id: uuid.UUID, *, create: bool
    ) -> bytes | None:
        aad = _wrap_aad(table, subject_id)
        row = conn.execute(
            sa.select(table.c.nonce, table.c.wrapped)
            .where(table.c.subject_id == str(subject_id))
        ).first()
        if row is not None:
            return self._unwrap(subject_id, row.nonce, row.wrapped, aad=aad)
        if not create:
            return None
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        conn.execute(table.insert().values(
            subject_id=str(subject_id), nonce=nonce, wrapped=self._wrap.encrypt(nonce, dek, aad),
        ))
        return dek

    def _unwrap(
        self, subject_id: uuid.UUID, nonce: bytes, wrapped: bytes, *, aad: bytes | None = None
    ) -> bytes:
        try:
            return self._wrap.decrypt(nonce, wrapped, subject_id.bytes if aad is None else aad)
        except InvalidTag:
            raise VaultError(
                f"vault {self._target}: the data key of subject {subject_id} fails authentication"
                " (the vault was altered)"
            ) from None

    def _open_row(
        self, aes: AESGCM, subject_id: uuid.UUID, row_id: int, nonce: bytes, sealed: bytes
    ) -> np.ndarray:
        try:
            plain = aes.decrypt(nonce, sealed, template_aad(subject_id, row_id))
        except InvalidTag:
            raise VaultError(
                f"vault {self._target}: template {row_id} of subject {subject_id} fails"
                " authentication (the vault was altered)"
            ) from None
        return np.frombuffer(plain, dtype=_VECTOR_DTYPE)


class _Target:
    """Where a vault lives: a SQLite file (`path`) or a PostgreSQL URL (+ optional schema)."""

    def __init__(self, *, path: Path | None = None, url: sa.URL | None = None,
                 schema: str | None = None) -> None:
        self.path, self.url, self.schema = path, url, schema

    @classmethod
    def parse(cls, location: Path | str) -> _Target:
        if isinstance(location, Path) or "://" not in location:
            return cls(path=Path(location))
        try:
            url = sa.make_url(location)
        except sa.exc.ArgumentError:
            raise VaultError("the vault URL is not a valid database URL") from None
        backend = url.get_backend_name()
        if backend == "sqlite":
            if not url.database or url.database == ":memory:":
                raise VaultError("a SQLite vault URL must name a file")
            return cls(path=Path(url.database))
        if backend != "postgresql":
            raise VaultError(
                f"the vault needs a SQLite file or PostgreSQL, not {backend!r}"
            )
        schema = url.query.get("schema")
        if isinstance(schema, tuple):
            schema = schema[-1]
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise VaultError(
                "the vault URL's schema must be a plain lower-case name (letters, digits, _)"
            )
        url = url.difference_update_query(["schema"])
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return cls(url=url, schema=schema)

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        assert self.url is not None
        text = self.url.render_as_string(hide_password=True)
        return text + (f" (schema {self.schema})" if self.schema else "")

    def qualified(self, table: str) -> str:
        return f'"{self.schema}"."{table}"' if self.schema else f'"{table}"'

    def engine(self) -> sa.Engine:
        if self.path is not None:
            path = self.path
            # mode=rw: SQLite must never create the file itself (it would not be 0600);
            # isolation_level None: transactions are explicit (the "begin" listener below).
            engine = sa.create_engine(
                "sqlite://",
                creator=lambda: sqlite3.connect(
                    f"file:{quote(str(path))}?mode=rw", uri=True, isolation_level=None,
                    check_same_thread=False,
                ),
                poolclass=sa.pool.QueuePool, pool_size=1,
            )
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            sa.event.listen(engine, "begin", _sqlite_begin)
            return engine
        assert self.url is not None
        engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=2)
        if self.schema:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        return engine


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    # secure_delete: freed cells and pages are zeroed, not left for a hex editor to find.
    # temp_store=MEMORY: VACUUM's working copy never touches the disk.
    # journal_mode=DELETE is a no-op on our files; it would rewrite the header only if
    # someone had switched the file to WAL, whose log would keep erased pages.
    for pragma in ("secure_delete = ON", "temp_store = MEMORY", "foreign_keys = ON",
                   "journal_mode = DELETE"):
        dbapi_conn.execute(f"PRAGMA {pragma}")


def _sqlite_begin(conn: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front, so two writers never both read "no data key yet".
    write = conn.get_execution_options().get("vault_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def _transaction(engine: sa.Engine, *, write: bool) -> Iterator[sa.Connection]:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # Writers: read committed, so the reads after the lock see the last writer's rows.
            # Readers: one snapshot, so keys and templates read apart still belong together.
            conn.execution_options(
                isolation_level="READ COMMITTED" if write else "REPEATABLE READ"
            )
        else:
            conn.execution_options(vault_write=write)
        with conn.begin():
            if write and conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
            yield conn


def _cause(err: BaseException) -> str:
    """The database's own message, first line only: never the SQL or its parameters."""
    orig = getattr(err, "orig", None)
    text = str(orig if orig is not None else err).strip()
    if orig is None and isinstance(err, sa.exc.SQLAlchemyError):
        text = type(err).__name__
    return text.splitlines()[0] if text else type(err).__name__


def _wrap_aad(table: sa.Table, subject_id: uuid.UUID) -> bytes:
    return (_DOCUMENT_KEY_AAD + subject_id.bytes) if table is document_keys else subject_id.bytes


def _doc_label(what: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_LABEL:
        raise ValueError(f"a document's {what} must be a non-empty text of at most {_MAX_LABEL}")
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"a document's {what} may not contain control characters")
    return value


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[1] != DIM:
        raise ValueError(f"expected an (n, {DIM}) array of face vectors, got shape {array.shape}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"face vectors must be numeric, got dtype {array.dtype}")
    matrix = np.ascontiguousarray(array, dtype=_VECTOR_DTYPE)
    if not np.isfinite(matrix).all():
        raise ValueError("face vectors must be finite (no NaN or infinity)")
    return matrix


def _stack(vectors: Iterable[np.ndarray]) -> np.ndarray:
    rows = list(vectors)
    if not rows:
        return np.empty((0, DIM), dtype=np.float32)
    return np.stack(rows).astype(np.float32, copy=False)


def _check_value(check_key: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(check_key).encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AAD)


def _initial_meta(check_key: bytes) -> list[dict[str, Any]]:
    return [{"name": "format", "value": str(FORMAT_VERSION).encode()},
            {"name": "check", "value": _check_value(check_key)}]


def _create_file(path: Path, check_key: bytes) -> None:
    """Build a new vault in a temp file and link it into place, so `path` appears complete.

    os.link fails if `path` exists: two processes creating at once cannot clobber each other.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise VaultError(f"cannot create the vault at {path}: {err.strerror}") from err
    try:
        os.fchmod(fd, 0o600)
        os.close(fd)
        engine = _Target(path=tmp).engine()
        try:
            with _transaction(engine, write=True) as conn:
                metadata.create_all(conn)
                conn.execute(meta.insert(), _initial_meta(check_key))
        finally:
            engine.dispose()
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.info("vault %s was created concurrently; opening that one", path)
        else:
            log.info("created vault %s (mode 0600)", path)
    except sa.exc.SQLAlchemyError as err:
        raise VaultError(f"cannot create the vault at {path}: {_cause(err)}") from None
    except OSError as err:
        raise VaultError(f"cannot create the vault at {path}: {err.strerror}") from err
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_postgres(engine: sa.Engine, target: _Target, check_key: bytes, *,
                      create: bool) -> None:
    """Refuse a missing vault, or (with `create`) build it in one locked transaction, so
    workers starting together create it once."""
    try:
        with engine.connect() as conn:
            if sa.inspect(conn).has_table("meta", schema=target.schema):
                return
        if not create:
            raise VaultError(f"no vault at {target} (create it with `consentry init`)")
        with _transaction(engine, write=True) as conn:
            if target.schema:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{target.schema}"')
            if sa.inspect(conn).has_table("meta", schema=target.schema):
                return
            metadata.create_all(conn)
            conn.execute(meta.insert(), _initial_meta(check_key))
        log.info("created vault %s", target)
    except sa.exc.SQLAlchemyError as err:
        raise VaultError(f"cannot open the vault at {target}: {_cause(err)}") from None


def _check_key(engine: sa.Engine, target: _Target, check_key: bytes) -> None:
    """Refuse a wrong key before anything is written, so a typo cannot damage the vault."""
    try:
        with _transaction(engine, write=False) as conn:
            stored = {name: bytes(value) for name, value in conn.execute(sa.select(meta))}
    except sa.exc.SQLAlchemyError as err:
        if target.path is None and isinstance(err, sa.exc.OperationalError):
            raise VaultError(f"cannot open the vault at {target}: {_cause(err)}") from None
        raise VaultError(f"{target} is not a Consentry vault ({_cause(err)})") from None
    if "check" not in stored or "format" not in stored:
        raise VaultError(f"{target} is not a Consentry vault (no key check)")
    if stored["format"] != str(FORMAT_VERSION).encode():
        raise VaultError(f"vault {target} has an unsupported format version")
    check = stored["check"]
    try:
        plain = AESGCM(check_key).decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], _CHECK_AAD)
    except InvalidTag:
        raise KeyMaterialError(f"the key does not open the vault at {target}") from None
    if plain != _CHECK_PLAINTEXT:
        raise VaultError(f"vault {target} has a damaged key check")


def _add_missing_tables(engine: sa.Engine, target: _Target) -> None:
    """Vaults made before documents existed get their (empty) document tables; only after the
    key check, so a wrong key still changes nothing."""
    try:
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names(schema=target.schema))
        if all(table.name in names for table in _DOCUMENT_TABLES):
            return
        with _transaction(engine, write=True) as conn:
            metadata.create_all(conn, tables=list(_DOCUMENT_TABLES), checkfirst=True)
    except sa.exc.SQLAlchemyError as err:
        raise VaultError(f"vault {target}: cannot add the document tables ({_cause(err)})") \
            from None


def _warn_if_loose(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o177:
        log.warning(
            "vault %s has mode %04o, looser than 0600; run `chmod 600 %s`", path, mode, path
        )
