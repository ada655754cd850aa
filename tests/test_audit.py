"""The audit chain notices edits, deletions, reordering and a cut tail."""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from plugin.audit import GENESIS_MAC, AuditLog
from plugin.errors import AuditChainError, KeyMaterialError
from plugin.keys import derive_key
from plugin.schema import audit, metadata

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    metadata.create_all(engine)
    return engine


@pytest.fixture
def key() -> bytes:
    return derive_key(os.urandom(32), "audit")


@pytest.fixture
def head(tmp_path: Path) -> Path:
    return tmp_path / "audit.head"


@pytest.fixture
def log(engine: sa.Engine, key: bytes, head: Path) -> AuditLog:
    return AuditLog(engine, key=key, head_path=head)


def fill(log: AuditLog, n: int) -> list[uuid.UUID]:
    subjects = [uuid.uuid4() for _ in range(n)]
    for i, subject in enumerate(subjects):
        log.append(
            "consent.added",
            actor="admin",
            subject_id=subject,
            asset=f"folder:img_{i}.jpg",
            details={"consent_id": str(uuid.uuid4()), "channels": ["website", "print"]},
            at=T0 + timedelta(hours=i),
        )
    return subjects


def sql(engine: sa.Engine, statement: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def test_fresh_log_verifies_empty(log: AuditLog, head: Path) -> None:
    assert log.verify() == 0
    assert list(log.entries()) == []
    log.sync_head()
    assert json.loads(head.read_text())["seq"] == 0
    assert log.verify() == 0


def test_appended_entries_verify(log: AuditLog, head: Path) -> None:
    subjects = fill(log, 5)
    assert log.verify() == 5
    assert stat.S_IMODE(head.stat().st_mode) == 0o600
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev_mac"] == GENESIS_MAC
    assert all(e["prev_mac"] == p["mac"] for p, e in itertools.pairwise(entries))
    assert entries[2]["subject_id"] == str(subjects[2])
    assert entries[2]["details"]["channels"] == ["website", "print"]
    assert entries[2]["at"] == "2025-03-01T11:00:00.000000+00:00"
    assert json.loads(head.read_text())["seq"] == 5
    assert [e["seq"] for e in log.entries(since=T0 + timedelta(hours=3))] == [4, 5]
    # Stored times are UTC whatever zone the caller used.
    log.append("scan.done", at=datetime(2025, 3, 2, 12, 0, tzinfo=UTC).astimezone())
    assert list(log.entries())[-1]["at"].endswith("+00:00")


def test_default_time_is_now_in_utc(log: AuditLog) -> None:
    before = datetime.now(UTC)
    log.append("scan.started")
    (entry,) = log.entries()
    assert before <= datetime.fromisoformat(entry["at"]) <= datetime.now(UTC)
    assert entry["details"] == {} and entry["actor"] == "consentry"


def test_edited_details_are_detected(log: AuditLog, engine: sa.Engine) -> None:
    fill(log, 5)
    sql(engine, "UPDATE audit SET details = :d WHERE seq = 3", d='{"consent_id":"forged"}')
    with pytest.raises(AuditChainError, match=r"seq 3\b.*edited"):
        log.verify()


@pytest.mark.parametrize("column", ["at", "actor", "action", "subject_id", "asset"])
def test_every_field_is_covered(log: AuditLog, engine: sa.Engine, column: str) -> None:
    fill(log, 3)
    sql(engine, f"UPDATE audit SET {column} = 'x' WHERE seq = 2")
    with pytest.raises(AuditChainError, match=r"seq 2\b"):
        log.verify()


def test_tail_cut_is_detected(log: AuditLog, engine: sa.Engine) -> None:
    fill(log, 5)
    sql(engine, "DELETE FROM audit WHERE seq > 3")
    with pytest.raises(AuditChainError, match=r"seq 4\b.*tail cut.*entry 5.*ends at 3"):
        log.verify()


def test_tail_cut_and_regrown_is_detected(log: AuditLog, engine: sa.Engine) -> None:
    # Cut two entries, then let the service append two new ones with the same seqs: the head
    # still names the old entry 5, whose MAC no longer matches.
    fill(log, 5)
    sql(engine, "DELETE FROM audit WHERE seq > 3")
    log.append("scan.done")
    log.append("scan.done")
    with pytest.raises(AuditChainError, match=r"seq 5\b.*replaced"):
        log.verify()
    with pytest.raises(AuditChainError):
        log.sync_head()


def test_missing_head_is_detected(log: AuditLog, head: Path) -> None:
    fill(log, 3)
    head.unlink()
    with pytest.raises(AuditChainError, match=r"head file .* is missing"):
        log.verify()


def test_hand_written_head_is_detected(log: AuditLog, engine: sa.Engine, head: Path) -> None:
    fill(log, 5)
    sql(engine, "DELETE FROM audit WHERE seq > 3")
    with engine.connect() as conn:
        mac3 = conn.execute(sa.select(audit.c.mac).where(audit.c.seq == 3)).scalar_one()
    body = json.loads(head.read_text())
    head.write_text(json.dumps({**body, "seq": 3, "mac": mac3}))
    with pytest.raises(AuditChainError, match="altered"):
        log.verify()


def test_deleted_middle_entry_is_detected(log: AuditLog, engine: sa.Engine) -> None:
    fill(log, 5)
    sql(engine, "DELETE FROM audit WHERE seq = 2")
    with pytest.raises(AuditChainError, match=r"seq 2\b.*found seq 3"):
        log.verify()


def test_reordered_entries_are_detected(log: AuditLog, engine: sa.Engine) -> None:
    fill(log, 5)
    sql(engine, "UPDATE audit SET seq = 100 WHERE seq = 2")
    sql(engine, "UPDATE audit SET seq = 2 WHERE seq = 3")
    sql(engine, "UPDATE audit SET seq = 3 WHERE seq = 100")
    with pytest.raises(AuditChainError, match=r"seq 2\b"):
        log.verify()


def test_altered_mac_is_detected(log: AuditLog, engine: sa.Engine) -> None:
    fill(log, 5)
    sql(engine, "UPDATE audit SET mac = :m WHERE seq = 4", m="f" * 64)
    with pytest.raises(AuditChainError, match=r"seq 4\b.*edited"):
        log.verify()


def test_broken_link_is_detected(log: AuditLog, engine: sa.Engine, key: bytes) -> None:
    # Entry 3 re-chained to another parent with a valid MAC (as only a key holder could make):
    # its own MAC holds, so only the link check can catch it.
    fill(log, 4)
    with engine.connect() as conn:
        rows = [r._asdict() for r in conn.execute(sa.select(audit).order_by(audit.c.seq))]
    forged = dict(rows[2], prev_mac="a" * 64)
    forged["mac"] = log._mac(forged)  # a MAC made with the right key, as an insider could
    sql(
        engine,
        "UPDATE audit SET prev_mac = :p, mac = :m WHERE seq = 3",
        p=forged["prev_mac"],
        m=forged["mac"],
    )
    with pytest.raises(AuditChainError, match=r"seq 3\b.*broken link"):
        log.verify()


def test_other_key_fails_at_the_first_entry(engine: sa.Engine, log: AuditLog, head: Path) -> None:
    fill(log, 2)
    other = AuditLog(engine, key=derive_key(os.urandom(32), "audit"), head_path=head)
    with pytest.raises(AuditChainError, match=r"seq 1\b"):
        other.verify()


def test_short_key_is_refused(engine: sa.Engine, head: Path) -> None:
    with pytest.raises(KeyMaterialError):
        AuditLog(engine, key=b"short", head_path=head)


def test_caller_transaction_with_sync(log: AuditLog, engine: sa.Engine, head: Path) -> None:
    fill(log, 1)
    with log.transaction() as conn:
        assert log.append("subject.erased", subject_id=uuid.uuid4(), conn=conn) == 2
        assert log.append("asset.reevaluated", asset="folder:a.jpg", conn=conn) == 3
    assert json.loads(head.read_text())["seq"] == 3
    assert log.verify() == 3


def test_a_group_appended_at_once_chains_like_single_appends(log: AuditLog, engine: sa.Engine,
                                                            head: Path) -> None:
    fill(log, 2)
    with log.transaction() as conn:
        last = log.append_many([{"action": "asset.relabelled", "asset": f"folder:{i}.jpg",
                                 "details": {"status": "review"}} for i in range(5)], conn=conn)
        assert log.append_many([], conn=conn) is None
    assert last == 7 and json.loads(head.read_text())["seq"] == 7
    assert log.append("scan.done") == 8
    assert log.verify() == 8
    with engine.connect() as conn:
        rows = conn.execute(sa.select(audit).order_by(audit.c.seq)).all()
    assert [r.asset for r in rows[2:7]] == [f"folder:{i}.jpg" for i in range(5)]
    assert all(b.prev_mac == a.mac for a, b in itertools.pairwise(rows))
    # A name in one entry refuses the whole group; nothing of it is written.
    with pytest.raises(ValueError), log.transaction() as conn:
        log.append_many([{"action": "asset.relabelled"},
                         {"action": "asset.relabelled", "details": {"name": "Jane Doe"}}],
                        conn=conn)
    assert log.verify() == 8


def test_rolled_back_append_leaves_a_valid_log(log: AuditLog, engine: sa.Engine) -> None:
    fill(log, 2)
    with pytest.raises(RuntimeError), log.transaction() as conn:
        log.append("subject.erased", conn=conn)
        raise RuntimeError("the caller's work failed")
    assert log.verify() == 2
    assert log.append("scan.done") == 3
    assert log.verify() == 3


def test_lagging_head_is_accepted_then_synced(
    log: AuditLog, engine: sa.Engine, head: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(log, 2)
    with engine.begin() as conn:
        log.append("consent.withdrawn", conn=conn)
    assert json.loads(head.read_text())["seq"] == 2
    with caplog.at_level(logging.WARNING, logger="plugin.audit"):
        assert log.verify() == 3
    assert "sync_head is due" in caplog.text
    log.sync_head()
    assert json.loads(head.read_text())["seq"] == 3
    # ...and once synced, cutting that entry is caught.
    sql(engine, "DELETE FROM audit WHERE seq = 3")
    with pytest.raises(AuditChainError, match="tail cut"):
        log.verify()


def test_sync_head_never_blesses_a_cut(log: AuditLog, engine: sa.Engine, head: Path) -> None:
    fill(log, 4)
    sql(engine, "DELETE FROM audit WHERE seq = 4")
    with pytest.raises(AuditChainError, match="tail cut"):
        log.sync_head()
    assert json.loads(head.read_text())["seq"] == 4


@pytest.mark.parametrize(
    "details",
    [
        {"name": "Jane Doe"},
        {"subject": {"Display_Name": "Jane Doe"}},
        {"faces": [{"encoding": [0.1, 0.2]}]},
        {"vector": "anything"},
        {"v": np.zeros(128)},
        {"v": [0.01 * i for i in range(128)]},
    ],
)
def test_names_and_vectors_are_refused(log: AuditLog, details: dict) -> None:
    with pytest.raises(ValueError) as caught:
        log.append("subject.enrolled", details=details)
    assert "Jane" not in str(caught.value)
    assert log.verify() == 0


def test_bad_arguments_are_refused(log: AuditLog) -> None:
    with pytest.raises(ValueError, match="timezone"):
        log.append("scan.done", at=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="action"):
        log.append("")
    with pytest.raises(ValueError, match="JSON"):
        log.append("scan.done", details={"x": object()})
    assert log.verify() == 0


def test_ids_and_times_in_details_are_serialised(log: AuditLog) -> None:
    consent = uuid.uuid4()
    log.append("consent.added", details={"consent_id": consent, "signed_at": T0})
    (entry,) = log.entries()
    assert entry["details"] == {
        "consent_id": str(consent),
        "signed_at": "2025-03-01T09:00:00.000000+00:00",
    }
    assert log.verify() == 1
