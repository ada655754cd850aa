"""`consentry init`: a settings file, a key (0600), an empty vault and state database."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from plugin import keys
from plugin.errors import ConfigError
from plugin.settings import load
from plugin.state import StateStore
from plugin.vault import Vault

TEMPLATE = """\
# Consentry settings. Every key is documented in README.md ("Configuration").
# Relative paths are relative to this file.

[store]
state_url = "sqlite:///.consentry/state.db"
vault_path = ".consentry/vault.db"
key_file = ".consentry/key"
audit_head = ".consentry/audit.head"

[policy]
channels = ["internal", "intranet", "website", "social", "print", "advertising"]

[matching]
# Chosen by measurement on lfw-dev (README, "Accuracy"); a wrong name is a privacy incident.
threshold = {threshold}
margin = {margin}
review_threshold = {review_threshold}

[engine]
max_side = 1600
upsample = 1

[xmp]
names_as_keywords = false
{connectors}"""

FOLDER = """
[[connectors]]
kind = "folder"
name = "photos"
root = {root}
write_mode = "{write_mode}"
"""


def render(*, photos: Path | None, write_mode: str, base: Path) -> str:
    from plugin.settings import MatchingSettings

    m = MatchingSettings()
    connectors = ""
    if photos is not None:
        root = photos.absolute()
        with contextlib.suppress(ValueError):
            root = root.relative_to(base.absolute())
        connectors = FOLDER.format(root=json.dumps(root.as_posix()), write_mode=write_mode)
    return TEMPLATE.format(threshold=m.threshold, margin=m.margin,
                           review_threshold=m.review_threshold, connectors=connectors)


def initialise(config: Path, *, photos: Path | None = None,
               write_mode: str = "embed") -> list[Path]:
    """Create what is missing; never overwrite an existing key, vault or settings file."""
    if write_mode not in ("embed", "sidecar"):
        raise ConfigError("must be embed or sidecar", key="write_mode")
    if photos is not None and not photos.is_dir():
        raise ConfigError(f"{photos} is not a folder", key="photos")
    created: list[Path] = []
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(render(photos=photos, write_mode=write_mode, base=config.parent),
                          encoding="utf-8")
        created.append(config)
    settings = load(config)
    settings.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not settings.key_file.exists() and not _env_key():
        keys.generate_key_file(settings.key_file)
        created.append(settings.key_file)
    kek = keys.load_kek(key_file=settings.key_file)
    vault_file = (Path(settings.vault_url.removeprefix("sqlite:///"))
                  if settings.vault_url.startswith("sqlite:///") else None)
    if vault_file is None:
        # A vault on a database server: made if missing; an existing one must open with the key.
        Vault.open(settings.vault_url, kek, create=True).close()
    elif not vault_file.exists():
        Vault.open(vault_file, kek, create=True).close()
        created.append(vault_file)
    StateStore(settings.state_url).close()
    return created


def _env_key() -> bool:
    import os

    return bool(os.environ.get("CONSENTRY_KEY"))
