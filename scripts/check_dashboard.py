"""Check a Grafana dashboard: Grafana 11 schema, every PromQL query parses, every metric exists in a scrape.

Usage: python scripts/check_dashboard.py DASHBOARD.json [--metrics URL_OR_FILE ...]

Exits 1 and names the panel of every problem found; with --metrics (a /metrics URL or a saved scrape,
repeatable) every metric a query reads must appear in at least one of them.
"""

from __future__ import annotations

import argparse
import enum
import json
import pathlib
import re
import sys
import types
import typing
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import promql_parser
from grafana_foundation_sdk.cog import plugins, runtime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dashboard_model

# Grafana replaces these before a query reaches Prometheus; any duration parses the same way.
GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
# Series Prometheus adds to every target itself, so no scrape shows them.
SYNTHETIC_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"})
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "counter": ("_total", "_created"),
}
_SAMPLE_NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dashboard, and where."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def metric_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition has or declares (a family with no samples yet counts)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                name, kind = parts[2], parts[3]
                # A family's own name is a series only for gauges and the like; a counter's is name_total.
                base = name.removesuffix("_total") if kind == "counter" else name
                names.update(base + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            match = _SAMPLE_NAME.match(line)
            if match:
                names.add(match.group(1))
    return names


def read_scrape(source: str) -> str:
    """A scrape from a URL or a file."""
    if re.match(r"https?://", source):
        with urllib.request.urlopen(source, timeout=10) as response:
            return str(response.read().decode("utf-8"))
    return pathlib.Path(source).read_text(encoding="utf-8")


def query_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads; raises ValueError when it does not parse."""
    parsed = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", expr))
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
                    names.add(matcher.value)

    promql_parser.walk(parsed, visit)
    return names


def _type_problems(value: Any, annotation: Any, path: str) -> list[str]:
    """Where a decoded value does not have the type the SDK's schema model declares."""
    origin = typing.get_origin(annotation)
    if annotation is object or annotation is Any:
        # Panel options and custom field config: typed per panel type by the SDK's plugin hooks.
        return _model_problems(value, path) if _is_model(value) else []
    if origin in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if value is None and len(members) < len(typing.get_args(annotation)):
            return []
        if len(members) == 1:
            return _type_problems(value, members[0], path)
        attempts = [_type_problems(value, member, path) for member in members]
        if any(not attempt for attempt in attempts):
            return []
        return [f"{path}: {value!r} is none of {', '.join(_type_name(member) for member in members)}"]
    if annotation is type(None):
        return [] if value is None else [f"{path}: expected null"]
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        return [] if value in allowed else [f"{path}: {value!r} is not one of {allowed}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        (item,) = typing.get_args(annotation) or (Any,)
        return [
            problem
            for index, element in enumerate(value)
            for problem in _type_problems(element, item, f"{path}[{index}]")
        ]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        _, item = typing.get_args(annotation) or (Any, Any)
        return [problem for key, element in value.items() for problem in _type_problems(element, item, f"{path}.{key}")]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation) or value in {member.value for member in annotation}:
            return []
        return [f"{path}: {value!r} is not one of {sorted(str(member.value) for member in annotation)}"]
    if annotation is bool:
        return [] if isinstance(value, bool) else [f"{path}: expected a boolean, got {value!r}"]
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an integer, got {value!r}"]
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected a number, got {value!r}"]
    if annotation is str:
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r}"]
    if isinstance(value, runtime.UnknownDataquery):
        return [f"{path}: not a Prometheus query (no datasource of type prometheus)"]
    if isinstance(annotation, type) and issubclass(annotation, cogvariants.Dataquery):
        if not _is_model(value):
            return [f"{path}: expected a query, got {value!r}"]
        return _model_problems(value, path)
    if isinstance(annotation, type) and hasattr(annotation, "from_json"):
        if isinstance(value, dict):
            # Some fields are kept as decoded JSON by the SDK: decode them into their model to check them too.
            try:
                value = annotation.from_json(value)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                return [f"{path}: does not fit {annotation.__name__}: {error!r}"]
        if not isinstance(value, annotation):
            return [f"{path}: expected {annotation.__name__}, got {type(value).__name__}"]
        return _model_problems(value, path)
    return []


def _is_model(value: object) -> bool:
    return callable(getattr(value, "to_json", None)) and not isinstance(value, type)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


def _model_problems(model: object, path: str) -> list[str]:
    hints = typing.get_type_hints(type(model))
    problems = []
    for attribute, annotation in hints.items():
        problems += _type_problems(getattr(model, attribute, None), annotation, f"{path}.{attribute}")
    return problems


def _unknown_fields(original: Any, encoded: Any, path: str) -> list[str]:
    """Fields the schema model dropped on a round trip: not part of Grafana's schema."""
    if isinstance(original, dict) and isinstance(encoded, dict):
        problems = []
        for key, value in original.items():
            if key not in encoded:
                problems.append(f"{path}.{key}: not a field of Grafana's dashboard schema")
            else:
                problems += _unknown_fields(value, encoded[key], f"{path}.{key}")
        return problems
    if isinstance(original, list) and isinstance(encoded, list):
        return [
            problem
            for index, (left, right) in enumerate(zip(original, encoded, strict=False))
            for problem in _unknown_fields(left, right, f"{path}[{index}]")
        ]
    return []


def _panel_label(panel: dict[str, Any], index: int) -> str:
    return f'panel "{panel.get("title", "")}" (id {panel.get("id")}, #{index})'


