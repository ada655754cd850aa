"""The shared HTTP client against a real server on 127.0.0.1: what is retried, what is not."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from plugin.errors import AuthError, ConnectorError, UnavailableError
from plugin.http import HttpClient, RetryPolicy, build_session

SECRET = "s3cr3t-app-password"


class Server:
    """Answers from a script of (status, headers) per path; records every request."""

    def __init__(self):
        self.script: dict[str, list[tuple[int, dict]]] = {}
        self.log: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                outer.log.append((self.command, self.path, self.headers.get("Authorization")))
                steps = outer.script.get(self.path) or [(200, {})]
                status, headers = steps.pop(0) if len(steps) > 1 else steps[0]
                body = b"ok"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def client(server, sleeps=None, attempts=4):
    session = build_session(auth=("admin", SECRET))
    return HttpClient("nc", session, base_url=server.url, timeout=5,
                      policy=RetryPolicy(attempts=attempts, initial=0.01, maximum=0.05),
                      sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_retries_5xx_then_succeeds(server):
    server.script["/x"] = [(503, {}), (502, {}), (200, {})]
    assert client(server).request("GET", "/x").status_code == 200
    assert [p for _, p, _ in server.log] == ["/x"] * 3


def test_honours_retry_after(server):
    server.script["/x"] = [(429, {"Retry-After": "7"}), (200, {})]
    sleeps = []
    client(server, sleeps).request("GET", "/x")
    assert sleeps == [7.0]


def test_gives_up_as_unavailable(server):
    server.script["/x"] = [(503, {})]
    with pytest.raises(UnavailableError, match=r"HTTP 503 after 4 attempt\(s\)"):
        client(server).request("GET", "/x")
    assert len(server.log) == 4


def test_auth_errors_are_not_retried(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.script["/x"] = [(401, {})]
    with pytest.raises(AuthError) as err:
        client(server).request("GET", "/x")
    assert len(server.log) == 1
    assert SECRET not in str(err.value) and SECRET not in caplog.text


def test_other_4xx_are_not_retried(server):
    server.script["/x"] = [(404, {})]
    with pytest.raises(ConnectorError, match="GET /x: HTTP 404"):
        client(server).request("GET", "/x")
    assert len(server.log) == 1
    assert client(server).request("GET", "/x", ok=(404,)).status_code == 404


def test_post_is_not_retried_unless_idempotent(server):
    server.script["/x"] = [(503, {}), (200, {})]
    with pytest.raises(UnavailableError):
        client(server).request("POST", "/x")
    assert len(server.log) == 1
    server.script["/x"] = [(503, {}), (200, {})]
    assert client(server).request("POST", "/x", idempotent=True).status_code == 200


def test_connection_refused_is_unavailable(server):
    url = server.url
    server.close()
    c = HttpClient("nc", requests.Session(), base_url=url, timeout=1,
                   policy=RetryPolicy(attempts=2, initial=0.01), sleep=lambda s: None)
    with pytest.raises(UnavailableError, match=r"ConnectionError after 2 attempt\(s\)"):
        c.request("GET", "/x")
    server.httpd = type("Dummy", (), {"shutdown": lambda self: None,
                                      "server_close": lambda self: None})()


def test_credentials_travel_in_headers_not_urls(server):
    client(server).request("GET", "/x")
    _method, path, auth = server.log[0]
    assert SECRET not in path and auth.startswith("Basic ")
