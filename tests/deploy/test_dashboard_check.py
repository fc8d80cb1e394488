"""scripts/check_dashboard.py offline: the committed dashboard passes; each kind of mistake fails, naming its panel."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scripts import check_dashboard

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "roundtable.json"


def committed() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panel_titled(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    return next(panel for panel in dashboard["panels"] if panel["title"] == title)


def test_the_committed_dashboard_is_what_the_sdk_builder_makes() -> None:
    result = subprocess.run(
        [sys.executable, "deploy/grafana/dashboard.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_committed_dashboard_passes_the_offline_check() -> None:
    assert check_dashboard.check(committed()) == []
    assert check_dashboard.main([str(DASHBOARD)]) == 0


def test_the_dashboard_shows_what_operators_asked_for() -> None:
    queried = check_dashboard.queried_metrics(committed())
    assert {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "roundtable_discussions_active",
        "roundtable_discussions_queued",
        "roundtable_admissions_rejected_total",
        "roundtable_agent_sets_live",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "roundtable_event_loop_lag_seconds_bucket",
    } <= queried


def set_expr(expr: str) -> Callable[[dict[str, Any]], None]:
    def mutate(dashboard: dict[str, Any]) -> None:
        panel_titled(dashboard, "Live agent sets")["targets"][0]["expr"] = expr

    return mutate


def set_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(dashboard: dict[str, Any]) -> None:
        panel_titled(dashboard, "Live agent sets")[key] = value

    return mutate


def legend_mode(dashboard: dict[str, Any]) -> None:
    panel_titled(dashboard, "Live agent sets")["options"] = {
        "legend": {"displayMode": "sideways", "placement": "bottom", "showLegend": True, "calcs": []}
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (set_expr("sum(rate(roundtable_agent_sets_live[5m]"), "query A does not parse"),
        (set_expr(""), "query A has no expr"),
        (set_field("type", "graph"), "panel type 'graph' is not one Grafana 11 ships"),
        (set_field("gridPos", {"x": 20, "y": 0, "w": 12, "h": 8}), "does not fit the 24-column grid"),
        (set_field("maxDataPoints", "many"), "max_data_points: expected a number, got 'many'"),
        (set_field("colour", "red"), "panel.colour: not a field of Grafana's dashboard schema"),
        (set_field("datasource", {"type": "loki", "uid": "logs"}), "query A is not on a Prometheus data source"),
        (set_field("id", 2), 'id 2 is also used by panel "RPC rate by method"'),
        (legend_mode, "display_mode: 'sideways' is not one of ['hidden', 'list', 'table']"),
    ],
)
def test_an_invalid_panel_fails_the_check_naming_the_panel(
    mutate: Callable[[dict[str, Any]], None], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dashboard = copy.deepcopy(committed())
    mutate(dashboard)
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(dashboard), encoding="utf-8")
    assert check_dashboard.main([str(path)]) == 1
    errors = capsys.readouterr().err
    assert 'panel "Live agent sets"' in errors
    assert message in errors


def test_an_invalid_dashboard_field_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dashboard = committed()
    dashboard["graphTooltip"] = 7
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(dashboard), encoding="utf-8")
    assert check_dashboard.main([str(path)]) == 1
    assert "dashboard: dashboard.graph_tooltip: 7 is not one of" in capsys.readouterr().err


def test_unreadable_json_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dashboard.json"
    path.write_text("{", encoding="utf-8")
    assert check_dashboard.main([str(path)]) == 1
    assert "cannot read the dashboard" in capsys.readouterr().err


def test_metric_names_come_from_samples_and_declared_families() -> None:
    scrape = "\n".join(
        [
            "# HELP rejected_total Refused.",
            "# TYPE rejected_total counter",
            "# TYPE latency_seconds histogram",
            'latency_seconds_bucket{le="+Inf"} 1.0',
            "up_gauge 3",
        ]
    )
    names = check_dashboard.metric_names(scrape)
    assert {"rejected_total", "latency_seconds_bucket", "latency_seconds_count", "up_gauge"} <= names
    assert "rejected" not in names


def test_query_metrics_reads_selectors_inside_functions_and_name_matchers() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval]))) / on() group_left "
        'sum({__name__="b_total"}) + c offset 5m'
    )
    assert check_dashboard.query_metrics(expr) == {"a_bucket", "b_total", "c"}
