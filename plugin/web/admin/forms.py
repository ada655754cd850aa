"""Parsing of admin form fields: dates, ids, channels. A bad value is a FormError with a
message key, shown next to the form (422), never a 500."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException


class FormError(ValueError):
    def __init__(self, key: str, **values: Any) -> None:
        super().__init__(key)
        self.key, self.values = key, values


def text(form: FormData, name: str, *, limit: int = 500) -> str:
    value = form.get(name, "")
    return value.strip()[:limit] if isinstance(value, str) else ""


def checked(form: FormData, name: str) -> bool:
    return form.get(name) in ("on", "1", "true", "yes")


def day(form: FormData, name: str) -> datetime | None:
    """An <input type=date> value as the start of that day, UTC; empty = None."""
    return parse_day(text(form, name, limit=32), field=name)


def parse_day(raw: str, *, field: str) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.combine(date.fromisoformat(raw), time(0), tzinfo=UTC)
    except ValueError as err:
        raise FormError("admin.form.bad_date", field=field) from err


def path_uuid(value: Any) -> uuid.UUID:
    """Starlette's uuid converter already parsed it; anything else is a 404."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError as err:
        raise HTTPException(404) from err


def as_date_input(value: datetime | None) -> str:
    return value.date().isoformat() if value else ""