def _check_panel(panel: dict[str, Any], label: str, known_types: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    try:
        model: object = (dashboard_model.RowPanel if panel.get("type") == "row" else dashboard_model.Panel).from_json(
            panel
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return [Problem(label, f"does not fit Grafana's panel schema: {error!r}")]
    problems += [Problem(label, message) for message in _model_problems(model, "panel")]
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))
    problems += [Problem(label, message) for message in _unknown_fields(panel, encoded, "panel")]
    if panel.get("type") not in known_types:
        problems.append(Problem(label, f"panel type {panel.get('type')!r} is not one Grafana 11 ships"))
    if not panel.get("title"):
        problems.append(Problem(label, "has no title"))
    grid = panel.get("gridPos") or {}
    if not all(isinstance(grid.get(key), int) for key in ("x", "y", "w", "h")):
        problems.append(Problem(label, "needs gridPos with integer x, y, w and h"))
    elif grid["w"] < 1 or grid["x"] < 0 or grid["x"] + grid["w"] > 24:
        problems.append(Problem(label, f"gridPos {grid} does not fit the 24-column grid"))
    if panel.get("type") == "row":
        return problems
    targets = panel.get("targets") or []
    if not targets:
        problems.append(Problem(label, "has no queries"))
    datasource_type = (panel.get("datasource") or {}).get("type")
    ref_ids = [target.get("refId") for target in targets]
    if len(set(ref_ids)) != len(ref_ids):
        problems.append(Problem(label, f"refIds repeat: {ref_ids}"))
    for target in targets:
        if (target.get("datasource") or {}).get("type", datasource_type) != "prometheus":
            problems.append(Problem(label, f"query {target.get('refId')} is not on a Prometheus data source"))
        if not str(target.get("expr", "")).strip():
            problems.append(Problem(label, f"query {target.get('refId')} has no expr"))
    return problems


def check(dashboard: Any, available_metrics: set[str] | None = None) -> list[Problem]:
    """Every problem of a dashboard (decoded JSON); with available_metrics, also unknown metric names."""
    plugins.register_default_plugins()
    if not isinstance(dashboard, dict):
        return [Problem("dashboard", "is not a JSON object")]
    problems: list[Problem] = []
    panels = dashboard.get("panels")
    if not isinstance(panels, list) or not all(isinstance(panel, dict) for panel in panels):
        return [Problem("dashboard", "panels must be a list of objects")]
    top = {key: value for key, value in dashboard.items() if key != "panels"}
    try:
        model = dashboard_model.Dashboard.from_json(top)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return [Problem("dashboard", f"does not fit Grafana's dashboard schema: {error!r}")]
    problems += [Problem("dashboard", message) for message in _model_problems(model, "dashboard")]
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))
    problems += [Problem("dashboard", message) for message in _unknown_fields(top, encoded, "dashboard")]
    if not dashboard.get("title"):
        problems.append(Problem("dashboard", "has no title"))
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        problems.append(Problem("dashboard", f"schemaVersion {dashboard.get('schemaVersion')!r} predates Grafana 9"))

    known_types = set(runtime.Runtime().panelcfg_variants) | {"row"}
    seen_ids: dict[Any, str] = {}
    for index, panel in enumerate(panels):
        label = _panel_label(panel, index)
        problems += _check_panel(panel, label, known_types)
        panel_id = panel.get("id")
        if not isinstance(panel_id, int):
            problems.append(Problem(label, "needs an integer id"))
        elif panel_id in seen_ids:
            problems.append(Problem(label, f"id {panel_id} is also used by {seen_ids[panel_id]}"))
        else:
            seen_ids[panel_id] = label
        for target in panel.get("targets") or []:
            expr = str(target.get("expr", ""))
            if not expr.strip():
                continue
            try:
                used = query_metrics(expr)
            except ValueError as error:
                problems.append(Problem(label, f"query {target.get('refId')} does not parse ({error}): {expr}"))
                continue
            if available_metrics is not None:
                for name in sorted(used - available_metrics - SYNTHETIC_METRICS):
                    problems.append(
                        Problem(label, f"query {target.get('refId')} reads {name}, which no scraped service exports")
                    )
    return problems


def queried_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every metric name the dashboard's queries read."""
    return {
        name
        for panel in dashboard.get("panels", [])
        for target in panel.get("targets") or []
        for name in query_metrics(str(target.get("expr", "")))
    }


def main(argv: Iterable[str] | None = None) -> int:
    """Print every problem and return 1 if there is any, else print a summary and return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dashboard", type=pathlib.Path, help="dashboard JSON file")
    parser.add_argument(
        "--metrics", action="append", default=[], help="a /metrics URL or saved scrape; repeat for several services"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        dashboard = json.loads(args.dashboard.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        print(f"{args.dashboard}: cannot read the dashboard: {error}", file=sys.stderr)
        return 1
    available: set[str] | None = None
    if args.metrics:
        available = set()
        for source in args.metrics:
            try:
                available |= metric_names(read_scrape(source))
            except OSError as error:
                print(f"{source}: cannot read the scrape: {error}", file=sys.stderr)
                return 1
    problems = check(dashboard, available)
    for problem in problems:
        print(f"{args.dashboard}: {problem}", file=sys.stderr)
    if problems:
        return 1
    panels = [panel for panel in dashboard.get("panels", []) if panel.get("type") != "row"]
    queries = sum(len(panel.get("targets") or []) for panel in panels)
    against = f", every metric found in {len(args.metrics)} scrape(s)" if args.metrics else ""
    print(f"{args.dashboard}: {len(panels)} panels, {queries} queries valid{against}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
