"""The key-encryption key (KEK): 32 random bytes, kept as base64 text (DESIGN §6).

The KEK comes from the `CONSENTRY_KEY` environment variable or, failing that, a key file that
only its owner may read. It is never used directly: `derive_key` gives each purpose (wrapping the
vault's data keys, the vault's key check, the audit HMAC) its own HKDF-SHA256 key, so that no two
mechanisms share key material and a leak of one derived key reveals nothing about the others.

Error messages name the file or the variable, never the key material.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from plugin.errors import KeyMaterialError

log = logging.getLogger(__name__)

KEY_ENV = "CONSENTRY_KEY"
KEY_BYTES = 32


def generate_key_file(path: Path) -> None:
    """Write a new random KEK to `path` with mode 0600; never overwrite an existing file.

    Overwriting would silently orphan the vault and the audit log that the old key opens, so an
    existing file is an error. O_EXCL makes create-or-fail atomic and the 0600 mode is set at
    creation, so the key is never readable by others, not even for an instant.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise KeyMaterialError(
            f"key file {path} already exists; refusing to overwrite it "
            "(it may be the only key that opens the vault)"
        ) from err
    except OSError as err:
        raise KeyMaterialError(f"cannot create key file {path}: {err.strerror}") from err
    try:
        # The umask can only remove bits; fchmod makes the mode exactly 0600 whatever it is.
        os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise KeyMaterialError(f"cannot write key file {path}: {err.strerror}") from err
    os.close(fd)
    log.info("created key file %s (mode 0600)", path)


def load_kek(*, key_file: Path | None, env: Mapping[str, str] = os.environ) -> bytes:
    """Return the 32-byte KEK: `CONSENTRY_KEY` if set, else the contents of `key_file`.

    The variable wins so that containers and CI can inject the key without a file on disk.
    """
    if KEY_ENV in env:
        return _decode(env[KEY_ENV], source=f"environment variable {KEY_ENV}")
    if key_file is None:
        raise KeyMaterialError(f"no key: set {KEY_ENV} or configure a key file")
    key_file = Path(key_file)
    try:
        mode = stat.S_IMODE(key_file.stat().st_mode)
        text = key_file.read_bytes().decode("ascii")
    except FileNotFoundError as err:
        raise KeyMaterialError(
            f"key file {key_file} does not exist (create one with `consentry init`, "
            f"or set {KEY_ENV})"
        ) from err
    except UnicodeDecodeError as err:
        raise KeyMaterialError(f"key file {key_file} is not base64 text") from err
    except OSError as err:
        raise KeyMaterialError(f"cannot read key file {key_file}: {err.strerror}") from err
    if mode & 0o177:
        log.warning(
            "key file %s has mode %04o, looser than 0600: anyone who can read it can open "
            "the vault; run `chmod 600 %s`",
            key_file,
            mode,
            key_file,
        )
    return _decode(text, source=f"key file {key_file}")


def _decode(text: str, *, source: str) -> bytes:
    text = text.strip()
    if not text:
        raise KeyMaterialError(f"{source} is empty")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise KeyMaterialError(f"{source} is not valid base64") from err
    if len(key) != KEY_BYTES:
        raise KeyMaterialError(
            f"{source} decodes to {len(key)} bytes; a key-encryption key is {KEY_BYTES} bytes"
        )
    return key


def derive_key(kek: bytes, purpose: str) -> bytes:
    """A 32-byte key for one `purpose`, from the KEK by HKDF-SHA256 (info="consentry <purpose>").

    Purposes in use: "vault-wrap", "vault-check" (plugin.vault) and "audit" (plugin.audit).
    """
    if len(kek) != KEY_BYTES:
        raise KeyMaterialError(f"a key-encryption key is {KEY_BYTES} bytes, got {len(kek)}")
    if not purpose:
        raise ValueError("derive_key needs a non-empty purpose")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"consentry " + purpose.encode("utf-8"),
    )
    return hkdf.derive(kek)
