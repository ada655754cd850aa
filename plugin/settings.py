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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

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
    vault_url: str = Field(
        "",
        description="vault on a database server: postgresql+psycopg://user@host/db (a separate "
        "database, or ?schema=vault for a schema of its own); empty = the file at vault_path",
    )
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
    learn_from_review: bool = Field(
        False, description="a face a reviewer confirms becomes one more template of the person "
        "(biometric consent only; at most 3 templates a person)",
    )
    corroborate: bool = Field(
        True, description="after a scan run, faces it named at <= corroborate_anchor vouch for "
        "the same person's unnamed faces of that run (in memory only; plugin/corroboration.py)",
    )
    corroborate_anchor: float = Field(
        0.36, gt=0, lt=1.2, description="max distance at which a named face may vouch"
    )
    corroborate_threshold: float = Field(
        0.43, gt=0, lt=1.2, description="max distance from a vouching face to name a face"
    )


class EngineSettings(_Section):
    max_side: int = Field(1600, ge=200, le=8000, description="longest side analysed, pixels")
    max_pixels: int = Field(100_000_000, gt=0, description="decompression-bomb guard")
    upsample: int = Field(1, ge=0, le=2, description="HOG upsampling passes (small faces)")
    adaptive_upsample: bool = Field(
        True, description="upsample only small images and around small faces (else always)"
    )
    direct_upsample_pixels: int = Field(
        500_000, ge=0, description="analysed images up to this size get the upsampled pass at once"
    )
    small_face_px: int = Field(
        100, ge=0, description="a face found narrower than this triggers the upsampled pass"
    )
    second_pass_area: Literal["regions", "whole"] = Field(
        "regions", description="upsampled pass around the small faces found, or everywhere"
    )
    second_pass_reach: float = Field(
        2.0, gt=0, le=10, description="the upsampled regions reach this many face sizes "
        "around each small face found"
    )
    empty_second_pass_pixels: int = Field(
        1_000_000, ge=0,
        description="when the plain pass finds no face, the upsampled pass runs on the image "
        "reduced to this many pixels (0: full size)",
    )
    min_face_px: int = Field(40, ge=0, description="smaller faces go to review, not encoded")
    min_detector_score: float = Field(
        0.3, description="HOG score below which a face goes to review, not encoded"
    )
    min_sharpness: float = Field(
        40.0, ge=0, description="variance of Laplacian below which a face goes to review"
    )
    jitters: int = Field(1, ge=1, le=100, description="encodings averaged per face (dlib jitter)")
    workers: int = Field(0, ge=0, le=64, description="analysis processes; 0 = one per core")


class XmpSettings(_Section):
    names_as_keywords: bool = Field(
        False, description="also write People|Name keywords (Immich shows them as tags)"
    )


class ConsoleSettings(_Section):
    bind: str = Field("127.0.0.1", description="address of `consentry console`; keep it local, "
                      "put a TLS reverse proxy in front")
    port: int = Field(8470, ge=1, le=65535, description="port of `consentry console`")
    public_url: str = Field("", description="external URL behind the proxy (links in e-mails)")
    session_secret_env: str = Field(
        "", description="environment variable holding the session signing secret; empty = "
        "use secret_file",
    )
    secret_file: Path = Field(
        Path(".consentry/console.secret"),
        description="session signing secret, generated 0600 on first start",
    )
    secure_cookies: bool = Field(
        False, description="mark cookies Secure (set true behind an HTTPS proxy)"
    )
    session_hours: int = Field(8, ge=1, le=168, description="admin session lifetime, hours")
    login_attempts: int = Field(5, ge=1, le=100, description="failed logins per IP+user ...")
    login_window: int = Field(300, ge=10, le=86400, description="... within this many seconds")


