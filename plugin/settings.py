"""Settings: one TOML file, overridable from the environment, validated by pydantic.

Environment: `CONSENTRY_CONFIG` names the file (default `./consentry.toml`);
`CONSENTRY_<SECTION>__<KEY>` overrides one key (e.g. `CONSENTRY_MATCHING__THRESHOLD=0.45`);
`CONSENTRY_KEY` carries the key-encryption key instead of the key file (plugin/keys.py).
Relative paths in the file are relative to the file's folder, so a config works from any cwd.
Every error names the file, the key and the problem.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from plugin.errors import ConfigError
from plugin.models import DEFAULT_CHANNELS

CONFIG_ENV = "CONSENTRY_CONFIG"
DEFAULT_CONFIG = Path("consentry.toml")
_ENV_PREFIX = "CONSENTRY_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreSettings(_Section):
    state_url: str = Field(
        "sqlite:///.consentry/state.db",
        description="SQLAlchemy URL of the state database; sqlite paths are relative to the file",
    )
    vault_path: Path = Field(Path(".consentry/vault.db"), description="encrypted template store")
    key_file: Path = Field(
        Path(".consentry/key"),
        description="key-encryption key (0600); CONSENTRY_KEY overrides it",
    )
    audit_head: Path = Field(
        Path(".consentry/audit.head"),
        description="latest audit MAC, kept outside the database so a cut tail is noticed",
    )


class PolicySettings(_Section):
    channels: tuple[str, ...] = Field(
        DEFAULT_CHANNELS, min_length=1, description="publication channel vocabulary"
    )

    @field_validator("channels")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("channels must be distinct")
        return value


class MatchingSettings(_Section):
    threshold: float = Field(0.41, gt=0, lt=1.2, description="max distance to name a face")
    margin: float = Field(0.14, ge=0, lt=1, description="runner-up must be this much further")
    review_threshold: float = Field(
        0.6, gt=0, lt=1.2, description="closer than this but not identified: review"
    )
    templates: Literal["nearest", "mean"] = Field(
        "nearest", description="compare with each reference photo, or with their mean"
    )


class EngineSettings(_Section):
    max_side: int = Field(1600, ge=200, le=8000, description="longest side analysed, pixels")
    max_pixels: int = Field(100_000_000, gt=0, description="decompression-bomb guard")
    upsample: int = Field(1, ge=0, le=2, description="HOG upsampling passes (small faces)")
    jitters: int = Field(1, ge=1, le=100, description="encodings averaged per face (dlib jitter)")
    workers: int = Field(0, ge=0, le=64, description="analysis processes; 0 = one per core")


class XmpSettings(_Section):
    names_as_keywords: bool = Field(
        False, description="also write People|Name keywords (Immich shows them as tags)"
    )


class Settings(_Section):
    store: StoreSettings = Field(default_factory=StoreSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    matching: MatchingSettings = Field(default_factory=MatchingSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    xmp: XmpSettings = Field(default_factory=XmpSettings)
    connectors: list[dict[str, Any]] = Field(
        default_factory=list,
        description="one table per connector: kind, name, and the kind's own keys",
    )
    base_dir: Path = Field(Path("."), exclude=True)

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def state_url(self) -> str:
        url = self.store.state_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
            return prefix + str(self.resolve(Path(url[len(prefix):])).absolute())
        return url

    @property
    def vault_path(self) -> Path:
        return self.resolve(self.store.vault_path)

    @property
    def audit_head(self) -> Path:
        return self.resolve(self.store.audit_head)

    @property
    def key_file(self) -> Path:
        return self.resolve(self.store.key_file)


def _coerce(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, raw in env.items():
        if not name.startswith(_ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(_ENV_PREFIX):].lower().partition("__")
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][key] = _coerce(raw)


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the settings; ConfigError names file, key and problem."""
    env = os.environ if env is None else env
    path = path or config_path(env)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError("no such file (run `consentry init` first)", file=str(path)) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}", file=str(path)) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", file=str(path)) from err
    _apply_env(data, env)
    return validate(data, file=str(path), base_dir=path.parent.absolute())


def validate(data: Mapping[str, Any], *, file: str, base_dir: Path) -> Settings:
    try:
        settings = Settings.model_validate({**data, "base_dir": base_dir})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(first["msg"], file=file, key=key) from err
    m = settings.matching
    if m.review_threshold < m.threshold:
        raise ConfigError(
            "must not be smaller than matching.threshold", file=file,
            key="matching.review_threshold",
        )
    return settings
