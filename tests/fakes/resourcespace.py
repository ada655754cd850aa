"""FakeResourceSpaceServer: the API subset Consentry uses, with ResourceSpace's quirks.

Enforced as a real server does: `sign = sha256(key + query)` (401 `Invalid signature`, or 200
with that body in `legacy_auth` mode), per-user admin rights, answers in their real mixed
shapes (ints, numeric strings, `true`, `false`, JSend), download URLs that need an access key
(without one: the HTML login page with status 200), the resource log feed, consentmanager.

Knobs: `fail_next` (statuses answered before the real one), `fail_rate` (seeded random 503s),
`retry_after`, `truncate_next` (cut JSON bodies), `delay_next` (seconds, for timeouts),
`html_downloads` (every download answers the login page).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from PIL import Image, ImageOps

from tests.fakes.local import LoopbackServer

LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>ResourceSpace</title></head><body>" \
             b"<form id='loginform'>Username Password</form></body></html>"
NAMED_PERSONS = 29


@dataclass
class Resource:
    ref: int
    original: bytes
    extension: str
    scr: bytes
    width: int
    height: int
    resource_type: int = 1
    archive: int = 0
    file_modified: str = ""
    fields: dict[int, Any] = field(default_factory=dict)  # text, or a list of node ids


class FakeResourceSpaceServer(LoopbackServer):
    def __init__(self, *, users: dict[str, tuple[str, bool]] | None = None,
                 legacy_auth: bool = False, sizes_with_dimensions: bool = True,
                 seed: int = 7) -> None:
        self.users = users or {"admin": ("k3y-" + "a" * 60, True)}
        self.legacy_auth = legacy_auth
        self.sizes_with_dimensions = sizes_with_dimensions
        self.resources: dict[int, Resource] = {}
        self.fields: dict[int, dict[str, Any]] = {
            8: {"name": "Title", "shortname": "title", "type": 0},
            NAMED_PERSONS: {"name": "Named person(s)", "shortname": "namedpersons", "type": 9},
        }
        self.nodes: dict[int, tuple[int, str]] = {}  # node id -> (field, name)
        self.log: list[dict[str, Any]] = []
        self.consents: dict[int, dict[str, Any]] = {}
        self.collections: dict[int, set[int]] = {}
        self.links: set[tuple[int, int]] = set()  # (consent, resource)
        self.access_keys: dict[str, int] = {}
        self.calls: Counter[str] = Counter()
        self.downloads: Counter[tuple[int, str]] = Counter()
        self.requests: list[str] = []  # raw request lines, to check nothing secret is sent
        self.fail_next: list[int] = []
        self.fail_rate = 0.0
        self.retry_after: str | None = None
        self.truncate_next = 0
        self.delay_next = 0.0
        self.html_downloads = False
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._ids = 100
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append(f"{self.command} {self.path} {body!r}")
                status, ctype, payload, headers = outer._dispatch(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._listen(Handler)

    # -- test helpers --------------------------------------------------------------------------
    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _log(self, resource: int, type_: str, *, field: int | str = "", notes: str = "") -> None:
        ref = len(self.log) + 1
        self.log.append({"ref": ref, "date": "2026-11-26 12:00:00", "resource": resource,
                         "type": type_, "field": field, "user": 1, "notes": notes, "diff": ""})

    def upload(self, data: bytes, *, extension: str = "jpg", resource_type: int = 1) -> int:
        """A resource as ResourceSpace stores it after upload: original kept byte-identical,
        an upright `scr` preview of at most 1400 px."""
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            upright = ImageOps.exif_transpose(img).convert("RGB")
        upright.thumbnail((1400, 1400))
        out = io.BytesIO()
        upright.save(out, "JPEG", quality=90)
        with self._lock:
            ref = len(self.resources) + 1
            self.resources[ref] = Resource(ref, data, extension, out.getvalue(), width, height,
                                           resource_type=resource_type,
                                           file_modified=f"2026-11-26 12:00:{ref:02d}")
            self._log(ref, "c")
            self._log(ref, "u")
        return ref

    def replace_file(self, ref: int, data: bytes) -> None:
        res = self.resources[ref]
        new = self.upload(data, extension=res.extension, resource_type=res.resource_type)
        moved = self.resources.pop(new)
        self.log = [r for r in self.log if r["resource"] != new]
        res.original, res.scr, res.width, res.height = (moved.original, moved.scr,
                                                        moved.width, moved.height)
        res.file_modified = f"2026-11-27 09:00:{ref:02d}"
        self._log(ref, "u")

    def field_value(self, ref: int, field_id: int) -> Any:
        value = self.resources[ref].fields.get(field_id, "")
        if isinstance(value, list):
            return sorted(self.nodes[n][1] for n in value)
        return value

    def field_by_name(self, name: str) -> int | None:
        return next((f for f, d in self.fields.items() if d["name"] == name), None)

    def add_consent(self, **record: Any) -> int:
        ref = len(self.consents) + 1
        self.consents[ref] = {"ref": ref, "name": "", "date_of_birth": "", "address": "",
                              "parent_guardian_name": "", "email": "", "telephone": "",
                              "consent_usage": "", "notes": "", "file": "",
                              "date_of_consent": "", "expires": "", "created_by": 1, **record}
        return ref

    # -- HTTP ----------------------------------------------------------------------------------
    def _dispatch(self, method: str, path: str, body: bytes
                  ) -> tuple[int, str, bytes, dict[str, str]]:
        with self._lock:
            if self.delay_next:
                delay, self.delay_next = self.delay_next, 0.0
            else:
                delay = 0.0
            fault = self.fail_next.pop(0) if self.fail_next else None
            if fault is None and self.fail_rate and self._random.random() < self.fail_rate:
                fault = 503
        if delay:
            time.sleep(delay)
            return 200, "application/json", b"true", {}
        if fault is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return fault, "text/plain", b"Service Unavailable", headers
        url = urlsplit(path)
        if url.path == "/pages/download.php":
            return self._download(dict(parse_qsl(url.query)))
        if url.path.rstrip("/") != "/api":
            return 404, "text/html", b"not found", {}
        if method == "POST":
            form = dict(parse_qsl(body.decode()))
            query, signature = form.get("query", ""), form.get("sign", "")
        else:
            pairs = parse_qsl(url.query, keep_blank_values=True)
            signature = dict(pairs).get("sign", "")
            query = urlencode([(k, v) for k, v in pairs
                               if k not in ("sign", "authmode", "pretty")])
        params = dict(parse_qsl(query, keep_blank_values=True))
        user = self.users.get(params.get("user", ""))
        expected = hashlib.sha256((user[0] + query).encode()).hexdigest() if user else None
        if expected is None or signature != expected:
            return (200 if self.legacy_auth else 401), "text/plain", b"Invalid signature", {}
        function = params.pop("function", "")
        params.pop("user")
        with self._lock:
            self.calls[function] += 1
            handler = getattr(self, f"api_{function}", None)
            if handler is None:
                result: Any = False  # ResourceSpace answers `false` to an unknown function
                status = 200
            else:
                status, result = handler(params, admin=user[1])
            payload = json.dumps(result).encode()
            if self.truncate_next:
                self.truncate_next -= 1
                payload = payload[: max(1, len(payload) // 2)]
        return status, "application/json", payload, {}

    def _download(self, query: dict[str, str]) -> tuple[int, str, bytes, dict[str, str]]:
        ref = self.access_keys.get(query.get("access_key", ""))
        if self.html_downloads or ref is None or ref != int(query.get("ref", 0)):
            return 200, "text/html; charset=UTF-8", LOGIN_PAGE, {}
        res = self.resources[ref]
        size = query.get("size", "")
        self.downloads[(ref, size)] += 1
        data = res.scr if size == "scr" else res.original
        return 200, "image/jpeg", data, {}

    # -- API functions (each returns status, result in its real shape) ----------------------
    def _field_id(self, value: str) -> int | None:
        if value.isdigit():
            return int(value) if int(value) in self.fields else None
        return next((f for f, d in self.fields.items() if d["shortname"] == value), None)

    def _row(self, res: Resource) -> dict[str, Any]:
        return {"ref": res.ref, "resource_type": res.resource_type, "archive": res.archive,
                "file_extension": res.extension, "file_modified": res.file_modified,
                "modified": "2026-11-26 12:00:00", "field8": ""}

    def api_do_search(self, p: dict[str, str], *, admin: bool) -> tuple[int, Any]:
        search = p.get("search", "")
        types = {int(t) for t in p.get("restypes", "").split(",") if t}
        rows = [r for r in self.resources.values()
                if (not types or r.resource_type in types) and r.archive == 0]
        if search.startswith("!collection"):
            wanted = self.collections.get(int(search[len("!collection"):]), set())
            rows = [r for r in rows if r.ref in wanted]
        rows.sort(key=lambda r: r.ref, reverse=p.get("sort", "desc") == "desc")
        offset, _, count = p.get("fetchrows", "").partition(",")
        if count:
            start, n = int(offset), int(count)
            return 200, {"total": len(rows), "data": [self._row(r) for r in rows[start:start + n]]}
        return 200, [self._row(r) for r in rows]

    def api_resource_log_last_rows(self, p: dict[str, str], *, admin: bool) -> tuple[int, Any]:
        minref = int(p.get("minref") or 0)
        rows = [r for r in self.log if r["ref"] > minref]
        maxrecords = int(p.get("maxrecords") or 0)
        # Numbers come back as strings from this call, as from many older ones.
        rows = [{k: str(v) for k, v in r.items()} for r in rows]
        return 200, rows[-maxrecords:] if maxrecords else rows

    def api_get_resource_data(self, p: dict[str, str], *, admin: bool) -> tuple[int, Any]:
        res = self.resources.get(int(p.get("resource") or 0))
        return 200, (self._row(res) if res else False)

    def api_get_resource_field_data(self, p: dict[str, str], *, admin: bool
                                    ) -> tuple[int, Any]:
        res = self.resources.get(int(p.get("resource") or 0))
        if res is None:
            return 200, False
        return 200, [{"ref": str(f), "name": d["shortname"], "title": d["name"],
                      "type": str(d["type"]), "value": ", ".join(self.field_value(res.ref, f))
                      if isinstance(res.fields.get(f), list) else res.fields.get(f, "")}
                     for f, d in sorted(self.fields.items())]

    def api_get_resource_path(self, p: dict[str, str], *, admin: bool) -> tuple[int, Any]:
        ref = int(p.get("ref") or 0)
        if ref not in self.resources:
            return 200, False
        key = hashlib.sha256(f"{ref}{self._next_id()}".encode()).hexdigest()[:12]
        self.access_keys[key] = ref
        query = urlencode({"ref": ref, "size": p.get("size", ""), "ext": p.get("extension", ""),
                           "noattach": "true", "k": "", "access_key": key})
        return 200, f"{self.url}/pages/download.php?{query}"

    def api_get_resource_all_image_sizes(self, p: dict[str, str], *, admin: bool
                                         ) -> tuple[int, Any]:
        res = self.resources.get(int(p.get("resource") or 0))
        if res is None:
            return 200, False
        original: dict[str, Any] = {"size_code": "original", "extension": res.extension}
        if self.sizes_with_dimensions:
            original |= {"width": str(res.width), "height": res.height}
        return 200, [original, {"size_code": "scr", "extension": "jpg"}]

    def api_update_field(self, p: dict[str, str], *, admin: bool) -> tuple[int, Any]:
        res = self.resources.get(int(p.get("resource") or 0))
        field_id = self._field_id(p.get("field", ""))
        if res is None or field_id is None:
            return 200, False
        value, kind = p.get("value", ""), self.fields[field_id]["type"]
        if kind in (0, 1):
            res.fields[field_id] = value
        elif p.get("nodevalues") in ("1", "true"):
            ids = [int(v) for v in value.split(",") if v]
            if any(self.nodes.get(n, (None,))[0] != field_id for n in ids):
                return 200, False
            res.fields[field_id] = ids
        else:
            names = [v.strip() for v in value.split(",") if v.strip()]
            ids = []
            for name in names:
                node = next((n for n, (f, t) in self.nodes.items()
                             if f == field_id and t == name), None)
                if node is None:
                    if kind == 3:
                        return 200, False  # a dropdown only takes its own options
                    node = self._next_id()
                    self.nodes[node] = (field_id, name)
                ids.append(node)
            res.fields[field_id] = ids
        self._log(res.ref, "e", field=field_id)
        return 200, True

    def api_set_node(self, p: dict[str, str], *, admin: bool) -> tuple[int, Any]:
        field_id = self._field_id(p.get("resource_type_field", ""))
        name = p.get("name", "")
        if field_id is None or not name:
            return 200, False
        existing = next((n for n, (f, t) in self.nodes.items() if f == field_id and t == name),
                        None)
        if existing is not None and p.get("returnexisting") in ("1", "true"):
            return 200, existing
        node = self._next_id()
        self.nodes[node] = (field_id, name)
        return 200, str(node)

    def api_create_resource_type_field(self, p: dict[str, str], *, admin: bool
                                       ) -> tuple[int, Any]:
        if not admin:
            return 403, {"status": "fail", "data": {"message": "Permission denied"}}
        ref = max(self.fields) + 1
        name = p.get("name", "")
        self.fields[ref] = {"name": name, "shortname": name.lower().replace(" ", ""),
                            "type": int(p.get("type") or 0)}
        return 200, {"status": "success", "data": {"ref": ref}}

    def api_consentmanager_get_consent(self, p: dict[str, str], *, admin: bool
                                       ) -> tuple[int, Any]:
        record = self.consents.get(int(p.get("consent") or 0))
        return 200, ({k: str(v) for k, v in record.items()} if record else False)

    def api_consentmanager_get_consents(self, p: dict[str, str], *, admin: bool
                                        ) -> tuple[int, Any]:
        resource = int(p.get("resource") or 0)
        return 200, [{"ref": c, "name": self.consents[c]["name"],
                      "expires": self.consents[c]["expires"]}
                     for c, r in sorted(self.links) if r == resource]

    def api_consentmanager_get_all_consents(self, p: dict[str, str], *, admin: bool
                                            ) -> tuple[int, Any]:
        return 200, [{k: str(v) for k, v in c.items()} for c in self.consents.values()]

    def api_consentmanager_link_consent(self, p: dict[str, str], *, admin: bool
                                        ) -> tuple[int, Any]:
        consent, resource = int(p.get("consent") or 0), int(p.get("resource") or 0)
        if consent not in self.consents or resource not in self.resources:
            return 200, False
        self.links.add((consent, resource))
        self._log(resource, "", notes=f"New consent {consent}")
        return 200, True

    def api_consentmanager_unlink_consent(self, p: dict[str, str], *, admin: bool
                                          ) -> tuple[int, Any]:
        consent, resource = int(p.get("consent") or 0), int(p.get("resource") or 0)
        if (consent, resource) not in self.links:
            return 200, False
        self.links.discard((consent, resource))
        self._log(resource, "", notes=f"Unlinked consent {consent}")
        return 200, True

    def api_consentmanager_delete_consent(self, p: dict[str, str], *, admin: bool
                                          ) -> tuple[int, Any]:
        ref = int(p.get("ref") or 0)
        if self.consents.pop(ref, None) is None:
            return 200, False
        self.links = {(c, r) for c, r in self.links if c != ref}  # its links go with it
        return 200, True
