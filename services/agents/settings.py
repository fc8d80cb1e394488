"""Settings of the agent service."""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.agents.personas import DEFAULT_PERSONAS_FILE
from services.shared.settings import ServiceSettings


class AgentsSettings(ServiceSettings):
    """Agent service settings: listener, LLM backend, agent-set limits, streaming."""

    model_config = SettingsConfigDict(env_prefix="ROUNDTABLE_AGENTS_")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9102, ge=-1, le=65535, description="Prometheus port; 0 picks one, -1 disables.")
    personas_file: pathlib.Path = Field(DEFAULT_PERSONAS_FILE, description="TOML file of personas.")
    llm_backend: str = Field(
        "simulator", description="Name of the LLM backend, shown to users: simulator, openai, local."
    )
    llm_base_url: str = Field(
        "http://127.0.0.1:50060/v1", description="OpenAI-compatible base URL (…/v1) of the LLM backend."
    )
    llm_api_key: str = Field("sim", description="API key for the LLM backend.")
    llm_model: str = Field("roundtable-sim-1", description="Model name sent to the LLM backend.")
    llm_client: Literal["stream", "openai-sdk"] = Field(
        "stream",
        description="HTTP client of the LLM backend: stream (lean aiohttp + orjson) or openai-sdk (the reference).",
    )
    llm_organization: str = Field("", description="OpenAI-Organization header for the LLM backend; empty: none.")
    llm_project: str = Field("", description="OpenAI-Project header for the LLM backend; empty: none.")
    llm_requests_per_minute: int = Field(
        0, ge=0, description="The LLM backend's request quota per minute, kept fleet-wide; 0: no limit."
    )
    llm_tokens_per_minute: int = Field(
        0, ge=0, description="The LLM backend's token quota per minute, kept fleet-wide; 0: no limit."
    )
    llm_budget_redis_url: str = Field(
        "",
        description=(
            "Redis URL of the LLM budget shared by every replica (redis+cluster://host:port: a Redis Cluster); "
            "empty: this replica's memory."
        ),
    )
    llm_budget_when_redis_down: Literal["open", "closed"] = Field(
        "open", description="When the budget's Redis is unreachable: open (calls go ahead) or closed (calls fail)."
    )
    llm_temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature.")
    llm_max_tokens: int = Field(256, ge=1, le=32_768, description="Longest answer of one agent, in tokens.")
    llm_timeout_seconds: float = Field(
        120.0, gt=0, description="Longest one LLM call may take, further bounded by the caller's deadline."
    )
    llm_max_retries: int = Field(
        3,
        ge=0,
        le=10,
        description="Retries of an LLM call on 429/5xx/connection errors (honours Retry-After).",
    )
    max_concurrent_llm_calls: int = Field(
        256, ge=1, description="Outbound LLM calls in flight on this replica; more wait their turn."
    )
    max_agent_sets: int = Field(
        10_000, ge=1, description="Live agent sets on this replica; past it the least recently used goes."
    )
    release_grace_seconds: float = Field(
        300.0, ge=0, description="How long a finished session's agent set stays, for a follow-up."
    )
    delta_flush_chars: int = Field(
        200, ge=1, description="Stream an agent's text once this many characters have gathered…"
    )
    delta_flush_interval_ms: float = Field(100.0, ge=0, description="…or once this long has passed.")
