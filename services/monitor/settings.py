"""Settings of the monitor service."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings


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

    @model_validator(mode="after")
    def _default_window_within_max(self) -> Self:
        if self.default_window_seconds > self.max_window_seconds:
            raise ValueError("default_window_seconds must not exceed max_window_seconds")
        return self
