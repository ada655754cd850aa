"""Nextcloud: WebDAV listing and SEARCH, previews for analysis, system tags and XMP write-back.

Only the folders the admin selects are ever listed or downloaded (data minimisation). Assets are
identified by Nextcloud's fileid, so a renamed or moved file keeps its face records; the etag is
the version. Tagging changes neither etag nor mtime, and sidecars are not images, so our own
writes are never seen as changes; an embedded write returns the new etag for the same reason.

Embedded writes are guarded three ways, because Nextcloud keeps the same etag for two writes
within one second (nextcloud/server#63994): `If-Match` on the downloaded etag, a size/checksum
comparison right before the upload, and a re-check after it. Any mismatch means someone else
wrote: the file is downloaded again, our XMP merged into their version, and the upload retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import quote

import requests
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from requests.auth import HTTPBasicAuth

from connectors.base import ConnectorContext, Fetched, KnownAssets, Purpose
from connectors.nextcloud_api import (
    TAG_PROPS,
    DavEntry,
    DavXmlError,
    parse_multistatus,
    propfind_body,
    search_body,
)
from plugin import crashpoints
from plugin.errors import AssetError, AuthError, ConfigError, ConnectorError, UnavailableError
from plugin.http import HttpClient, RetryPolicy, build_session
from plugin.models import AssetRef, AssetVerdict, Geometry, Status

log = logging.getLogger(__name__)

DEFAULT_TAGS: dict[str, str] = {
    "cleared": "Consent: cleared",
    "limited": "Consent: limited",
    "missing": "Consent: missing",
    "expired": "Consent: expired",
    "withdrawn": "Consent: withdrawn",
    "review": "Consent: review",
}
WEBHOOK_EVENTS = tuple(f"OCP\\Files\\Events\\Node\\Node{e}Event"
                       for e in ("Created", "Written", "Renamed", "Deleted"))
_OCS_WEBHOOKS = "/ocs/v2.php/apps/webhook_listeners/api/v1/webhooks"
_OCS_HEADERS = {"OCS-APIRequest": "true", "Accept": "application/json"}
_CHUNK = 1 << 16


class NextcloudConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["nextcloud"] = "nextcloud"
    name: str = Field("nextcloud", pattern=r"^[A-Za-z0-9_.-]+$", description="connector name")
    url: str = Field(pattern=r"^https?://", description="server address, e.g. https://cloud.example.org")
    user: str = Field(min_length=1, description="Nextcloud user whose files are scanned")
    app_password: SecretStr | None = Field(
        None, description="app password (Settings → Security); prefer app_password_env")
    app_password_env: str = Field(
        "CONSENTRY_NEXTCLOUD_PASSWORD",
        description="environment variable holding the app password when app_password is unset")
    include: tuple[str, ...] = Field(
        ("Photos",), min_length=1,
        description="folders (relative to the user's files) scanned; nothing else is downloaded")
    exclude: tuple[str, ...] = Field((), description="sub-folders of `include` never listed")
    write_mode: Literal["sidecar", "embed", "tags-only"] = Field(
        "sidecar", description="XMP in an .xmp sidecar next to the file, in the file, or none")
    tags: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TAGS),
        description="system tag name per status (cleared, limited, missing, expired, "
                    "withdrawn, review); photos without faces get none")
    page_size: int = Field(500, ge=1, le=10000, description="results per SEARCH page")
    overlap_seconds: int = Field(
        120, ge=0, description="incremental scans look this far behind the last scan")
    full_scan_hours: int = Field(
        24, ge=0, description="walk all selected folders again after this many hours (the "
                              "safety net for renames and missed webhooks); 0: never")
    preview_size: int = Field(1600, ge=64, le=8192, description="preview edge (px) analysed")
    max_download_mb: int = Field(200, ge=1, description="refuse downloads larger than this")
    timeout: float = Field(30.0, gt=0, description="seconds per HTTP request")
    max_attempts: int = Field(5, ge=1, le=20, description="tries per request on outages")
    verify_tls: bool = Field(True, description="verify the server's TLS certificate")
    webhook_secret: SecretStr | None = Field(
        None, description="shared secret webhook calls must carry; prefer webhook_secret_env")
    webhook_secret_env: str = Field(
        "CONSENTRY_NEXTCLOUD_WEBHOOK_SECRET",
        description="environment variable holding the webhook secret when webhook_secret is unset")
    webhook_header: str = Field(
        "X-Consentry-Secret", pattern=r"^[A-Za-z0-9-]+$",
        description="header carrying the webhook secret")

    @field_validator("include", "exclude")
    @classmethod
    def _folders(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(v.strip("/") for v in value)
        if any(".." in PurePosixPath(v).parts for v in cleaned):
            raise ValueError("folders must not contain '..'")
        return cleaned

    @field_validator("tags")
    @classmethod
    def _tag_statuses(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - set(DEFAULT_TAGS)
        if unknown:
            raise ValueError(f"unknown status(es) {sorted(unknown)}; known: {sorted(DEFAULT_TAGS)}")
        if len(set(value.values())) != len(value):
            raise ValueError("tag names must be distinct")
        return {**DEFAULT_TAGS, **value}


def _secret(value: SecretStr | None, env: str) -> str | None:
    return value.get_secret_value() if value is not None else (os.environ.get(env) or None)


class _Password:
    """requests auth that resolves the app password on first use, so building the connector
    (e.g. `consentry check` of a config without the env var set) contacts nothing."""

    def __init__(self, config: NextcloudConfig) -> None:
        self._config = config

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        password = _secret(self._config.app_password, self._config.app_password_env)
        if password is None:
            raise ConfigError("no app password: set app_password or "
                              f"${self._config.app_password_env}",
                              key=f"{self._config.name}.app_password")
        return HTTPBasicAuth(self._config.user, password)(request)


class NextcloudConnector:
    Config = NextcloudConfig

    def __init__(self, config: NextcloudConfig, context: ConnectorContext, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.name = config.name
        if config.write_mode != "tags-only" and context.writer is None:
            raise ConfigError("sidecar and embed modes need the XMP writer", key=self.name)
        self._writer = context.writer
        self._engine_version = context.engine_version
        work = context.work_dir
        self.work_dir = (work if work.is_absolute() else context.base_dir / work) / self.name
        session = build_session(auth=_Password(config), verify=config.verify_tls)
        self.http = HttpClient(self.name, session, base_url=config.url, timeout=config.timeout,
                               policy=RetryPolicy(attempts=config.max_attempts), sleep=sleep)
        self._dav = f"/remote.php/dav/files/{quote(config.user, safe='')}"
        self._tag_ids: dict[str, str] | None = None
        self._listed: dict[str, DavEntry] = {}  # fileid → entry of the last listing
        self.deleted: list[str] = []  # fileids reported deleted by webhooks since the last run

    # -- paths -------------------------------------------------------------------------
    def _url(self, rel: str) -> str:
        return f"{self._dav}/{quote(rel, safe='/')}"

    def _rel(self, path: str) -> str:
        prefix = f"/remote.php/dav/files/{self.config.user}"
        if not path.startswith(prefix):
            raise ConnectorError(self.name, "server answered with a path outside the user's files")
        return path[len(prefix):].strip("/")

    def selected(self, rel: str) -> bool:
        """True for paths inside an included folder and outside every excluded one."""
        def under(folder: str) -> bool:
            return folder == "" or rel == folder or rel.startswith(folder + "/")
        return any(map(under, self.config.include)) and not any(
            under(f) for f in self.config.exclude if f)

    def _is_photo(self, entry: DavEntry) -> bool:
        return (not entry.collection and (entry.get("d:getcontenttype") or "").startswith("image/")
                and entry.fileid is not None)

    def _ref(self, entry: DavEntry) -> AssetRef:
        return AssetRef(connector=self.name, id=str(entry.fileid), version=entry.etag,
                        name=self._rel(entry.href), mime=entry.get("d:getcontenttype"),
                        fingerprint=entry.etag)

    # -- DAV calls ---------------------------------------------------------------------
    def _multistatus(self, method: str, path: str, *, what: str, **kwargs) -> list[DavEntry]:
        response = self.http.request(method, path, **kwargs)
        try:
            return parse_multistatus(response.content)
        except DavXmlError as err:
            raise ConnectorError(self.name, f"{method} {what}: {err}") from err

    def _propfind(self, path: str, *, depth: str, what: str,
                  body: bytes | None = None) -> list[DavEntry]:
        return self._multistatus("PROPFIND", path, what=what, data=body or propfind_body(),
                                 headers={"Depth": depth, "Content-Type": "application/xml"})

    def stat(self, rel: str) -> DavEntry | None:
        """Properties of one file, or None when it does not exist (any more)."""
        response = self.http.request("PROPFIND", self._url(rel), ok=(404,), data=propfind_body(),
                                     headers={"Depth": "0", "Content-Type": "application/xml"})
        if response.status_code == 404:
            return None
        try:
            entries = parse_multistatus(response.content)
        except DavXmlError as err:
            raise AssetError(rel, f"PROPFIND: {err}") from err
        return entries[0] if entries else None

    # -- change detection --------------------------------------------------------------
    def changes(self, cursor: str | None) -> tuple[list[AssetRef], str | None]:
        """First run (and every `full_scan_hours`): walk the selected folders. Otherwise SEARCH
        on upload time (new files; the mtime is the client's and may be years old) and on mtime
        (edits), from the last scan minus the overlap window. Refs are de-duplicated by
        (fileid, etag)."""
        started = int(self._server_now().timestamp())
        since, walked = _read_cursor(cursor)
        full = since is None or (self.config.full_scan_hours > 0 and
                                 started - walked >= self.config.full_scan_hours * 3600)
        entries = self._walk() if full else self._search(since or 0)
        refs: dict[tuple[str, str], AssetRef] = {}
        for entry in entries:
            if self._is_photo(entry) and self.selected(self._rel(entry.href)):
                ref = self._ref(entry)
                refs.setdefault((ref.id, ref.version), ref)
                self._listed[ref.id] = entry
        return list(refs.values()), json.dumps({"since": started,
                                                "walked": started if full else walked})

    def _server_now(self) -> datetime:
        """The server's clock (Date header): local clock skew must not make us miss files."""
        response = self.http.request("PROPFIND", self._dav + "/",
                                     data=propfind_body(("d:getetag",)),
                                     headers={"Depth": "0", "Content-Type": "application/xml"})
        try:
            return parsedate_to_datetime(response.headers["Date"])
        except (KeyError, TypeError, ValueError):
            return datetime.now(UTC)

    def select(self, paths: list[Path]) -> list[AssetRef]:
        """Refs for the given remote files or folders (`consentry scan PATH`), paths relative
        to the user's files; only selected ones count."""
        refs: list[AssetRef] = []
        for given in paths:
            rel = PurePosixPath(given.as_posix()).as_posix().strip("/")
            if not self.selected(rel):
                raise ConfigError(f"{rel} is not inside the folders selected for {self.name}")
            entry = self.stat(rel)
            if entry is None:
                raise ConfigError(f"{rel} does not exist on {self.name}")
            found = self._walk((rel,)) if entry.collection else [entry]
            for e in found:
                if self._is_photo(e):
                    refs.append(self._ref(e))
                    self._listed[str(e.fileid)] = e
        return refs

    def _walk(self, start: tuple[str, ...] | None = None) -> Iterator[DavEntry]:
        # Depth: infinity is often disabled on servers: walk folder by folder.
        pending = list(start or self.config.include)
        seen: set[str] = set()
        while pending:
            folder = pending.pop(0)
            if folder in seen or not self.selected(folder):
                continue
            seen.add(folder)
            url = self._url(folder) + "/" if folder else self._dav + "/"
            for entry in self._propfind(url, depth="1", what=f"listing of {folder or '/'}"):
                rel = self._rel(entry.href)
                if rel == folder:
                    continue
                if entry.collection:
                    if self.selected(rel):
                        pending.append(rel)
                else:
                    yield entry

    def _search(self, since: int) -> Iterator[DavEntry]:
        start = since - self.config.overlap_seconds
        literals = {
            "nc:upload_time": str(start),
            # An unparsable date literal silently becomes 0 (= every file): ISO 8601 with offset.
            "d:getlastmodified": datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds"),
        }
        for folder in self.config.include:
            scope = f"/files/{self.config.user}/{folder}".rstrip("/")
            for prop, literal in literals.items():
                offset = 0
                while True:
                    page = self._multistatus(
                        "SEARCH", "/remote.php/dav/", what=f"search in {folder or '/'}",
                        data=search_body(scope=scope, prop=prop, literal=literal,
                                         limit=self.config.page_size, offset=offset),
                        headers={"Content-Type": "text/xml"})
                    yield from page
                    if len(page) < self.config.page_size:
                        break
                    offset += len(page)

    # -- content -----------------------------------------------------------------------
    def _download(self, url: str, dest: Path, *, asset: str, ok: tuple[int, ...] = ()
                  ) -> requests.Response | None:
        """Stream to `dest`, refusing more than max_download_mb; None for a status in `ok`."""
        limit = self.config.max_download_mb << 20
        response = self.http.request("GET", url, ok=ok, stream=True)
        with response:
            if response.status_code in ok:
                return None
            dest.parent.mkdir(parents=True, exist_ok=True)
            size = 0
            try:
                with dest.open("wb") as out:
                    for chunk in response.iter_content(_CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise AssetError(asset, f"larger than {self.config.max_download_mb} MB")
                        out.write(chunk)
                        if size == len(chunk):  # crash tests: killed mid-stream, once a file
                            crashpoints.hit("download")
            except requests.RequestException as err:
                raise UnavailableError(self.name, f"GET {asset}: {type(err).__name__}") from err
        return response

    def _local(self, ref: AssetRef, kind: str) -> Path:
        suffix = PurePosixPath(ref.name).suffix.lower() or ".img"
        return self.work_dir / ref.id / f"{kind}{suffix if kind == 'original' else '.jpg'}"

    def fetch(self, ref: AssetRef, purpose: Purpose) -> Fetched:
        """Analysis gets the server's preview (bounded size) plus the original's geometry; the
        original is downloaded only without a preview or without geometry metadata."""
        if purpose == "analysis":
            preview = self._local(ref, "preview")
            size = self.config.preview_size
            got = self._download(f"/index.php/core/preview?fileId={quote(ref.id)}&x={size}"
                                 f"&y={size}&a=1", preview, asset=ref.name, ok=(404,))
            if got is not None:
                return Fetched(preview, self._original_geometry(ref))
        original = self._local(ref, "original")
        if self._download(self._url(ref.name), original, asset=ref.name, ok=(404,)) is None:
            raise AssetError(ref.name, "file vanished after it was listed")
        return Fetched(original)

    def _original_geometry(self, ref: AssetRef) -> Geometry:
        entry = self._listed.get(ref.id)
        if entry is None or entry.etag != ref.version:
            entry = self.stat(ref.name)
        if entry is None:
            raise AssetError(ref.name, "file vanished after it was listed")
        stored, orientation = entry.stored_size(), entry.orientation()
        if stored is not None and orientation is not None:
            return Geometry(stored_width=stored[0], stored_height=stored[1],
                            orientation=orientation)
        path = self.fetch(ref, "original").path
        return _read_geometry(path, ref.name)

    # -- write-back --------------------------------------------------------------------
    def write_back(self, ref: AssetRef, verdict: AssetVerdict, geometry: Geometry) -> AssetRef:
        if self.config.write_mode == "sidecar":
            self._write_sidecar(ref, verdict, geometry)
        elif self.config.write_mode == "embed":
            ref = self._write_embedded(ref, verdict, geometry)
        self.set_tags(ref, verdict.status)
        # The downloaded copies are personal data: gone as soon as they are not needed.
        shutil.rmtree(self.work_dir / ref.id, ignore_errors=True)
        return ref

    def _write_sidecar(self, ref: AssetRef, verdict: AssetVerdict, geometry: Geometry) -> None:
        # The writer carries the image's foreign XMP into a new sidecar: it needs the image,
        # and the current sidecar so that an unchanged verdict uploads nothing.
        assert self._writer is not None
        image = self.fetch(ref, "original").path
        sidecar = image.with_name(image.name + ".xmp")
        sidecar.unlink(missing_ok=True)
        remote = self._url(ref.name + ".xmp")
        self._download(remote, sidecar, asset=ref.name, ok=(404,))
        if sidecar.exists() and sidecar.stat().st_size == 0:
            sidecar.unlink()
        if self._writer.write(image, verdict, geometry, engine=self._engine_version,
                              sidecar=sidecar):
            self.http.request("PUT", remote, data=sidecar.read_bytes(),
                              headers={"Content-Type": "application/rdf+xml"})

    def _write_embedded(self, ref: AssetRef, verdict: AssetVerdict, geometry: Geometry,
                        attempts: int = 4) -> AssetRef:
        assert self._writer is not None
        local = self._local(ref, "original")
        for _ in range(attempts):
            got = self._download(self._url(ref.name), local, asset=ref.name, ok=(404,))
            if got is None:
                raise AssetError(ref.name, "file vanished before its metadata could be written")
            etag = (got.headers.get("ETag") or "").strip('"')
            before = local.read_bytes()
            if not self._writer.write(local, verdict, geometry, engine=self._engine_version):
                return ref.model_copy(update={"version": etag, "fingerprint": etag})
            if not self._unchanged_since(ref.name, etag, before):
                continue  # someone wrote after our download: merge into their version
            data = local.read_bytes()
            put = self.http.request("PUT", self._url(ref.name), data=data, ok=(412,),
                                    headers={"If-Match": f'"{etag}"'})
            if put.status_code == 412:
                continue
            after = self.stat(ref.name)
            if after is None:
                raise AssetError(ref.name, "file vanished while its metadata was written")
            if not _same_content(after, data):
                continue  # a write slipped past If-Match (same-second etag): merge again
            return ref.model_copy(update={"version": after.etag, "fingerprint": after.etag})
        raise AssetError(ref.name, f"file kept changing during {attempts} write attempts; "
                                   "nothing overwritten")

    def _unchanged_since(self, rel: str, etag: str, downloaded: bytes) -> bool:
        """Etag, size and checksum still those of what we downloaded (etag alone can lie)."""
        entry = self.stat(rel)
        return entry is not None and entry.etag == etag and _same_content(entry, downloaded)

    # -- system tags -------------------------------------------------------------------
    def _tags(self, *, refresh: bool = False) -> dict[str, str]:
        """display name → tag id of every system tag on the server."""
        if self._tag_ids is None or refresh:
            entries = self._propfind("/remote.php/dav/systemtags/", depth="1", what="tag list",
                                     body=propfind_body(TAG_PROPS))
            self._tag_ids = {e.props["oc:display-name"]: e.props["oc:id"] for e in entries
                             if e.get("oc:id") and e.get("oc:display-name")}
        return self._tag_ids

    def tag_id(self, name: str) -> str:
        """The id of tag `name`, created on first use. POST is not retried blindly: after a
        failed create the list is read again, since the tag may have been made after all."""
        for attempt in range(self.config.max_attempts):
            if name in (known := self._tags(refresh=attempt > 0)):
                return known[name]
            try:
                response = self.http.request(
                    "POST", "/remote.php/dav/systemtags/", ok=(409,),
                    json={"name": name, "userVisible": True, "userAssignable": True})
            except UnavailableError:
                continue
            location = response.headers.get("Content-Location", "")
            if response.status_code == 201 and (tag := location.rstrip("/").rpartition("/")[2]):
                self._tags()[name] = tag
                return tag
        raise UnavailableError(self.name, "could not create the system tags")

    def set_tags(self, ref: AssetRef, status: Status) -> None:
        """Make the file carry exactly its status's tag among ours; others' tags stay."""
        wanted_name = self.config.tags.get(status.value)
        wanted = self.tag_id(wanted_name) if wanted_name else None
        ours = {self._tags()[n] for n in self.config.tags.values() if n in self._tags()}
        base = f"/remote.php/dav/systemtags-relations/files/{quote(ref.id)}"
        try:
            entries = self._propfind(base, depth="1", what="tags of a file",
                                     body=propfind_body(TAG_PROPS))
        except ConnectorError as err:
            if isinstance(err, AuthError | UnavailableError):
                raise
            raise AssetError(ref.name, str(err)) from err
        current = {e.props["oc:id"] for e in entries if e.get("oc:id")}
        for stale in sorted((current & ours) - {wanted}):
            self.http.request("DELETE", f"{base}/{stale}", ok=(404,))
        if wanted is not None and wanted not in current:
            self.http.request("PUT", f"{base}/{wanted}", ok=(409,))

    def take_deleted(self, known: KnownAssets) -> list[str]:
        """Fileids that webhooks reported deleted or moved out of the selection (drained)."""
        taken, self.deleted = self.deleted, []
        return taken

    # -- webhooks ----------------------------------------------------------------------
    def webhook_secret(self) -> str | None:
        return _secret(self.config.webhook_secret, self.config.webhook_secret_env)

    def parse_webhook(self, headers: dict[str, str], body: bytes) -> list[AssetRef]:
        """Refs to scan for one webhook_listeners call. Deleted files are remembered in
        `deleted` (and their sidecar removed); renames move our sidecar along."""
        secret = self.webhook_secret()
        given = next((v for k, v in headers.items()
                      if k.lower() == self.config.webhook_header.lower()), "")
        if secret is None or not hmac.compare_digest(given.encode(), secret.encode()):
            raise AuthError(self.name, "webhook call without the shared secret")
        try:
            event = json.loads(body)["event"]
            cls = str(event["class"]).rpartition("\\")[2]
        except (ValueError, KeyError, TypeError) as err:
            raise ConnectorError(self.name, "webhook body is not a webhook_listeners event"
                                 ) from err
        if cls == "NodeRenamedEvent":
            source, target = (self._event_path(event.get(k)) for k in ("source", "target"))
            if source and target and self.config.write_mode == "sidecar" and self.selected(source):
                self._move_sidecar(source, target)
            node = event.get("target") or event.get("source") or {}
            if (source and self.selected(source) and not (target and self.selected(target))
                    and isinstance(node, dict) and node.get("id") is not None):
                self.deleted.append(str(node["id"]))  # moved out of the selection
            return self._refs_for(target)
        path = self._event_path(event.get("node"))
        if cls == "NodeDeletedEvent":
            node = event.get("node") or {}
            if isinstance(node, dict) and node.get("id") is not None:
                self.deleted.append(str(node["id"]))
            if path and self.selected(path) and self.config.write_mode == "sidecar":
                self.http.request("DELETE", self._url(path + ".xmp"), ok=(404,))
            return []
        return self._refs_for(path)

    def _event_path(self, node: object) -> str | None:
        raw = node.get("path") if isinstance(node, dict) else node
        prefix = f"/{self.config.user}/files/"
        if not isinstance(raw, str) or not raw.startswith(prefix):
            return None  # another user's file, or not a file event
        return raw[len(prefix):].strip("/")

    def _refs_for(self, path: str | None) -> list[AssetRef]:
        if not path or not self.selected(path):
            return []
        entry = self.stat(path)
        if entry is None or not self._is_photo(entry):
            return []
        ref = self._ref(entry)
        self._listed[ref.id] = entry
        return [ref]

    def _move_sidecar(self, source: str, target: str) -> None:
        destination = self.http.url(self._url(target + ".xmp"))
        self.http.request("MOVE", self._url(source + ".xmp"), ok=(404,),
                          headers={"Destination": destination, "Overwrite": "T"})

    def register_webhooks(self, url: str) -> tuple[int, int]:
        """Register the four file events for `url` (admin only); (created, already there)."""
        secret = self.webhook_secret()
        if secret is None:
            raise ConfigError(f"no webhook secret: set webhook_secret or "
                              f"${self.config.webhook_secret_env}",
                              key=f"{self.name}.webhook_secret")
        listed = self.http.request("GET", _OCS_WEBHOOKS, headers=_OCS_HEADERS)
        existing = {(w.get("uri"), w.get("event")) for w in _ocs_data(listed, self.name)}
        # PHP regex between slashes: the slashes inside must be escaped as well.
        paths = "|".join(re.escape(f"/{self.config.user}/files/{f}".rstrip("/") + "/")
                         .replace("/", "\\/") for f in self.config.include)
        created = 0
        for event in WEBHOOK_EVENTS:
            if (url, event) in existing:
                continue
            self.http.request("POST", _OCS_WEBHOOKS, headers=_OCS_HEADERS, json={
                "httpMethod": "POST", "uri": url, "event": event,
                # Rename events carry source/target, not node: filtered on our side instead.
                "eventFilter": {} if event.endswith("RenamedEvent")
                else {"event.node.path": f"/^({paths})/"},
                "userIdFilter": self.config.user, "authMethod": "header",
                "authData": {self.config.webhook_header: secret}})
            created += 1
        return created, len(WEBHOOK_EVENTS) - created

    # -- check -------------------------------------------------------------------------
    def check(self) -> list[tuple[str, bool, str]]:
        lines: list[tuple[str, bool, str]] = []
        try:
            self._propfind(self._dav + "/", depth="0", what="user root")
            lines.append(("server", True, f"{self.config.url} reachable, credentials accepted"))
            for folder in self.config.include:
                found = self.http.request("PROPFIND", self._url(folder), ok=(404,),
                                          data=propfind_body(("d:getetag",)),
                                          headers={"Depth": "0"})
                lines.append((f"folder {folder or '/'}", found.status_code != 404,
                              "readable" if found.status_code != 404 else "not found"))
            self._tags(refresh=True)
            lines.append(("system tags", True, "readable"))
        except AuthError:
            lines.append(("server", False, f"credentials refused or missing permission for user "
                                           f"{self.config.user} (app password: [redacted])"))
        except ConfigError as err:
            lines.append(("server", False, err.problem))
        except ConnectorError as err:
            lines.append(("server", False, f"not reachable: {err}"))
        return lines

    def close(self) -> None:
        self.http.session.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _read_cursor(cursor: str | None) -> tuple[int | None, int]:
    """(since, last full walk); an unreadable cursor means: walk again."""
    try:
        data = json.loads(cursor) if cursor else {}
        return int(data["since"]), int(data.get("walked", data["since"]))
    except (ValueError, KeyError, TypeError):
        return None, 0


def _same_content(entry: DavEntry, data: bytes) -> bool:
    if entry.size is not None and entry.size != len(data):
        return False
    sha1 = entry.sha1
    # SHA1 because that is what Nextcloud reports; an integrity check, not security.
    return sha1 is None or sha1 == hashlib.sha1(data).hexdigest()  # noqa: S324


def _ocs_data(response: requests.Response, connector: str) -> list[dict]:
    try:
        data = response.json()["ocs"]["data"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConnectorError(connector, "OCS answer is not JSON (is webhook_listeners enabled?)"
                             ) from err
    return data if isinstance(data, list) else []


def _read_geometry(path: Path, asset: str) -> Geometry:
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as err:
        raise AssetError(asset, f"cannot read the original's size: {type(err).__name__}") from err
    return Geometry(stored_width=width, stored_height=height,
                    orientation=orientation if orientation in range(1, 9) else 1)


__all__ = ["NextcloudConfig", "NextcloudConnector"]
