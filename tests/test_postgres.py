"""Distributed mode on PostgreSQL: the state store, the audit chain under concurrent writers,
the vault (database and schema), and a whole `consentry` scan with state and vault on the server.

Each test gets a fresh database (`postgres_url`, tests/services.py); without a server they skip,
with CONSENTRY_REQUIRE_SERVICES=1 (scripts/test) they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from plugin import keys
from plugin import schema as t
from plugin.audit import AuditLog
from plugin.cli import app as cli_app
from plugin.errors import AuditChainError, KeyMaterialError, VaultError
from plugin.models import DEFAULT_CHANNELS, Consent, Grant, GrantKind, Subject
from plugin.state import StateStore
from plugin.vault import DocumentNotFoundError, Vault

runner = CliRunner()


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 128)).astype(np.float32)


def consent_for(subject_id: uuid.UUID) -> Consent:
    start = datetime.now(UTC) - timedelta(days=1)
    return Consent(
        subject_id=subject_id, document_ref="quitclaims/q.pdf", document_sha256="0" * 64,
        signed_at=start,
        grants=(Grant(kind=GrantKind.BIOMETRIC, valid_from=start),
                Grant(kind=GrantKind.PUBLICATION, channels=DEFAULT_CHANNELS, valid_from=start)),
    )


def dump(url: str, *tables: str, schema: str | None = None) -> dict[str, list]:
    """Every row of `tables`, to show that an operation changed nothing."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    prefix = f'"{schema}".' if schema else ""
    try:
        with engine.connect() as conn:
            return {name: sorted(map(tuple, conn.exec_driver_sql(f"SELECT * FROM {prefix}{name}")))
                    for name in tables}
    finally:
        engine.dispose()


# -- state ---------------------------------------------------------------------------------
def test_state_store_migrates_and_works_on_postgres(postgres_url: str) -> None:
    store = StateStore(postgres_url)
    try:
        assert not store.is_sqlite and store.engine.dialect.name == "postgresql"
        subject = Subject(display_name="Zoë Ångström", external_ids={"immich": "p-1"})
        store.add_subject(subject)
        consent = consent_for(subject.id)
        store.add_consent(consent)
        assert [s.display_name for s in store.subjects()] == ["Zoë Ångström"]
        assert store.subject(subject.id).external_ids == {"immich": "p-1"}
        stored = store.consents(subject.id)
        assert [c.id for c in stored] == [consent.id]
        assert {g.kind for g in stored[0].grants} == {GrantKind.BIOMETRIC, GrantKind.PUBLICATION}
        assert store.consents(subject.id)[0].grants[0].valid_from.tzinfo is not None
        assert store.withdraw(consent.id, datetime.now(UTC), [GrantKind.PUBLICATION]) == 1
        store.set_meta("k", "1")
        store.set_meta("k", "2")
        assert store.get_meta("k") == "2"
        store.set_cursor("photos", "c1")
        store.set_cursor("photos", "c2")
        assert store.cursor("photos") == "c2"
        with store.begin() as conn:
            store.delete_subject(subject.id, conn)
        assert store.counts() == {"subjects": 0, "consents": 0, "assets": 0, "faces": 0}
    finally:
        store.close()
    # Reopening runs no migration twice; every revision (0001..head) is applied.
    again = StateStore(postgres_url)
    try:
        with again.engine.connect() as conn:
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            tables = set(sa.inspect(conn).get_table_names())
        assert version
        assert {"subjects", "consents", "grants", "assets", "faces", "audit"} <= tables
    finally:
        again.close()


