"""XMP written for editors (DESIGN §7), through one stay-open exiftool process.

`TAGS` maps our logical fields to exiftool tags; `plan` (pure) turns the values a file holds now
plus a verdict into the values it must hold; `XmpWriter` reads, plans, and writes only when the
plan differs from the file.

What Consentry owns in a file, and how a later write recognises it (everything else is kept):

- **Regions**: the `mwg-rs:RegionList` entries whose Area (x, y, w, h rounded to six decimals)
  is listed in `consentry:Regions`. They are replaced as a set on every write; others' regions
  stay, in their order, before ours. A foreign region with exactly the box of one of ours is the
  same box and merges into ours.
- **Names**: the names on our regions, as the file holds them and as this write sets them.
  `PersonInImage` entries equal to one of them, and `PersonInImageWDetails` entries whose
  PersonName is one of them *and* whose PersonId holds a `urn:uuid:`, are ours; nothing else is
  touched. No name is ever stored in our namespace: the regions carry them, so removing a
  region's Name also releases every trace of it. A name that someone else also put in
  `PersonInImage` cannot be told apart from ours and goes with ours — it merges into ours when
  we write that name, and on withdrawal, privacy wins.
- **Keywords**: `Consent|…` (lr:hierarchicalSubject) and `Consent/…` (digiKam:TagsList) are
  Consentry's subtree and always replaced. `People|<name>` / `People/<name>` count as ours only
  when name keywords are on (this write's setting, or `consentry:NameKeywords` saying we wrote
  them) and the name is one of ours, as above. `dc:subject` is never written.
- **PLUS**: `ModelReleaseStatus` is ours (the policy's answer). `ModelReleaseID` entries are ours
  when listed in `consentry:ConsentIDs` or written now. `MinorModelAgeDisclosure` is written as
  `AG-UNK` for a minor (the writer knows no age at capture time) unless the file already gives a
  minor's age; `AG-UNK` is removed again when no minor is depicted; other ages are left alone.
- **consentry:** — all ours.

An entry equal to one this write sets is ours from this write on, not only from the next: the
next write judges by what this one left, so it finds the same entries ours, in the same order,
and has nothing to do.

Sidecar mode: readers such as Immich let a sidecar's tag replace the image's tag whole, so the
sidecar carries the foreign entries of the image's XMP (regions, people, keywords, release ids)
as well as its own, merged and de-duplicated; the image is only read, never written. The image's
foreign entries are carried **once**, by Consentry's first write into the sidecar (one holding
nothing of our namespace yet: absent, or made by another tool, as Immich does). From then on the
sidecar is authoritative: each write changes only our entries there, and the image serves only
to recognise what an earlier embedded write of ours left in it (our marks and the names on our
regions, which are never carried).

Why only once: removal. Our namespace keeps no names, so once Consentry has removed one (consent
withdrawn, subject erased) nothing tells that the image's equal `PersonInImage` entry or
`People|…` keyword was that name; carrying the image again on every write would put the removed
name back into the sidecar at once (and fail the write's own check that a second write finds
nothing to do). So readers stop showing a removed name even where the image still lists it.
Limits: the image itself is out of reach in sidecar mode (the erasure receipt lists its fields
for the privacy officer); a sidecar deleted or stripped of our namespace is seeded again from
the image, name included; and what another tool adds to the image's XMP after our first write is
not mirrored into the sidecar — in sidecar mode tools should write the sidecar, which the
readers prefer anyway. Rejected: carrying an image name only while a foreign region of the image
names that person too — on every write it would hide from sidecar readers every name an image
lists without a region (an agency's `PersonInImage`), though Consentry never wrote it, and it
leaves name keywords, release ids and regions with the same flaw.

No value depends on the time of writing: the same verdict gives the same bytes, and a file that
already holds the planned values is not touched at all (same bytes, same mtime).
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import exiftool
from exiftool.exceptions import ExifToolException, ExifToolExecuteError
from pydantic import BaseModel, ConfigDict

from plugin import xmp_read
from plugin.errors import ConfigError, MetadataError
from plugin.geometry import AREA_DECIMALS, Area, to_area
from plugin.models import AssetVerdict, Geometry, ModelRelease, Status

log = logging.getLogger(__name__)

# config/exiftool.config in a checkout; the wheel carries a copy inside the package.
_PACKAGED_CONFIG = Path(__file__).resolve().with_name("exiftool.config")
DEFAULT_CONFIG = (
    _PACKAGED_CONFIG
    if _PACKAGED_CONFIG.is_file()
    else Path(__file__).resolve().parents[1] / "config" / "exiftool.config"
)

STATUS_LABELS: dict[Status, str] = {
    Status.CLEARED: "Cleared",
    Status.LIMITED: "Limited",
    Status.REVIEW: "Review",
    Status.MISSING: "Missing",
    Status.EXPIRED: "Expired",
    Status.WITHDRAWN: "Withdrawn",
    Status.NO_FACES: "No faces",
}
MINOR_UNKNOWN_AGE = "AG-UNK"
_MINOR_AGES = frozenset({"AG-U14", "AG-A15", "AG-A16", "AG-A17"})
_PERSON_URN = "urn:uuid:"

Raw = dict[str, Any]
T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


def status_keyword(status: Status, separator: str = "/") -> str:
    """`Consent/Missing` (digiKam, Immich), `Consent|Missing` (Lightroom)."""
    return f"Consent{separator}{STATUS_LABELS[status]}"


class Kind(StrEnum):
    TEXT = "text"
    CODE = "code"  # a vocabulary code, read and written without print conversion
    INT = "int"
    BOOL = "bool"
    DATE = "date"  # exiftool's "YYYY:mm:dd HH:MM:SSZ"; stored as ISO 8601
    TEXTS = "texts"  # bag of text
    STRUCTS = "structs"  # bag of structures
    STRUCT = "struct"

    @property
    def is_list(self) -> bool:
        return self in (Kind.TEXTS, Kind.STRUCTS)


@dataclass(frozen=True)
class Tag:
    name: str
    kind: Kind
    written: bool = True

    @property
    def arg(self) -> str:
        # `#` disables print conversion for this tag alone: PLUS codes then go in as codes and
        # are stored as their vocabulary URI. A global `-n` would store print values wrong.
        return f"{self.name}#" if self.kind is Kind.CODE else self.name


TAGS: dict[str, Tag] = {
    "region_info": Tag("XMP-mwg-rs:RegionInfo", Kind.STRUCT),
    "persons": Tag("XMP-iptcExt:PersonInImage", Kind.TEXTS),
    "person_details": Tag("XMP-iptcExt:PersonInImageWDetails", Kind.STRUCTS),
    "model_release": Tag("XMP-plus:ModelReleaseStatus", Kind.CODE),
    "model_release_ids": Tag("XMP-plus:ModelReleaseID", Kind.TEXTS),
    "minor_age": Tag("XMP-plus:MinorModelAgeDisclosure", Kind.CODE),
    "hierarchical_subject": Tag("XMP-lr:HierarchicalSubject", Kind.TEXTS),
    "tags_list": Tag("XMP-digiKam:TagsList", Kind.TEXTS),
    "status": Tag("XMP-consentry:Status", Kind.TEXT),
    "channels": Tag("XMP-consentry:Channels", Kind.TEXTS),
    "valid_until": Tag("XMP-consentry:ValidUntil", Kind.DATE),
    "consent_ids": Tag("XMP-consentry:ConsentIDs", Kind.TEXTS),
    "unidentified": Tag("XMP-consentry:Unidentified", Kind.INT),
    "engine": Tag("XMP-consentry:Engine", Kind.TEXT),
    "region_marks": Tag("XMP-consentry:Regions", Kind.TEXTS),
    "name_keywords": Tag("XMP-consentry:NameKeywords", Kind.BOOL),
    "subject": Tag("XMP-dc:Subject", Kind.TEXTS, written=False),
    "description": Tag("XMP-dc:Description", Kind.TEXT, written=False),
}


# -- what a file holds ----------------------------------------------------------------------
class Region(BaseModel):
    model_config = ConfigDict(frozen=True)

    area: Area | None
    name: str | None = None
    type: str | None = None
    ours: bool = False


class PersonDetails(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str | None
    ids: tuple[str, ...] = ()


class XmpState(BaseModel):
    """What Consentry cares about in one file (image or sidecar), as read."""

    model_config = ConfigDict(frozen=True)

    dimensions: tuple[int, int] | None = None
    regions: tuple[Region, ...] = ()
    persons: tuple[str, ...] = ()
    person_details: tuple[PersonDetails, ...] = ()
    model_release: ModelRelease | None = None
    model_release_ids: tuple[str, ...] = ()
    minor_age: str | None = None
    hierarchical_subject: tuple[str, ...] = ()
    tags_list: tuple[str, ...] = ()
    subject: tuple[str, ...] = ()
    description: str | None = None
    status: Status | None = None
    channels: tuple[str, ...] = ()
    valid_until: datetime | None = None
    consent_ids: tuple[str, ...] = ()
    unidentified: int | None = None
    engine: str | None = None
    region_marks: tuple[str, ...] = ()
    name_keywords: bool = False

    @property
    def our_regions(self) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if r.ours)

    @property
    def foreign_regions(self) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if not r.ours)

    @property
    def foreign_names(self) -> tuple[str, ...]:
        """Names others wrote (foreign regions, PersonInImage): not ours to change (DESIGN §7)."""
        ours = {r.name for r in self.our_regions if r.name}
        names = [r.name for r in self.foreign_regions if r.name]
        return tuple(_unique([*names, *(p for p in self.persons if p not in ours)]))

    @classmethod
    def from_raw(cls, raw: Raw) -> XmpState:
        simple = {
            key: _READ[tag.kind](raw[key])
            for key, tag in TAGS.items()
            if tag.kind not in (Kind.STRUCT, Kind.STRUCTS)
        }
        # A code someone else wrote must not make the file unreadable.
        simple["model_release"] = _enum(ModelRelease, raw["model_release"])
        simple["status"] = _enum(Status, raw["status"])
        marks = _marks([raw])
        info = raw["region_info"] if isinstance(raw["region_info"], dict) else {}
        return cls(
            **simple,
            dimensions=_dimensions(info.get("AppliedToDimensions")),
            regions=tuple(
                Region(
                    area=_area(r),
                    name=_text(r.get("Name")),
                    type=_text(r.get("Type")),
                    ours=_area_key(r) in marks,
                )
                for r in _region_list(raw)
            ),
            person_details=tuple(
                PersonDetails(name=_text(d.get("PersonName")), ids=_texts(d.get("PersonId")))
                for d in raw["person_details"]
                if isinstance(d, dict)
            ),
        )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in _as_list(value))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _enum(enum: type[E], value: Any) -> E | None:
    try:
        return enum(str(value)) if value is not None else None
    except ValueError:
        return None


def _dimensions(dims: Any) -> tuple[int, int] | None:
    try:
        return int(dims["W"]), int(dims["H"])
    except (KeyError, TypeError, ValueError):
        return None


def _parse_date(value: Any) -> datetime | None:
    if value is None:
        return None
    for fmt in ("%Y:%m:%d %H:%M:%S%z", "%Y:%m:%d %H:%M:%S"):
        try:
            parsed = datetime.strptime(str(value), fmt)
        except ValueError:
            continue
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


_READ: dict[Kind, Callable[[Any], Any]] = {
    Kind.TEXT: _text,
    Kind.CODE: _text,
    Kind.INT: _int,
    Kind.BOOL: lambda value: value is True,
    Kind.DATE: _parse_date,
    Kind.TEXTS: _texts,
}


def _xmp_date(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.utcoffset() is None:
        raise ValueError("valid_until must carry a timezone")
    return value.astimezone(UTC).strftime("%Y:%m:%d %H:%M:%SZ")


# -- regions --------------------------------------------------------------------------------
def _region_list(raw: Raw) -> list[dict[str, Any]]:
    info = raw["region_info"]
    regions = info.get("RegionList") if isinstance(info, dict) else None
    return [r for r in _as_list(regions) if isinstance(r, dict)]


def _area(region: dict[str, Any]) -> Area | None:
    area = region.get("Area")
    try:
        return Area(*(float(area[k]) for k in "XYWH"))
    except (KeyError, TypeError, ValueError):
        return None


def _area_key(region: dict[str, Any]) -> tuple[float, ...] | None:
    area = _area(region)
    return None if area is None else tuple(round(v, AREA_DECIMALS) for v in area)


def _mark(area: Area) -> str:
    return ",".join(f"{v:.{AREA_DECIMALS}f}" for v in area)


def _marks(sources: Iterable[Raw]) -> set[tuple[float, ...]]:
    marks = set()
    for raw in sources:
        for text in raw["region_marks"]:
            try:
                values = tuple(round(float(v), AREA_DECIMALS) for v in str(text).split(","))
            except ValueError:
                continue
            if len(values) == 4:
                marks.add(values)
    return marks


def _our_region(area: Area, name: str | None) -> dict[str, Any]:
    region: dict[str, Any] = {
        "Area": {
            "X": Decimal(f"{area.x:.{AREA_DECIMALS}f}"),
            "Y": Decimal(f"{area.y:.{AREA_DECIMALS}f}"),
            "W": Decimal(f"{area.w:.{AREA_DECIMALS}f}"),
            "H": Decimal(f"{area.h:.{AREA_DECIMALS}f}"),
            "Unit": "normalized",
        },
        "Type": "Face",
    }
    if name:
        region["Name"] = name
    return region


# -- the plan -------------------------------------------------------------------------------
def _canon(value: Any) -> Any:
    """A form in which exiftool's read-back equals what was written: numbers as text, no
    empty lists or structures (exiftool stores none)."""
    if type(value) is str:  # most leaves: the fast way out
        return value
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, dict):
        items = {str(k): _canon(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not None} or None
    if isinstance(value, list):
        return [_canon(v) for v in value] or None
    return str(value)


def _unique(items: Iterable[T], key: Callable[[T], Any] = _canon) -> list[T]:
    seen: set[str] = set()
    out = []
    for item in items:
        k = json.dumps(key(item), sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def _region_key(region: dict[str, Any]) -> Any:
    area = _area_key(region)
    return [area, _canon(region.get("Type"))] if area is not None else _canon(region)


def _changed(desired: Raw, current: Raw | None) -> list[str]:
    """The planned fields `current` does not hold yet (all of them when there is no file)."""
    if current is None:
        return list(desired)
    return [k for k, v in desired.items() if _canon(v) != _canon(current.get(k))]


def _same(desired: Raw, current: Raw | None) -> bool:
    """True when `current` already holds every planned value."""
    return not _changed(desired, current)


def _written_by_consentry(raw: Raw) -> bool:
    """True when Consentry has written into this file: it holds something of our namespace."""
    return any(
        raw[key] not in (None, [])
        for key, tag in TAGS.items()
        if tag.name.startswith("XMP-consentry:")
    )


def plan(
    current: Raw | None,
    verdict: AssetVerdict,
    geometry: Geometry,
    *,
    image: Raw | None = None,
    engine: str,
    names_as_keywords: bool,
) -> Raw:
    """The values of every written tag after writing `verdict` (None: no such tag).

    `current` is what the file being written holds now (None: a sidecar not there yet). In
    sidecar mode `image` is the image's own XMP: it always tells what Consentry wrote earlier
    (our marks, the names on our regions), but its foreign entries are carried only until
    Consentry has written the sidecar once (see the module docstring). Raises ValueError for a
    face box outside the image or a naive `valid_until`.
    """
    # What tells our entries from others': every file Consentry may have written.
    evidence = [s for s in (current, image) if s is not None]
    # Where the entries we keep come from: the image only while the sidecar is not seeded.
    sources = [current] if current is not None and _written_by_consentry(current) else evidence
    marks = _marks(evidence)
    old_names = {
        str(r["Name"])
        for s in evidence
        for r in _region_list(s)
        if _area_key(r) in marks and r.get("Name") not in (None, "")
    }
    old_name_keywords = any(s["name_keywords"] is True for s in evidence)
    names = list(verdict.names)
    # An entry equal to one we write now is ours as well (it merges into ours, like a foreign
    # region with our box): so the write after this one finds the same entries ours, in the
    # same order, and removing the name later removes it too.
    our_names = old_names | set(names)
    our_consents = {str(c) for s in evidence for c in s["consent_ids"]}
    consent_ids = [str(c) for c in verdict.consent_ids]
    our_consents |= set(consent_ids)

    areas = [to_area(face.box, geometry) for face in verdict.faces]
    ours = [_our_region(a, f.name) for a, f in zip(areas, verdict.faces, strict=True)]
    taken = marks | {_area_key(r) for r in ours}
    foreign = _unique(
        (r for s in sources for r in _region_list(s) if _area_key(r) not in taken),
        key=_region_key,
    )
    info = next((s["region_info"] for s in sources if isinstance(s["region_info"], dict)), {})
    info = {k: v for k, v in info.items() if k not in ("AppliedToDimensions", "RegionList")}
    info["AppliedToDimensions"] = {
        "W": geometry.stored_width,
        "H": geometry.stored_height,
        "Unit": "pixel",
    }
    if foreign or ours:
        info["RegionList"] = foreign + ours

    details: list[dict[str, Any]] = []
    for face in verdict.faces:
        if face.name and face.subject_id:
            urn = f"{_PERSON_URN}{face.subject_id}"
            details.append({"PersonName": face.name, "PersonId": [urn]})

    def our_detail(d: Any) -> bool:
        return (
            isinstance(d, dict)
            and str(d.get("PersonName")) in our_names
            and any(str(i).startswith(_PERSON_URN) for i in _as_list(d.get("PersonId")))
        )

    name_keywords_ours = old_name_keywords or names_as_keywords

    def keywords(field: str, sep: str) -> list[Any]:
        def ours_(k: Any) -> bool:
            text = str(k)
            if text.startswith(f"Consent{sep}"):
                return True
            person = text.removeprefix(f"People{sep}")
            return name_keywords_ours and person != text and person in our_names

        kept = (k for s in sources for k in s[field] if not ours_(k))
        people = [f"People{sep}{n}" for n in names] if names_as_keywords else []
        return _unique([*kept, status_keyword(verdict.status, sep), *people])

    current_age = next((s["minor_age"] for s in sources if s["minor_age"] is not None), None)
    if verdict.minor:
        minor_age = current_age if current_age in _MINOR_AGES else MINOR_UNKNOWN_AGE
    else:
        minor_age = None if current_age == MINOR_UNKNOWN_AGE else current_age

    return {
        "region_info": info,
        "persons": _unique(
            [*(p for s in sources for p in s["persons"] if str(p) not in our_names), *names]
        ),
        "person_details": _unique(
            [*(d for s in sources for d in s["person_details"] if not our_detail(d)), *details]
        ),
        "model_release": verdict.model_release.value,
        "model_release_ids": _unique(
            [
                *(i for s in sources for i in s["model_release_ids"] if str(i) not in our_consents),
                *consent_ids,
            ]
        ),
        "minor_age": minor_age,
        "hierarchical_subject": keywords("hierarchical_subject", "|"),
        "tags_list": keywords("tags_list", "/"),
        "status": verdict.status.value,
        "channels": list(verdict.channels),
        "valid_until": _xmp_date(verdict.valid_until),
        "consent_ids": consent_ids,
        "unidentified": verdict.unidentified,
        "engine": engine or None,
        "region_marks": _unique(_mark(a) for a in areas),
        "name_keywords": True if names_as_keywords and names else None,
    }


def _import_json(desired: Raw) -> list[dict[str, Any]]:
    """exiftool's -json import: group-qualified tags; [] deletes a tag."""

    def plain(value: Any) -> Any:
        if isinstance(value, Decimal):
            return str(value)  # as text, so no digit of a foreign value changes
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    doc: dict[str, Any] = {"SourceFile": "*"}
    for key, value in desired.items():
        doc[TAGS[key].arg] = [] if value is None or value == [] else plain(value)
    return [doc]


