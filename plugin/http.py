"""The one HTTP session of a connector, and the one place that decides what is retried.

Every call has a timeout; TLS is verified; connection errors, timeouts, 429 (honouring
Retry-After) and 5xx are retried with backoff; 4xx never is. 401/403 become `AuthError` (stop the
connector, no retry storm); an outage that outlasts the retries becomes `UnavailableError`.
Credentials live in the session's auth or headers, never in a URL, a log line or a message.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from plugin.errors import AuthError, ConnectorError, UnavailableError

log = logging.getLogger(__name__)

USER_AGENT = "consentry/0.1 (+https://consentry.org)"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    initial: float = 0.5
    maximum: float = 30.0
    # Never sleep longer than this for a Retry-After, whatever the server asks.
    max_retry_after: float = 120.0


class RetryableStatus(Exception):
    """A response worth another try (429 / 5xx); carries the response for Retry-After."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        super().__init__(f"HTTP {response.status_code}")


def build_session(*, auth: Any = None, headers: Mapping[str, str] | None = None,
                  verify: bool | str = True) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    session.headers.update(headers or {})
    session.auth = auth
    session.verify = verify
    return session


def retry_after_seconds(response: requests.Response, *, now: datetime | None = None
                        ) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _retryable(err: BaseException) -> bool:
    return isinstance(err, RetryableStatus | requests.ConnectionError | requests.Timeout)


class HttpClient:
    """A connector's session plus the retry policy; `request` is the only way out."""

    def __init__(self, connector: str, session: requests.Session, *, base_url: str,
                 timeout: float = 30.0, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.connector = connector
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.policy = policy or RetryPolicy()
        self._sleep = sleep

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def _wait(self, state: RetryCallState) -> float:
        backoff = wait_exponential_jitter(multiplier=self.policy.initial, max=self.policy.maximum)
        delay = backoff(state)
        err = state.outcome.exception() if state.outcome else None
        if isinstance(err, RetryableStatus):
            asked = retry_after_seconds(err.response)
            if asked is not None:
                delay = min(asked, self.policy.max_retry_after)
        return delay

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (),
                idempotent: bool | None = None, **kwargs: Any) -> requests.Response:
        """Send with retries; return the response for 2xx/3xx or a status in `ok`.

        POST is not retried unless the caller says it is idempotent (or has checked that a
        failed attempt did not happen): a retried create must not create twice.

        Raises AuthError on 401/403, UnavailableError when retries are exhausted, and
        ConnectorError for any other 4xx (with the method, the path and the status only).
        """
        kwargs.setdefault("timeout", self.timeout)
        url = self.url(path)
        if idempotent is None:
            idempotent = method.upper() != "POST"
        attempts = self.policy.attempts if idempotent else 1
        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=self._wait,
            retry=retry_if_exception(_retryable),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    response = self.session.request(method, url, **kwargs)
                    if response.status_code in RETRY_STATUS and response.status_code not in ok:
                        raise RetryableStatus(response)
        except RetryableStatus as err:
            raise UnavailableError(
                self.connector, f"{method} {path}: HTTP {err.response.status_code} after "
                f"{attempts} attempt(s)") from err
        except (requests.ConnectionError, requests.Timeout) as err:
            raise UnavailableError(
                self.connector, f"{method} {path}: {type(err).__name__} after "
                f"{attempts} attempt(s)") from err
        status = response.status_code
        if status in ok or status < 400:
            return response
        if status in (401, 403):
            raise AuthError(self.connector, f"{method} {path}: HTTP {status}: credentials "
                                            "refused or missing permission")
        raise ConnectorError(self.connector, f"{method} {path}: HTTP {status}")


__all__ = ["HttpClient", "RetryPolicy", "build_session", "retry_after_seconds"]
