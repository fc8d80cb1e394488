"""The Prometheus alert rules: valid, and each one proven by a promtool unit test that makes it fire."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from services.shared.metrics import SERVER_FAULT_CODES
from tests.tools import require_tool

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = (
    "RoundtableHighErrorRate",
    "RoundtableHighLatencyP99",
    "RoundtableSaturated",
    "RoundtableHighMemory",
    "RoundtableEventLoopLag",
    "RoundtableLLMBudgetWaits",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_check_rules_passes() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_test_rules_passes() -> None:
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    rules = (RULES_DIR / "rules.yml").read_text(encoding="utf-8")
    assert tuple(re.findall(r"^\s*- alert: (\w+)$", rules, re.MULTILINE)) == ALERTS
    unit_tests = (RULES_DIR / "rules_test.yml").read_text(encoding="utf-8")
    # An alert_rule_test block whose exp_alerts list is not empty: the alert is expected to fire.
    firing = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels:", unit_tests))
    quiet = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts: \[\]", unit_tests))
    assert firing == set(ALERTS)
    assert quiet == set(ALERTS), "each alert also needs a check that it waits for its `for` duration"


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    # Proves the unit tests can fail: the error rate threshold raised tenfold must break them.
    rules = (RULES_DIR / "rules.yml").read_text(encoding="utf-8")
    (tmp_path / "rules.yml").write_text(rules.replace("> 0.05", "> 0.5"), encoding="utf-8")
    (tmp_path / "rules_test.yml").write_text((RULES_DIR / "rules_test.yml").read_text(encoding="utf-8"))
    result = subprocess.run(
        [require_tool("promtool"), "test", "rules", "rules_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "alertname: RoundtableHighErrorRate" in result.stdout + result.stderr


def test_the_error_rate_rule_counts_the_monitors_server_fault_codes() -> None:
    # One set of codes for both alerts: the monitor's reporter counts SERVER_FAULT_CODES as errors.
    rules = (RULES_DIR / "rules.yml").read_text(encoding="utf-8")
    [codes] = re.findall(r'grpc_code=~"([^"]+)"', rules)
    assert codes.split("|") == list(SERVER_FAULT_CODES)


def test_a_burst_of_refused_calls_has_a_unit_test_that_keeps_the_error_rate_alert_quiet() -> None:
    unit_tests = (RULES_DIR / "rules_test.yml").read_text(encoding="utf-8")
    block = unit_tests.split("- name: a burst of refused calls is not an outage", 1)[1].split("- name:", 1)[0]
    for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND", "UNAUTHENTICATED"):
        assert f'grpc_code="{code}"' in block
    assert "alertname: RoundtableHighErrorRate\n        exp_alerts: []" in block
