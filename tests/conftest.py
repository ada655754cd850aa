"""Shared fixtures. Test data outside the repo comes through one setting, CONSENTRY_TESTDATA
(default ../shared/testdata beside the checkout); tests that need it skip with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugin.demo import TESTDATA_ENV, testdata_dir
from tests.services import postgres_url, redis_url  # noqa: F401  (PostgreSQL/Redis fixtures)


@pytest.fixture(autouse=True)
def _one_analysis_process(monkeypatch):
    """Tests reuse the session engine in-process; the pool has tests of its own."""
    monkeypatch.setenv("CONSENTRY_ENGINE__WORKERS", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    """monkeypatch for module-scoped fixtures (one demo run shared by a module's tests)."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def testdata() -> Path:
    root = testdata_dir()
    if not (root / "demo" / "manifest.json").is_file():
        pytest.skip(f"test data not found at {root}: set {TESTDATA_ENV}")
    return root


@pytest.fixture(scope="session")
def demo_data(testdata: Path) -> Path:
    return testdata / "demo"


@pytest.fixture(scope="session")
def manifest(demo_data: Path) -> dict:
    return json.loads((demo_data / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def engine():
    """One loaded engine for the session; tests read `detector_calls` differences."""
    from plugin.engine import DlibEngine

    e = DlibEngine()
    e.load()
    return e


class CountingEngine:
    """The session engine, counting detector calls (re-labelling must make none)."""

    def __init__(self, inner):
        self.inner, self.detect_calls = inner, 0

    @property
    def version(self):
        return self.inner.version

    def detect(self, image):
        self.detect_calls += 1
        return self.inner.detect(image)

    def encode(self, image, faces):
        return self.inner.encode(image, faces)


@pytest.fixture
def counting_engine(engine, monkeypatch):
    """A counting engine that every App opened in the test uses."""
    counting = CountingEngine(engine)
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: counting)
    return counting
