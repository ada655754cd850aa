"""Tamper-evident audit log in the state database's `audit` table (DESIGN §6).

Every entry carries `mac = HMAC-SHA256(key, canonical JSON of seq, at, actor, action, subject_id,
asset, details, prev_mac)`, where `prev_mac` is the previous entry's MAC (64 zeros for seq 1) and
`key = keys.derive_key(kek, "audit")`. Editing, deleting or reordering entries breaks a MAC or a
link. Cutting the tail leaves a valid chain, so the latest (seq, mac) is also kept outside the
table, in the *head file* (0600, replaced atomically, itself HMAC'd so it cannot be hand-written).

Head rule (what `verify` accepts):
    * the head names an entry that exists with exactly that MAC, and no entry is missing after it;
    * the head may lag behind the end of the log, never run ahead of it.
A head ahead of the log, or naming a replaced entry, is a cut tail: AuditChainError. A lagging
head is not evidence of tampering (an attacker who cannot forge MACs cannot add entries) and
happens legitimately between a commit and the head update; `verify` logs a warning, and the lagging
entries are authenticated by the chain but not yet protected against truncation.

Transactions: `append()` without `conn` commits its own transaction, then advances the head.
With `conn`, the entry joins the caller's transaction and the head can only move after the commit:
use `with log.transaction() as conn:` (which syncs the head after commit), or call `sync_head()`
yourself after committing. `sync_head()` never blesses a cut: it refuses to move a head whose
entry is no longer in the log. Heads only move forward (a file lock orders concurrent writers).

Several writers (workers in several processes or on several machines): the appender takes a
lock before it reads the last entry -- on PostgreSQL a transaction-level advisory lock, on SQLite
the database's write lock -- and holds it to its commit, so seqs stay 1..n with no gap and no
fork. The primary key on seq would turn any remaining race into an error, never a second chain.
Each machine keeps its own head file; processes on one machine share it under the file lock.
A machine's head lags by what the others appended since its last write, which `verify` accepts;
a cut is caught by every head that saw an entry beyond the cut (the `audit verify` of the
machine that wrote last sees them all).

Privacy: entries name subjects and assets by id only. Callers pass ids, never names or face
vectors; `details` keys such as "name" or "vector" and long lists of numbers are refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from plugin.errors import AuditChainError, KeyMaterialError
from plugin.schema import audit

log = logging.getLogger(__name__)

GENESIS_MAC = "0" * 64

# Keys that would put a person's name or biometric data into the log (DESIGN §6).
FORBIDDEN_DETAIL_KEYS = frozenset(
    {
        "name",
        "names",
        "display_name",
        "full_name",
        "vector",
        "vectors",
        "encoding",
        "encodings",
        "embedding",
        "embeddings",
    }
)
# A list of this many numbers in `details` looks like a face vector (128 floats) and is refused.
_MAX_NUMBER_LIST = 64
_MAX_LABEL = 64  # width of the actor and action columns

_ENTRY_DOMAIN = b"consentry audit entry v1\n"
_HEAD_DOMAIN = b"consentry audit head v1\n"
# One PostgreSQL advisory lock orders appenders across workers, so the chain stays linear.
_PG_LOCK_ID = int.from_bytes(b"cnsntry\x01", "big")


@dataclass(frozen=True)
class _Head:
    seq: int
    mac: str


class AuditLog:
    """Append and verify the HMAC chain; `key` is `keys.derive_key(kek, "audit")`."""

    def __init__(self, engine: sa.Engine, *, key: bytes, head_path: Path) -> None:
        if len(key) < 32:
            raise KeyMaterialError("the audit key must be 32 bytes: keys.derive_key(kek, 'audit')")
        self._engine = engine
        self._key = key
        self.head_path = Path(head_path)
        self._append_lock = threading.Lock()
        self._head_lock = threading.Lock()

    def append(
        self,
        action: str,
        *,
        actor: str = "consentry",
        subject_id: uuid.UUID | None = None,
        asset: str | None = None,
        details: Mapping[str, Any] | None = None,
        at: datetime | None = None,
        conn: sa.Connection | None = None,
    ) -> int:
        """Add one entry and return its seq.

        With `conn`, the entry is part of the caller's transaction; call `sync_head()` after
        the commit (or use `transaction()`), otherwise the head lags (see the module docstring).
        """
        fields = _fields(action, actor=actor, subject_id=subject_id, asset=asset,
                         details=details, at=at)
        if conn is not None:
            return self._insert(conn, [fields])[0]
        # One appender at a time in this process; across processes and machines `_insert`
        # takes the database's lock (module docstring).
        with self._append_lock:
            with self._engine.begin() as own:
                seq, mac = self._insert(own, [fields])
            self._advance_head(_Head(seq, mac), strict=False)
        return seq

    def append_many(self, entries: Sequence[Mapping[str, Any]], *, conn: sa.Connection
                    ) -> int | None:
        """Add several entries, chained in order, in the caller's transaction.

        Each mapping takes `append`'s keyword arguments (`action` required). One lock, one
        read of the last entry and one insert for all of them: re-labelling records thousands
        of assets a minute. Returns the last seq (None when `entries` is empty); call
        `sync_head()` after the commit.
        """
        if not entries:
            return None
        rows = [_fields(e["action"], **{k: v for k, v in e.items() if k != "action"})
                for e in entries]
        return self._insert(conn, rows)[0]

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """`engine.begin()` that moves the head after a successful commit."""
        with self._engine.begin() as conn:
            yield conn
        self._sync(strict=False)

    def sync_head(self) -> None:
        """Move the head to the last committed entry; AuditChainError if its entry is gone."""
        self._sync(strict=True)

    def verify(self) -> int:
        """Check the whole chain and the head; return the number of entries.

        Raises AuditChainError naming the first bad seq and why.
        """
        # The head is read before the entries: heads only move forward, so one read first can
        # lag behind the entries read next (appends go on during verify) but never run ahead.
        head, head_error = None, None
        try:
            head = self._read_head()
        except AuditChainError as err:
            head_error = err  # reported after the chain, which names the first bad seq
        count, prev, head_mac = 0, GENESIS_MAC, None
        with self._engine.connect() as conn:
            for row in conn.execute(sa.select(audit).order_by(audit.c.seq)):
                entry = row._asdict()
                expected = count + 1
                if entry["seq"] != expected:
                    raise _broken(
                        expected,
                        f"found seq {entry['seq']} where {expected} belongs: entries were deleted"
                        " or renumbered",
                    )
                if not _same(self._mac(entry), str(entry["mac"])):
                    raise _broken(expected, "edited: the entry does not match its MAC")
                if entry["prev_mac"] != prev:
                    raise _broken(
                        expected, f"broken link: prev_mac is not the MAC of entry {expected - 1}"
                    )
                if head is not None and expected == head.seq:
                    head_mac = entry["mac"]
                prev, count = entry["mac"], expected
        if head_error is not None:
            raise head_error
        if head is None:
            if count:
                raise _broken(
                    count,
                    f"the head file {self.head_path} is missing, so a cut tail would go unseen",
                )
            return 0
        if head.seq > count:
            raise _broken(
                count + 1,
                f"tail cut: the head names entry {head.seq} but the log ends at {count}",
            )
        if head.seq and not _same(str(head_mac), head.mac):
            raise _broken(head.seq, "the head names this entry with another MAC: it was replaced")
        if head.seq == 0 and head.mac != GENESIS_MAC:
            raise _broken(1, "the head of an empty log carries a MAC")
        if head.seq < count:
            log.warning(
                "audit head is at entry %d, the log at %d: the entries after the head are"
                " authentic but not yet protected against truncation (sync_head is due)",
                head.seq,
                count,
            )
        return count

    def entries(self, since: datetime | None = None) -> Iterator[dict[str, Any]]:
        """Entries in seq order (at >= since when given), as stored, with `details` parsed.

        `at` stays the stored ISO-8601 UTC text so an export can be re-verified byte for byte.
        """
        query = sa.select(audit).order_by(audit.c.seq)
        if since is not None:
            query = query.where(audit.c.at >= _utc_text(since))
        with self._engine.connect() as conn:
            for row in conn.execute(query):
                entry = row._asdict()
                entry["details"] = json.loads(entry["details"])
                yield entry

    def _insert(self, conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> tuple[int, str]:
        """Chain `rows` after the last entry and insert them; the last (seq, mac)."""
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        elif conn.dialect.name == "sqlite":
            # A write that changes nothing takes SQLite's write lock (waiting busy_timeout for
            # it) before the last entry is read, so a second writer cannot read the same one.
            conn.execute(audit.update().where(sa.false()).values(seq=audit.c.seq))
        last = conn.execute(
            sa.select(audit.c.seq, audit.c.mac).order_by(audit.c.seq.desc()).limit(1)
        ).first()
        seq, mac = (0, GENESIS_MAC) if last is None else (last.seq, last.mac)
        entries = []
        for fields in rows:
            seq += 1
            entry = {**fields, "seq": seq, "prev_mac": mac}
            entry["mac"] = mac = self._mac(entry)
            entries.append(entry)
        conn.execute(sa.insert(audit), entries)
        return seq, mac

    def _mac(self, entry: Mapping[str, Any]) -> str:
        payload = {
            name: entry[name]
            for name in ("seq", "at", "actor", "action", "subject_id", "asset", "details")
        }
        payload["prev_mac"] = entry["prev_mac"]
        return hmac.new(self._key, _ENTRY_DOMAIN + _canonical(payload), hashlib.sha256).hexdigest()

    def _sync(self, *, strict: bool) -> None:
        with self._engine.connect() as conn:
            last = conn.execute(
                sa.select(audit.c.seq, audit.c.mac).order_by(audit.c.seq.desc()).limit(1)
            ).first()
        head = _Head(0, GENESIS_MAC) if last is None else _Head(last.seq, last.mac)
        self._advance_head(head, strict=strict)

    def _advance_head(self, new: _Head, *, strict: bool) -> None:
        """Write `new` as the head if it is further along than the current head.

        A current head whose entry is missing or changed is evidence of a cut; it is left in
        place for `verify` to report, and raised here only when `strict`.
        """
        with self._head_lock, self._file_lock():
            try:
                current = self._read_head()
                if current is not None:
                    self._check_anchor(current)
                    if current.seq >= new.seq:
                        return
            except AuditChainError as err:
                if strict:
                    raise
                log.error("audit head left unchanged: %s", err)
                return
            self._write_head(new)

    def _check_anchor(self, head: _Head) -> None:
        if head.seq == 0:
            return
        with self._engine.connect() as conn:
            mac = conn.execute(sa.select(audit.c.mac).where(audit.c.seq == head.seq)).scalar()
        if mac is None:
            raise _broken(
                head.seq, "tail cut: the head names an entry that is no longer in the log"
            )
        if not _same(str(mac), head.mac):
            raise _broken(head.seq, "the head names this entry with another MAC: it was replaced")

    def _head_check(self, head: _Head) -> str:
        message = _HEAD_DOMAIN + f"{head.seq}:{head.mac}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _read_head(self) -> _Head | None:
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise AuditChainError(
                f"cannot read the audit head {self.head_path}: {err.strerror}"
            ) from err
        try:
            data = json.loads(raw)
            head = _Head(int(data["seq"]), str(data["mac"]))
            check = str(data["check"])
        except (ValueError, KeyError, TypeError) as err:
            raise AuditChainError(f"the audit head {self.head_path} is unreadable") from err
        if not _same(self._head_check(head), check):
            raise AuditChainError(
                f"the audit head {self.head_path} was altered or written with another key"
            )
        return head

    def _write_head(self, head: _Head) -> None:
        """Temp file + fsync + os.replace: a crash leaves the old head or the new, never half."""
        directory = self.head_path.parent
        directory.mkdir(parents=True, exist_ok=True)
        body = {"seq": head.seq, "mac": head.mac, "check": self._head_check(head)}
        tmp = directory / f".{self.head_path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, _canonical(body) + b"\n")
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, self.head_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An flock beside the head file, so processes sharing it advance it one at a time."""
        self.head_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.head_path.with_name(self.head_path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _broken(seq: int, why: str) -> AuditChainError:
    return AuditChainError(f"audit log broken at seq {seq}: {why}")


def _same(a: str, b: str) -> bool:
    """Constant-time comparison that also accepts non-ASCII text (a tampered column may hold it)."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _fields(action: str, *, actor: str = "consentry", subject_id: uuid.UUID | None = None,
            asset: str | None = None, details: Mapping[str, Any] | None = None,
            at: datetime | None = None) -> dict[str, Any]:
    """One entry's columns before chaining, validated."""
    return {
        "at": _utc_text(at if at is not None else datetime.now(UTC)),
        "actor": _label("actor", actor),
        "action": _label("action", action),
        "subject_id": None if subject_id is None else str(uuid.UUID(str(subject_id))),
        "asset": asset,
        "details": _details_text(details),
    }


def _utc_text(moment: datetime) -> str:
    """Fixed-width ISO-8601 UTC, so that text order is time order (used by `entries(since)`)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _label(field: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_LABEL:
        raise ValueError(f"audit {field} must be a non-empty string of at most {_MAX_LABEL}")
    return value


def _details_text(details: Mapping[str, Any] | None) -> str:
    if details is None:
        return "{}"
    if not isinstance(details, Mapping):
        raise ValueError("audit details must be a mapping")
    _refuse_personal(details, "details")
    try:
        return json.dumps(
            details,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_json_default,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"audit details must be plain JSON: {err}") from err


def _refuse_personal(value: Any, where: str) -> None:
    """Refuse details that would carry a name or a face vector into the log."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit {where} has a non-string key")
            if key.lower() in FORBIDDEN_DETAIL_KEYS:
                raise ValueError(
                    f"audit {where}.{key} is refused: the log takes ids, never names or vectors"
                )
            _refuse_personal(item, f"{where}.{key}")
    elif hasattr(value, "__array__"):
        raise ValueError(f"audit {where} is an array: face vectors never go into the log")
    elif isinstance(value, list | tuple):
        numbers = sum(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if numbers >= _MAX_NUMBER_LIST:
            raise ValueError(
                f"audit {where} is a list of {numbers} numbers, which looks like a face vector"
            )
        for index, item in enumerate(value):
            _refuse_personal(item, f"{where}[{index}]")


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return _utc_text(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
