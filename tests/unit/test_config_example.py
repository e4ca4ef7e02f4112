"""config.example.toml documents every setting, so it cannot rot: its keys (set, or shown
commented out for settings without a static default) are exactly the settings model's, and what
it sets parses and validates."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from orchestrator import settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def documented_keys() -> set[str]:
    keys, section = set(), None
    for line in EXAMPLE.read_text().splitlines():
        if match := re.match(r"^\[([\w.]+)\]", line):
            section = match.group(1)
        elif section and (match := re.match(r"^#? ?(\w+) = ", line)):
            keys.add(f"{section}.{match.group(1)}")
    return keys


def test_example_documents_exactly_the_settings_model() -> None:
    model_keys = set(settings.flatten(settings.Settings()))
    assert documented_keys() == model_keys


def test_example_loads_and_its_values_are_the_defaults() -> None:
    loaded = settings.load(EXAMPLE, environ={})
    defaults = settings.flatten(settings.Settings())
    effective = settings.flatten(loaded.settings)
    data = tomllib.loads(EXAMPLE.read_text())
    set_in_file = set(_leaves(data))
    assert set_in_file  # the file sets values, not only comments
    assert {key: effective[key] for key in set_in_file} == {
        key: defaults[key] for key in set_in_file
    }


def _leaves(table: dict[str, object], prefix: str = "") -> list[str]:
    """The dotted keys of a TOML document's values (tables walked)."""
    keys: list[str] = []
    for key, value in table.items():
        if isinstance(value, dict):
            keys += _leaves(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys
