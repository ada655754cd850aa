"""The vault keeps templates encrypted, refuses wrong keys untouched, and erases for real."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import sqlite3
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plugin.errors import KeyMaterialError, VaultError
from plugin.keys import KEY_ENV, derive_key, generate_key_file, load_kek
from plugin.vault import WRAP_PURPOSE, DocumentNotFoundError, Vault, template_aad


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 128)).astype(np.float32)


@pytest.fixture
def kek() -> bytes:
    return os.urandom(32)


@pytest.fixture
def vault_path(tmp_path: Path) -> Path:
    return tmp_path / "vault" / "templates.db"


def raw_rows(path: Path, subject_id: uuid.UUID) -> tuple[tuple[bytes, bytes], list[tuple]]:
    """The subject's wrapped key and template rows, read straight from the SQLite file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        key = conn.execute(
            "SELECT nonce, wrapped FROM subject_keys WHERE subject_id = ?", (str(subject_id),)
        ).fetchone()
        rows = conn.execute(
            "SELECT id, nonce, ciphertext FROM templates WHERE subject_id = ?", (str(subject_id),)
        ).fetchall()
    finally:
        conn.close()
    return key, rows


def decryptable_offsets(data: bytes, dek: bytes, aad: bytes, sealed_len: int) -> list[int]:
    """Every offset where nonce + ciphertext for `aad` would open under `dek` (SQLite stores the
    nonce column right before the ciphertext column in a record)."""
    aes = AESGCM(dek)
    found = []
    for offset in range(len(data) - 12 - sealed_len + 1):
        try:
            aes.decrypt(
                data[offset : offset + 12], data[offset + 12 : offset + 12 + sealed_len], aad
            )
        except InvalidTag:
            continue
        found.append(offset)
    return found


def test_roundtrip(vault_path: Path, kek: bytes) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a, b = vectors(3, 1), vectors(2, 2)
    with Vault.open(vault_path, kek, create=True) as vault:
        assert vault.path == vault_path
        assert vault.add_templates(alice, a[:2]) == 2
        assert vault.add_templates(bob, b) == 2
        assert vault.add_templates(alice, a[2:]) == 3
    with Vault.open(vault_path, kek) as vault:
        got = vault.templates(alice)
        assert got.dtype == np.float32 and got.shape == (3, 128)
        np.testing.assert_array_equal(got, a)
        np.testing.assert_array_equal(vault.templates(bob), b)
        assert vault.templates(uuid.uuid4()).shape == (0, 128)
        assert vault.subjects() == [alice, bob]
        owners, matrix = vault.all_templates()
        assert owners == [alice, alice, bob, bob, alice]
        assert matrix.dtype == np.float32
        np.testing.assert_array_equal(matrix, np.vstack([a[:2], b, a[2:]]))


def test_float64_input_is_stored_as_float32(vault_path: Path, kek: bytes) -> None:
    subject = uuid.uuid4()
    v64 = np.random.default_rng(3).normal(size=(1, 128))
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(subject, v64)
        np.testing.assert_array_equal(vault.templates(subject), v64.astype(np.float32))


@pytest.mark.parametrize(
    "bad", [np.zeros(128), np.zeros((2, 127)), np.full((1, 128), np.nan), np.zeros((1, 128), bool)]
)
def test_rejects_malformed_vectors(vault_path: Path, kek: bytes, bad: np.ndarray) -> None:
    with Vault.open(vault_path, kek, create=True) as vault:
        with pytest.raises(ValueError):
            vault.add_templates(uuid.uuid4(), bad)
        assert vault.subjects() == []


