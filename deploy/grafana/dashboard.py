"""Builds deploy/grafana/roundtable.json with grafana-foundation-sdk: `python deploy/grafana/dashboard.py [--check]`."""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import dataclass

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueGraphMode
from grafana_foundation_sdk.models.dashboard import Dashboard, DashboardCursorSync, DataSourceRef

OUTPUT = pathlib.Path(__file__).resolve().parent / "roundtable.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# Each replica's own slots, summed; or the one fleet-wide cap every replica sharing Redis admission reports.
CAPACITY = (
    'sum(roundtable_discussions_capacity{scope="replica"}) or max(roundtable_discussions_capacity{scope="fleet"})'
)
# Scrape jobs are named roundtable-<service>, as deploy/prometheus/rules.yml expects.
OURS = 'job=~"roundtable-.*"'
# The agent service exports roundtable_llm_* (services/agents/metrics.py). The live dashboard test
# (tests/deploy/test_live.py) proves every queried metric exists in a real scrape.
LLM_METRICS_EXPORTED = True


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str = ""


def _targets(queries: list[Query]) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery().expr(query.expr).legend_format(query.legend or "__auto").ref_id(chr(ord("A") + index))
        for index, query in enumerate(queries)
    ]


def graph(title: str, description: str, unit: str, queries: list[Query], width: int = 12) -> timeseries.Panel:
    """A time series panel."""
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .targets(_targets(queries))  # type: ignore[arg-type]
        .span(width)
        .height(8)
    )


