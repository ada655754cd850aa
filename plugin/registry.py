"""The one place where plugin/ reaches connectors: kind -> "module:Class", imported lazily.

Only the kinds an admin configures are imported, so a broken optional connector cannot stop
the others, and importing plugin/ has no side effects.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from plugin.errors import ConfigError

KINDS: dict[str, str] = {
    "folder": "connectors.folder:FolderConnector",
    "nextcloud": "connectors.nextcloud:NextcloudConnector",
    "immich": "connectors.immich:ImmichConnector",
    "resourcespace": "connectors.resourcespace:ResourceSpaceConnector",
}


def connector_class(kind: str) -> Any:
    target = KINDS.get(kind)
    if target is None:
        raise ConfigError(f"unknown connector kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"connector kind {kind!r} is not available in this version") from err
    return getattr(module, attr)


def build(raw: Mapping[str, Any], *, file: str, index: int, context: Any) -> Any:
    """Validate one `[[connectors]]` table with its kind's config model and build it."""
    key = f"connectors[{index}]"
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise ConfigError("needs a 'kind'", file=file, key=key)
    cls = connector_class(kind)
    try:
        config = cls.Config.model_validate(dict(raw))
    except ValidationError as err:
        first = err.errors()[0]
        sub = ".".join(str(p) for p in first["loc"])
        raise ConfigError(first["msg"], file=file, key=f"{key}.{sub}") from err
    return cls(config, context)
