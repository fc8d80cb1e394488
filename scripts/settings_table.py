"""Print (or, with --write, put into README.md) the configuration table built from the settings classes."""

from __future__ import annotations

import pathlib
import sys

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.agents.settings import AgentsSettings
from services.monitor.settings import MonitorSettings
from services.session.settings import SessionSettings
from services.shared.settings import ServiceSettings

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
# Defaults that depend on the machine are described instead of printed.
SKIP_DEFAULTS = {"instance_id": "host name + random suffix", "personas_file": "services/agents/personas.toml"}


def _rows(settings_cls: type[BaseSettings], fields: list[str]) -> list[str]:
    prefix = settings_cls.model_config.get("env_prefix", "")
    rows = []
    for name in fields:
        info = settings_cls.model_fields[name]
        default = SKIP_DEFAULTS.get(name, info.get_default(call_default_factory=False))
        flag = "--" + name.replace("_", "-")
        # A setting every service shares under one name (the service credential) has it as an alias.
        aliases = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
        environment = next((a for a in aliases if isinstance(a, str) and a.isupper()), f"{prefix}{name.upper()}")
        rows.append(f"| `{flag}` | `{environment}` | `{default}` | {info.description} |")
    return rows


def table() -> str:
    """The Markdown tables, one per service; common settings listed once."""
    common = list(ServiceSettings.model_fields)
    parts = [
        "Every service (prefix `ROUNDTABLE_SESSION_`, `ROUNDTABLE_AGENTS_` or `ROUNDTABLE_MONITOR_`; "
        "defaults shown for the session service):",
        "",
        "| flag | environment | default | meaning |",
        "|---|---|---|---|",
        *_rows(SessionSettings, common),
    ]
    for title, settings_cls in (
        ("Session service", SessionSettings),
        ("Agent service", AgentsSettings),
        ("Monitor service", MonitorSettings),
    ):
        own = [f for f in settings_cls.model_fields if f not in common or f in ("port", "metrics_port")]
        parts += ["", f"{title}:", "", "| flag | environment | default | meaning |", "|---|---|---|---|"]
        parts += _rows(settings_cls, own)
    return "\n".join(parts)


def render(readme: str) -> str:
    """README text with the table between the markers replaced."""
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(render(README.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(table())
