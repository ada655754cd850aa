"""FakeNextcloudServer: the subset of Nextcloud the connector speaks, stateful, on 127.0.0.1.

Basic auth with an app password (401 with a Sabre body), WebDAV PROPFIND (Depth 0/1; infinity
refused like many servers do) with namespaced, URL-encoded multi-status, SEARCH with paging and
the real quirks (unparsable date literal → 0, `nc:upload_time` 0 unless used in the where
clause), GET/PUT with etags and If-Match → 412, MOVE/DELETE, previews, system tags with
201/409/404, OCS webhook registration. Fault knobs: `fail_rate` (503 / 429 + Retry-After),
`timeout_rate` (answers after the client gave up, but still does the work), `fail_next`,
`truncate` (cut XML bodies), `password` (change it → 401), `sticky_etag` (Nextcloud keeps the
etag for two writes in one second), `after_get` / `before_put` (another client's edit).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

from defusedxml import ElementTree
from PIL import Image, ImageOps

from tests.fakes.local import LoopbackServer

D, OC, NC = "DAV:", "http://owncloud.org/ns", "http://nextcloud.org/ns"
SEARCHDAV = "https://github.com/icewind1991/SearchDAV/ns"
OCS_WEBHOOKS = "/ocs/v2.php/apps/webhook_listeners/api/v1/webhooks"
SABRE_401 = (b'<?xml version="1.0" encoding="utf-8"?><d:error xmlns:d="DAV:" '
             b'xmlns:s="http://sabredav.org/ns"><s:exception>Sabre\\DAV\\Exception\\'
             b'NotAuthenticated</s:exception><s:message>No public access to this resource., '
             b'Username or password was incorrect</s:message></d:error>')


@dataclass
class FakeFile:
    fileid: int
    data: bytes
    etag: str
    mtime: int
    upload_time: int
    mime: str
    size_meta: tuple[int, int] | None = None
    orientation: int | None = None


def _mime(name: str) -> str:
    ext = name.rpartition(".")[2].lower()
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png",
            "xmp": "application/rdf+xml"}.get(ext, "application/octet-stream")


@dataclass
class Knobs:
    fail_rate: float = 0.0
    timeout_rate: float = 0.0
    timeout_sleep: float = 0.3
    retry_after: str = "0"
    fail_next: list[int] = field(default_factory=list)
    truncate: dict[str, int] = field(default_factory=dict)  # method → bodies left to cut
    previews: bool = True
    photo_metadata: bool = True
    checksums: bool = False
    sticky_etag: bool = False
    after_get: dict[str, bytes] = field(default_factory=dict)
    before_put: dict[str, bytes] = field(default_factory=dict)


class FakeNextcloudServer(LoopbackServer):
    def __init__(self, user: str = "admin", password: str = "app-secret-0001",
                 folders: tuple[str, ...] = ("Photos",), *, seed: int = 7) -> None:
        self.user, self.password = user, password
        self.files: dict[str, FakeFile] = {}
        self.folders: set[str] = {""} | set(folders)
        self.tags: dict[int, str] = {}
        self.relations: dict[int, set[int]] = {}
        self.webhooks: list[dict] = []
        self.log: list[tuple[str, str]] = []
        self.raw: list[tuple[str, str, dict[str, str]]] = []  # method, raw target, headers
        self.knobs = Knobs()
        self.rng = random.Random(seed)
        self.now = float(int(time.time()))
        self.lock = threading.RLock()
        self._ids = 100
        self._etags = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # No Nagle: small request/response pieces must not wait for delayed ACKs.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def date_time_string(self, timestamp=None):
                return formatdate(outer.now, usegmt=True)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    outer._serve(self, body)

            do_GET = do_PUT = do_POST = do_DELETE = do_PROPFIND = do_SEARCH = do_MOVE = _handle

            def log_message(self, *args):
                pass

        self._listen(Handler)

    # -- state helpers (what another client would do) ---------------------------------
    def advance(self, seconds: float) -> None:
        self.now += seconds

    def _new_etag(self) -> str:
        self._etags += 1
        return hashlib.md5(f"{self._etags}".encode()).hexdigest()[:13]

    def add_file(self, rel: str, data: bytes, *, mtime: int | None = None) -> FakeFile:
        """Upload as a client would (parents created); replacing keeps the fileid."""
        with self.lock:
            parts = rel.split("/")
            for i in range(1, len(parts)):
                self.folders.add("/".join(parts[:i]))
            old = self.files.get(rel)
            f = FakeFile(fileid=old.fileid if old else self._next_id(), data=data,
                         etag=old.etag if old and self.knobs.sticky_etag else self._new_etag(),
                         mtime=int(self.now if mtime is None else mtime),
                         upload_time=old.upload_time if old else int(self.now), mime=_mime(rel))
            if f.mime.startswith("image/"):
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        f.size_meta = im.size
                        f.orientation = im.getexif().get(0x0112, 1)
                except OSError:
                    pass
            self.files[rel] = f
            return f

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def by_id(self, fileid: int) -> tuple[str, FakeFile] | None:
        return next(((p, f) for p, f in self.files.items() if f.fileid == fileid), None)

    def tags_of(self, rel: str) -> list[str]:
        return sorted(self.tags[t] for t in self.relations.get(self.files[rel].fileid, ()))

    def rename(self, source: str, target: str) -> None:
        with self.lock:
            self.files[target] = self.files.pop(source)

    def delete(self, rel: str) -> FakeFile:
        with self.lock:
            f = self.files.pop(rel)
            self.relations.pop(f.fileid, None)
            return f

    def webhook(self, event: str, rel: str | None = None, *, source: str | None = None,
                secret: str = "", header: str = "X-Consentry-Secret",
                fileid: int | None = None) -> tuple[dict[str, str], bytes]:
        """Headers and body of a webhook_listeners delivery for `event` (Created, Written, …)."""
        def node(path: str, fid: int | None) -> dict:
            n: dict = {"path": f"/{self.user}/files/{path}"}
            if fid is not None:
                n["id"] = fid
            return n
        cls = f"OCP\\Files\\Events\\Node\\Node{event}Event"
        if event == "Renamed":
            assert source and rel
            ev = {"class": cls, "source": node(source, fileid), "target": node(rel, fileid)}
        else:
            assert rel
            fid = fileid if fileid is not None or event == "Deleted" else self.files[rel].fileid
            ev = {"class": cls, "node": node(rel, fid)}
        body = {"event": ev, "user": {"uid": self.user, "displayName": self.user},
                "time": int(self.now), "authentication": []}
        headers = {header: secret, "User-Agent": "Nextcloud-Server-Crawler/33.0.2",
                   "Content-Type": "application/json"}
        return headers, json.dumps(body).encode()

    # -- request handling ---------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        target = urlsplit(h.path)
        path = unquote(target.path)
        with self.lock:
            self.raw.append((h.command, h.path, dict(h.headers)))
            fault = self._fault()
        if fault == "timeout":
            time.sleep(self.knobs.timeout_sleep)  # the client has given up; the work still runs
        elif fault is not None:
            headers = {"Retry-After": self.knobs.retry_after} if fault == 429 else {}
            return self._send(h, fault, b"busy", headers)
        if not self._authorised(h):
            return self._send(h, 401, SABRE_401, {"Content-Type": "application/xml",
                                                  "WWW-Authenticate": 'Basic realm="Nextcloud"'})
        with self.lock:
            self.log.append((h.command, path + (f"?{target.query}" if target.query else "")))
            status, payload, headers = self._route(h, path, parse_qs(target.query), body)
        if (status == 207 and self.knobs.truncate.get(h.command, 0) > 0):
            self.knobs.truncate[h.command] -= 1
            payload = payload[: len(payload) // 2]
        self._send(h, status, payload, headers)

    def _fault(self) -> int | str | None:
        k = self.knobs
        if k.fail_next:
            return k.fail_next.pop(0)
        roll = self.rng.random()
        if roll < k.timeout_rate:
            return "timeout"
        if roll < k.timeout_rate + k.fail_rate:
            return 429 if self.rng.random() < 0.25 else 503
        return None

    def _authorised(self, h: BaseHTTPRequestHandler) -> bool:
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return user == self.user and password == self.password

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _route(self, h, path: str, query: dict, body: bytes) -> tuple[int, bytes, dict]:
        files_prefix = f"/remote.php/dav/files/{self.user}"
        if path.startswith(files_prefix):
            return self._files(h, path[len(files_prefix):].strip("/"), body)
        if path.rstrip("/") == "/remote.php/dav" and h.command == "SEARCH":
            return self._search(body)
        if path.rstrip("/") == "/remote.php/dav/systemtags":
            return self._systemtags(h, body)
        if path.startswith("/remote.php/dav/systemtags-relations/files/"):
            return self._relations(h, path.rstrip("/").split("/")[5:])
        if path == "/index.php/core/preview" and h.command == "GET":
            return self._preview(query)
        if path.startswith(OCS_WEBHOOKS):
            return self._ocs(h, body)
        return 404, b"not found", {}

    # -- files ---------------------------------------------------------------------------
    def _href(self, rel: str, collection: bool) -> str:
        href = f"/remote.php/dav/files/{self.user}/{rel}".rstrip("/")
        return quote(href + ("/" if collection else ""), safe="/")

    def _entry(self, rel: str, *, upload_time: bool = True) -> str:
        if rel in self.folders:
            found = ("<d:resourcetype><d:collection/></d:resourcetype>"
                     f"<d:getetag>\"dir{abs(hash(rel)) % 10**8}\"</d:getetag>")
            return self._response(self._href(rel, True), found, "<oc:fileid/><d:getcontenttype/>")
        f = self.files[rel]
        found = (f"<d:getetag>&quot;{f.etag}&quot;</d:getetag>"
                 f"<d:getlastmodified>{formatdate(f.mtime, usegmt=True)}</d:getlastmodified>"
                 f"<d:getcontenttype>{f.mime}</d:getcontenttype>"
                 f"<d:getcontentlength>{len(f.data)}</d:getcontentlength><d:resourcetype/>"
                 f"<oc:fileid>{f.fileid}</oc:fileid><oc:size>{len(f.data)}</oc:size>"
                 f"<nc:upload_time>{f.upload_time if upload_time else 0}</nc:upload_time>")
        missing = ""
        if self.knobs.checksums:
            found += f"<oc:checksums><oc:checksum>SHA1:{hashlib.sha1(f.data).hexdigest()} " \
                     f"MD5:{hashlib.md5(f.data).hexdigest()}</oc:checksum></oc:checksums>"
        else:
            found += "<oc:checksums/>"
        if self.knobs.photo_metadata and f.size_meta:
            width, height = f.size_meta
            size = json.dumps({"width": width, "height": height})
            found += (f"<nc:metadata-photos-size>{escape(size)}"
                      f"</nc:metadata-photos-size><nc:metadata-photos-ifd0>"
                      f"{escape(json.dumps({'Orientation': f.orientation or 1}))}"
                      "</nc:metadata-photos-ifd0>")
        else:
            missing = "<nc:metadata-photos-size/><nc:metadata-photos-ifd0/>"
        return self._response(self._href(rel, False), found, missing)

    @staticmethod
    def _response(href: str, found: str, missing: str = "") -> str:
        out = (f"<d:response><d:href>{href}</d:href><d:propstat><d:prop>{found}</d:prop>"
               "<d:status>HTTP/1.1 200 OK</d:status></d:propstat>")
        if missing:
            out += (f"<d:propstat><d:prop>{missing}</d:prop>"
                    "<d:status>HTTP/1.1 404 Not Found</d:status></d:propstat>")
        return out + "</d:response>"

    @staticmethod
    def _multistatus(responses: list[str]) -> tuple[int, bytes, dict]:
        xml = (f'<?xml version="1.0"?>\n<d:multistatus xmlns:d="{D}" xmlns:s="http://sabredav.'
               f'org/ns" xmlns:oc="{OC}" xmlns:nc="{NC}">' + "".join(responses)
               + "</d:multistatus>")
        return 207, xml.encode(), {"Content-Type": "application/xml; charset=utf-8"}

    def _files(self, h, rel: str, body: bytes) -> tuple[int, bytes, dict]:
        cmd = h.command
        if cmd == "PROPFIND":
            depth = h.headers.get("Depth", "infinity")
            if depth not in ("0", "1"):
                return 403, b"Depth infinity is disabled", {}
            if rel not in self.folders and rel not in self.files:
                return 404, b"", {}
            entries = [self._entry(rel)]
            if depth == "1" and rel in self.folders:
                prefix = rel + "/" if rel else ""
                children = sorted({p for p in self.folders | set(self.files)
                                   if p.startswith(prefix) and p != rel
                                   and "/" not in p[len(prefix):]})
                entries += [self._entry(c) for c in children]
            return self._multistatus(entries)
        if cmd == "GET":
            f = self.files.get(rel)
            if f is None:
                return 404, b"", {}
            data, etag = f.data, f.etag
            if rel in self.knobs.after_get:
                self.add_file(rel, self.knobs.after_get.pop(rel))
            return 200, data, {"ETag": f'"{etag}"', "Content-Type": f.mime}
        if cmd == "PUT":
            if rel in self.knobs.before_put:
                self.add_file(rel, self.knobs.before_put.pop(rel))
            parent = rel.rpartition("/")[0]
            if parent not in self.folders:
                return 409, b"parent missing", {}
            old = self.files.get(rel)
            match = h.headers.get("If-Match")
            if match is not None and (old is None or match.strip('"') != old.etag):
                return 412, b"", {}
            if h.headers.get("If-None-Match") == "*" and old is not None:
                return 412, b"", {}
            mtime = h.headers.get("X-OC-MTime")
            f = self.add_file(rel, body, mtime=int(mtime) if mtime else None)
            return (204 if old else 201), b"", {"ETag": f'"{f.etag}"', "OC-FileId": str(f.fileid)}
        if cmd == "DELETE":
            if rel not in self.files:
                return 404, b"", {}
            self.delete(rel)
            return 204, b"", {}
        if cmd == "MOVE":
            if rel not in self.files:
                return 404, b"", {}
            dest = unquote(urlsplit(h.headers["Destination"]).path)
            self.rename(rel, dest.split(f"/remote.php/dav/files/{self.user}/", 1)[1])
            return 201, b"", {}
        return 405, b"", {}

    def _search(self, body: bytes) -> tuple[int, bytes, dict]:
        root = ElementTree.fromstring(body)
        scope = root.findtext(f".//{{{D}}}scope/{{{D}}}href") or ""
        folder = scope.split(f"/files/{self.user}", 1)[1].strip("/")
        gt = root.find(f".//{{{D}}}where//{{{D}}}gt")
        prop = gt.find(f"{{{D}}}prop")[0].tag
        literal = gt.findtext(f"{{{D}}}literal") or ""
        limit = int(root.findtext(f".//{{{D}}}nresults") or 10**9)
        first = int(root.findtext(f".//{{{SEARCHDAV}}}firstresult") or 0)
        since = _parse_literal(literal)
        key = "upload_time" if prop == f"{{{NC}}}upload_time" else "mtime"
        hits = sorted(((p, f) for p, f in self.files.items()
                       if (not folder or p.startswith(folder + "/"))
                       and f.mime.startswith("image/") and getattr(f, key) > since),
                      key=lambda pf: (pf[1].mtime, pf[1].fileid))
        page = hits[first:first + limit]
        return self._multistatus([self._entry(p, upload_time=key == "upload_time")
                                  for p, _ in page])

    def _preview(self, query: dict) -> tuple[int, bytes, dict]:
        hit = self.by_id(int(query.get("fileId", ["0"])[0]))
        if hit is None or not self.knobs.previews or not hit[1].mime.startswith("image/"):
            return 404, b"", {}
        size = int(query.get("x", ["256"])[0]), int(query.get("y", ["256"])[0])
        with Image.open(io.BytesIO(hit[1].data)) as im:
            upright = ImageOps.exif_transpose(im).convert("RGB")
        upright.thumbnail(size)
        out = io.BytesIO()
        upright.save(out, "JPEG", quality=90)
        return 200, out.getvalue(), {"Content-Type": "image/jpeg"}

    # -- system tags ---------------------------------------------------------------------
    def _tag_entry(self, tag_id: int, base: str) -> str:
        return self._response(f"{base}{tag_id}", f"<oc:id>{tag_id}</oc:id><oc:display-name>"
                              f"{escape(self.tags[tag_id])}</oc:display-name><oc:user-visible>"
                              "true</oc:user-visible><oc:user-assignable>true"
                              "</oc:user-assignable>")

    def _systemtags(self, h, body: bytes) -> tuple[int, bytes, dict]:
        base = "/remote.php/dav/systemtags/"
        if h.command == "PROPFIND":
            return self._multistatus([self._response(base, "<d:resourcetype><d:collection/>"
                                                           "</d:resourcetype>")]
                                     + [self._tag_entry(t, base) for t in sorted(self.tags)])
        if h.command == "POST":
            name = json.loads(body)["name"]
            if name in self.tags.values():
                return 409, b"tag exists", {}
            tag_id = max(self.tags, default=0) + 1
            self.tags[tag_id] = name
            return 201, b"", {"Content-Location": f"{base}{tag_id}"}
        return 405, b"", {}

    def _relations(self, h, parts: list[str]) -> tuple[int, bytes, dict]:
        fileid = int(parts[0])
        if self.by_id(fileid) is None:
            return 404, b"", {}
        assigned = self.relations.setdefault(fileid, set())
        base = f"/remote.php/dav/systemtags-relations/files/{fileid}/"
        if len(parts) == 1 and h.command == "PROPFIND":
            return self._multistatus([self._response(base, "<d:resourcetype><d:collection/>"
                                                           "</d:resourcetype>")]
                                     + [self._tag_entry(t, base) for t in sorted(assigned)])
        tag_id = int(parts[1])
        if tag_id not in self.tags:
            return 404, b"", {}
        if h.command == "PUT":
            if tag_id in assigned:
                return 409, b"", {}
            assigned.add(tag_id)
            return 201, b"", {}
        if h.command == "DELETE":
            if tag_id not in assigned:
                return 404, b"", {}
            assigned.discard(tag_id)
            return 204, b"", {}
        return 405, b"", {}

    # -- OCS webhooks --------------------------------------------------------------------
    def _ocs(self, h, body: bytes) -> tuple[int, bytes, dict]:
        if h.headers.get("OCS-APIRequest") != "true":
            return 412, b'{"message":"CSRF check failed"}', {}

        def answer(data) -> tuple[int, bytes, dict]:
            return 200, json.dumps({"ocs": {"meta": {"status": "ok", "statuscode": 200},
                                            "data": data}}).encode(), \
                {"Content-Type": "application/json"}
        if h.command == "GET":
            return answer(self.webhooks)
        if h.command == "POST":
            hook = {"id": len(self.webhooks) + 1, "userId": self.user, **json.loads(body)}
            self.webhooks.append(hook)
            return answer(hook)
        return 405, b"", {}


def _parse_literal(literal: str) -> int:
    """As Nextcloud does: unix seconds or ISO 8601; anything else silently becomes 0."""
    if literal.isdigit():
        return int(literal)
    try:
        when = datetime.fromisoformat(literal)
    except ValueError:
        return 0
    return int(when.timestamp()) if when.tzinfo else int(when.replace(tzinfo=UTC).timestamp())
