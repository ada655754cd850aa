"""Connector secrets from the settings file or, when unset there, from an environment variable.

Read on first use, not when the connector is built: `consentry check`, `consentry status` and
the settings test build connectors without contacting anything or needing the secret.
"""

from __future__ import annotations

import os

import requests
from pydantic import SecretStr

from plugin.errors import ConfigError


class LazySecret:
    """Quacks like pydantic's SecretStr (`get_secret_value`); never shows the value."""

    def __init__(self, value: SecretStr | None, env: str, *, connector: str, key: str) -> None:
        self._value, self._env, self._connector, self._key = value, env, connector, key

    def get_secret_value(self) -> str:
        if self._value is not None:
            return self._value.get_secret_value()
        found = os.environ.get(self._env) if self._env else None
        if not found:
            raise ConfigError(f"no {self._key}: set it, or the environment variable "
                              f"{self._env or '(none named)'}",
                              key=f"connectors.{self._connector}.{self._key}")
        return found

    def __repr__(self) -> str:
        return "LazySecret('**********')"


class HeaderSecret(requests.auth.AuthBase):
    """requests auth that adds a secret header (Immich's x-api-key) on each request."""

    def __init__(self, header: str, secret: LazySecret) -> None:
        self._header, self._secret = header, secret

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers[self._header] = self._secret.get_secret_value()
        return request
