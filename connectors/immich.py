"""Immich through its REST API: people, faces and `Consent/<Status>` tags written into Immich.

Change detection pages `POST /api/search/metadata` over a fixed window (`updatedAfter` = the
cursor, `updatedBefore` = the start of the run). Immich orders those results by creation date,
not by `updatedAt`, so the cursor moves to the window's end only when `changes()` returns, and the
pipeline stores it only after every ref of the window was processed: a crash re-reads the window,
which the processing key makes harmless.

Version = the original's checksum. Our own tag writes bump `updatedAt`, so written assets come
back in the next window; their checksum is unchanged, so the processing key is unchanged and the
pipeline skips them before any download: no re-analysis loop.

Names go into Immich through the API only, never also through XMP (Immich would import a second,
`exif` face beside ours). The people and faces Consentry created are remembered in the state
database through ConnectorContext.links (the create call returns no id: a face is found again by
its box), shared by every worker on every machine: a subject's person is created under a lock
held per subject, an asset's faces are rewritten under a lock held per asset. Faces Consentry
did not create are never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import requests
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from connectors.base import ConnectorContext, Fetched, LinkStore, Purpose
from connectors.secrets import HeaderSecret, LazySecret
from plugin.errors import AssetError, AuthError, ConnectorError, UnavailableError
from plugin.http import HttpClient, build_session
from plugin.models import AssetRef, AssetVerdict, FaceBox, Geometry, Status

log = logging.getLogger(__name__)

# One tag per status of DESIGN §5; `no_faces` has none (the asset carries no Consent tag).
STATUS_TAGS: dict[Status, str] = {
    Status.CLEARED: "Cleared",
    Status.LIMITED: "Limited",
    Status.MISSING: "Missing",
    Status.EXPIRED: "Expired",
    Status.WITHDRAWN: "Withdrawn",
    Status.REVIEW: "Review",
}
SAME_FACE_IOU = 0.5
# Far above the pipeline's look-ahead (two photos per analysis worker).
KEEP_DOWNLOADS = 256


class ImmichConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["immich"] = "immich"
    name: str = Field("immich", pattern=r"^[A-Za-z0-9_.-]+$", description="connector name")
    url: str = Field(description="server address without /api, e.g. https://photos.example.org")
    api_key: SecretStr | None = Field(
        None, description="API key of the Immich user whose library is processed (sent as "
        "x-api-key; permissions: asset.read, asset.view, face.*, person.*, tag.*); prefer "
        "api_key_env"
    )
    api_key_env: str = Field(
        "CONSENTRY_IMMICH_API_KEY",
        description="environment variable holding the API key when api_key is unset")
    album_ids: tuple[str, ...] = Field(
        (), description="only assets in these albums (ids); empty: every asset of the key's user"
    )
    write_faces: bool = Field(
        True, description="link consented people to Immich people and create their faces"
    )
    write_tags: bool = Field(True, description="keep one Consent/<Status> tag exact per asset")
    tag_root: str = Field("Consent", pattern=r"^[^/]+$", description="parent of the status tags")
    page_size: int = Field(1000, ge=1, le=1000, description="assets per search page (max 1000)")
    timeout: float = Field(30.0, gt=0, description="seconds per HTTP call")
    verify_tls: bool | str = Field(True, description="verify TLS; or a path to a CA bundle")


class _Forbidden(Exception):
    """A 403 on a face/person call: the key lacks a permission; fall back to tags only."""

    def __init__(self, permission: str) -> None:
        self.permission = permission
        super().__init__(permission)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def geometry_of(asset: dict[str, Any]) -> Geometry | None:
    """The original's stored grid: Immich reports exifImageWidth/Height as stored (before the
    EXIF orientation is applied) and the orientation as a string ("6")."""
    exif = asset.get("exifInfo") or {}
    width, height = exif.get("exifImageWidth"), exif.get("exifImageHeight")
    if not width or not height:
        return None
    try:
        orientation = int(exif.get("orientation") or 1)
    except (TypeError, ValueError):
        orientation = 1
    return Geometry(stored_width=width, stored_height=height,
                    orientation=orientation if 1 <= orientation <= 8 else 1)


def _box_in(face: dict[str, Any], width: int, height: int) -> FaceBox:
    """An Immich face's box in a frame of width × height (Immich stores its own frame)."""
    sx, sy = width / face["imageWidth"], height / face["imageHeight"]
    return FaceBox(top=round(face["boundingBoxY1"] * sy), right=round(face["boundingBoxX2"] * sx),
                   bottom=round(face["boundingBoxY2"] * sy), left=round(face["boundingBoxX1"] * sx))