def _raw(doc: dict[str, Any]) -> Raw:
    """Our fields from exiftool's -j -struct -G1 document (or the Python reader's)."""
    return {
        key: _as_list(doc.get(tag.name)) if tag.kind.is_list else doc.get(tag.name)
        for key, tag in TAGS.items()
    }


def _read_form(path: Path, *, sidecar: bool) -> str | None:
    """What the Python reader may try for `path` (see `xmp_read`): None leaves it to exiftool."""
    if sidecar:
        return "xmp"
    return "jpeg" if path.suffix.lower() in _JPEG_SUFFIXES else None


_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe"})
# The Python reader must know every tag we read, in the form we read it.
_FAST_READ_OK = all(tag.arg in xmp_read.SUPPORTED for tag in TAGS.values())


# -- the writer -----------------------------------------------------------------------------
class XmpWriter:
    """Reads and writes Consentry's XMP through stay-open exiftool processes.

    Threads may share one writer: each exiftool call takes a free process from a small pool
    (`processes`, default one per core, started on first use), so re-labelling writes files on
    every core (exiftool is ~5-8 ms of Perl per file; one process is one core). A single thread
    keeps reusing the same process. Use it as a context manager, or call `close()`.

    A write costs one exiftool command per file, or less: the file and the temp copy are read
    in Python when exiftool serialised their XMP (`xmp_read`, `fast_read`; exiftool otherwise),
    the command sets only the tags that change, and exports that wait for a process while all
    are busy go out together in one command (up to `batch` files). `counts` tells how often
    each path was taken.
    """

    def __init__(
        self, *, config_file: Path = DEFAULT_CONFIG, names_as_keywords: bool = False,
        processes: int | None = None, fast_read: bool = True, batch: int = 32,
    ) -> None:
        if not config_file.is_file():
            raise ConfigError("exiftool namespace config not found", file=str(config_file))
        self.names_as_keywords = names_as_keywords
        self.processes = max(1, processes or min(4, os.cpu_count() or 1))
        # Reads of exiftool-written JPEGs and sidecars in Python (`xmp_read`), exiftool for
        # anything else; `counts` tells how often each answered.
        self.fast_read = fast_read and _FAST_READ_OK
        self.counts: dict[str, int] = {}
        # Up to `batch` concurrent writes share one exiftool command (`_export_shared`).
        self.batch = max(1, batch)
        self._queued: list[_Export] = []
        self._lock = threading.Lock()
        # pyexiftool asks Linux to kill exiftool when the *thread* that started it ends
        # (PR_SET_PDEATHSIG): processes are started on this long-lived thread, never on a
        # short-lived worker thread.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exiftool")
        # LIFO: one thread always gets the same (running) process back.
        self._free: queue.LifoQueue[exiftool.ExifToolHelper] = queue.LifoQueue()
        self._all: list[exiftool.ExifToolHelper] = []
        try:
            for _ in range(self.processes):
                et = exiftool.ExifToolHelper(
                    config_file=config_file, common_args=["-G1"], encoding="utf-8"
                )
                self._all.append(et)
                self._free.put(et)
        except (OSError, ExifToolException) as err:
            raise ConfigError(f"cannot start exiftool: {err}") from err

    def __enter__(self) -> XmpWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for et in self._all:
                if et.running:
                    et.terminate()
        self._starter.shutdown(wait=True)

    def read(self, path: Path) -> XmpState:
        """What Consentry cares about in `path` (an image or a sidecar), as stored there."""
        form = _read_form(path, sidecar=path.suffix.lower() == ".xmp")
        return XmpState.from_raw(self._fetch(path, form=form))

    def write(
        self,
        image: Path,
        verdict: AssetVerdict,
        geometry: Geometry,
        *,
        engine: str,
        sidecar: Path | None = None,
    ) -> bool:
        """Write `verdict` into `image`, or into `sidecar` (the image is then only read).

        `geometry` is the image's stored grid and orientation; face boxes are displayed pixels.
        Returns False, leaving the file untouched, when it already holds exactly this verdict.
        Atomic: a temp file in the same folder replaces the target; on any failure the target
        is unchanged and MetadataError names it.
        """
        target = sidecar or image
        form = _read_form(target, sidecar=sidecar is not None)
        embedded = self._fetch(image, form=_read_form(image, sidecar=False))

        def desired_for(current: Raw | None) -> Raw:
            try:
                return plan(
                    current,
                    verdict,
                    geometry,
                    image=embedded if sidecar else None,
                    engine=engine,
                    names_as_keywords=self.names_as_keywords,
                )
            except ValueError as err:
                raise MetadataError(str(target), str(err)) from err

        if sidecar is None:
            current: Raw | None = embedded
        else:
            current = self._fetch(sidecar, form=form) if sidecar.exists() else None
        desired = desired_for(current)
        changed = _changed(desired, current)
        if not changed:
            log.debug("%s already carries this verdict", target)
            return False

        tmp: Path | None = None
        try:
            tmp = self._export({k: desired[k] for k in changed}, source=target if current
                               is not None else None, target=target)
            after = self._fetch(tmp, asset=target, form=form)
            # Our next write must find nothing to do: catches values exiftool dropped silently.
            if not _same(desired_for(after), after):
                raise MetadataError(str(target), "exiftool did not store every value")
            if current is not None and filecmp.cmp(tmp, target, shallow=False):
                return False
            if current is not None:
                shutil.copymode(target, tmp)
            os.replace(tmp, target)
        except OSError as err:
            raise MetadataError(str(target), f"cannot replace the file: {err}") from err
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        log.debug("wrote XMP to %s", target)
        return True

    # -- exiftool -------------------------------------------------------------------------
    def _run(self, asset: Path, *args: str, et: exiftool.ExifToolHelper | None = None) -> str:
        """One exiftool command, on `et` (held by the caller) or a process from the pool."""
        held = et is not None
        if et is None:
            et = self._free.get()
        try:
            if not et.running:
                self._starter.submit(et.run).result()
            return et.execute(*args)
        except ExifToolExecuteError as err:
            message = " ".join(str(err.stderr or "").split()) or f"exit status {err.returncode}"
            raise MetadataError(str(asset), f"exiftool: {message}") from err
        except (ExifToolException, OSError) as err:
            raise MetadataError(str(asset), f"exiftool failed: {err}") from err
        finally:
            if not held:
                self._free.put(et)

    def _fetch(self, path: Path, *, asset: Path | None = None, form: str | None = None) -> Raw:
        """The written tags of `path`. `form` ("jpeg", "xmp"; None: unknown) lets the Python
        reader answer instead of exiftool; it answers only what it can answer exactly."""
        asset = asset or path
        if form is not None and self.fast_read:
            try:
                doc = xmp_read.read_tags(path, sidecar=form == "xmp")
            except OSError:
                doc = None  # exiftool reports it, in its words
            if doc is not None:
                self._count("fast_reads")
                return _raw(doc)
        self._count("exiftool_reads")
        args = [f"-{t.arg}" for t in TAGS.values()]
        out = self._run(asset, "-j", "-struct", "-ExifTool:Error", *args, str(path))
        try:
            # Decimal keeps numbers as exiftool printed them, so foreign values round-trip.
            doc = json.loads(out, parse_float=Decimal)[0]
        except (ValueError, IndexError, KeyError) as err:
            raise MetadataError(str(asset), "exiftool returned no metadata") from err
        if error := doc.get("ExifTool:Error"):
            raise MetadataError(str(asset), f"exiftool: {error}")
        return _raw(doc)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def _export(self, values: Raw, *, source: Path | None, target: Path) -> Path:
        """Set `values` (the fields that change) on a copy of `source` (None: a new sidecar)
        in a temp file beside `target`, and return that. Concurrent calls share one exiftool
        command (`_export_shared`).

        Only the fields that change are set: the others already hold their planned values,
        and each tag set costs exiftool time (a structure ~1.5 ms); the read-back in `write`
        checks the result whole. A crash can leave the temp file behind: `.tmp` keeps it out
        of photo scans. exiftool keeps the source's format for it, and only a brand-new
        sidecar needs its own suffix.
        """
        doc = _import_json({k: v for k, v in values.items() if TAGS[k].written})[0]
        if source is not None and source.suffix and source.is_absolute() and self.batch > 1:
            return self._export_shared(doc, source=source, asset=target)
        suffix = ".tmp" if source is not None else target.suffix
        out = target.with_name(f".{target.name}.consentry-{secrets.token_hex(4)}{suffix}")
        self._export_one(doc, source=source, out=out, asset=target)
        return out

    def _export_one(self, doc: dict[str, Any], *, source: Path | None, out: Path, asset: Path,
                    et: exiftool.ExifToolHelper | None = None) -> None:
        self._count("exiftool_writes")
        fd, name = tempfile.mkstemp(prefix="consentry-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump([doc], handle, ensure_ascii=False)
            files = ["-o", str(out), str(source)] if source is not None else [str(out)]
            self._run(asset, f"-j={name}", *files, et=et)
        finally:
            Path(name).unlink(missing_ok=True)
        if not out.is_file():
            raise MetadataError(str(asset), "exiftool wrote no file")

    def _export_shared(self, doc: dict[str, Any], *, source: Path, asset: Path) -> Path:
        """Group commit: the exports waiting while every exiftool process is busy go out in
        one command (exiftool's fixed cost per command is ~1.5 ms of a core per file saved).

        Each caller queues its export, then takes a free process and runs whatever is queued,
        its own export or not, until its own is done. A file the shared command did not write
        is exported again on its own, so its error is its own and names it.
        """
        job = _Export(doc=doc, source=source, asset=asset)
        with self._lock:
            self._queued.append(job)
        while not job.done.is_set():
            batch: list[_Export] = []
            et = self._free.get()
            try:
                batch = self._take_batch()
                if batch:
                    self._run_batch(batch, et)
            finally:
                self._free.put(et)
            if not batch:
                job.done.wait()  # another caller took it
        if job.error is not None:
            raise job.error
        assert job.out is not None
        return job.out

    def _take_batch(self) -> list[_Export]:
        with self._lock:
            batch: list[_Export] = []
            sources: set[Path] = set()
            for job in list(self._queued):
                if len(batch) >= self.batch:
                    break
                if job.source not in sources:  # one file once per command
                    sources.add(job.source)
                    batch.append(job)
                    self._queued.remove(job)
            return batch

    def _run_batch(self, batch: list[_Export], et: exiftool.ExifToolHelper) -> None:
        token = secrets.token_hex(4)
        for job in batch:
            job.out = job.source.with_name(f".{job.source.name}.consentry-{token}.tmp")
        try:
            if len(batch) > 1:
                self._count("exiftool_shared_writes")
                fd, name = tempfile.mkstemp(prefix="consentry-", suffix=".json")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as handle:
                        json.dump([{**job.doc, "SourceFile": str(job.source)} for job in batch],
                                  handle, ensure_ascii=False)
                    # %d (with its slash) %f.%e: the same name as `_export` gives a lone file
                    self._run(batch[0].asset, f"-j={name}", "-o",
                              f"%d.%f.%e.consentry-{token}.tmp",
                              *(str(job.source) for job in batch), et=et)
                except MetadataError:
                    pass  # which files failed, and why, is found out below
                finally:
                    Path(name).unlink(missing_ok=True)
            for job in batch:
                out = job.out
                if out is None or out.is_file():
                    continue
                try:
                    self._export_one(job.doc, source=job.source, out=out, asset=job.asset, et=et)
                except MetadataError as err:
                    job.error = err
        except BaseException as err:
            for job in batch:
                if job.error is None and not (job.out and job.out.is_file()):
                    job.error = MetadataError(str(job.asset), f"exiftool failed: {err}")
            raise
        finally:
            for job in batch:
                job.done.set()


@dataclass(eq=False)
class _Export:
    """One file's export waiting for a shared exiftool command."""

    doc: dict[str, Any]
    source: Path
    asset: Path
    out: Path | None = None
    error: MetadataError | None = None
    done: threading.Event = field(default_factory=threading.Event)
