"""The connector contract (DESIGN §8): a small required protocol, optional powers apart.

A connector speaks one platform's API and nothing else. The pipeline calls:
`changes(cursor)` → refs to look at and the next cursor; `fetch(ref, purpose)` → a local file;
`write_back(ref, verdict, geometry)` → the asset's version after our own write, so that our
write is not seen as a change on the next scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from plugin.models import AssetRef, AssetVerdict, Geometry

Purpose = Literal["analysis", "original"]


class KnownAssets(Protocol):
    """What Consentry has recorded of a connector's assets (the state store)."""

    def asset_ids(self, connector: str) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Fetched:
    """A local file to analyse. `original` is the stored geometry of the original when `path`
    is a preview: the pipeline maps boxes from the preview onto the original's grid, which is
    what the XMP and the platform's own face boxes describe."""

    path: Path
    original: Geometry | None = None


class MetadataWriter(Protocol):
    """What connectors need of plugin.xmp.XmpWriter (injected, never imported here)."""

    def write(
        self,
        image: Path,
        verdict: AssetVerdict,
        geometry: Geometry,
        *,
        engine: str,
        sidecar: Path | None = None,
    ) -> bool: ...


class KnownVersions(Protocol):
    """Lets a connector reuse a stored version while its cheap fingerprint is unchanged."""

    def known_version(self, connector: str, asset_id: str) -> tuple[str | None, str] | None:
        """(fingerprint, version) recorded for the asset, or None when never seen."""
        ...


class LinkStore(Protocol):
    """What a connector remembers of the records it created on its platform (Immich people and
    faces), shared by every worker on every machine: plugin.links.StateLinks keeps it in the
    state database. A face record is {"id", "subject", "created", "previous"}."""

    def hold(self, connector: str, key: str) -> AbstractContextManager[None]:
        """Exclusive use of `key` (e.g. "person:<subject>", "asset:<id>") across all workers
        and machines until the block ends: read, call the platform, record, then let go."""
        ...

    def person(self, connector: str, subject: str) -> str | None: ...

    def people(self, connector: str) -> dict[str, str]: ...

    def set_person(self, connector: str, subject: str, person: str | None) -> None: ...

    def faces(self, connector: str, asset: str) -> list[dict[str, Any]]: ...

    def set_faces(self, connector: str, asset: str,
                  records: Sequence[Mapping[str, Any]]) -> None: ...

    def assets_of(self, connector: str, subject: str) -> list[str]:
        """Assets holding a face record of the subject."""
        ...

    def import_links(self, connector: str, people: Mapping[str, str],
                     faces: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[int, int]:
        """Add links kept elsewhere before (a links.json); what is recorded already wins.
        Returns (people, faces) added."""
        ...


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What every connector is built with, besides its own config."""

    writer: MetadataWriter | None
    engine_version: str
    known: KnownVersions | None = None
    base_dir: Path = Path()
    work_dir: Path = Path(".consentry/work")
    links: LinkStore | None = None


@runtime_checkable
class Connector(Protocol):
    name: str

    def changes(self, cursor: str | None) -> tuple[list[AssetRef], str | None]:
        """Assets that may have changed since `cursor`, and the cursor to store afterwards."""
        ...

    def fetch(self, ref: AssetRef, purpose: Purpose) -> Fetched:
        """A local file with the asset's pixels (a preview is fine for analysis)."""
        ...

    def write_back(self, ref: AssetRef, verdict: AssetVerdict, geometry: Geometry) -> AssetRef:
        """Write the verdict where editors look; return the ref with its new version."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class WebhookSource(Protocol):
    def parse_webhook(self, headers: dict[str, str], body: bytes) -> list[AssetRef]: ...


@runtime_checkable
class DeletionSource(Protocol):
    def take_deleted(self, known: KnownAssets) -> list[str]:
        """Ids of assets found deleted since the last call (drained); `known` lists what
        Consentry has recorded, for connectors that find deletions by comparison."""
        ...


@runtime_checkable
class Checkable(Protocol):
    def check(self) -> list[tuple[str, bool, str]]:
        """(what, ok, detail) lines for `consentry check`; never a secret in `detail`."""
        ...
