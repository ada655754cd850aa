"""Message catalogs: English and Dutch, one flat JSON object per file.

Files `messages/<area>.<lang>.json` (area `admin` or `portal`) are merged per language, so a
key lives in exactly one area file ("admin.*"/"base.*" in admin, "portal.*" in portal). English
is the fallback for a key missing in another language; a key missing everywhere renders as the
key itself (visible in review, never a crash). `tests/test_console.py` checks both languages
have the same keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LANGS: tuple[str, ...] = ("en", "nl")
DEFAULT_LANG = "en"
MESSAGES = Path(__file__).with_name("messages")


@cache
def catalog(lang: str) -> Mapping[str, str]:
    """All messages of one language (every area merged)."""
    merged: dict[str, str] = {}
    for path in sorted(MESSAGES.glob(f"*.{lang}.json")):
        merged.update(json.loads(path.read_text(encoding="utf-8")))
    return merged


def area_catalog(area: str, lang: str) -> dict[str, str]:
    path = MESSAGES / f"{area}.{lang}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def t(lang: str, key: str, **values: Any) -> str:
    """The message `key` in `lang`, formatted with `values` (str.format placeholders)."""
    text = catalog(lang).get(key)
    if text is None:
        text = catalog(DEFAULT_LANG).get(key)
    if text is None:
        log.warning("missing message %s", key)
        return key
    return text.format(**values) if values else text


def negotiate(query: str | None, cookie: str | None, accept_language: str | None) -> str:
    """Query `?lang=` beats the `lang` cookie beats Accept-Language; English otherwise."""
    for choice in (query, cookie):
        if choice in LANGS:
            return choice
    for part in (accept_language or "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGS:
            return code
    return DEFAULT_LANG