def test_files_are_owner_only(tmp_path: Path, vault_path: Path) -> None:
    key_file = tmp_path / "consentry.key"
    old_umask = os.umask(0)  # a permissive umask must not make the files readable by others
    try:
        generate_key_file(key_file)
        kek = load_kek(key_file=key_file, env={})
        vault = Vault.open(vault_path, kek, create=True)
        vault.add_templates(uuid.uuid4(), vectors(1, 4))
        vault.close()
    finally:
        os.umask(old_umask)
    assert mode(key_file) == 0o600
    assert mode(vault_path) == 0o600
    assert len(base64.b64decode(key_file.read_text().strip())) == 32
    assert [p.name for p in vault_path.parent.iterdir()] == [vault_path.name]

    # SQLite gives its rollback journal the database file's mode: hold a write open and look.
    conn = sqlite3.connect(vault_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE meta SET value = value || x'00'")
        journal = vault_path.with_name(vault_path.name + "-journal")
        assert journal.exists()
        assert mode(journal) == 0o600
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    key_file = tmp_path / "consentry.key"
    generate_key_file(key_file)
    before = key_file.read_bytes()
    with pytest.raises(KeyMaterialError, match="already exists"):
        generate_key_file(key_file)
    assert key_file.read_bytes() == before


def test_no_plaintext_vector_in_the_file(vault_path: Path, kek: bytes) -> None:
    stored = vectors(4, 5)
    v64 = np.random.default_rng(6).normal(size=(1, 128))
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(uuid.uuid4(), stored)
        vault.add_templates(uuid.uuid4(), v64)
    data = vault_path.read_bytes()
    for vector in [*stored, v64[0].astype(np.float32)]:
        raw = vector.astype("<f4").tobytes()
        assert raw not in data
        for start in range(0, len(raw), 16):  # not even a fragment of four floats
            assert raw[start : start + 16] not in data
    assert v64[0].tobytes()[:32] not in data
    assert kek not in data


def test_wrong_key_changes_nothing(vault_path: Path, kek: bytes) -> None:
    subject = uuid.uuid4()
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(subject, vectors(2, 7))
    before = vault_path.read_bytes()
    other = os.urandom(32)
    with pytest.raises(KeyMaterialError) as caught:
        Vault.open(vault_path, other)
    assert str(caught.value) == f"the key does not open the vault at {vault_path}"
    assert base64.b64encode(other).decode() not in str(caught.value)
    with pytest.raises(KeyMaterialError):
        Vault.open(vault_path, other, create=True)
    assert vault_path.read_bytes() == before
    assert sorted(p.name for p in vault_path.parent.iterdir()) == [vault_path.name]
    with Vault.open(vault_path, kek) as vault:
        assert vault.templates(subject).shape == (2, 128)


def test_missing_vault_names_the_path(vault_path: Path, kek: bytes) -> None:
    with pytest.raises(VaultError, match=str(vault_path)):
        Vault.open(vault_path, kek)
    assert not vault_path.exists()


def test_not_a_vault(tmp_path: Path, kek: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(VaultError, match="not a Consentry vault"):
        Vault.open(path, kek)


def test_closed_vault_refuses_work(vault_path: Path, kek: bytes) -> None:
    vault = Vault.open(vault_path, kek, create=True)
    vault.close()
    vault.close()
    with pytest.raises(VaultError, match="closed"):
        vault.subjects()


def test_tampered_ciphertext_is_detected(vault_path: Path, kek: bytes) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(alice, vectors(1, 8))
        vault.add_templates(bob, vectors(1, 9))
    conn = sqlite3.connect(vault_path)
    with conn:  # move Bob's template under Alice's name: the AAD must catch it
        conn.execute("UPDATE templates SET subject_id = ?", (str(alice),))
    conn.close()
    with Vault.open(vault_path, kek) as vault, pytest.raises(VaultError, match="authentication"):
        vault.templates(alice)


def test_missing_key_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.key"
    with pytest.raises(KeyMaterialError, match=str(missing)):
        load_kek(key_file=missing, env={})
    with pytest.raises(KeyMaterialError, match=KEY_ENV):
        load_kek(key_file=None, env={})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("not base64 at all!", "not valid base64"),
        (base64.b64encode(b"k" * 16).decode(), "16 bytes"),
    ],
)
def test_malformed_key_names_its_source_not_its_value(
    tmp_path: Path, text: str, problem: str
) -> None:
    with pytest.raises(KeyMaterialError, match=problem) as caught:
        load_kek(key_file=None, env={KEY_ENV: text})
    assert KEY_ENV in str(caught.value)
    if text:
        assert text not in str(caught.value)
    key_file = tmp_path / "k.key"
    key_file.write_text(text)
    key_file.chmod(0o600)
    with pytest.raises(KeyMaterialError, match=problem) as caught:
        load_kek(key_file=key_file, env={})
    assert str(key_file) in str(caught.value)