class MailSettings(_Section):
    """Outgoing mail (invitations, expiry alerts). Empty `host` = no mail is sent."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    host: str = Field("", description="SMTP server; empty = mail off (links are copied instead)")
    port: int = Field(587, ge=1, le=65535, description="SMTP port")
    from_: str = Field("", alias="from", description="sender address (`from` in the file)")
    starttls: bool = Field(True, description="upgrade the connection with STARTTLS")
    user: str = Field("", description="SMTP login; empty = no login")
    password_env: str = Field(
        "", description="environment variable holding the SMTP password (never the file)"
    )
    timeout: float = Field(20, gt=0, le=300, description="seconds per SMTP operation")
    alerts_to: tuple[str, ...] = Field(
        (), description="addresses that receive expiry alerts (the admin)"
    )


class PortalSettings(_Section):
    """The consent portal for data subjects (issue #9)."""

    invitation_days: int = Field(14, ge=1, le=90, description="an invitation link expires after")
    consent_days: int = Field(
        730, ge=1, le=3650, description="default duration of a consent given in the portal"
    )
    alert_days: int = Field(
        30, ge=1, le=365, description="the sweep alerts the admin this many days before expiry"
    )
    max_upload_bytes: int = Field(
        10_000_000, ge=100_000, le=100_000_000, description="largest reference selfie accepted"
    )


class ServiceSettings(_Section):
    """`consentry serve`: webhook endpoint, health, metrics, pollers, sweep, reaper."""

    bind: str = Field("127.0.0.1", description="address of the webhook/health/metrics endpoint; "
                      "keep it local, put a TLS reverse proxy in front")
    port: int = Field(8460, ge=0, le=65535,
                      description="port of `consentry serve`; 0 = any free port (printed)")
    max_body_bytes: int = Field(1_000_000, ge=1024, le=100_000_000,
                                description="largest webhook body accepted (413 above)")
    poll_interval: float = Field(300, ge=0, description="seconds between polls of a connector "
                                 "without its own poll_interval; 0 = webhooks only")
    sweep_every: float = Field(86400, ge=0, description="seconds between consent sweeps; 0 = never")
    reap_every: float = Field(60, ge=0, description="seconds between queue reaper runs; 0 = never")
    shutdown_grace: float = Field(30, ge=0, le=3600, description="seconds in-flight jobs get to "
                                  "finish on SIGTERM before they are released to the queue")
    console: bool = Field(False, description="also serve the admin console and consent portal "
                          "(else run `consentry console serve`)")


class ConnectorService(BaseModel):
    """Keys any `[[connectors]]` table may carry for `consentry serve`, whatever its kind.

    They are taken out of the table before the kind's own model sees it (those models refuse
    unknown keys), unless the kind declares the key itself (Nextcloud's webhook_secret): then
    both read it, and the kind's default applies here too.
    """

    model_config = ConfigDict(extra="ignore")

    name: str
    poll_interval: float | None = Field(None, ge=0, description="seconds between polls; "
                                        "default service.poll_interval; 0 = webhooks only")
    webhook_secret: SecretStr | None = Field(
        None, description="shared secret of POST /hooks/{name}; prefer webhook_secret_env")
    webhook_secret_env: str = Field(
        "", description="environment variable holding the webhook secret")
    webhook_header: str = Field("X-Consentry-Secret", pattern=r"^[A-Za-z0-9-]+$",
                                description="header carrying the webhook secret")

    def secret(self) -> str | None:
        if self.webhook_secret is not None:
            return self.webhook_secret.get_secret_value() or None
        return (os.environ.get(self.webhook_secret_env) or None) if self.webhook_secret_env \
            else None


SERVICE_KEYS = tuple(k for k in ConnectorService.model_fields if k != "name")


class QueueSettings(_Section):
    """Service mode's job queue (plugin/jobs.py): huey carries job ids, the `jobs` table is the
    truth; a claimed job carries a lease that its worker renews while it works."""

    url: str = Field(
        "", pattern=r"^$|^(redis|rediss|unix)://",
        description="empty: embedded queue in the SQLite file `path` (no server); "
        "redis://host:6379/0: workers on several machines (state_url then PostgreSQL)",
    )
    path: Path = Field(Path(".consentry/queue.db"), description="the embedded queue's file")
    lease_seconds: float = Field(
        300, ge=1, le=86400,
        description="a job whose worker stopped renewing its claim this long ago is retried",
    )
    max_attempts: int = Field(
        5, ge=1, le=50, description="a job whose worker died this many times ends failed"
    )
    retry_seconds: float = Field(
        60, ge=0, le=86400, description="wait before retrying a job whose platform was down"
    )
    workers: int = Field(
        0, ge=0, le=64, description="job processes of `consentry worker`; 0 = one per core"
    )
    worker_type: Literal["process", "thread"] = Field(
        "process", description="processes (face work is CPU-bound) or threads"
    )
    poll_seconds: float = Field(
        1.0, gt=0, le=60, description="longest wait of an idle worker on the embedded queue"
    )


class Settings(_Section):
    store: StoreSettings = Field(default_factory=StoreSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    matching: MatchingSettings = Field(default_factory=MatchingSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    xmp: XmpSettings = Field(default_factory=XmpSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    mail: MailSettings = Field(default_factory=MailSettings)
    portal: PortalSettings = Field(default_factory=PortalSettings)
    connectors: list[dict[str, Any]] = Field(
        default_factory=list,
        description="one table per connector: kind, name, and the kind's own keys",
    )
    base_dir: Path = Field(Path("."), exclude=True)
    _services: dict[str, ConnectorService] = PrivateAttr(default_factory=dict)

    def connector_service(self, name: str) -> ConnectorService:
        """The service keys of connector `name` (defaults when its table set none)."""
        return self._services.get(name) or ConnectorService(name=name)

    def connector_names(self) -> list[str]:
        """Names of the configured connectors of known kinds, in file order."""
        return list(self._services)

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
    def vault_url(self) -> str:
        """Where plugin.vault opens the vault: store.vault_url, or the SQLite file vault_path."""
        url = self.store.vault_url
        prefix = "sqlite:///"
        if not url:
            return prefix + str(self.vault_path.absolute())
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
            return prefix + str(self.resolve(Path(url[len(prefix):])).absolute())
        return url

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
    for i, raw in enumerate(settings.connectors):
        settings.connectors[i] = _split_service_keys(settings, raw, file=file, index=i)
    m = settings.matching
    if m.review_threshold < m.threshold:
        raise ConfigError(
            "must not be smaller than matching.threshold", file=file,
            key="matching.review_threshold",
        )
    return settings


def _split_service_keys(settings: Settings, raw: dict[str, Any], *, file: str,
                        index: int) -> dict[str, Any]:
    """Take the generic service keys out of one connector table (see ConnectorService)."""
    from plugin import registry  # lazy: only the configured kinds are imported

    try:
        fields = registry.connector_class(str(raw.get("kind"))).Config.model_fields
    except ConfigError:
        return raw  # unknown kind: registry.build reports it with the table's key
    values = {k: raw[k] for k in SERVICE_KEYS if k in raw}
    values.update({k: f.default for k, f in fields.items()
                   if k in SERVICE_KEYS and k not in raw and f.default is not None})
    name = raw.get("name", fields["name"].default if "name" in fields else None)
    try:
        service = ConnectorService.model_validate({**values, "name": str(name)})
    except ValidationError as err:
        first = err.errors()[0]
        sub = ".".join(str(p) for p in first["loc"])
        raise ConfigError(first["msg"], file=file, key=f"connectors[{index}].{sub}") from err
    settings._services[service.name] = service
    return {k: v for k, v in raw.items() if k not in SERVICE_KEYS or k in fields}
