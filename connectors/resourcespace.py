"""ResourceSpace: the consent status in the DAM's own fields, its consent manager as a source
of quitclaims.

Changes come from `resource_log_last_rows`: the log's `ref` grows monotonically, so "rows after
the highest ref seen" is the cursor (first run: a full `do_search` walk). Faces are found on the
`scr` preview (~1400 px) and mapped to the original's grid. Results go into fields, never into
files: ResourceSpace does not write field values back into originals, so Consentry does not
embed names in them either (a name would survive in every download after its consent ended).

Written per resource, exactly (stale values removed on every re-evaluation):
- a "Consent status" dropdown (created on first use with an admin key, else configured by id);
- the consented, identified people in "Named person(s)" (field 29);
- the Consentry consent ids and the earliest valid-until in a text field.
With the consentmanager plugin, mapped consent records are linked to the resources a person was
identified in, and unlinked when that ends, so ResourceSpace's consent panel shows face truth.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from connectors.base import ConnectorContext, Fetched, Purpose
from connectors.resourcespace_api import ResourceSpaceApi, RsCallError, as_int
from connectors.secrets import LazySecret
from plugin.errors import AssetError, AuthError, ConfigError, ConnectorError, UnavailableError
from plugin.http import HttpClient, RetryPolicy, build_session
from plugin.models import AssetRef, AssetVerdict, Consent, Geometry, Grant, GrantKind, Status

log = logging.getLogger(__name__)

FieldRef = int | str
STATUS_FIELD_NAME = "Consent status"
CONSENT_FIELD_NAME = "Consent records (Consentry)"
FIELD_TYPE_TEXT, FIELD_TYPE_DROPDOWN = 0, 3
KEEP_DOWNLOADS = 64  # well above the pipeline's look-ahead (2 per worker)
DEFAULT_USAGE_CHANNELS: dict[str, tuple[str, ...]] = {
    "Print": ("print",),
    "Websites": ("website",),
    "Merchandise": ("advertising",),
    "TV": ("advertising",),
    "Social Media": ("social",),
}


class ResourceSpaceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["resourcespace"] = "resourcespace"
    name: str = Field("resourcespace", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="connector name")
    base_url: str = Field(pattern=r"^https?://", description="ResourceSpace base URL "
                          "(the folder holding /api/)")
    user: str = Field(min_length=1, description="ResourceSpace user the API key belongs to")
    private_key: SecretStr | None = Field(None, description="the user's private API key "
                                          "(Admin → Users → user → Private API key); prefer "
                                          "private_key_env")
    private_key_env: str = Field(
        "CONSENTRY_RESOURCESPACE_KEY",
        description="environment variable holding the private key when private_key is unset")
    resource_types: tuple[int, ...] = Field((1,), description="resource type ids to analyse "
                                            "(1 = Photo); empty: all types")
    collections: tuple[int, ...] = Field((), description="only resources in these collection "
                                         "ids; empty: the whole library")
    status_field: FieldRef | None = Field(None, description="id or short name of the 'Consent "
                                          "status' dropdown; unset: created on first use "
                                          "(needs an admin key)")
    named_persons_field: FieldRef = Field(29, description="id or short name of the "
                                          "'Named person(s)' keyword field")
    consent_field: FieldRef | None = Field(None, description="id or short name of a text field "
                                           "for consent ids and valid-until; unset: created on "
                                           "first use (needs an admin key)")
    change_log_types: tuple[str, ...] = Field(("c", "u", "t", "s"), description="resource log "
                                              "types that mean new pixels or a new resource")
    log_days: int = Field(3650, ge=1, description="how far back the log feed reads, days")
    page_size: int = Field(100, ge=1, le=1000, description="rows per do_search page")
    timeout_seconds: float = Field(30.0, gt=0, description="per-request timeout, seconds")
    verify_tls: bool | str = Field(True, description="verify TLS; or a CA bundle path")
    retry_attempts: int = Field(5, ge=1, le=10, description="tries per request on outages")
    retry_initial_seconds: float = Field(0.5, ge=0, description="first retry backoff, seconds")
    consent_manager: bool = Field(False, description="use the consentmanager plugin: import "
                                  "mapped records, link them to identified resources")
    usage_channels: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_USAGE_CHANNELS),
        description="consent manager usage medium → Consentry publication channels")
    faces_plugin_enabled: bool | None = Field(None, description="whether the faces plugin is "
                                              "on (the API cannot tell); true makes check warn")

    @field_validator("base_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.rstrip("/")


@dataclass(frozen=True, slots=True)
class ConsentLink:
    subject_id: uuid.UUID
    consent_id: uuid.UUID


def _day(value: Any) -> date | None:
    text = str(value or "").strip()[:10]
    if not text or text.startswith("0000"):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _usages(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [p.strip() for p in str(value or "").split(",") if p.strip()]


class ResourceSpaceConnector:
    Config = ResourceSpaceConfig

    def __init__(self, config: ResourceSpaceConfig, context: ConnectorContext) -> None:
        # No network here: `consentry check` and config loading must work offline.
        self.config = config
        self.name = config.name
        session = build_session(verify=config.verify_tls)
        self.http = HttpClient(
            config.name, session, base_url=config.base_url, timeout=config.timeout_seconds,
            policy=RetryPolicy(attempts=config.retry_attempts,
                               initial=config.retry_initial_seconds,
                               maximum=max(config.retry_initial_seconds * 16, 0.001)))
        self.api = ResourceSpaceApi(self.http, user=config.user, key=LazySecret(
            config.private_key, config.private_key_env, connector=config.name,
            key="private_key"))
        self._work_dir = context.work_dir
        self._state_file = context.work_dir / "resourcespace" / f"{config.name}.json"
        self._tmp: Path | None = None
        self._fields: dict[str, FieldRef] = {}
        self._recent: deque[Path] = deque()

    # -- local state (field ids we created, the admin's consent mapping) ---------------
    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self._state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def _save(self, data: dict[str, Any]) -> None:
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self._state_file)

    def consent_mapping(self) -> dict[int, ConsentLink]:
        """ResourceSpace consent record id → the subject and the consent imported from it."""
        return {int(k): ConsentLink(uuid.UUID(v["subject"]), uuid.UUID(v["consent"]))
                for k, v in self._load().get("consents", {}).items()}

    def map_consent(self, consent_ref: int, link: ConsentLink | None) -> None:
        """Record (or drop) the admin's mapping. A dropped record stays managed ("retired")
        so the next write-back unlinks it from the resources it was linked to."""
        data = self._load()
        consents = data.setdefault("consents", {})
        retired = set(data.get("retired", []))
        if link is None:
            consents.pop(str(consent_ref), None)
            retired.add(consent_ref)
        else:
            consents[str(consent_ref)] = {"subject": str(link.subject_id),
                                          "consent": str(link.consent_id)}
            retired.discard(consent_ref)
        data["retired"] = sorted(retired)
        self._save(data)

    # -- listing ---------------------------------------------------------------------------
    def _search_rows(self, search: str) -> Iterable[dict[str, Any]]:
        offset, size = 0, self.config.page_size
        while True:
            value = self.api.call(
                "do_search", search=search, restypes=list(self.config.resource_types),
                order_by="resourceid", archive=0, fetchrows=f"{offset},{size}", sort="asc")
            # Newer versions answer {"total": n, "data": [...]} to an offset; older a list.
            total = None
            if isinstance(value, dict) and "data" in value:
                total, value = as_int(value.get("total")), value["data"]
            rows = [r for r in (value or []) if isinstance(r, dict)]
            yield from rows
            offset += len(rows)
            if len(rows) < size or (total is not None and offset >= total):
                return

    def _members(self) -> set[int] | None:
        if not self.config.collections:
            return None
        return {ref for c in self.config.collections
                for r in self._search_rows(f"!collection{c}") if (ref := as_int(r.get("ref")))}

    def _ref(self, row: dict[str, Any]) -> AssetRef | None:
        ref = as_int(row.get("ref"))
        if ref is None:
            return None
        ext = str(row.get("file_extension") or "").lower()
        # file_modified moves only when the file does: our own field writes are no change.
        version = f"{row.get('file_modified') or 'nofile'}|{ext}"
        return AssetRef(connector=self.name, id=str(ref), version=version,
                        name=f"resource {ref}", fingerprint=version)

    def _wanted(self, row: dict[str, Any], members: set[int] | None) -> bool:
        types = self.config.resource_types
        if types and as_int(row.get("resource_type")) not in types:
            return False
        if as_int(row.get("archive")) not in (None, 0):
            return False
        return members is None or as_int(row.get("ref")) in members

    def _log_rows(self, after: int) -> list[dict[str, Any]]:
        rows = self.api.call_rows("resource_log_last_rows", minref=after,
                                  days=self.config.log_days, maxrecords=0)
        return [r for r in rows if (as_int(r.get("ref")) or 0) > after]

    def changes(self, cursor: str | None) -> tuple[list[AssetRef], str | None]:
        """First run: every resource; then those the log shows new pixels for since `cursor`."""
        after = as_int(cursor) if cursor else None
        members = self._members()
        if after is None:
            # Read the log head first: what changes during the walk is seen next time.
            rows = self._log_rows(0)
            head = max((as_int(r["ref"]) or 0 for r in rows), default=0)
            refs = [ref for row in self._search_rows("") if self._wanted(row, members)
                    and (ref := self._ref(row))]
            return refs, str(head)
        rows = self._log_rows(after)
        head = max((as_int(r["ref"]) or 0 for r in rows), default=after)
        changed = sorted({res for r in rows if str(r.get("type")) in self.config.change_log_types
                          and (res := as_int(r.get("resource"))) and res > 0})
        refs = []
        for res in changed:
            try:
                data = self.api.call("get_resource_data", resource=res)
            except RsCallError:
                continue  # deleted since it was logged
            if isinstance(data, dict) and self._wanted(data, members) and (ref := self._ref(data)):
                refs.append(ref)
        return refs, str(head)

    # -- content ---------------------------------------------------------------------------
    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._work_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f"rs-{self.name}-", dir=self._work_dir))
        return self._tmp

    def _download(self, ref: AssetRef, *, size: str, extension: str) -> Path:
        url = self.api.call("get_resource_path", ref=int(ref.id), not_used="", size=size,
                            generate=1, extension=extension)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise AssetError(ref.name, f"no {size or 'original'} file to download")
        target = self._tmpdir() / f"{ref.id}-{size or 'original'}.{extension or 'bin'}"
        # The pipeline may fetch a few assets ahead of their analysis: keep the latest
        # downloads, drop older ones, so a large library never piles up on disk.
        self._recent.append(target)
        while len(self._recent) > KEEP_DOWNLOADS:
            self._recent.popleft().unlink(missing_ok=True)
        try:
            self.api.download(url, target, asset=ref.name)
        except (AuthError, UnavailableError):
            raise
        except ConnectorError as err:  # 404 and the like: this resource, not the server
            raise AssetError(ref.name, f"download failed: {err}") from err
        return target

    def _original_geometry(self, ref: AssetRef, preview: Path) -> Geometry:
        """Stored size of the original from `get_resource_all_image_sizes`; the original itself
        is read only when that is missing or the preview is turned against it (EXIF
        orientation, which the size list does not carry)."""
        with Image.open(preview) as img:
            pw, ph = img.size
        width = height = None
        for size in self.api.call_rows("get_resource_all_image_sizes", resource=int(ref.id)):
            if size.get("size_code") == "original":
                width, height = as_int(size.get("width")), as_int(size.get("height"))
        if width and height and (width >= height) == (pw >= ph):
            return Geometry(stored_width=width, stored_height=height)
        original = self._download(ref, size="", extension=ref.version.rpartition("|")[2])
        try:
            with Image.open(original) as img:
                orientation = int(img.getexif().get(0x0112, 1) or 1)
                return Geometry(stored_width=img.size[0], stored_height=img.size[1],
                                orientation=orientation if 1 <= orientation <= 8 else 1)
        except OSError as err:
            raise AssetError(ref.name, "the original is not a readable image") from err
        finally:
            original.unlink(missing_ok=True)

    def fetch(self, ref: AssetRef, purpose: Purpose) -> Fetched:
        ext = ref.version.rpartition("|")[2]
        if purpose == "original":
            return Fetched(self._download(ref, size="", extension=ext))
        preview = self._download(ref, size="scr", extension="jpg")
        try:
            return Fetched(preview, original=self._original_geometry(ref, preview))
        except OSError as err:
            raise AssetError(ref.name, "the preview is not a readable image") from err

    # -- fields ----------------------------------------------------------------------------
    def _field(self, role: Literal["status", "consent"], resource: int) -> FieldRef:
        """The configured field, else the one we created, else one titled like ours (made by
        an admin, or by us before the state file was lost), else a new one."""
        if role in self._fields:
            return self._fields[role]
        configured = self.config.status_field if role == "status" else self.config.consent_field
        field = configured if configured is not None else self._load().get("fields", {}).get(role)
        if field is None:
            name = STATUS_FIELD_NAME if role == "status" else CONSENT_FIELD_NAME
            field = self._find_field(resource, name)
            if field is None:
                field = self._create_field(role, resource)
            data = self._load()
            data.setdefault("fields", {})[role] = field
            self._save(data)
        self._fields[role] = field
        return field

    def _find_field(self, resource: int, title: str) -> int | None:
        rows = self.api.call_rows("get_resource_field_data", resource=resource)
        return next((as_int(r.get("ref")) for r in rows if r.get("title") == title), None)

    def _create_field(self, role: Literal["status", "consent"], resource: int) -> int:
        name = STATUS_FIELD_NAME if role == "status" else CONSENT_FIELD_NAME
        kind = FIELD_TYPE_DROPDOWN if role == "status" else FIELD_TYPE_TEXT
        key = "status_field" if role == "status" else "consent_field"
        try:
            ref = None
            for _ in range(self.config.retry_attempts):
                try:
                    ref = self.api.call_int("create_resource_type_field", name=name,
                                            restype=list(self.config.resource_types), type=kind)
                    break
                except UnavailableError:
                    # Not idempotent: it may have happened before the outage hid the answer.
                    if (ref := self._find_field(resource, name)) is not None:
                        break
            if ref is None:
                raise UnavailableError(self.name, "create_resource_type_field kept failing")
            if role == "status":
                for status in Status:
                    self.api.call("set_node", ref="", resource_type_field=ref,
                                  name=status.value, returnexisting=1)
        except (AuthError, RsCallError) as err:
            options = ", ".join(s.value for s in Status)
            raise ConfigError(
                f"ResourceSpace user {self.config.user!r} cannot create the field {name!r} "
                f"({err.__class__.__name__}): create it as an admin ("
                + ("dropdown with the options " + options if role == "status" else "text")
                + f") and set {key} = its id", key=f"{self.name}.{key}") from err
        log.info("%s: created field %r (id %s)", self.name, name, ref)
        return ref

    def _person_nodes(self, names: Iterable[str]) -> list[int]:
        nodes = []
        for name in names:
            nodes.append(self.api.call_int("set_node", ref="",
                                           resource_type_field=self.config.named_persons_field,
                                           name=name, returnexisting=1))
        return nodes

    def write_back(self, ref: AssetRef, verdict: AssetVerdict, geometry: Geometry) -> AssetRef:
        """Set the three fields to exactly what the verdict says; link consent records."""
        resource = int(ref.id)
        self._update(resource, self._field("status", resource), verdict.status.value)
        nodes = self._person_nodes(verdict.names)
        if nodes:
            self._update(resource, self.config.named_persons_field,
                         ",".join(map(str, nodes)), nodevalues=True)
        else:
            self._update(resource, self.config.named_persons_field, "")
        self._update(resource, self._field("consent", resource), consent_text(verdict))
        if self.config.consent_manager:
            self._sync_links(resource, verdict)
        return ref

    def _update(self, resource: int, field: FieldRef, value: str, *,
                nodevalues: bool = False) -> None:
        self.api.call("update_field", resource=resource, field=field, value=value,
                      nodevalues=nodevalues)

    # -- consent manager ---------------------------------------------------------------------
    def _linked(self, resource: int) -> set[int]:
        rows = self.api.call_rows("consentmanager_get_consents", resource=resource)
        return {ref for r in rows if (ref := as_int(r.get("ref"))) is not None}

    def _sync_links(self, resource: int, verdict: AssetVerdict) -> None:
        """Link a record while it covers an identified face (or has expired there: the DAM's
        own expiry views need the link); unlink it once withdrawn or no longer identified."""
        mapping = self.consent_mapping()
        want = set()
        for face in verdict.faces:
            if not (face.subject_id and face.name):
                continue
            for ref, link in mapping.items():
                if link.subject_id == face.subject_id and (
                        link.consent_id in face.consent_ids or face.status == Status.EXPIRED):
                    want.add(ref)
        managed = set(mapping) | set(self._load().get("retired", []))
        have = self._linked(resource) & managed
        for consent in sorted(want - have):
            self._checked("consentmanager_link_consent", consent, resource, linked=True)
        for consent in sorted(have - want):
            self._checked("consentmanager_unlink_consent", consent, resource, linked=False)

    def _checked(self, function: str, consent: int, resource: int, *, linked: bool) -> None:
        """Link/unlink are not idempotent on the server: after an outage, look before retrying."""
        for _ in range(self.config.retry_attempts):
            try:
                self.api.call(function, consent=consent, resource=resource)
                return
            except UnavailableError:
                if (consent in self._linked(resource)) == linked:
                    return
        raise UnavailableError(self.name, f"{function} kept failing")

    def consent_record(self, consent_ref: int) -> dict[str, Any]:
        record = self.api.call("consentmanager_get_consent", consent=consent_ref)
        if not isinstance(record, dict):
            raise RsCallError(self.name, "consentmanager_get_consent", "no such consent record")
        return record

    def import_consent(self, consent_ref: int, subject_id: uuid.UUID,
                       record: dict[str, Any] | None = None) -> Consent:
        """A ResourceSpace consent record as a publication consent. Never a biometric grant:
        ResourceSpace records know nothing of face recognition; that consent lives here."""
        record = record if record is not None else self.consent_record(consent_ref)
        signed = _day(record.get("date_of_consent")) or _day(record.get("created"))
        if signed is None:
            raise ConnectorError(self.name, f"consent record {consent_ref} has no date of consent")
        expires = _day(record.get("expires"))
        channels: list[str] = []
        for usage in _usages(record.get("consent_usage")):
            mapped = self.config.usage_channels.get(usage)
            if mapped is None:
                log.warning("%s: consent %s: usage %r has no channel mapping (usage_channels)",
                            self.name, consent_ref, usage)
            channels += [c for c in mapped or () if c not in channels]
        guardian = str(record.get("parent_guardian_name") or "").strip()
        canonical = {"ref": consent_ref, "usage": _usages(record.get("consent_usage")),
                     "date_of_consent": str(signed), "expires": str(expires or ""),
                     "guardian": bool(guardian)}
        return Consent(
            subject_id=subject_id,
            document_ref=f"resourcespace:{self.config.base_url}/consent/{consent_ref}",
            document_sha256=hashlib.sha256(json.dumps(canonical, sort_keys=True).encode())
            .hexdigest(),
            signed_at=_midnight(signed),
            signed_by=guardian or None,
            guardian=bool(guardian),
            grants=(Grant(kind=GrantKind.PUBLICATION, channels=tuple(channels),
                          valid_from=_midnight(signed),
                          # The expiry day itself is still covered.
                          valid_until=_midnight(expires) + timedelta(days=1) if expires
                          else None),),
        )

    # -- check -----------------------------------------------------------------------------
    def check(self) -> list[tuple[str, bool, str]]:
        lines: list[tuple[str, bool, str]] = []
        try:
            self.api.call("do_search", search="", restypes="", order_by="resourceid",
                          archive=0, fetchrows="0,1", sort="asc")
            lines.append(("api", True, f"signed calls accepted for {self.api.where}"))
        except ConnectorError as err:
            return [("api", False, str(err))]
        if self.config.consent_manager:
            try:
                self.api.call("consentmanager_get_all_consents", findtext="")
                lines.append(("consent manager", True,
                              f"{len(self.consent_mapping())} record(s) mapped to subjects"))
            except ConnectorError as err:
                lines.append(("consent manager", False, f"plugin not usable: {err}"))
        for role, key in (("status", "status_field"), ("consent", "consent_field")):
            if getattr(self.config, key) is None and role not in self._load().get("fields", {}):
                lines.append((key, True, "not set: created on first write (needs an admin key)"))
        faces = self.config.faces_plugin_enabled
        if faces:
            lines.append(("faces plugin", False,
                          "enabled: it names people on upload without any consent and no API "
                          "clears its face→person links; disable $faces_tag_on_upload"))
        elif faces is None:
            lines.append(("faces plugin", True, "state unknown (the API cannot tell): if it "
                          "is on, it names people without consent; set faces_plugin_enabled"))
        return lines

    def close(self) -> None:
        self.http.session.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def consent_text(verdict: AssetVerdict) -> str:
    """'consents: id, id; valid until: YYYY-MM-DD' — empty when no consent covers the faces."""
    if not verdict.consent_ids:
        return ""
    until = verdict.valid_until.date().isoformat() if verdict.valid_until else "open"
    return f"consents: {', '.join(str(c) for c in verdict.consent_ids)}; valid until: {until}"
