"""Consentry's error hierarchy: one tree, translated from library errors at the boundary.

    ConsentryError
    ├── ConfigError            a setting is missing or wrong (names file, key, problem)
    ├── KeyMaterialError       key-encryption key missing, malformed, or not the vault's
    ├── VaultError             the template store is unreadable or inconsistent
    ├── StateError             the state database is unusable or an audit chain is broken
    │   └── AuditChainError    `audit verify` found an edited, reordered or cut log
    ├── ConsentError           consent operation refused (no biometric grant, unknown subject)
    ├── EnrollmentError        a reference photo has zero or several faces
    ├── AssetError             one asset failed; carries the asset's name; the batch goes on
    │   ├── ImageError         undecodable, truncated, not an image, too large (bomb guard)
    │   └── MetadataError      exiftool could not read or write the asset's XMP
    ├── EngineError            the face models cannot be loaded (a broken install, never exit 0)
    └── ConnectorError         a platform failed; carries the connector name
        ├── AuthError          credentials refused: stop the connector, do not retry
        └── UnavailableError   outage after retries: try again later

Messages never carry a token, a vector or a person's name (DESIGN §6).
"""

from __future__ import annotations


class ConsentryError(Exception):
    """Base of every error Consentry raises on purpose."""


class ConfigError(ConsentryError):
    def __init__(self, problem: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file, self.key, self.problem = file, key, problem
        where = " ".join(p for p in (file and f"{file}:", key and f"[{key}]") if p)
        super().__init__(f"{where} {problem}".strip())

    def __reduce__(self):
        return _config_error, (type(self), self.problem, self.file, self.key)


def _config_error(cls: type[ConfigError], problem: str, file: str | None,
                  key: str | None) -> ConfigError:
    return cls(problem, file=file, key=key)


class KeyMaterialError(ConsentryError):
    pass


class VaultError(ConsentryError):
    pass


class StateError(ConsentryError):
    pass


class AuditChainError(StateError):
    pass


class ConsentError(ConsentryError):
    pass


class EnrollmentError(ConsentryError):
    pass


class AssetError(ConsentryError):
    """One asset could not be processed; `asset` names it, `cause` says why."""

    def __init__(self, asset: str, cause: str) -> None:
        self.asset, self.cause = asset, cause
        super().__init__(f"{asset}: {cause}")

    def __reduce__(self):  # pickled back from an analysis worker process
        return type(self), (self.asset, self.cause)


class ImageError(AssetError):
    pass


class MetadataError(AssetError):
    pass


class EngineError(ConsentryError):
    pass


class ConnectorError(ConsentryError):
    def __init__(self, connector: str, message: str) -> None:
        self.connector, self.message = connector, message
        super().__init__(f"{connector}: {message}")

    def __reduce__(self):
        return type(self), (self.connector, self.message)


class AuthError(ConnectorError):
    pass


class UnavailableError(ConnectorError):
    pass
