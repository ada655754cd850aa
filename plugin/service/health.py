"""Per-connector health: ok, unavailable since T, or auth failed.

Kept in memory for /healthz and /metrics and mirrored into the state database's meta table,
so `consentry status` in another process shows the last poll too. A state change is logged
once ("unavailable", then "recovered"), never on every failed poll, and a log line carries
the connector's configured name and the kind of failure only: never a token, URL or person.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from plugin.state import now_utc

log = logging.getLogger(__name__)

META_PREFIX = "service.connector."


class ConnectorState(StrEnum):
    OK = "ok"
    UNAVAILABLE = "unavailable"
    AUTH_FAILED = "auth_failed"


@dataclass(frozen=True, slots=True)
class Health:
    connector: str
    state: ConnectorState
    since: str  # ISO time of the last state change
    last_poll: str | None = None
    last_ok: str | None = None
    last_found: int = 0  # assets the last poll queued
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Health:
        return cls(**{**data, "state": ConnectorState(data["state"])})


class MetaStore(Protocol):
    """What the board needs of plugin.state.StateStore."""

    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...


class HealthBoard:
    """Thread-safe health of every connector of this process."""

    def __init__(self, connectors: Iterable[str], *, store: MetaStore | None = None,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self._clock = clock
        self._store = store
        self._lock = threading.Lock()
        start = clock().isoformat()
        self._health = {name: Health(name, ConnectorState.OK, since=start)
                        for name in connectors}
        for health in self._health.values():
            self._save(health)

    def names(self) -> list[str]:
        return list(self._health)

    def snapshot(self) -> dict[str, Health]:
        with self._lock:
            return dict(self._health)

    def healthy(self) -> bool:
        return all(h.state is ConnectorState.OK for h in self.snapshot().values())

    def ok(self, name: str, *, polled: bool = False, found: int = 0) -> None:
        now = self._clock().isoformat()
        self._update(name, ConnectorState.OK, "", now, polled=polled, found=found)

    def failed(self, name: str, state: ConnectorState, detail: str, *,
               polled: bool = False) -> None:
        now = self._clock().isoformat()
        self._update(name, state, detail, now, polled=polled, found=0)

    def _update(self, name: str, state: ConnectorState, detail: str, now: str, *,
                polled: bool, found: int) -> None:
        with self._lock:
            old = self._health[name]
            new = replace(old, state=state, detail=detail,
                          since=now if state is not old.state else old.since,
                          last_poll=now if polled else old.last_poll,
                          last_ok=now if state is ConnectorState.OK else old.last_ok,
                          last_found=found if polled else old.last_found)
            self._health[name] = new
        if state is old.state:
            if polled:
                self._save(new)
            return  # a webhook that found the platform as it was: nothing new to store
        if state is ConnectorState.OK:
            log.warning("connector %s recovered", name)
        elif state is ConnectorState.AUTH_FAILED:
            log.error("connector %s: %s; fix them, the service retries", name, detail)
        else:
            log.warning("connector %s unavailable (%s)", name, detail)
        self._save(new)

    def _save(self, health: Health) -> None:
        if self._store is None:
            return
        try:
            self._store.set_meta(META_PREFIX + health.connector, json.dumps(health.as_dict()))
        except Exception:  # health must never take the service down
            log.debug("could not store the health of %s", health.connector, exc_info=True)


def stored_health(store: MetaStore, names: Iterable[str]) -> dict[str, Health | None]:
    """The health another process (`consentry serve`) last stored, per connector."""
    found: dict[str, Health | None] = {}
    for name in names:
        raw = store.get_meta(META_PREFIX + name)
        try:
            found[name] = Health.from_dict(json.loads(raw)) if raw else None
        except (ValueError, TypeError, KeyError):
            found[name] = None
    return found
