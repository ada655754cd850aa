"""Drive the console over real HTTP: uvicorn on 127.0.0.1 (port 0) in a thread + requests.

httpx is not installed, so Starlette's TestClient is not available; a real server is closer to
production anyway (cookies, redirects, multipart). Use:

    with serve(asgi_app) as base_url:
        c = WebClient(base_url)
        c.login("admin", "correct horse battery")
        page = c.get("/admin/")
        c.post_form("/admin/people/new", {"display_name": "..."}, page_path="/admin/people/new")
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
import uvicorn

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextmanager
def serve(asgi_app: Any) -> Iterator[str]:
    """Serve `asgi_app` on 127.0.0.1 in a thread; yields the base URL; stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("console test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no csrf field in the page"
    return match.group(1)


class WebClient:
    """A browser-like session: cookies kept, redirects not followed unless asked."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.http = requests.Session()

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        kw.setdefault("timeout", 30)
        return self.http.get(self.base + path, **kw)

    def post(self, path: str, data: Any = None, **kw: Any) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        kw.setdefault("timeout", 60)
        return self.http.post(self.base + path, data=data, **kw)

    def csrf(self, page_path: str = "/admin/login") -> str:
        page = self.get(page_path)
        assert page.status_code == 200, (page_path, page.status_code)
        return csrf_of(page.text)

    def post_form(self, path: str, data: dict[str, Any], *, page_path: str | None = None,
                  **kw: Any) -> requests.Response:
        """POST with the CSRF token taken from `page_path` (default: the login page)."""
        token = self.csrf(page_path or "/admin/login")
        return self.post(path, {**data, "csrf": token}, **kw)

    def login(self, username: str, password: str) -> requests.Response:
        r = self.post_form("/admin/login", {"username": username, "password": password})
        assert r.status_code == 303, (r.status_code, r.text[:500])
        return r