def test_workers_starting_together_migrate_once(postgres_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    code = ("import sys, time, pathlib\n"
            "from plugin.state import StateStore\n"
            "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.01)\n"
            "StateStore(sys.argv[1]).close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, postgres_url, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    time.sleep(1.0)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err


# -- audit ---------------------------------------------------------------------------------
APPENDER = r"""
import sys, time, uuid
from pathlib import Path
import sqlalchemy as sa
from plugin.audit import AuditLog

url, key_hex, head, go, n, who = sys.argv[1:7]
from plugin.state import StateStore
engine = StateStore(url).engine  # with its SQLite pragmas (busy_timeout)
log = AuditLog(engine, key=bytes.fromhex(key_hex), head_path=Path(head))
while not Path(go).exists():
    time.sleep(0.01)
for i in range(int(n)):
    if i % 2:
        log.append("test.append", actor=who, details={"i": i})
    else:  # inside a caller's transaction, head moved after the commit
        with log.transaction() as conn:
            log.append("test.append", actor=who, asset=f"a{i}", details={"i": i}, conn=conn)
engine.dispose()
"""


@pytest.fixture(params=["postgresql", "sqlite"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":  # the embedded mode has several writers too (queue workers)
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


def test_audit_appends_from_several_processes_keep_one_chain(state_url: str,
                                                             tmp_path: Path) -> None:
    StateStore(state_url).close()  # the audit table
    key = keys.derive_key(os.urandom(32), "audit")
    go = tmp_path / "go"
    shared_head = tmp_path / "shared" / "audit.head"
    # Two "machines" (a head file each) and two processes sharing one head file.
    heads = [tmp_path / "m1" / "audit.head", tmp_path / "m2" / "audit.head",
             shared_head, shared_head]
    n = 40
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, state_url, key.hex(), str(head), str(go),
             str(n), f"worker-{i}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i, head in enumerate(heads)
    ]
    time.sleep(1.0)  # let every process reach the start line
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as conn:
            seqs = [r.seq for r in conn.execute(sa.select(t.audit.c.seq).order_by(t.audit.c.seq))]
            actors = {r.actor for r in conn.execute(sa.select(t.audit.c.actor))}
        assert seqs == list(range(1, 4 * n + 1))  # no gap, no duplicate
        assert actors == {f"worker-{i}" for i in range(4)}
        for head in heads:
            log = AuditLog(engine, key=key, head_path=head)
            assert log.verify() == 4 * n
        # Each head anchors a real entry; the machine that wrote last is at the end.
        last = AuditLog(engine, key=key, head_path=tmp_path / "late" / "audit.head")
        last.append("test.after")
        assert last.verify() == 4 * n + 1
        # A cut tail is still caught through a head that saw the last entry.
        with engine.begin() as conn:
            conn.execute(t.audit.delete().where(t.audit.c.seq == 4 * n + 1))
        with pytest.raises(AuditChainError, match="tail cut"):
            last.verify()
    finally:
        engine.dispose()


# -- vault ---------------------------------------------------------------------------------
@pytest.fixture(params=["database", "schema"])
def vault_url(request: pytest.FixtureRequest, postgres_url: str) -> str:
    return postgres_url + ("?schema=vault" if request.param == "schema" else "")


def test_vault_on_postgres(vault_url: str, postgres_url: str) -> None:
    kek = os.urandom(32)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a, b = vectors(3, 1), vectors(2, 2)
    with pytest.raises(VaultError, match="no vault") as caught:
        Vault.open(vault_url, kek)
    password = sa.make_url(postgres_url).password
    assert password and password not in str(caught.value)
    with Vault.open(vault_url, kek, create=True) as vault:
        assert vault.path is None and password not in repr(vault)
        assert vault.add_templates(alice, a[:2]) == 2
        assert vault.add_templates(bob, b) == 2
        assert vault.add_templates(alice, a[2:]) == 3
        doc = vault.put_document(alice, b"%PDF signed", media_type="application/pdf",
                                 filename="Alice Quitclaim.pdf")
        vault.put_document(bob, b"bob", media_type="text/plain", filename="b.txt")
    with Vault.open(vault_url, kek, create=True) as vault:  # create on an existing one: opens it
        np.testing.assert_array_equal(vault.templates(alice), a)
        assert vault.subjects() == [alice, bob]
        owners, matrix = vault.all_templates()
        assert owners == [alice, alice, bob, bob, alice]
        np.testing.assert_array_equal(matrix, np.vstack([a[:2], b, a[2:]]))
        assert vault.document(alice, doc) == (b"%PDF signed", "application/pdf",
                                              "Alice Quitclaim.pdf")
        assert [d["id"] for d in vault.documents(alice)] == [doc]

    schema = "vault" if "schema=" in vault_url else None
    tables = ("meta", "subject_keys", "templates", "document_keys", "documents")
    before = dump(postgres_url, *tables, schema=schema)
    stored = b"".join(bytes(r[3]) for r in before["templates"])  # (id, subject, nonce, ct)
    assert stored and a[0].tobytes()[:16] not in stored  # ciphertext, never the vectors
    with pytest.raises(KeyMaterialError, match="does not open the vault"):
        Vault.open(vault_url, os.urandom(32))
    with pytest.raises(KeyMaterialError):
        Vault.open(vault_url, os.urandom(32), create=True)
    assert dump(postgres_url, *tables, schema=schema) == before

    with Vault.open(vault_url, kek) as vault:
        assert vault.erase(alice) == 3
        assert vault.subjects() == [bob]
        assert vault.document(alice, doc)[0] == b"%PDF signed"  # the quitclaim outlives templates
        assert vault.erase(alice, documents=True) == 0
        with pytest.raises(DocumentNotFoundError):
            vault.document(alice, doc)
        assert vault.erase(alice, documents=True) == 0
        np.testing.assert_array_equal(vault.templates(bob), b)
    after = dump(postgres_url, *tables, schema=schema)
    assert not any(str(alice) in map(str, row) for rows in after.values() for row in rows)


def test_vault_writers_on_two_connections_share_one_data_key(postgres_url: str) -> None:
    """Two workers enrolling the same new subject at once: one data key, every row readable."""
    kek = os.urandom(32)
    subject = uuid.uuid4()
    Vault.open(postgres_url, kek, create=True).close()
    vaults = [Vault.open(postgres_url, kek) for _ in range(2)]
    errors: list[BaseException] = []

    def enroll(vault: Vault, seed: int) -> None:
        try:
            for i in range(5):
                vault.add_templates(subject, vectors(2, seed * 100 + i))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=enroll, args=(v, i)) for i, v in enumerate(vaults)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, errors
        assert vaults[0].templates(subject).shape == (20, 128)
        assert vaults[1].all_templates()[1].shape == (20, 128)
    finally:
        for v in vaults:
            v.close()


# -- a whole scan --------------------------------------------------------------------------
PHOTOS = ("events/2024-summit/IMG_2041.jpg", "events/2024-summit/IMG_2042.jpg",
          "events/2024-summit/IMG_2043.jpg")


def test_scan_and_erasure_with_state_and_vault_on_postgres(
    postgres_url: str, demo_data: Path, engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    library = tmp_path / "library"
    for rel in PHOTOS:
        (library / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data / "library" / rel, library / rel)
    config = tmp_path / "consentry.toml"
    monkeypatch.setenv("CONSENTRY_STORE__STATE_URL", postgres_url)
    monkeypatch.setenv("CONSENTRY_STORE__VAULT_URL", postgres_url + "?schema=vault")
    monkeypatch.delenv("CONSENTRY_KEY", raising=False)

    password = sa.make_url(postgres_url).password
    assert password

    def cli(*args: str):
        result = runner.invoke(cli_app, ["--config", str(config), *args])
        assert password not in result.output
        return result

    result = cli("init", "--photos", str(library))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / ".consentry" / "state.db").exists()
    assert not (tmp_path / ".consentry" / "vault.db").exists()

    result = cli("subjects", "add", "Barack Obama")
    assert result.exit_code == 0, result.output
    subject_id = uuid.UUID(result.output.strip().splitlines()[-1])
    from plugin.app import App

    with App.open(config) as a:  # a consent with a biometric grant, then the references
        a.state.add_consent(consent_for(subject_id))
    refs = [str(demo_data / f"people/Barack_Obama/ref-{i}.jpg") for i in (1, 2)]
    result = cli("subjects", "enroll", str(subject_id), *refs)
    assert result.exit_code == 0, result.output

    result = cli("scan")
    assert result.exit_code == 0, result.output
    result = cli("scan")  # nothing changed: every photo is skipped
    assert result.exit_code == 0, result.output
    result = cli("audit", "verify")
    assert result.exit_code == 0, result.output
    result = cli("dpia")  # names the vault's database, not a vault file, and no password
    assert result.exit_code == 0, result.output
    assert "consentry:***@127.0.0.1" in result.output and "(schema vault)" in result.output
    assert "VACUUM FULL" in result.output

    with App.open(config) as a:
        assert a.vault.path is None and a.vault.subjects() == [subject_id]
        assert a.vault.templates(subject_id).shape == (2, 128)
        rows = {r.asset_id: r for r in a.state.assets("photos")}
        assert set(rows) == set(PHOTOS)
        named = [f for rel in PHOTOS for f in a.state.faces("photos", rel)
                 if f.subject_id == subject_id]
        assert len(named) >= 3  # Obama is in all three photos
        assert all(rows[rel].last_error is None for rel in PHOTOS)
    assert b"Barack Obama" in (library / PHOTOS[2]).read_bytes()

    # Erasure on PostgreSQL: templates, the signed quitclaim in the vault, the records, the tags.
    with App.open(config) as a:
        doc = a.vault.put_document(subject_id, b"%PDF signed by Barack Obama",
                                   media_type="application/pdf", filename="Barack Obama.pdf")
    result = cli("subjects", "erase", "Barack Obama", "--yes")
    assert result.exit_code == 0, result.output
    with App.open(config) as a:
        assert a.vault.subjects() == [] and a.vault.documents(subject_id) == []
        with pytest.raises(DocumentNotFoundError):
            a.vault.document(subject_id, doc)
        assert a.state.subject(subject_id) is None
        assert a.audit.verify() > 0
    assert b"Barack Obama" not in (library / PHOTOS[2]).read_bytes()
