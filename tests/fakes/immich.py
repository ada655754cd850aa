"""FakeImmichServer: a stateful Immich subset on 127.0.0.1, port 0, in a thread.

Enforces `x-api-key` with per-permission 403s (message naming the permission, as Immich 3.1
does), page-number paging of `POST /api/search/metadata` ordered by creation date, 201 with an
empty body on `POST /api/faces`, tag upserts by path, and `updatedAt` bumps on tag writes (not on
face writes). Every request is checked against `immich-openapi.json` (path, method, query names,
body schema); problems land in `invalid`. Knobs: `fail_next` (statuses to answer next; 0 =
answer normally), `fail_on` (the same, per (method, path)), `fail_rate` (random 503s),
`retry_after`, `delay` (seconds before answering).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
from PIL import Image, ImageOps

from tests.fakes.local import LoopbackServer

OPENAPI = Path(__file__).resolve().parents[3] / "shared" / "api" / "immich-openapi.json"
ALL = frozenset({"all"})


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class OpenApi:
    """Request validation against the server's own description."""

    def __init__(self, path: Path = OPENAPI) -> None:
        self.doc = json.loads(path.read_text(encoding="utf-8"))
        self.routes = []
        self._validators: dict[tuple[str, str], jsonschema.Draft202012Validator] = {}
        for template, ops in self.doc["paths"].items():
            pattern = re.sub(r"\{[^}]+\}", r"[^/]+", template)
            self.routes.append((re.compile(f"^/api{pattern}$"), template, ops))

    def problems(self, method: str, path: str, query: dict[str, Any], body: Any) -> list[str]:
        for regex, template, ops in self.routes:
            if regex.match(path) and method.lower() in ops:
                op = ops[method.lower()]
                break
        else:
            return [f"{method} {path}: no such operation"]
        out = []
        names = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        out += [f"{method} {template}: unknown query {q}" for q in query if q not in names]
        schema = (op.get("requestBody", {}).get("content", {}).get("application/json", {})
                  .get("schema"))
        if schema is not None:
            if body is None:
                if op["requestBody"].get("required"):
                    out.append(f"{method} {template}: body required")
            else:
                key = (method, template)
                if key not in self._validators:
                    wrapped = {**schema, "components": self.doc["components"]}
                    self._validators[key] = jsonschema.Draft202012Validator(wrapped)
                for err in self._validators[key].iter_errors(body):
                    out.append(f"{method} {template}: {err.message}")
        elif body is not None:
            out.append(f"{method} {template}: body not expected")
        return out


