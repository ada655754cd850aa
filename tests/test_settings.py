"""Settings: errors name file, key and problem; environment overrides; examples load."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.base import ConnectorContext
from plugin import registry
from plugin.errors import ConfigError
from plugin.settings import load

REPO = Path(__file__).resolve().parents[1]


class _NoWriter:
    def write(self, *args, **kwargs):
        raise AssertionError("not used")


CONTEXT = ConnectorContext(writer=_NoWriter(), engine_version="x")


def write(tmp_path, text):
    p = tmp_path / "consentry.toml"
    p.write_text(text)
    return p


def test_defaults_and_relative_paths(tmp_path):
    s = load(write(tmp_path, ""), env={})
    assert s.vault_path == tmp_path.absolute() / ".consentry/vault.db"
    assert s.state_url == f"sqlite:///{tmp_path.absolute()}/.consentry/state.db"


def test_wrong_value_names_file_and_key(tmp_path):
    p = write(tmp_path, "[matching]\nthreshold = 'close'\n")
    with pytest.raises(ConfigError) as err:
        load(p, env={})
    assert str(p) in str(err.value) and "[matching.threshold]" in str(err.value)


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\[matching.treshold\].*Extra inputs"):
        load(write(tmp_path, "[matching]\ntreshold = 0.4\n"), env={})


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[matching\n"), env={})
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml", env={})


def test_environment_overrides(tmp_path):
    s = load(write(tmp_path, "[matching]\nthreshold = 0.4\n"),
             env={"CONSENTRY_MATCHING__THRESHOLD": "0.45", "CONSENTRY_XMP__NAMES_AS_KEYWORDS":
                  "true"})
    assert s.matching.threshold == 0.45 and s.xmp.names_as_keywords is True


def test_review_threshold_below_threshold_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="review_threshold"):
        load(write(tmp_path, "[matching]\nthreshold = 0.5\nreview_threshold = 0.4\n"), env={})


def test_connector_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[connectors\[0\]\.write_mode\]"):
        registry.build({"kind": "folder", "root": str(tmp_path), "write_mode": "paint"},
                       file="c.toml", index=0, context=CONTEXT)
    with pytest.raises(ConfigError, match="unknown connector kind 'ftp'"):
        registry.build({"kind": "ftp"}, file="c.toml", index=0, context=CONTEXT)


@pytest.mark.parametrize("example", sorted((REPO / "config").glob("*.toml")),
                         ids=lambda p: p.name)
def test_example_configs_load(example, tmp_path, monkeypatch):
    settings = load(example, env={})
    for i, raw in enumerate(settings.connectors):
        raw = {**raw, "root": str(tmp_path)} if raw.get("kind") == "folder" else raw
        registry.build(raw, file=str(example), index=i, context=CONTEXT)
