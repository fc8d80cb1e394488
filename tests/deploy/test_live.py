"""Against the running suite: promtool on every /metrics, the dashboard check on a live scrape, a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts.check_dashboard import query_metrics
from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.processes import free_port, terminate
from services.shared.server import ServiceHost
from tests.deploy.test_rules import ALERTS
from tests.suite import Suite, run_to_end, start_suite
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "roundtable.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"


@dataclass
class LiveSuite:
    """The suite, reporting to a monitor whose fleet view is on /metrics, every metrics port open."""

    suite: Suite
    monitor: ServiceHost

    def metrics_urls(self) -> dict[str, str]:
        """Scrape job name → /metrics URL, one per service."""
        hosts = {"session": self.suite.session_host, "agents": self.suite.agents_host, "monitor": self.monitor}
        urls = {}
        for service, host in hosts.items():
            assert host.metrics is not None
            urls[f"roundtable-{service}"] = f"http://127.0.0.1:{host.metrics.port}/metrics"
        return urls


async def fetch(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode("utf-8"))

    return await asyncio.to_thread(get)


@pytest.fixture(scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveSuite]:
    # The default registry, as a monitor process has it, so roundtable_fleet_* are on /metrics.
    settings = MonitorSettings(port=0, metrics_port=0, enable_reflection=False, instance_id="monitor-live")
    monitor = ServiceHost(settings, MonitorService(settings))
    await monitor.start()
    reporting = {"metrics_port": 0, "monitor_address": monitor.address, "report_interval_seconds": 0.2}
    suite = await start_suite(tmp_path_factory.mktemp("live"), session=reporting, agents=reporting)
    try:
        # One discussion end to end, so the labelled series (finished by status, client calls) have samples.
        await run_to_end(
            suite.session(),
            session_pb2.CreateDiscussionRequest(topic="Are dashboards read?", personas=["engineer"], rounds=1),
        )
        async with grpc.aio.insecure_channel(monitor.address) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            deadline = time.monotonic() + 10
            while len((await stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest())).instances) < 2:
                assert time.monotonic() < deadline, "session and agents never reported to the monitor"
                await asyncio.sleep(0.1)
        yield LiveSuite(suite, monitor)
    finally:
        await suite.stop()
        await monitor.stop(grace_seconds=0)


async def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """Run a command without blocking the event loop the servers it talks to run on."""
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode() if stdin else None), timeout=120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_promtool_check_metrics_passes_on_every_service(live: LiveSuite) -> None:
    promtool = require_tool("promtool")
    for job, url in live.metrics_urls().items():
        code, stdout, stderr = await run(promtool, "check", "metrics", stdin=await fetch(url))
        assert (code, stdout + stderr) == (0, ""), f"{job}: {stdout}{stderr}"


async def test_dashboard_check_passes_against_a_live_scrape(live: LiveSuite) -> None:
    sources = [argument for url in live.metrics_urls().values() for argument in ("--metrics", url)]
    code, stdout, stderr = await run(sys.executable, "scripts/check_dashboard.py", str(DASHBOARD), *sources)
    assert code == 0, stderr
    assert "every metric found in 3 scrape(s)" in stdout


async def test_dashboard_check_fails_for_a_panel_querying_a_metric_no_service_exports(
    live: LiveSuite, tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panel = next(panel for panel in dashboard["panels"] if panel["title"] == "Live agent sets")
    panel["targets"][0]["expr"] = "sum(roundtable_agent_sets_alive)"  # parses fine; the metric is _live
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(dashboard), encoding="utf-8")
    sources = [argument for url in live.metrics_urls().values() for argument in ("--metrics", url)]
    code, _, stderr = await run(sys.executable, "scripts/check_dashboard.py", str(broken), *sources)
    assert code == 1
    assert 'panel "Live agent sets"' in stderr
    assert "roundtable_agent_sets_alive, which no scraped service exports" in stderr
    assert stderr.count("\n") == 1, "only the broken panel is reported"


def rule_expressions(rules_yaml: str) -> list[str]:
    """The expr of every rule, single-line or block."""
    expressions = []
    lines = rules_yaml.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)expr: (.*)$", line)
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2)
        if value.strip() not in ("|", ">"):
            expressions.append(value)
            continue
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        expressions.append("\n".join(block))
    return expressions


async def test_alert_rules_read_only_metrics_the_services_export(live: LiveSuite) -> None:
    exported: set[str] = set()
    for url in live.metrics_urls().values():
        exported |= {
            sample.name for family in text_string_to_metric_families(await fetch(url)) for sample in family.samples
        }
    expressions = rule_expressions(RULES.read_text(encoding="utf-8"))
    assert len(expressions) == len(ALERTS)
    used = set().union(*(query_metrics(expr) for expr in expressions))
    assert used
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def handled_invalid_get_discussion(scrape: str) -> float:
    """grpc_server_handled_total of GetDiscussion answered INVALID_ARGUMENT, as one scrape shows it."""
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if (
                sample.name == "grpc_server_handled_total"
                and sample.labels.get("grpc_method") == "GetDiscussion"
                and sample.labels.get("grpc_code") == "INVALID_ARGUMENT"
            ):
                return float(sample.value)
    return 0.0


async def prometheus_api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    body = json.loads(await fetch(url))
    assert body["status"] == "success", body
    return body["data"]


async def test_a_real_prometheus_scrapes_the_suite_and_answers_a_query(live: LiveSuite, tmp_path: Path) -> None:
    binary = require_tool("prometheus")
    port = free_port()
    jobs = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['{url.split('/')[2]}']\n"
        for job, url in live.metrics_urls().items()
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {RULES}\nscrape_configs:\n{jobs}",
        encoding="utf-8",
    )
    session_url = live.metrics_urls()["roundtable-session"]
    calls = 7
    before = handled_invalid_get_discussion(await fetch(session_url))
    stub = live.suite.session()
    for _ in range(calls):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id="../etc/passwd"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = handled_invalid_get_discussion(await fetch(session_url))
    assert expected - before == calls

    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
        env={"PATH": os.environ.get("PATH", "")},
    )
    try:
        invalid = (
            'grpc_server_handled_total{job="roundtable-session",grpc_method="GetDiscussion",'
            'grpc_code="INVALID_ARGUMENT"}'
        )
        up = 'up{job=~"roundtable-.*"}'
        # The monitor's fleet view reaches Prometheus too: the session instance reported to it.
        fleet = 'roundtable_fleet_instances{job="roundtable-monitor",service="session"}'
        wanted = {
            invalid: [(session_url.split("/")[2], expected)],
            up: [("roundtable-agents", 1.0), ("roundtable-monitor", 1.0), ("roundtable-session", 1.0)],
            fleet: [("roundtable-monitor", 1.0)],
        }
        label = {invalid: "instance", up: "job", fleet: "job"}
        answers: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while True:
            assert process.returncode is None, (tmp_path / "prometheus.log").read_text()
            try:
                for query in wanted:
                    data = await prometheus_api(port, "/api/v1/query", query=query)
                    answers[query] = sorted(
                        (row["metric"][label[query]], float(row["value"][1])) for row in data["result"]
                    )
            except OSError:
                pass  # not listening yet
            if answers == wanted:
                break
            assert time.monotonic() < deadline, f"Prometheus never answered {wanted}: {answers}"
            await asyncio.sleep(0.5)
        # The alert rules load and evaluate in a real server.
        rules = await prometheus_api(port, "/api/v1/rules")
        loaded = [rule for group in rules["groups"] for rule in group["rules"]]
        assert sorted(rule["name"] for rule in loaded) == sorted(ALERTS)
        assert {rule["health"] for rule in loaded} <= {"ok", "unknown"}
    finally:
        await terminate(process, grace_seconds=15)
        log.close()