def single(title: str, description: str, unit: str, query: Query, width: int = 6) -> stat.Panel:
    """A single-value panel with a sparkline."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .graph_mode(BigValueGraphMode.AREA)
        .targets(_targets([query]))  # type: ignore[arg-type]
        .span(width)
        .height(8)
    )


def build() -> Dashboard:
    """The Roundtable overview dashboard, every panel numbered."""
    model = _board().build()
    for panel_id, panel in enumerate(model.panels or [], start=1):
        panel.id_val = panel_id
    return model


def _board() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("Roundtable")
        .uid("roundtable-overview")
        .description("RPCs, discussions, agents and resources of the Roundtable services.")
        .tags(["roundtable", "grpc"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    board.with_row(dashboard.Row("RPCs"))
    board.with_panel(
        graph(
            "RPC rate by method",
            "Calls completed per second on every server, by method.",
            "reqps",
            [
                Query(
                    f"sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total[{RATE}]))",
                    "{{grpc_method}}",
                )
            ],
        )
    )
    board.with_panel(
        graph(
            "Error ratio by method",
            "Share of calls that ended with a code other than OK, by method.",
            "percentunit",
            [
                Query(
                    f'sum by (grpc_method) (rate(grpc_server_handled_total{{grpc_code!="OK"}}[{RATE}]))'
                    f" / sum by (grpc_method) (rate(grpc_server_handled_total[{RATE}]))",
                    "{{grpc_method}}",
                )
            ],
        )
    )
    board.with_panel(
        graph(
            "p99 latency by method (unary)",
            "99th percentile server-side latency of unary calls; streams last as long as a discussion.",
            "s",
            [
                Query(
                    "histogram_quantile(0.99, sum by (grpc_method, le) "
                    f'(rate(grpc_server_handling_seconds_bucket{{grpc_type="unary"}}[{RATE}])))',
                    "{{grpc_method}}",
                )
            ],
        )
    )
    board.with_panel(
        graph(
            "Session → agents calls, p99",
            "99th percentile latency of the session service's calls to the agent service, as the caller sees it.",
            "s",
            [
                Query(
                    "histogram_quantile(0.99, sum by (grpc_method, le) "
                    f"(rate(grpc_client_handling_seconds_bucket[{RATE}])))",
                    "{{grpc_method}}",
                )
            ],
        )
    )

    board.with_row(dashboard.Row("Discussions"))
    board.with_panel(
        graph(
            "Active and queued discussions",
            "Discussions running and waiting for a slot, against the slots there are.",
            "short",
            [
                Query("sum(roundtable_discussions_active)", "active"),
                Query("sum(roundtable_discussions_queued)", "queued"),
                Query(CAPACITY, "capacity"),
            ],
            width=18,
        )
    )
    board.with_panel(
        single(
            "Saturation",
            "Running discussions over capacity; past 90 % for 10 minutes RoundtableSaturated fires.",
            "percentunit",
            Query(f"sum(roundtable_discussions_active) / ({CAPACITY})"),
        )
    )
    board.with_panel(
        graph(
            "Discussions created and finished",
            "Discussions accepted, finished by status, and expired, per second.",
            "ops",
            [
                Query(f"sum(rate(roundtable_discussions_created_total[{RATE}]))", "created"),
                Query(f"sum by (status) (rate(roundtable_discussions_finished_total[{RATE}]))", "{{status}}"),
                Query(f"sum(rate(roundtable_discussions_expired_total[{RATE}]))", "expired"),
            ],
        )
    )
    board.with_panel(
        graph(
            "Admissions rejected by limit",
            "Calls refused with RESOURCE_EXHAUSTED per second, by the limit that was reached.",
            "ops",
            [Query(f"sum by (limit) (rate(roundtable_admissions_rejected_total[{RATE}]))", "{{limit}}")],
            width=6,
        )
    )
    board.with_panel(
        graph(
            "Stream subscribers",
            "StreamDiscussion calls open.",
            "short",
            [Query("sum(roundtable_stream_subscribers)", "subscribers")],
            width=6,
        )
    )

    board.with_row(dashboard.Row("Agents"))
    board.with_panel(
        graph(
            "Live agent sets",
            "Per-session agent sets held by the agent service.",
            "short",
            [Query("sum(roundtable_agent_sets_live)", "agent sets")],
        )
    )
    board.with_panel(
        graph(
            "Monitor alerts firing",
            "Alerts the monitor service has firing, by alert (ListAlerts names the method or instance).",
            "short",
            [Query("sum by (alert) (roundtable_fleet_alerts_firing)", "{{alert}}")],
        )
    )
    board.with_panel(
        graph(
            "Agent answers by outcome",
            "Answers per second (one per agent per round, summaries included): completed, failed, cancelled.",
            "ops",
            [Query(f"sum by (outcome) (rate(roundtable_agent_runs_total[{RATE}]))", "{{outcome}}")],
        )
    )
    board.with_panel(
        graph(
            "Agent sets created and released",
            "Per-session agent sets created and dropped (released, expired or evicted) per second.",
            "ops",
            [
                Query(f"sum(rate(roundtable_agent_sets_created_total[{RATE}]))", "created"),
                Query(f"sum(rate(roundtable_agent_sets_released_total[{RATE}]))", "released"),
            ],
        )
    )

    if LLM_METRICS_EXPORTED:
        _llm_row(board)
        _llm_budget_row(board)

    board.with_row(dashboard.Row("Resources"))
    board.with_panel(
        graph(
            "CPU by process",
            "CPU time per second of each service process; 100 % is one core.",
            "percentunit",
            [Query(f"rate(process_cpu_seconds_total{{{OURS}}}[{RATE}])", "{{job}} {{instance}}")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "Resident memory by process",
            "Resident set size of each service process; RoundtableHighMemory fires past 2 GiB.",
            "bytes",
            [Query(f"process_resident_memory_bytes{{{OURS}}}", "{{job}} {{instance}}")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "Open file descriptors",
            "Descriptors open against the process limit; per-session log files count here.",
            "short",
            [
                Query(f"process_open_fds{{{OURS}}}", "{{job}} {{instance}} open"),
                Query(f"process_max_fds{{{OURS}}}", "{{job}} {{instance}} limit"),
            ],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "Event loop lag, p99",
            "99th percentile of how late a 100 ms timer fires on each process's event loop: how long ready "
            "work (RPCs gRPC core hands over included) waits for the loop. RoundtableEventLoopLag fires past 0.5 s.",
            "s",
            [
                Query(
                    "histogram_quantile(0.99, sum by (job, instance, le) "
                    f"(rate(roundtable_event_loop_lag_seconds_bucket[{RATE}])))",
                    "{{job}} {{instance}}",
                )
            ],
        )
    )
    board.with_panel(
        graph(
            "Event loop stalls over 0.5 s",
            "Lag samples per second longer than 0.5 s, by process: the loop was busy that long before its timers ran.",
            "ops",
            [
                Query(
                    f"sum by (job, instance) (rate(roundtable_event_loop_lag_seconds_count[{RATE}]))"
                    " - sum by (job, instance) "
                    f'(rate(roundtable_event_loop_lag_seconds_bucket{{le="0.5"}}[{RATE}]))',
                    "{{job}} {{instance}}",
                )
            ],
        )
    )
    return board


def _llm_row(board: dashboard.Dashboard) -> None:
    board.with_row(dashboard.Row("LLM"))
    board.with_panel(
        graph(
            "LLM request latency",
            "Latency of one LLM call as the agent service sees it, retries included.",
            "s",
            [
                Query(
                    f"histogram_quantile({quantile}, sum by (le) "
                    f"(rate(roundtable_llm_request_seconds_bucket[{RATE}])))",
                    f"p{round(quantile * 100)}",
                )
                for quantile in (0.5, 0.99)
            ],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM tokens by direction",
            "Tokens sent to and received from the LLM per second.",
            "short",
            [Query(f"sum by (direction) (rate(roundtable_llm_tokens_total[{RATE}]))", "{{direction}}")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM retries",
            "LLM requests the SDK sent again per second (429, 5xx, timeouts, connection errors).",
            "ops",
            [Query(f"sum(rate(roundtable_llm_retries_total[{RATE}]))", "retries")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM calls by outcome",
            "LLM calls ended per second: ok, error (retries spent), timeout, cancelled.",
            "ops",
            [Query(f"sum by (outcome) (rate(roundtable_llm_request_seconds_count[{RATE}]))", "{{outcome}}")],
        )
    )
    board.with_panel(
        graph(
            "LLM calls in flight and waiting",
            "Calls holding an outbound slot, and calls queued for one (--max-concurrent-llm-calls).",
            "short",
            [
                Query("sum(roundtable_llm_calls_in_flight)", "in flight"),
                Query("sum(roundtable_llm_calls_waiting)", "waiting"),
            ],
        )
    )


def _llm_budget_row(board: dashboard.Dashboard) -> None:
    # The fleet LLM budget (services/agents/llm_budget.py): `backend` is each provider key's configured name.
    board.with_row(dashboard.Row("LLM budget"))
    board.with_panel(
        graph(
            "LLM budget remaining tokens",
            "Tokens left in each backend's per-minute bucket (shared by the fleet), the lowest any replica last saw.",
            "short",
            [Query("min by (backend) (roundtable_llm_budget_remaining_tokens)", "{{backend}}")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM budget remaining requests",
            "Requests left in each backend's per-minute bucket, the lowest any agent replica last saw.",
            "short",
            [Query("min by (backend) (roundtable_llm_budget_remaining_requests)", "{{backend}}")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM budget reserved tokens",
            "Tokens held by LLM calls in flight until they settle to real usage, summed over the replicas.",
            "short",
            [Query("sum by (backend) (roundtable_llm_budget_reserved_tokens)", "{{backend}}")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM calls waiting for budget",
            "Calls queued for room in their backend's requests or tokens per minute, served fairly across callers.",
            "short",
            [Query("sum by (backend) (roundtable_llm_budget_waiting_calls)", "{{backend}}")],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM budget wait",
            "How long calls waited for room in the budget (0 when there was room at once); "
            "RoundtableLLMBudgetWaits fires when p95 stays above 10 s.",
            "s",
            [
                Query(
                    f"histogram_quantile({quantile}, sum by (le) "
                    f"(rate(roundtable_llm_budget_wait_seconds_bucket[{RATE}])))",
                    f"p{round(quantile * 100)}",
                )
                for quantile in (0.5, 0.95)
            ],
            width=8,
        )
    )
    board.with_panel(
        graph(
            "LLM 429s and cooldowns",
            "Provider 429 answers per second, the fleet-wide pauses they started, and budget store (Redis) errors.",
            "ops",
            [
                Query(f"sum(rate(roundtable_llm_rate_limited_total[{RATE}]))", "429s"),
                Query(
                    f"sum by (backend) (rate(roundtable_llm_budget_cooldowns_total[{RATE}]))", "{{backend}} cooldowns"
                ),
                Query(
                    f"sum by (backend) (rate(roundtable_llm_budget_store_errors_total[{RATE}]))",
                    "{{backend}} store errors",
                ),
            ],
            width=8,
        )
    )


def render() -> str:
    """The dashboard as Grafana JSON."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write the dashboard, or with --check fail when the committed file is not what this builds."""
    text = render()
    if argv == ["--check"]:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