class FakeImmichServer(LoopbackServer):
    def __init__(self, *, keys: dict[str, frozenset[str]] | None = None,
                 preview_side: int = 640, openapi: OpenApi | None = None) -> None:
        self.keys = keys if keys is not None else {"good-key": ALL}
        self.preview_side = preview_side
        self.openapi = openapi or OpenApi()
        self.assets: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.faces: dict[str, dict[str, Any]] = {}
        self.people: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, dict[str, Any]] = {}
        self.albums: dict[str, set[str]] = {}
        self.log: list[tuple[str, str]] = []
        self.invalid: list[str] = []
        self.fail_next: list[int] = []
        self.fail_on: dict[tuple[str, str], list[int]] = {}
        self.fail_rate = 0.0
        self.faults = 0
        self.retry_after = "0"
        self.delay = 0.0
        self.random = random.Random(7)
        self.lock = threading.RLock()
        self._clock = datetime(2026, 1, 1, tzinfo=UTC)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # keep-alive without 40 ms delayed-ACK stalls

            def _handle(self) -> None:
                outer._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self._listen(Handler)

    # -- test helpers ------------------------------------------------------------------------
    def tick(self) -> datetime:
        """The server's clock: real time, strictly increasing, so `updatedAt` orders events."""
        self._clock = max(self._clock + timedelta(microseconds=1), datetime.now(UTC))
        return self._clock

    def add_asset(self, data: bytes | None = None, *, name: str = "IMG.jpg",
                  created: datetime | None = None, album: str | None = None) -> str:
        asset_id = str(uuid.uuid4())
        exif: dict[str, Any] = {"exifImageWidth": None, "exifImageHeight": None,
                                "orientation": None}
        if data is not None:
            with Image.open(io.BytesIO(data)) as img:
                orientation = img.getexif().get(0x0112)
                exif = {"exifImageWidth": img.width, "exifImageHeight": img.height,
                        "orientation": str(orientation) if orientation else None}
            self.files[asset_id] = data
        digest = hashlib.sha1(data or asset_id.encode()).digest()  # Immich's checksum is SHA-1
        with self.lock:
            now = self.tick()
            self.assets[asset_id] = {
                "id": asset_id, "type": "IMAGE", "originalFileName": name,
                "originalPath": f"/upload/{name}", "originalMimeType": "image/jpeg",
                "checksum": base64.b64encode(digest).decode(), "isTrashed": False,
                "fileCreatedAt": _iso(created or now), "updatedAt": _iso(now),
                "exifInfo": exif, "tags": set(),
            }
            if album:
                self.albums.setdefault(album, set()).add(asset_id)
        return asset_id

    def touch(self, asset_id: str, **changes: Any) -> None:
        with self.lock:
            self.assets[asset_id].update(changes, updatedAt=_iso(self.tick()))

    def faces_of(self, asset_id: str) -> list[dict[str, Any]]:
        return [f for f in self.faces.values() if f["assetId"] == asset_id]

    def tag_values(self, asset_id: str) -> set[str]:
        return {self.tags[t]["value"] for t in self.assets[asset_id]["tags"]}

    def add_face(self, asset_id: str, box: tuple[int, int, int, int], *, width: int,
                 height: int, person: str | None = None, source: str = "machine-learning"
                 ) -> str:
        face_id = str(uuid.uuid4())
        x1, y1, x2, y2 = box
        self.faces[face_id] = {"id": face_id, "assetId": asset_id, "personId": person,
                               "imageWidth": width, "imageHeight": height,
                               "boundingBoxX1": x1, "boundingBoxY1": y1, "boundingBoxX2": x2,
                               "boundingBoxY2": y2, "sourceType": source}
        return face_id

    def add_person(self, name: str = "") -> str:
        person_id = str(uuid.uuid4())
        self.people[person_id] = {"id": person_id, "name": name, "isHidden": False,
                                  "birthDate": None, "thumbnailPath": "",
                                  "updatedAt": _iso(self.tick())}
        return person_id

    # -- dispatch ----------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self.lock:
            self.log.append((h.command, parts.path))
            self.invalid += self.openapi.problems(h.command, parts.path, query, body)
            fault = self.fail_next.pop(0) if self.fail_next else None
            planned = self.fail_on.get((h.command, parts.path))
            if fault is None and planned:
                fault = planned.pop(0)
            if fault == 0:  # 0 in fail_next: answer this one normally
                fault = None
            elif fault is None and self.fail_rate and self.random.random() < self.fail_rate:
                fault = 503
        if self.delay:
            time.sleep(self.delay)
        if fault is not None:
            self.faults += 1
            headers = {"Retry-After": self.retry_after} if fault == 429 else {}
            return self._send(h, fault, {"message": "fault"}, headers)
        key = h.headers.get("x-api-key")
        route = self._route(h.command, parts.path)
        if route is None:
            return self._send(h, 404, {"message": "Not Found"})
        handler, permission, args = route
        if permission is not None:
            granted = self.keys.get(key or "")
            if granted is None:
                return self._send(h, 401, {"message": "Invalid API key"})
            if "all" not in granted and permission not in granted:
                return self._send(h, 403, {
                    "message": f"Missing required permission: {permission}"})
        with self.lock:
            status, payload = handler(*args, query=query, body=body)
        if isinstance(payload, bytes):
            return self._send(h, status, payload, {"Content-Type": "image/jpeg"})
        self._send(h, status, payload)

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: Any,
              headers: dict[str, str] | None = None) -> None:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = b"" if payload is None else json.dumps(payload).encode()
        h.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str):
        uid = r"([0-9a-f-]{36})"
        table = [
            ("GET", r"/api/server/ping", self._ping, None),
            ("POST", r"/api/search/metadata", self._search, "asset.read"),
            ("GET", rf"/api/assets/{uid}", self._asset, "asset.read"),
            ("GET", rf"/api/assets/{uid}/thumbnail", self._thumbnail, "asset.view"),
            ("GET", rf"/api/assets/{uid}/original", self._original, "asset.download"),
            ("GET", r"/api/faces", self._faces, "face.read"),
            ("POST", r"/api/faces", self._create_face, "face.create"),
            ("PUT", rf"/api/faces/{uid}", self._reassign, "face.update"),
            ("DELETE", rf"/api/faces/{uid}", self._delete_face, "face.delete"),
            ("GET", r"/api/people", self._list_people, "person.read"),
            ("POST", r"/api/people", self._create_person, "person.create"),
            ("GET", rf"/api/people/{uid}", self._get_person, "person.read"),
            ("PUT", rf"/api/people/{uid}", self._update_person, "person.update"),
            ("DELETE", rf"/api/people/{uid}", self._delete_person, "person.delete"),
            ("GET", r"/api/tags", self._list_tags, "tag.read"),
            ("PUT", r"/api/tags", self._upsert_tags, "tag.create"),
            ("PUT", rf"/api/tags/{uid}/assets", self._tag_assets, "tag.asset"),
            ("DELETE", rf"/api/tags/{uid}/assets", self._untag_assets, "tag.asset"),
        ]
        for m, pattern, handler, permission in table:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return handler, permission, match.groups()
        return None

    # -- endpoints ---------------------------------------------------------------------------
    def _ping(self, **_: Any):
        return 200, {"res": "pong"}

    def _public(self, asset: dict[str, Any]) -> dict[str, Any]:
        return {**asset, "tags": [self._tag(t) for t in sorted(asset["tags"])]}

    def _search(self, *, query, body):
        items = sorted(self.assets.values(), key=lambda a: (a["fileCreatedAt"], a["id"]))
        if body.get("updatedAfter"):
            items = [a for a in items if _time(a["updatedAt"]) >= _time(body["updatedAfter"])]
        if body.get("updatedBefore"):
            items = [a for a in items if _time(a["updatedAt"]) <= _time(body["updatedBefore"])]
        if not body.get("withDeleted"):
            items = [a for a in items if not a["isTrashed"]]
        for album in body.get("albumIds") or []:
            items = [a for a in items if a["id"] in self.albums.get(album, set())]
        if body.get("order") == "desc":
            items.reverse()
        page, size = body.get("page", 1), body.get("size", 250)
        chunk = items[(page - 1) * size: page * size]
        more = page * size < len(items)
        return 200, {"assets": {"items": [self._public(a) for a in chunk], "total": len(chunk),
                                "count": len(chunk), "facets": [],
                                "nextPage": str(page + 1) if more else None},
                     "albums": {"items": [], "total": 0, "count": 0, "facets": [],
                                "nextPage": None}}

    def _asset(self, asset_id, *, query, body):
        asset = self.assets.get(asset_id)
        return (200, self._public(asset)) if asset else (400, {"message": "Not found"})

    def _thumbnail(self, asset_id, *, query, body):
        data = self.files.get(asset_id)
        if data is None:
            return 404, {"message": "Not found"}
        with Image.open(io.BytesIO(data)) as img:
            upright = ImageOps.exif_transpose(img).convert("RGB")
        upright.thumbnail((self.preview_side, self.preview_side))
        out = io.BytesIO()
        upright.save(out, "JPEG", quality=90)
        return 200, out.getvalue()

    def _original(self, asset_id, *, query, body):
        data = self.files.get(asset_id)
        return (200, data) if data is not None else (404, {"message": "Not found"})

    def _face_out(self, face: dict[str, Any]) -> dict[str, Any]:
        person = self.people.get(face["personId"]) if face["personId"] else None
        return {k: v for k, v in face.items() if k not in ("personId", "assetId")} | {
            "person": person}

    def _faces(self, *, query, body):
        if query.get("id") not in self.assets:
            return 400, {"message": "Not found or no asset.read access"}
        return 200, [self._face_out(f) for f in self.faces_of(query["id"])]

    def _create_face(self, *, query, body):
        if body["assetId"] not in self.assets or body["personId"] not in self.people:
            return 400, {"message": "Not found or no access"}
        self.add_face(body["assetId"], (body["x"], body["y"], body["x"] + body["width"],
                                        body["y"] + body["height"]),
                      width=body["imageWidth"], height=body["imageHeight"],
                      person=body["personId"], source="manual")
        return 201, None  # Immich 3.1 answers with an empty body: no face id

    def _reassign(self, person_id, *, query, body):
        face = self.faces.get(body["id"])
        if face is None or person_id not in self.people:
            return 400, {"message": "Not found or no access"}
        face["personId"] = person_id
        return 200, self._face_out(face)

    def _delete_face(self, face_id, *, query, body):
        if self.faces.pop(face_id, None) is None:
            return 400, {"message": "Not found or no access"}
        return 204, None

    def _list_people(self, *, query, body):
        people = list(self.people.values())
        return 200, {"people": people, "total": len(people), "hidden": 0, "hasNextPage": False}

    def _create_person(self, *, query, body):
        person_id = self.add_person((body or {}).get("name", ""))
        return 201, self.people[person_id]

    def _get_person(self, person_id, *, query, body):
        person = self.people.get(person_id)
        return (200, person) if person else (400, {"message": "Not found or no access"})

    def _update_person(self, person_id, *, query, body):
        person = self.people.get(person_id)
        if person is None:
            return 400, {"message": "Not found or no access"}
        person.update({k: v for k, v in body.items() if k in ("name", "isHidden")})
        return 200, person

    def _delete_person(self, person_id, *, query, body):
        if self.people.pop(person_id, None) is None:
            return 400, {"message": "Not found or no access"}
        for face in self.faces.values():  # ON DELETE SET NULL
            if face["personId"] == person_id:
                face["personId"] = None
        return 204, None

    def _tag(self, tag_id: str) -> dict[str, Any]:
        return self.tags[tag_id]

    def _list_tags(self, *, query, body):
        return 200, list(self.tags.values())

    def _upsert_tags(self, *, query, body):
        out = []
        for value in body["tags"]:
            parent = None
            for depth, leaf in enumerate(value.split("/")):
                path = "/".join(value.split("/")[:depth + 1])
                tag = next((t for t in self.tags.values() if t["value"] == path), None)
                if tag is None:
                    tag_id, now = str(uuid.uuid4()), _iso(self.tick())
                    tag = {"id": tag_id, "name": leaf, "value": path, "parentId": parent,
                           "createdAt": now, "updatedAt": now}
                    self.tags[tag_id] = tag
                parent = tag["id"]
            out.append(tag)
        return 200, out

    def _tag_assets(self, tag_id, *, query, body):
        if tag_id not in self.tags:
            return 400, {"message": "Not found or no access"}
        results = []
        for asset_id in body["ids"]:
            asset = self.assets.get(asset_id)
            if asset is None:
                results.append({"id": asset_id, "success": False, "error": "not_found"})
            elif tag_id in asset["tags"]:
                results.append({"id": asset_id, "success": False, "error": "duplicate"})
            else:
                asset["tags"].add(tag_id)
                asset["updatedAt"] = _iso(self.tick())  # Immich's sidecar write bumps it
                results.append({"id": asset_id, "success": True})
        return 200, results

    def _untag_assets(self, tag_id, *, query, body):
        results = []
        for asset_id in body["ids"]:
            asset = self.assets.get(asset_id)
            if asset is None or tag_id not in asset["tags"]:
                results.append({"id": asset_id, "success": False, "error": "not_found"})
            else:
                asset["tags"].discard(tag_id)
                asset["updatedAt"] = _iso(self.tick())
                results.append({"id": asset_id, "success": True})
        return 200, results
