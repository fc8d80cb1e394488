"""The README's configuration table is the one the settings classes produce."""

from __future__ import annotations

from scripts.settings_table import README, render


def test_readme_configuration_table_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert render(text) == text, "run: python scripts/settings_table.py --write"