class ImmichConnector:
    Config = ImmichConfig

    def __init__(self, config: ImmichConfig, context: ConnectorContext) -> None:
        # No network here: the settings test builds every example config offline.
        self.config = config
        self.name = config.name
        # API key only, never a login cookie: a cookie would silently win over the key.
        session = build_session(headers={"Accept": "application/json"},
                                verify=config.verify_tls)
        session.auth = HeaderSecret("x-api-key", LazySecret(
            config.api_key, config.api_key_env, connector=config.name, key="api_key"))
        self.http = HttpClient(self.name, session, base_url=config.url.rstrip("/") + "/api",
                               timeout=config.timeout)
        self._work_dir = context.work_dir / f"immich-{self.name}"
        self._links = context.links
        self._imported = False
        self._geometry: dict[str, Geometry | None] = {}
        self._tag_ids: dict[Status, str] | None = None
        self._checked_people: set[str] = set()
        self._faces_off: str | None = None  # the missing permission, once a 403 was seen
        self._downloads: dict[str, Path] = {}
        self._clock = lambda: datetime.now(UTC)

    # -- change detection --------------------------------------------------------------------
    def _search(self, window: dict[str, str], album: str | None) -> Iterator[dict[str, Any]]:
        page: int | None = 1
        while page is not None:
            body: dict[str, Any] = {**window, "page": page, "size": self.config.page_size,
                                    "withExif": True, "withDeleted": True, "type": "IMAGE",
                                    "order": "asc"}
            if album:
                body["albumIds"] = [album]
            # A search is a read: safe to retry although it is a POST.
            answer = self.http.request("POST", "/search/metadata", json=body,
                                       idempotent=True).json()["assets"]
            yield from answer["items"]
            page = int(answer["nextPage"]) if answer.get("nextPage") else None

    def changes(self, cursor: str | None) -> tuple[list[AssetRef], str | None]:
        """Assets updated in [cursor, start of this run]; the run start is the next cursor."""
        now = self._clock()
        # Up to the next millisecond (Immich's precision): nothing updated before now is left out.
        end = now + timedelta(microseconds=(1000 - now.microsecond % 1000) % 1000)
        window = {"updatedBefore": _iso(end)}
        if cursor:
            window["updatedAfter"] = cursor
        refs: dict[str, AssetRef] = {}
        trashed = 0
        for album in self.config.album_ids or (None,):
            for asset in self._search(window, album):
                if asset["id"] in refs:
                    continue
                if asset.get("isTrashed"):
                    # In the trash: nothing to analyse; our faces and tags go with the asset.
                    trashed += 1
                    continue
                self._geometry[asset["id"]] = geometry_of(asset)
                refs[asset["id"]] = self._ref(asset)
        if trashed:
            log.info("%s: %d trashed asset(s) in the window left alone", self.name, trashed)
        return list(refs.values()), _iso(end)

    def _ref(self, asset: dict[str, Any]) -> AssetRef:
        return AssetRef(connector=self.name, id=asset["id"], version=asset["checksum"],
                        name=asset.get("originalFileName") or asset["id"],
                        mime=asset.get("originalMimeType"))

    def select(self, asset_ids: Sequence[Path | str]) -> list[AssetRef]:
        """Refs for given asset ids (`consentry scan --connector immich ID...`)."""
        refs = []
        for given in asset_ids:
            asset_id = Path(given).name
            asset = self._asset(asset_id)
            self._geometry[asset_id] = geometry_of(asset)
            refs.append(self._ref(asset))
        return refs

    def _asset(self, asset_id: str) -> dict[str, Any]:
        response = self.http.request("GET", f"/assets/{asset_id}", ok=(400, 404))
        if response.status_code in (400, 404):
            raise AssetError(asset_id, "asset no longer exists in Immich")
        return response.json()

    # -- content -----------------------------------------------------------------------------
    def fetch(self, ref: AssetRef, purpose: Purpose) -> Fetched:
        """The `preview` rendition (upright JPEG) for analysis, with the original's geometry."""
        if purpose == "analysis":
            path, params = f"/assets/{ref.id}/thumbnail", {"size": "preview"}
        else:
            path, params = f"/assets/{ref.id}/original", {}
        response = self.http.request("GET", path, params=params, ok=(400, 404))
        if response.status_code in (400, 404):
            raise AssetError(ref.name, "asset vanished from Immich after it was listed")
        self._work_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".preview-", suffix=".jpg", dir=self._work_dir)
        with os.fdopen(fd, "wb") as handle:
            handle.write(response.content)
        self._keep_download(ref.id, Path(name))
        if purpose != "analysis":
            return Fetched(Path(name))
        if ref.id not in self._geometry:
            self._geometry[ref.id] = geometry_of(self._asset(ref.id))
        return Fetched(Path(name), original=self._geometry[ref.id])

    def _keep_download(self, asset_id: str, path: Path) -> None:
        """The pipeline fetches a few assets ahead of analysing them: a download lives until
        its asset is written back, evicted as the oldest of KEEP_DOWNLOADS, or close()."""
        self._drop_download(asset_id)
        self._downloads[asset_id] = path
        while len(self._downloads) > KEEP_DOWNLOADS:
            self._drop_download(next(iter(self._downloads)))

    def _drop_download(self, asset_id: str) -> None:
        path = self._downloads.pop(asset_id, None)
        if path is not None:
            path.unlink(missing_ok=True)

    # -- our own records ---------------------------------------------------------------------
    @property
    def _store(self) -> LinkStore:
        """The links (state database), with a links.json of earlier versions imported first."""
        if self._links is None:
            raise ConnectorError(self.name, "no link store: the Immich connector keeps the "
                                 "people and faces it created in the state database")
        if not self._imported:
            self._import_links_file(self._links)
            self._imported = True
        return self._links

    def _import_links_file(self, store: LinkStore) -> None:
        """Links kept in the work dir by earlier versions go into the state database once; the
        file is then deleted (it links subject ids to Immich people: no copy stays behind, and
        other workers find nothing to import)."""
        legacy = self._work_dir / "links.json"
        if not legacy.exists():
            return
        with store.hold(self.name, "import"):
            try:
                data = json.loads(legacy.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return  # another worker imported it meanwhile
            except ValueError as err:
                raise ConnectorError(self.name, f"{legacy}: unreadable ({err}); fix or move "
                                     "it away") from err
            people, faces = store.import_links(self.name, data.get("people") or {},
                                               data.get("faces") or {})
            legacy.unlink()
            legacy.with_suffix(".lock").unlink(missing_ok=True)
        log.info("%s: imported %d person link(s) and %d face record(s) from %s into the state "
                 "database", self.name, people, faces, legacy)

    @contextmanager
    def _holding(self, key: str) -> Iterator[LinkStore]:
        """The link store with `key` held across every worker (of every machine)."""
        store = self._store
        with store.hold(self.name, key):
            yield store

    # -- write-back --------------------------------------------------------------------------
    def write_back(self, ref: AssetRef, verdict: AssetVerdict, geometry: Geometry) -> AssetRef:
        """Faces of consented people, then the status tag. The checksum does not move.

        A refused key (401) or an outage stops the run; any other 4xx concerns this asset only.
        """
        try:
            if self.config.write_faces and self._faces_off is None:
                try:
                    with self._holding(f"asset:{ref.id}") as links:
                        self._write_faces(links, ref, verdict, geometry)
                except _Forbidden as err:
                    self._faces_off = err.permission
                    log.warning("%s: the API key lacks the Immich permission %r: writing Consent "
                                "tags only for this library; add %s to the key to get faces and "
                                "people", self.name, err.permission, err.permission)
            if self.config.write_tags:
                self._write_tags(ref, verdict)
        except (AuthError, UnavailableError):
            raise
        except ConnectorError as err:
            raise AssetError(ref.name, str(err)) from err
        finally:
            self._drop_download(ref.id)
        return ref

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A face/person call whose 403 means a missing permission, not a broken key."""
        ok = (403, *kwargs.pop("ok", ()))
        response = self.http.request(method, path, ok=ok, **kwargs)
        if response.status_code == 403:
            raise _Forbidden(_missing_permission(response))
        return response

    def _faces_of(self, asset_id: str) -> list[dict[str, Any]]:
        return self._call("GET", "/faces", params={"id": asset_id}).json()

    def _write_faces(self, links: LinkStore, ref: AssetRef, verdict: AssetVerdict,
                     geometry: Geometry) -> None:
        width, height = geometry.displayed_size
        wanted = [(f.box, str(f.subject_id), f.name) for f in verdict.faces
                  if f.name and f.subject_id is not None]
        ours = links.faces(self.name, ref.id)
        if not wanted and not ours:
            return
        current = {f["id"]: f for f in self._faces_of(ref.id)}
        kept: list[dict[str, Any]] = []
        # Records not looked at yet: if a call fails midway, they and every face written so far
        # are still recorded (finally), so nothing Consentry made in Immich is forgotten.
        pending = list(ours)
        try:
            self._reconcile(ref, wanted, current, kept, pending, width, height)
        finally:
            if kept or ours:
                links.set_faces(self.name, ref.id, kept + pending)

    def _reconcile(self, ref: AssetRef, wanted: list[tuple[FaceBox, str, str]],
                   current: dict[str, dict[str, Any]], kept: list[dict[str, Any]],
                   pending: list[dict[str, Any]], width: int, height: int) -> None:
        """Release our faces no longer wanted, then put each wanted face in place; `kept`
        grows and `pending` shrinks as each step is done in Immich."""
        while pending:
            record = pending[0]
            face = current.get(record["id"])
            if face is not None:  # else deleted in Immich by someone: not ours to bring back
                box = _box_in(face, width, height)
                if any(s == record["subject"] and box.iou(b) >= SAME_FACE_IOU
                       for b, s, _ in wanted):
                    kept.append(record)
                else:
                    self._release(record)
                    current.pop(record["id"], None)
            pending.pop(0)
        for box, subject, name in wanted:
            person = self._person_for(subject, name)
            mine = {r["id"] for r in kept}
            face, overlap = max(((f, _box_in(f, width, height).iou(box)) for f in current.values()),
                                key=lambda pair: pair[1], default=(None, 0.0))
            if face is not None and overlap >= SAME_FACE_IOU:
                owner = (face.get("person") or {}).get("id")
                if owner == person:
                    if face["id"] not in mine:  # put there in Immich: remembered, never deleted
                        kept.append({"id": face["id"], "subject": subject, "created": False,
                                     "previous": None})
                    continue
                if face["id"] in mine or not (face.get("person") or {}).get("name"):
                    # Ours, or an unassigned/unnamed machine face: reassign, do not duplicate.
                    self._call("PUT", f"/faces/{person}", json={"id": face["id"]})
                    if face["id"] not in mine:
                        kept.append({"id": face["id"], "subject": subject, "created": False,
                                     "previous": owner})
                    continue
                # Named by someone in Immich: a human decision there; never overridden.
                log.info("%s: %s: a face there already belongs to another named person; left "
                         "alone", self.name, ref.name)
                continue
            created = self._create_face(ref.id, person, box, width, height)
            current[created["id"]] = created
            kept.append({"id": created["id"], "subject": subject, "created": True,
                         "previous": None})

    def _create_face(self, asset_id: str, person: str, box: FaceBox, width: int,
                     height: int) -> dict[str, Any]:
        body = {"assetId": asset_id, "personId": person, "imageWidth": width,
                "imageHeight": height, "x": box.left, "y": box.top, "width": box.width,
                "height": box.height}
        # 201 with an empty body and no id: the new face is found again by its box.
        found = self._checked_create(
            "/faces", body, lambda: self._find_face(asset_id, person, box, width, height))
        if found is None:
            raise ConnectorError(self.name, "POST /faces: the created face is not listed")
        return found

    def _checked_create(self, path: str, body: dict[str, Any],
                        find: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """POST is never retried blindly: after a failed attempt, look whether it happened."""
        attempts = self.http.policy.attempts
        for attempt in range(1, attempts + 1):
            try:
                response = self._call("POST", path, json=body)
            except UnavailableError:
                found = find()
                if found is not None:
                    return found
                if attempt == attempts:
                    raise
                continue
            return response.json() if response.content else find()
        return None

    def _find_face(self, asset_id: str, person: str, box: FaceBox, width: int,
                   height: int) -> dict[str, Any] | None:
        candidates = [(f, _box_in(f, width, height).iou(box)) for f in self._faces_of(asset_id)
                      if (f.get("person") or {}).get("id") == person]
        best = max(candidates, key=lambda pair: pair[1], default=(None, 0.0))
        return best[0] if best[1] >= SAME_FACE_IOU else None

    def _release(self, record: dict[str, Any]) -> str:
        """Undo one of our face writes: delete a face we created, hand back one we reassigned."""
        if record["created"]:
            self._call("DELETE", f"/faces/{record['id']}", json={"force": True}, ok=(404,))
            return "deleted"
        if record.get("previous"):
            self._call("PUT", f"/faces/{record['previous']}", json={"id": record["id"]},
                       ok=(400, 404))
            return "returned"
        return "kept"

    def _person_for(self, subject: str, name: str) -> str:
        """The Immich person linked to the subject: checked once per run, renamed, or created.
        Held per subject across every worker, so a subject never gets a second person."""
        with self._holding(f"person:{subject}") as links:
            person = links.person(self.name, subject)
            if person is not None and person not in self._checked_people:
                response = self._call("GET", f"/people/{person}", ok=(400, 404))
                if response.status_code in (400, 404):
                    person = None  # merged or deleted in Immich: link a new one
                elif response.json().get("name") != name:
                    self._call("PUT", f"/people/{person}", json={"name": name})
            if person is None:
                since = self._clock() - timedelta(seconds=5)
                created = self._checked_create("/people", {"name": name},
                                               lambda: self._new_person(links, name, since))
                if created is None:
                    raise ConnectorError(self.name, "POST /people answered without a person")
                person = created["id"]
                links.set_person(self.name, subject, person)
        self._checked_people.add(person)
        return person

    def _new_person(self, links: LinkStore, name: str, since: datetime) -> dict[str, Any] | None:
        """A person named `name`, created since `since` and linked to no subject: what a
        create that failed on the way back left behind."""
        linked = set(links.people(self.name).values())
        page: int | None = 1
        while page is not None:
            answer = self._call("GET", "/people", params={"page": page, "size": 500,
                                                          "withHidden": "true"}).json()
            for person in answer["people"]:
                updated = person.get("updatedAt")
                if (person["name"] == name and person["id"] not in linked and updated
                        and _parse_time(updated) >= since):
                    return person
            page = page + 1 if answer.get("hasNextPage") else None
        return None

    def _status_tags(self) -> dict[Status, str]:
        if self._tag_ids is None:
            values = {f"{self.config.tag_root}/{leaf}": status
                      for status, leaf in STATUS_TAGS.items()}
            # Upsert by path: safe to repeat (POST /tags answers 400 when the tag exists).
            answer = self.http.request("PUT", "/tags", json={"tags": sorted(values)}).json()
            self._tag_ids = {values[t["value"]]: t["id"] for t in answer if t["value"] in values}
        return self._tag_ids

    def _write_tags(self, ref: AssetRef, verdict: AssetVerdict) -> None:
        ids = self._status_tags()
        want = ids.get(verdict.status)
        have = {t["id"] for t in self._asset(ref.id).get("tags") or []}
        for tag_id in sorted((have & set(ids.values())) - {want}):
            self.http.request("DELETE", f"/tags/{tag_id}/assets", json={"ids": [ref.id]})
        if want is not None and want not in have:
            self.http.request("PUT", f"/tags/{want}/assets", json={"ids": [ref.id]})

    # -- withdrawal and erasure --------------------------------------------------------------
    def forget_subject(self, subject_id: uuid.UUID | str) -> dict[str, int]:
        """Erasure, or withdrawal of every grant: delete the faces Consentry created for the
        subject, hand back faces it had reassigned, and delete the Immich person it linked
        (a faceless Immich person keeps its name otherwise). Foreign faces are never deleted.
        Tags follow on the re-evaluation of the subject's assets. The subject's link rows go
        from the state database as each is undone."""
        subject = str(subject_id)
        counts = {"faces_deleted": 0, "faces_returned": 0, "people_deleted": 0}
        for asset_id in self._store.assets_of(self.name, subject):
            with self._holding(f"asset:{asset_id}") as links:
                records = links.faces(self.name, asset_id)
                keep = []
                for record in records:
                    if record["subject"] != subject:
                        keep.append(record)
                        continue
                    outcome = self._release(record)
                    if outcome != "kept":
                        counts[f"faces_{outcome}"] += 1
                if len(keep) != len(records):
                    links.set_faces(self.name, asset_id, keep)
        with self._holding(f"person:{subject}") as links:
            person = links.person(self.name, subject)
            if person is not None:
                # Faces still on the person (reassigned machine faces) fall back to unassigned.
                response = self._call("DELETE", f"/people/{person}", ok=(400, 404))
                counts["people_deleted"] = int(response.status_code < 400)
                self._checked_people.discard(person)
                links.set_person(self.name, subject, None)
        return counts

    def unname_subject(self, subject_id: uuid.UUID | str) -> dict[str, int]:
        """Withdrawal of all grants needs exactly what erasure does here: no Consentry-written
        face or person may keep the name."""
        return self.forget_subject(subject_id)

    # -- health ------------------------------------------------------------------------------
    def check(self) -> list[tuple[str, bool, str]]:
        lines: list[tuple[str, bool, str]] = []
        probes = [
            ("server reachable", "GET", "/server/ping", {}),
            ("assets readable (asset.read)", "POST", "/search/metadata",
             {"json": {"page": 1, "size": 1, "type": "IMAGE"}, "idempotent": True}),
            ("people readable (person.read)", "GET", "/people", {"params": {"page": 1,
                                                                           "size": 1}}),
            ("tags readable (tag.read)", "GET", "/tags", {}),
        ]
        for what, method, path, kwargs in probes:
            try:
                response = self.http.request(method, path, ok=(401, 403), **kwargs)
            except ConnectorError as err:
                lines.append((what, False, str(err)))
                continue
            if response.status_code == 401:
                lines.append((what, False, "API key refused (401): create a new key"))
            elif response.status_code == 403:
                lines.append((what, False, f"missing permission {_missing_permission(response)}"))
            else:
                lines.append((what, True, "ok"))
        if self._faces_off:
            lines.append(("faces and people", False,
                          f"missing permission {self._faces_off}: writing tags only"))
        return lines

    def close(self) -> None:
        for asset_id in list(self._downloads):
            self._drop_download(asset_id)
        self.http.session.close()


def _missing_permission(response: requests.Response) -> str:
    """Immich names the permission: {"message": "Missing required permission: person.read"}."""
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = ""
    _, sep, permission = message.partition("permission:")
    return permission.strip() if sep and permission.strip() else "unknown (HTTP 403)"