def test_environment_variable_wins_over_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "consentry.key"
    generate_key_file(key_file)
    from_file = load_kek(key_file=key_file, env={})
    from_env = os.urandom(32)
    assert load_kek(key_file=key_file, env={KEY_ENV: base64.b64encode(from_env).decode()}) == (
        from_env
    )
    assert from_env != from_file
    # The variable is enough on its own: no key file is needed, even a missing one.
    env = {KEY_ENV: base64.b64encode(from_env).decode() + "\n"}
    assert load_kek(key_file=tmp_path / "absent.key", env=env) == from_env


def test_loose_key_file_mode_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "consentry.key"
    generate_key_file(key_file)
    with caplog.at_level(logging.WARNING, logger="plugin.keys"):
        load_kek(key_file=key_file, env={})
    assert not caplog.records
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="plugin.keys"):
        kek = load_kek(key_file=key_file, env={})
    assert "0644" in caplog.text and str(key_file) in caplog.text
    assert key_file.read_text().strip() not in caplog.text
    assert len(kek) == 32


def test_derived_keys_are_independent(kek: bytes) -> None:
    audit, check = derive_key(kek, "audit"), derive_key(kek, "vault-check")
    assert len({audit, check, kek}) == 3
    assert derive_key(kek, "audit") == audit
    with pytest.raises(KeyMaterialError):
        derive_key(kek[:16], "audit")


