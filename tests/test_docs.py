"""The README documents every command and every setting (a test fails when one is missing)."""

from __future__ import annotations

from pathlib import Path

import click
import typer

from plugin import registry
from plugin.cli import app
from plugin.errors import ConfigError
from plugin.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def commands(group: click.Command, prefix: str = "consentry") -> list[str]:
    names = []
    for name, cmd in group.commands.items():
        if getattr(cmd, "commands", None):
            names += commands(cmd, f"{prefix} {name}")
        else:
            names.append(f"{prefix} {name}")
    return names


def test_every_command_is_documented():
    found = commands(typer.main.get_command(app))
    assert len(found) >= 12
    missing = [c for c in found if f"`{c}" not in README]
    assert not missing, f"undocumented commands: {missing}"


def test_every_setting_is_documented():
    missing = []
    for section, field in Settings.model_fields.items():
        if field.exclude:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            missing += [f"{section}.{k}" for k in annotation.model_fields
                        if f"`{section}.{k}`" not in README]
        elif f"`{section}`" not in README:
            missing.append(section)
    for kind in registry.KINDS:
        try:
            config = registry.connector_class(kind).Config
        except ConfigError:
            continue  # a connector kind not shipped in this version
        missing += [f"{kind}.{k}" for k in config.model_fields
                    if k != "kind" and f"| `{k}` |" not in README]
    assert not missing, f"undocumented settings: {missing}"
