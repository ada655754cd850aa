"""Wiring: from a settings file to a ready pipeline (key, vault, state, audit, XMP, connectors).

Opening checks the key against the vault before anything is written, so a wrong key changes
nothing. The face engine loads lazily: commands that need no detection never pay for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

from connectors.base import ConnectorContext
from plugin import keys, registry
from plugin.audit import AuditLog
from plugin.corroboration import CorroborationSettings
from plugin.engine import DlibEngine, FaceEngine, engine_from_settings
from plugin.links import StateLinks
from plugin.matcher import MatchSettings
from plugin.pipeline import Pipeline
from plugin.settings import Settings
from plugin.settings import load as load_settings
from plugin.state import StateStore, now_utc
from plugin.vault import Vault
from plugin.workers import AnalysisPool
from plugin.xmp import XmpWriter

log = logging.getLogger(__name__)


def default_engine(settings: Settings) -> DlibEngine:
    return engine_from_settings(settings.engine)


class App:
    """Everything one command needs, opened in order and closed in reverse."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_file: Path,
        engine: FaceEngine | None = None,
        clock: Callable[[], datetime] = now_utc,
        raise_errors: bool = False,
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self._stack = ExitStack()
        try:
            self.kek = keys.load_kek(key_file=settings.key_file)
            self.vault = Vault.open(settings.vault_url, self.kek)
            self._stack.callback(self.vault.close)
            self.state = StateStore(settings.state_url)
            self._stack.callback(self.state.close)
            self.audit = AuditLog(
                self.state.engine,
                key=keys.derive_key(self.kek, "audit"),
                head_path=settings.audit_head,
            )
            self.writer = self._stack.enter_context(
                XmpWriter(names_as_keywords=settings.xmp.names_as_keywords)
            )
            self.engine = engine or default_engine(settings)
            pool = None
            workers = settings.engine.workers or os.cpu_count() or 1
            if engine is None and workers > 1 and isinstance(self.engine, DlibEngine):
                # Worker processes start on the first photo to analyse, not here.
                pool = AnalysisPool(self.engine, workers=workers)
                self._stack.callback(pool.close)
            self.connectors: dict[str, Any] = {}
            context = ConnectorContext(
                writer=self.writer, engine_version=self.engine.version, known=self.state,
                base_dir=settings.base_dir, work_dir=settings.resolve(Path(".consentry/work")),
                links=StateLinks.of(self.state),
            )
            for i, raw in enumerate(settings.connectors):
                connector = registry.build(raw, file=str(config_file), index=i, context=context)
                self.connectors[connector.name] = connector
                self._stack.callback(connector.close)
            self.pipeline = Pipeline(
                state=self.state, vault=self.vault, audit=self.audit, engine=self.engine,
                connectors=self.connectors,
                match_settings=MatchSettings(
                    threshold=settings.matching.threshold,
                    margin=settings.matching.margin,
                    review_threshold=settings.matching.review_threshold,
                    templates=settings.matching.templates,
                ),
                corroboration=CorroborationSettings(
                    anchor=settings.matching.corroborate_anchor,
                    threshold=settings.matching.corroborate_threshold,
                ) if settings.matching.corroborate else None,
                channels=settings.policy.channels,
                fingerprint_key=keys.derive_key(self.kek, "verdict-fingerprint"),
                decode_options={"max_side": settings.engine.max_side,
                                "max_pixels": settings.engine.max_pixels},
                clock=clock,
                raise_errors=raise_errors,
                pool=pool,
            )
        except BaseException:
            self._stack.close()
            raise

    @classmethod
    def open(cls, config_file: Path, **kwargs: Any) -> App:
        return cls(load_settings(config_file), config_file=config_file, **kwargs)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
