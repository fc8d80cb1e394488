"""Settings of the monitor service."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings

# Streams that last as long as a discussion or a watch: their "latency" is their lifetime, not slowness.
LONG_LIVED_STREAMS: dict[str, float] = {
    "/roundtable.session.v1.SessionService/StreamDiscussion": 0.0,
    "/roundtable.agents.v1.AgentService/RunDiscussion": 0.0,
    "/roundtable.monitor.v1.MonitorService/WatchAlerts": 0.0,
}


class MonitorSettings(ServiceSettings):
    """Monitor settings, from --flags or ROUNDTABLE_MONITOR_* environment variables."""

    # frozen, extra="forbid" and kebab-case flags are inherited: pydantic merges model_config.
    model_config = SettingsConfigDict(env_prefix="ROUNDTABLE_MONITOR_")

    port: int = Field(default=50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=9103, ge=-1, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables."
    )
    stale_after_seconds: float = Field(
        default=30.0, gt=0, description="An instance not heard from for this long is dropped from the fleet view."
    )
    default_window_seconds: int = Field(
        default=60, gt=0, description="Performance summary window used when a request asks for 0 seconds."
    )
    max_window_seconds: int = Field(default=3600, gt=0, description="Longest performance summary window accepted.")
    history_per_instance: int = Field(
        default=400, ge=2, description="Reports kept per instance; bounds memory and the longest useful window."
    )

    alert_window_seconds: int = Field(
        default=60, gt=0, description="Window over which error rate and p99 are computed for alerts."
    )
    alert_evaluation_interval_seconds: float = Field(
        default=5.0, gt=0, description="Alerts are evaluated on every report and at least this often."
    )
    alert_error_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Server-fault rate (0–1: UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS, DEADLINE_EXCEEDED; "
        "refusals are not faults) of a method above which its alert fires; 0 disables.",
    )
    alert_error_rate_hold_seconds: float = Field(
        default=60.0, ge=0, description="How long the error rate must stay above its threshold before firing."
    )
    alert_p99_latency_ms: float = Field(
        default=1000.0, ge=0, description="p99 latency of a method above which its alert fires; 0 disables."
    )
    alert_p99_latency_ms_by_method: dict[str, float] = Field(
        default={},
        description="Per-method p99 thresholds (JSON: full method name to ms) over --alert-p99-latency-ms; 0 "
        "disables; the long-lived streams (StreamDiscussion, RunDiscussion, WatchAlerts) are off unless named.",
    )
    alert_p99_latency_hold_seconds: float = Field(
        default=60.0, ge=0, description="How long a p99 must stay above its threshold before firing."
    )
    alert_rss_mb: float = Field(
        default=2048.0, ge=0, description="Resident memory of an instance above which its alert fires; 0 disables."
    )
    alert_rss_hold_seconds: float = Field(
        default=60.0, ge=0, description="How long memory must stay above its threshold before firing."
    )
    alert_cpu_percent: float = Field(
        default=90.0,
        ge=0,
        description="CPU use of an instance (percent of one core) above which its alert fires; 0 disables.",
    )
    alert_cpu_hold_seconds: float = Field(
        default=120.0, ge=0, description="How long CPU use must stay above its threshold before firing."
    )
    alert_queued_sessions: int = Field(
        default=50, ge=0, description="Queued discussions on an instance above which its alert fires; 0 disables."
    )
    alert_queue_hold_seconds: float = Field(
        default=60.0, ge=0, description="How long the queue must stay above its threshold before firing."
    )
    alert_resolved_retention_seconds: float = Field(
        default=3600.0, gt=0, description="How long a resolved alert is still listed by ListAlerts."
    )

    @model_validator(mode="after")
    def _default_window_within_max(self) -> Self:
        if self.default_window_seconds > self.max_window_seconds:
            raise ValueError("default_window_seconds must not exceed max_window_seconds")
        if any(threshold < 0 for threshold in self.alert_p99_latency_ms_by_method.values()):
            raise ValueError("alert_p99_latency_ms_by_method thresholds must be 0 (off) or positive")
        return self
