"""The template vault: face vectors of consenting subjects, encrypted, erasable per person.

A SQLite file of its own, apart from the state database (DESIGN §6), created with mode 0600
(SQLite gives its -journal the mode of the database file). Layout:

    meta          format version; the key check (a constant sealed under the "vault-check" key)
    subject_keys  subject id -> its data key (DEK), AES-256-GCM-wrapped under the "vault-wrap"
                  key with AAD = subject id
    templates     row id, subject id, nonce, AES-256-GCM(DEK, float32 vector, AAD = subject id +
                  row id) -- one 128-d vector per row

Both keys are HKDF-derived from the KEK (plugin.keys). Binding the AAD to the subject and row means
a ciphertext copied into another subject's or another row's place fails authentication instead of
decrypting into somebody else's template.

Erasure is crypto-shredding: the subject's wrapped DEK and every template row go in one
transaction, `secure_delete` zeroes the freed bytes and VACUUM rebuilds the file, so neither the
wrapped key nor the ciphertext survives anywhere in the file. What the file cannot control:
copies made before erasure (backups) and the rollback journals SQLite unlinked, whose blocks a
filesystem may keep until reused. Both hold only ciphertext under a DEK wrapped by the KEK; rotating
the KEK (re-wrapping the remaining DEKs) is what makes those copies useless too.

No vector, key or ciphertext appears in a log line or an exception message.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import numpy as np
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

_CHECK_PLAINTEXT = b"consentry vault key check v1"
_CHECK_AAD = b"consentry vault check"
_VECTOR_DTYPE = np.dtype("<f4")

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE subject_keys ("
    " subject_id TEXT PRIMARY KEY, nonce BLOB NOT NULL, wrapped BLOB NOT NULL)",
    "CREATE TABLE templates ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " subject_id TEXT NOT NULL REFERENCES subject_keys(subject_id),"
    " nonce BLOB NOT NULL, ciphertext BLOB NOT NULL)",
    "CREATE INDEX templates_subject ON templates(subject_id)",
)


def template_aad(subject_id: uuid.UUID, row_id: int) -> bytes:
    """Associated data of one template row: the subject's 16 bytes + the row id (8, big-endian)."""
    return subject_id.bytes + row_id.to_bytes(8, "big")


