"""One helper for the test modules that share a scanned demo library (module-scoped)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from plugin.demo import run_demo


def scanned_demo(out: Path, demo_data: Path, engine, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`consentry demo` into `out` with the session engine; fails with the demo's own output."""
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    console = Console(file=io.StringIO(), width=200)
    assert run_demo(out=out, photos=demo_data, console=console) == 0, console.file.getvalue()
    return out