def test_erase_shreds_the_subject_and_spares_the_others(
    vault_path: Path, kek: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a, b = vectors(2, 10), vectors(3, 11)
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(alice, a)
        vault.add_templates(bob, b)

    # Capture what an attacker could have copied before erasure: Alice's wrapped key and rows,
    # and her data key itself.
    (key_nonce, wrapped), rows = raw_rows(vault_path, alice)
    dek = AESGCM(derive_key(kek, WRAP_PURPOSE)).decrypt(key_nonce, wrapped, alice.bytes)
    before = vault_path.read_bytes()
    assert wrapped in before
    sealed_len = len(rows[0][2])
    for row_id, nonce, sealed in rows:
        assert sealed in before
        # The scan below must be able to find a template, or its silence after erasure proves
        # nothing.
        assert decryptable_offsets(before, dek, template_aad(alice, row_id), sealed_len)

    with caplog.at_level(logging.DEBUG), Vault.open(vault_path, kek) as vault:
        assert vault.erase(alice) == 2
        assert vault.erase(alice) == 0
        assert vault.subjects() == [bob]
        assert vault.templates(alice).shape == (0, 128)
        np.testing.assert_array_equal(vault.templates(bob), b)
        owners, matrix = vault.all_templates()
        assert owners == [bob, bob, bob]
        np.testing.assert_array_equal(matrix, b)

    after = vault_path.read_bytes()
    assert wrapped not in after
    assert key_nonce not in after
    assert str(alice).encode() not in after
    for row_id, nonce, sealed in rows:
        assert sealed not in after
        assert sealed[:16] not in after
        assert nonce not in after
        assert decryptable_offsets(after, dek, template_aad(alice, row_id), sealed_len) == []
    assert sorted(p.name for p in vault_path.parent.iterdir()) == [vault_path.name]
    # Nothing secret in the log lines either.
    assert base64.b64encode(dek).decode() not in caplog.text


def test_erase_unknown_subject_is_a_no_op(vault_path: Path, kek: bytes) -> None:
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(uuid.uuid4(), vectors(1, 12))
        assert vault.erase(uuid.uuid4()) == 0
        assert len(vault.subjects()) == 1


# -- documents (signed quitclaims) ---------------------------------------------------------

PDF = b"%PDF-1.7\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"


def test_documents_roundtrip(vault_path: Path, kek: bytes) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with Vault.open(vault_path, kek, create=True) as vault:
        first = vault.put_document(alice, PDF, media_type="application/pdf",
                                   filename="Quitclaim Alice Ángel.pdf")
        second = vault.put_document(alice, b"scan", media_type="image/jpeg", filename="a.jpg")
        vault.put_document(bob, b"other", media_type="text/plain", filename="b.txt")
    with Vault.open(vault_path, kek) as vault:
        assert vault.document(alice, first) == (PDF, "application/pdf",
                                                "Quitclaim Alice Ángel.pdf")
        assert vault.document(alice, second) == (b"scan", "image/jpeg", "a.jpg")
        listed = vault.documents(alice)
        assert [d["id"] for d in listed] == [first, second]
        assert set(listed[0]) == {"id", "sha256", "media_type", "size", "created_at"}
        assert listed[0]["sha256"] == hashlib.sha256(PDF).hexdigest()
        assert listed[0]["size"] == len(PDF) and listed[0]["media_type"] == "application/pdf"
        assert listed[0]["created_at"].tzinfo is not None
        # A document is found only under its own subject.
        with pytest.raises(DocumentNotFoundError):
            vault.document(bob, first)
        with pytest.raises(DocumentNotFoundError):
            vault.document(alice, str(uuid.uuid4()))
        with pytest.raises(DocumentNotFoundError):
            vault.document(alice, "../../etc/passwd")
        assert vault.documents(uuid.uuid4()) == []
        # Documents alone do not make a subject "enrolled" (the sweep erases those).
        assert vault.subjects() == []


@pytest.mark.parametrize(
    ("data", "media_type", "filename"),
    [("text", "text/plain", "a.txt"), (b"x", "", "a.txt"), (b"x", "text/plain", ""),
     (b"x", "text/plain", "a\nb.txt"), (b"x", "t" * 300, "a.txt")],
)
def test_rejects_malformed_documents(
    vault_path: Path, kek: bytes, data: object, media_type: str, filename: str
) -> None:
    with Vault.open(vault_path, kek, create=True) as vault, pytest.raises(ValueError):
        vault.put_document(uuid.uuid4(), data, media_type=media_type, filename=filename)


def test_document_content_and_name_are_sealed(vault_path: Path, kek: bytes) -> None:
    subject = uuid.uuid4()
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.put_document(subject, PDF, media_type="application/pdf",
                           filename="Quitclaim Barack Obama.pdf")
    data = vault_path.read_bytes()
    assert b"Barack" not in data and b"Obama" not in data
    for start in range(0, len(PDF) - 16, 16):
        assert PDF[start : start + 16] not in data


def test_moved_document_fails_authentication(vault_path: Path, kek: bytes) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with Vault.open(vault_path, kek, create=True) as vault:
        doc = vault.put_document(alice, b"alice's", media_type="text/plain", filename="a.txt")
        vault.put_document(bob, b"bob's", media_type="text/plain", filename="b.txt")
    conn = sqlite3.connect(vault_path)
    with conn:  # Alice's ciphertext under another document id: the AAD must catch it
        other = str(uuid.uuid4())
        conn.execute("UPDATE documents SET id = ? WHERE id = ?", (other, doc))
    conn.close()
    with Vault.open(vault_path, kek) as vault, pytest.raises(VaultError, match="authentication"):
        vault.document(alice, other)


def test_template_erase_keeps_documents_full_erase_shreds_them(
    vault_path: Path, kek: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(alice, vectors(2, 13))
        # Small enough to sit in one page, so the bytes searched for below are contiguous.
        doc = vault.put_document(alice, b"%PDF signed", media_type="application/pdf",
                                 filename="alice.pdf")
        bob_doc = vault.put_document(bob, b"bob", media_type="text/plain", filename="b.txt")
    conn = sqlite3.connect(f"file:{vault_path}?mode=ro", uri=True)
    key_nonce, wrapped = conn.execute(
        "SELECT nonce, wrapped FROM document_keys WHERE subject_id = ?", (str(alice),)
    ).fetchone()
    sealed = conn.execute("SELECT ciphertext FROM documents WHERE id = ?", (doc,)).fetchone()[0]
    conn.close()
    assert wrapped in vault_path.read_bytes() and sealed in vault_path.read_bytes()

    with caplog.at_level(logging.DEBUG), Vault.open(vault_path, kek) as vault:
        # The biometric grant ended: templates go, the signed quitclaim stays.
        assert vault.erase(alice) == 2
        assert vault.document(alice, doc)[0] == b"%PDF signed"
        # The subject is erased: the document key and the documents go too.
        assert vault.erase(alice, documents=True) == 0
        assert vault.documents(alice) == []
        with pytest.raises(DocumentNotFoundError):
            vault.document(alice, doc)
        assert vault.document(bob, bob_doc)[0] == b"bob"
    after = vault_path.read_bytes()
    assert wrapped not in after and key_nonce not in after
    assert sealed not in after and sealed[:16] not in after
    assert str(alice).encode() not in after
    assert "alice.pdf" not in caplog.text


def test_vault_without_document_tables_gets_them_after_the_key_check(
    vault_path: Path, kek: bytes
) -> None:
    subject = uuid.uuid4()
    with Vault.open(vault_path, kek, create=True) as vault:
        vault.add_templates(subject, vectors(1, 14))
    conn = sqlite3.connect(vault_path)  # a vault made before documents existed
    with conn:
        conn.execute("DROP TABLE documents")
        conn.execute("DROP TABLE document_keys")
    conn.execute("VACUUM")
    conn.close()
    before = vault_path.read_bytes()
    with pytest.raises(KeyMaterialError):
        Vault.open(vault_path, os.urandom(32))
    assert vault_path.read_bytes() == before
    with Vault.open(vault_path, kek) as vault:
        assert vault.templates(subject).shape == (1, 128)
        doc = vault.put_document(subject, b"q", media_type="text/plain", filename="q.txt")
        assert vault.document(subject, doc) == (b"q", "text/plain", "q.txt")
    assert mode(vault_path) == 0o600


def test_vault_url_forms(tmp_path: Path, kek: bytes) -> None:
    path = tmp_path / "v.db"
    with Vault.open(f"sqlite:///{path}", kek, create=True) as vault:
        assert vault.path == path and vault.location == str(path)
    with Vault.open(str(path), kek) as vault:
        assert vault.subjects() == []
    with pytest.raises(VaultError, match="SQLite file or PostgreSQL"):
        Vault.open("mysql://u:secret@host/db", kek)
    with pytest.raises(VaultError, match="schema") as caught:
        Vault.open("postgresql://u:secret@host/db?schema=Bad-Name", kek)
    assert "secret" not in str(caught.value)


def test_settings_vault_url(tmp_path: Path) -> None:
    from plugin.settings import validate

    s = validate({}, file="c.toml", base_dir=tmp_path)
    assert s.vault_url == f"sqlite:///{tmp_path / '.consentry/vault.db'}"
    s = validate({"store": {"vault_url": "sqlite:///v/x.db"}}, file="c.toml", base_dir=tmp_path)
    assert s.vault_url == f"sqlite:///{tmp_path / 'v/x.db'}"
    pg = "postgresql+psycopg://u:pw@db.internal/vault?schema=vault"
    s = validate({"store": {"vault_url": pg}}, file="c.toml", base_dir=tmp_path)
    assert s.vault_url == pg
