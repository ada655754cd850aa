"""A local directory tree as a photo library: the embedded default, and what digiKam,
Lightroom or PhotoPrism read.

Versions are content hashes (sha256), so a copied or touched file with the same bytes is not
re-analysed; the hash is recomputed only when size or mtime moved (the fingerprint). Symlinks
are never followed out of the root: a library must not leak files the admin did not select.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from connectors.base import ConnectorContext, Fetched, KnownAssets, Purpose
from plugin.errors import AssetError, ConfigError
from plugin.models import AssetRef, AssetVerdict, Geometry

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
_MIME = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
}


class FolderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["folder"] = "folder"
    name: str = Field("photos", pattern=r"^[A-Za-z0-9_.-]+$", description="connector name")
    root: Path = Field(description="library folder; relative to the config file")
    write_mode: Literal["embed", "sidecar"] = Field(
        "embed", description="XMP in the file, or in an .xmp sidecar beside it"
    )
    sidecar_naming: Literal["full", "stem"] = Field(
        "full", description="full: IMG_0001.jpg.xmp; stem: IMG_0001.xmp"
    )
    suffixes: tuple[str, ...] = Field(IMAGE_SUFFIXES, description="file endings treated as photos")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderConnector:
    Config = FolderConfig
    # write_back may run on several threads at once (the XMP writer has a process pool).
    concurrent_write_back = True

    def __init__(self, config: FolderConfig, context: ConnectorContext) -> None:
        self.config = config
        self.name = config.name
        root = config.root if config.root.is_absolute() else context.base_dir / config.root
        self.root = root.resolve()
        if not self.root.is_dir():
            raise ConfigError(f"folder {self.root} does not exist", key=f"{self.name}.root")
        if context.writer is None:
            raise ConfigError("the folder connector needs an XMP writer", key=self.name)
        self._writer = context.writer
        self._engine_version = context.engine_version
        self._known = context.known
        self._suffixes = tuple(s.lower() for s in config.suffixes)

    # -- listing ---------------------------------------------------------------------------
    def _inside_root(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root)
        except (ValueError, OSError):
            return False
        return True

    def _candidates(self, start: Path):
        for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
            here = Path(dirpath)
            # Dotfiles are hidden or ours (the XMP writer's temp files): never photos.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            # A directory named like a photo is reported as a bad asset, not silently skipped.
            for d in dirnames:
                if d.lower().endswith(self._suffixes):
                    yield here / d
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(self._suffixes):
                    yield here / f

    def ref_for(self, path: Path, *, just_written: bool = False) -> AssetRef | None:
        """The ref of one file, or None when it is gone or outside the root.

        `just_written`: our own write just changed it, so no stored version can be current
        and the content is hashed without asking the state first.
        """
        if path.is_symlink() and not self._inside_root(path):
            log.warning("skipping %s: symlink pointing outside the library root", path)
            return None
        rel = path.relative_to(self.root).as_posix()
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if path.is_dir():
            return AssetRef(connector=self.name, id=rel, version="directory", name=rel)
        fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
        known = (self._known.known_version(self.name, rel)
                 if self._known and not just_written else None)
        if known and known[0] == fingerprint:
            version = known[1]
        else:
            try:
                version = file_sha256(path)
            except FileNotFoundError:
                return None
            except OSError as err:
                # Unreadable now: let fetch report it with the cause, under a distinct version.
                version = f"unreadable:{fingerprint}:{err.errno}"
        return AssetRef(
            connector=self.name,
            id=rel,
            version=version,
            name=rel,
            mime=_MIME.get(path.suffix.lower()),
            fingerprint=fingerprint,
        )

    def changes(self, cursor: str | None) -> tuple[list[AssetRef], str | None]:
        """Every photo under the root; unchanged ones are skipped by the pipeline's key."""
        refs = [ref for p in self._candidates(self.root) if (ref := self.ref_for(p))]
        return refs, cursor

    def take_deleted(self, known: KnownAssets) -> list[str]:
        """Recorded photos whose file is gone (deleted, or renamed: the new name is a new
        asset). Nothing while the root itself is missing: an unmounted share is not a deletion."""
        if not self.root.is_dir():
            return []
        ids = known.asset_ids(self.name)
        gone = [aid for aid in ids if not os.path.lexists(self.root / aid)]
        if gone and len(gone) == len(ids) and not any(os.scandir(self.root)):
            log.warning("%s: the library root is empty: treated as not mounted, nothing "
                        "forgotten", self.name)
            return []
        return gone

    def select(self, paths: list[Path]) -> list[AssetRef]:
        """Refs for the given files or folders under the root (`consentry scan PATH`)."""
        refs: list[AssetRef] = []
        for given in paths:
            path = given if given.is_absolute() else Path.cwd() / given
            path = path.absolute()
            if not self._inside_root(path):
                raise ConfigError(f"{given} is not inside the library root {self.root}")
            if path.is_dir() and not path.name.lower().endswith(self._suffixes):
                refs.extend(r for p in self._candidates(path) if (r := self.ref_for(p)))
            elif (ref := self.ref_for(path)) is not None:
                refs.append(ref)
        return refs

    # -- content ---------------------------------------------------------------------------
    def path_of(self, ref: AssetRef) -> Path:
        path = (self.root / ref.id).absolute()
        if not self._inside_root(path):
            raise AssetError(ref.name, "path escapes the library root")
        return path

    def sidecar_of(self, path: Path) -> Path:
        if self.config.sidecar_naming == "stem":
            return path.with_suffix(".xmp")
        return path.with_name(path.name + ".xmp")

    def fetch(self, ref: AssetRef, purpose: Purpose) -> Fetched:
        path = self.path_of(ref)
        if not path.exists():
            raise AssetError(ref.name, "file vanished after it was listed")
        return Fetched(path)

    def write_back(self, ref: AssetRef, verdict: AssetVerdict, geometry: Geometry) -> AssetRef:
        path = self.path_of(ref)
        if not path.is_file():
            raise AssetError(ref.name, "file vanished before its metadata could be written")
        sidecar = self.sidecar_of(path) if self.config.write_mode == "sidecar" else None
        changed = self._writer.write(
            path, verdict, geometry, engine=self._engine_version, sidecar=sidecar
        )
        if not changed or sidecar is not None:
            return ref
        # Our own write changed the file: record its new version so it is not a "change".
        return self.ref_for(path, just_written=True) or ref

    def close(self) -> None:
        """Nothing to release: the writer belongs to the pipeline."""