class Vault:
    """Encrypted per-subject face templates; open with `Vault.open`, use as a context manager.

    Safe to share between threads (one connection behind a lock).
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, wrap_key: bytes) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = conn
        self._wrap = AESGCM(wrap_key)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, kek: bytes, *, create: bool = False) -> Vault:
        """Open the vault at `path` with the KEK; with `create`, make it first if it is missing.

        A key that does not open the vault raises KeyMaterialError and leaves the file untouched.
        """
        path = Path(path)
        wrap_key = derive_key(kek, WRAP_PURPOSE)
        check_key = derive_key(kek, CHECK_PURPOSE)
        if not path.exists():
            if not create:
                raise VaultError(f"no vault at {path} (create it with `consentry init`)")
            _create(path, check_key)
        else:
            _warn_if_loose(path)
        conn = _connect(path)
        try:
            _check_key(conn, path, check_key)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, wrap_key)

    @property
    def path(self) -> Path:
        return self._path

    def add_templates(self, subject_id: uuid.UUID, vectors: np.ndarray) -> int:
        """Store `vectors`, shape (n, 128), as float32; return the subject's template count."""
        matrix = _as_matrix(vectors)
        sid = str(subject_id)
        with self._session(write=True) as conn:
            dek = self._data_key(conn, subject_id, create=len(matrix) > 0)
            if dek is not None and len(matrix):
                aes = AESGCM(dek)
                next_id = conn.execute(
                    "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence"
                    " WHERE name = 'templates'), 0), COALESCE((SELECT MAX(id) FROM templates), 0))"
                ).fetchone()[0]
                rows = []
                for vector in matrix:
                    next_id += 1
                    nonce = os.urandom(NONCE_BYTES)
                    sealed = aes.encrypt(nonce, vector.tobytes(), template_aad(subject_id, next_id))
                    rows.append((next_id, sid, nonce, sealed))
                conn.executemany(
                    "INSERT INTO templates (id, subject_id, nonce, ciphertext) VALUES (?, ?, ?, ?)",
                    rows,
                )
            count: int = conn.execute(
                "SELECT COUNT(*) FROM templates WHERE subject_id = ?", (sid,)
            ).fetchone()[0]
        log.debug("vault: %d template(s) added, subject %s now has %d", len(matrix), sid, count)
        return count

    def templates(self, subject_id: uuid.UUID) -> np.ndarray:
        """The subject's vectors as an (n, 128) float32 array; (0, 128) when there are none."""
        with self._session() as conn:
            dek = self._data_key(conn, subject_id, create=False)
            if dek is None:
                return np.empty((0, DIM), dtype=np.float32)
            rows = conn.execute(
                "SELECT id, nonce, ciphertext FROM templates WHERE subject_id = ? ORDER BY id",
                (str(subject_id),),
            ).fetchall()
        aes = AESGCM(dek)
        return _stack(self._open_row(aes, subject_id, *row) for row in rows)

    def all_templates(self) -> tuple[list[uuid.UUID], np.ndarray]:
        """Every stored vector, for the matcher: one subject id per row and the (N, 128) matrix."""
        with self._session() as conn:
            keys = conn.execute("SELECT subject_id, nonce, wrapped FROM subject_keys").fetchall()
            rows = conn.execute(
                "SELECT id, subject_id, nonce, ciphertext FROM templates ORDER BY id"
            ).fetchall()
        ciphers: dict[str, tuple[uuid.UUID, AESGCM]] = {}
        for sid, nonce, wrapped in keys:
            subject_id = uuid.UUID(sid)
            ciphers[sid] = (subject_id, AESGCM(self._unwrap(subject_id, nonce, wrapped)))
        owners: list[uuid.UUID] = []
        vectors: list[np.ndarray] = []
        for row_id, sid, nonce, sealed in rows:
            if sid not in ciphers:
                raise VaultError(f"vault {self._path}: template {row_id} has no data key")
            subject_id, aes = ciphers[sid]
            owners.append(subject_id)
            vectors.append(self._open_row(aes, subject_id, row_id, nonce, sealed))
        return owners, _stack(vectors)

    def subjects(self) -> list[uuid.UUID]:
        """Subjects that have a data key, hence templates, in the order they were enrolled."""
        with self._session() as conn:
            rows = conn.execute("SELECT subject_id FROM subject_keys ORDER BY rowid").fetchall()
        return [uuid.UUID(sid) for (sid,) in rows]

    def erase(self, subject_id: uuid.UUID) -> int:
        """Crypto-shred a subject: destroy its data key and templates; return how many templates.

        The deletion is one transaction; then VACUUM rewrites the file so that no page keeps the
        erased bytes. Idempotent: erasing an unknown or already erased subject returns 0.
        """
        sid = str(subject_id)
        with self._session(write=True) as conn:
            erased: int = conn.execute(
                "DELETE FROM templates WHERE subject_id = ?", (sid,)
            ).rowcount
            keys = conn.execute("DELETE FROM subject_keys WHERE subject_id = ?", (sid,)).rowcount
        with self._session(transaction=False) as conn:
            # Also run when an earlier erase was interrupted between its commit and VACUUM.
            if erased or keys or conn.execute("PRAGMA freelist_count").fetchone()[0]:
                conn.execute("VACUUM")
        if erased or keys:
            log.info("vault: erased subject %s (data key and %d template(s))", sid, erased)
        return erased

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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
        return f"Vault({str(self._path)!r})"

    @contextmanager
    def _session(
        self, *, write: bool = False, transaction: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, in a transaction (a consistent snapshot for reads)."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise VaultError(f"the vault at {self._path} is closed")
            try:
                if not transaction:
                    yield conn
                    return
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as err:
                raise VaultError(f"vault {self._path}: {err}") from err

    def _data_key(
        self, conn: sqlite3.Connection, subject_id: uuid.UUID, *, create: bool
    ) -> bytes | None:
        row = conn.execute(
            "SELECT nonce, wrapped FROM subject_keys WHERE subject_id = ?", (str(subject_id),)
        ).fetchone()
        if row is not None:
            return self._unwrap(subject_id, row[0], row[1])
        if not create:
            return None
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        conn.execute(
            "INSERT INTO subject_keys (subject_id, nonce, wrapped) VALUES (?, ?, ?)",
            (str(subject_id), nonce, self._wrap.encrypt(nonce, dek, subject_id.bytes)),
        )
        return dek

    def _unwrap(self, subject_id: uuid.UUID, nonce: bytes, wrapped: bytes) -> bytes:
        try:
            return self._wrap.decrypt(nonce, wrapped, subject_id.bytes)
        except InvalidTag:
            raise VaultError(
                f"vault {self._path}: the data key of subject {subject_id} fails authentication"
                " (the file was altered)"
            ) from None

    def _open_row(
        self, aes: AESGCM, subject_id: uuid.UUID, row_id: int, nonce: bytes, sealed: bytes
    ) -> np.ndarray:
        try:
            plain = aes.decrypt(nonce, sealed, template_aad(subject_id, row_id))
        except InvalidTag:
            raise VaultError(
                f"vault {self._path}: template {row_id} of subject {subject_id} fails"
                " authentication (the file was altered)"
            ) from None
        return np.frombuffer(plain, dtype=_VECTOR_DTYPE)


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


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: SQLite must never create the file itself (it would not be 0600); isolation_level
    # None: transactions are explicit (BEGIN/COMMIT in Vault._session).
    try:
        conn = sqlite3.connect(
            f"file:{quote(str(path))}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as err:
        raise VaultError(f"cannot open the vault at {path} ({err})") from err
    try:
        # secure_delete: freed cells and pages are zeroed, not left for a hex editor to find.
        # temp_store=MEMORY: VACUUM's working copy never touches the disk.
        # journal_mode=DELETE is a no-op on our files; it would rewrite the header only if
        # someone had switched the file to WAL, whose log would keep erased pages.
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.Error as err:
        conn.close()
        raise VaultError(f"{path} is not a Consentry vault ({err})") from err
    return conn


def _create(path: Path, check_key: bytes) -> None:
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
        conn = _connect(tmp)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            nonce = os.urandom(NONCE_BYTES)
            check = nonce + AESGCM(check_key).encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AAD)
            conn.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?)",
                [("format", str(FORMAT_VERSION).encode()), ("check", check)],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.info("vault %s was created concurrently; opening that one", path)
        else:
            log.info("created vault %s (mode 0600)", path)
    except sqlite3.Error as err:
        raise VaultError(f"cannot create the vault at {path}: {err}") from err
    except OSError as err:
        raise VaultError(f"cannot create the vault at {path}: {err.strerror}") from err
    finally:
        tmp.unlink(missing_ok=True)


def _check_key(conn: sqlite3.Connection, path: Path, check_key: bytes) -> None:
    """Refuse a wrong key before anything is written, so a typo cannot damage the vault."""
    try:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    except sqlite3.Error as err:
        raise VaultError(f"{path} is not a Consentry vault ({err})") from err
    if "check" not in meta or "format" not in meta:
        raise VaultError(f"{path} is not a Consentry vault (no key check)")
    if meta["format"] != str(FORMAT_VERSION).encode():
        raise VaultError(f"vault {path} has an unsupported format version")
    check = bytes(meta["check"])
    try:
        plain = AESGCM(check_key).decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], _CHECK_AAD)
    except InvalidTag:
        raise KeyMaterialError(f"the key does not open the vault at {path}") from None
    if plain != _CHECK_PLAINTEXT:
        raise VaultError(f"vault {path} has a damaged key check")


def _warn_if_loose(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o177:
        log.warning(
            "vault %s has mode %04o, looser than 0600; run `chmod 600 %s`", path, mode, path
        )
