"""ResourceSpace's signed API, with its inconsistent answers normalised into typed results.

Every call is `sign = sha256_hex(private_key + query)` over the exact URL-encoded query. The
query and the signature travel in a POST form (`query`, `sign`), never in a URL: request
libraries log URLs at debug level, and neither the key nor a signature may reach a log.

ResourceSpace answers the same idea in many shapes: `1`, `"2"`, `true`, `false`, `"FAILED: …"`,
JSend `{"status": "success", "data": {...}}`, and an `Invalid signature` body with status 401
(recent) or 200 (older). `ResourceSpaceApi.call` turns them into a Python value or one of:

    ConnectorError
    ├── AuthError          bad key or user: names user and URL, never the key
    ├── UnavailableError   outage after retries, or a truncated answer
    └── RsCallError        the function answered false / FAILED / a JSend failure
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from pydantic import SecretStr

from connectors.secrets import LazySecret
from plugin.errors import AssetError, AuthError, ConnectorError, UnavailableError
from plugin.http import HttpClient

log = logging.getLogger(__name__)

# Functions that change nothing, or set a value absolutely: safe to send twice.
IDEMPOTENT = frozenset({
    "do_search", "resource_log_last_rows", "get_resource_data", "get_resource_field_data",
    "get_resource_path", "get_resource_all_image_sizes", "update_field", "get_node_id",
    "set_node", "consentmanager_get_consent", "consentmanager_get_consents",
    "consentmanager_get_all_consents",
})


class RsCallError(ConnectorError):
    """A ResourceSpace function refused the call (false, `FAILED…`, JSend fail/error)."""

    def __init__(self, connector: str, function: str, detail: str) -> None:
        self.function, self.detail = function, detail
        super().__init__(connector, f"{function}: {detail}")


_ACCESS_KEY = re.compile(r"(access_key=)[^&\s\"']+")


class RedactAccessKeys(logging.Filter):
    """urllib3 logs every request line at debug level; download URLs carry an access key
    (a 24 h credential for the file), so it is masked before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and any("access_key=" in str(a) for a in record.args):
            record.args = tuple(_ACCESS_KEY.sub(r"\1***", str(a)) if isinstance(a, str) else a
                                for a in record.args)
        return True


def redact_urllib3() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, RedactAccessKeys) for f in logger.filters):
        logger.addFilter(RedactAccessKeys())


def sign(key: str, query: str) -> str:
    return hashlib.sha256((key + query).encode()).hexdigest()


def as_int(value: Any) -> int | None:
    """An id from any of ResourceSpace's shapes: 7, "7", 7.0; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _failure(value: Any) -> str | None:
    """Why an answer is a refusal, or None when it is a result."""
    if value is False:
        return "returned false"
    if isinstance(value, str) and value.strip().upper().startswith("FAILED"):
        return value.strip()[:200]
    if isinstance(value, dict) and value.get("status") in ("fail", "error"):
        data = value.get("data") or value.get("message") or ""
        text = data if isinstance(data, str) else json.dumps(data)[:200]
        return f"{value['status']}: {text}"
    return None


def _unwrap(value: Any) -> Any:
    """JSend success → its data ({"ref": 88} → 88 when that is all it holds)."""
    if isinstance(value, dict) and value.get("status") == "success" and "data" in value:
        data = value["data"]
        if isinstance(data, dict) and set(data) == {"ref"}:
            return data["ref"]
        return data
    return value


class ResourceSpaceApi:
    """One user's signed access to one ResourceSpace; all traffic goes through `http`."""

    def __init__(self, http: HttpClient, *, user: str, key: SecretStr | LazySecret) -> None:
        self.http, self.user, self._key = http, user, key
        redact_urllib3()

    @property
    def where(self) -> str:
        return f"user {self.user!r} at {self.http.base_url}"

    def _refused(self) -> AuthError:
        return AuthError(self.http.connector,
                         f"ResourceSpace refused the API signature of {self.where}: check the "
                         "user name and its private API key (Admin → Users → user)")

    def call(self, function: str, **params: Any) -> Any:
        """Call `function` with named parameters; return the normalised answer."""
        pairs = [("user", self.user), ("function", function)]
        pairs += [(k, _param(v)) for k, v in params.items()]
        query = urlencode(pairs)
        form = {"query": query, "sign": sign(self._key.get_secret_value(), query)}
        try:
            response = self.http.request("POST", "/api/", data=form, ok=(401,),
                                         idempotent=function in IDEMPOTENT)
        except AuthError as err:  # 403: the key is fine, the user lacks a permission
            raise AuthError(self.http.connector, f"{function}: ResourceSpace denied it to "
                                                 f"{self.where} (permission)") from err
        text = response.text
        if response.status_code == 401 or text.strip().lower().startswith("invalid signature"):
            raise self._refused()
        try:
            value = json.loads(text)
        except ValueError as err:
            if text.strip().upper().startswith("FAILED"):
                raise RsCallError(self.http.connector, function, text.strip()[:200]) from err
            raise UnavailableError(self.http.connector,
                                   f"{function}: answer is not JSON (truncated?)") from err
        if (why := _failure(value)) is not None:
            raise RsCallError(self.http.connector, function, why)
        return _unwrap(value)

    def call_int(self, function: str, **params: Any) -> int:
        value = self.call(function, **params)
        ref = as_int(value)
        if ref is None:
            raise RsCallError(self.http.connector, function, "answer is not an id")
        return ref

    def call_rows(self, function: str, **params: Any) -> list[dict[str, Any]]:
        """A list of rows; ResourceSpace sends `[]`, `{}` or `""` for none."""
        value = self.call(function, **params)
        if value in ("", None, {}):
            return []
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise RsCallError(self.http.connector, function, "answer is not a list of rows")
        return value

    def download(self, url: str, target: Any, *, asset: str) -> None:
        """Fetch a `get_resource_path` URL to `target`; an HTML answer (the login page a
        missing or stale access key gives, with status 200) is a per-asset error."""
        # The access key rides in the URL's query: keep it out of error messages (params).
        base, _, query = url.partition("?")
        response = self.http.request("GET", base, params=parse_qsl(query), stream=True)
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind in ("text/html", "application/xhtml+xml"):
            response.close()
            raise AssetError(asset, "ResourceSpace answered a web page instead of the file "
                                    "(download link refused: access key missing or expired)")
        with response, open(target, "wb") as handle:
            for block in response.iter_content(1 << 16):
                handle.write(block)


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)
