"""Settings of the session service (the seed's names: max_concurrent_sessions, session_timeout_hours, …).

Two profiles carry the seed's values; any single value can still be set by flag
or environment variable, which always wins over the profile.
"""

from __future__ import annotations

import pathlib
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.shared import limits
from services.shared.settings import ServiceSettings

# The longest whole-discussion timeout there is: far past any real discussion, far inside a Timestamp's range.
MAX_DISCUSSION_TIMEOUT_SECONDS = 7 * 86_400.0

# The seed's Config / ProductionConfig, plus what production needs to be safe by default.
PRODUCTION: dict[str, Any] = {
    "max_concurrent_sessions": 200,
    "session_timeout_hours": 12.0,
    "cleanup_interval_seconds": 3600.0,
    "enable_rate_limiting": True,
    "enable_memory_monitoring": True,
    "allow_anonymous": False,
    # Many principals share the fleet: none may take more than its share.
    "max_concurrent_sessions_per_principal": 20,
}


class SessionSettings(ServiceSettings):
    """Session service settings: listener, store, identity, limits, expiry."""

    model_config = SettingsConfigDict(env_prefix="ROUNDTABLE_SESSION_")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9101, ge=-1, le=65535, description="Prometheus port; 0 picks one, -1 disables.")
    agents_address: str = Field("127.0.0.1:50052", description="host:port of the agent service.")
    store: Literal["sqlite", "memory", "redis"] = Field(
        "sqlite", description="Where discussions live: sqlite (one replica), memory (tests), redis (replicas share it)."
    )
    sqlite_path: pathlib.Path = Field(pathlib.Path("var/roundtable.db"), description="SQLite database file.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "With --store redis: discussions, events, admission leases and rate limits (rediss:// for TLS; "
            "redis+cluster://host:port[,host:port…] or rediss+cluster:// names a Redis Cluster by its nodes)."
        ),
    )
    redis_key_prefix: str = Field(
        "rt", min_length=1, description="Prefix of every Redis key (deployments may share one Redis)."
    )
    redis_timeout_seconds: float = Field(
        0.5, gt=0, le=10, description="Longest one Redis command may take; past it the call fails UNAVAILABLE."
    )
    api_keys_file: pathlib.Path | None = Field(
        None, description="TOML file of API key hashes and their principals (python -m services.session.keys)."
    )
    allow_anonymous: bool = Field(
        True, description="Callers without a key act as one local principal (production: false)."
    )
    max_concurrent_sessions: int = Field(
        100, ge=1, description="Discussions running at once: on this replica, or fleet-wide with --store redis."
    )
    max_queued_sessions: int = Field(100, ge=0, description="Discussions waiting for a slot; past it, refused.")
    max_concurrent_sessions_per_principal: int | None = Field(
        None,
        ge=1,
        description="Running plus queued discussions one principal may have; unset, only the global caps "
        "apply (development: anonymous callers are one principal) (production: 20).",
    )
    max_retained_discussions_per_principal: int = Field(
        10_000, ge=1, description="Discussions one principal may keep stored; delete or let expire to free room."
    )
    max_events_per_discussion: int = Field(
        20_000, ge=100, description="Events kept per discussion; past 90 % text deltas are no longer recorded."
    )
    lease_ttl_seconds: float = Field(
        30.0, gt=0, description="An admission slot not renewed for this long is free again (crashed runner)."
    )
    enable_rate_limiting: bool = Field(False, description="Per-principal request rate limit (production: on).")
    rate_limit_per_minute: int = Field(600, ge=1, description="Request units a principal may spend per minute.")
    create_cost: int = Field(20, ge=1, description="Units a CreateDiscussion costs.")
    read_cost: int = Field(1, ge=1, description="Units any other call costs.")
    enable_memory_monitoring: bool = Field(
        False, description="Turn new discussions away while memory is above a limit (production: on)."
    )
    memory_limit_rss_mb: float = Field(2048.0, gt=0, description="Process RSS above which admission stops.")
    memory_limit_system_percent: float = Field(
        90.0, gt=0, le=100, description="System memory use above which admission stops."
    )
    session_timeout_hours: float = Field(
        24.0, gt=0, description="Idle time after which a discussion expires; also the longest ttl a client may ask."
    )
    cleanup_interval_seconds: float = Field(3600.0, gt=0, description="How often expired discussions are swept.")
    resume_interrupted: bool = Field(
        True, description="On restart, resume discussions a stop cut short (else mark them INTERRUPTED)."
    )
    # Bounded by the ceilings the agent service enforces, so what this service accepts runs there.
    max_rounds: int = Field(5, ge=1, le=limits.MAX_ROUNDS, description="Most debate rounds a discussion may ask for.")
    max_topic_chars: int = Field(4000, ge=1, le=limits.MAX_TOPIC_CHARS, description="Longest topic accepted.")
    max_personas: int = Field(12, ge=1, description="Most personas a discussion may name.")
    agents_call_timeout_seconds: float = Field(
        1800.0, gt=0, description="Deadline of one discussion's run on the agent service."
    )
    # 0 by default: each run is already bounded by agents_call_timeout_seconds, and how long an answer is
    # worth waiting for is the client's call (a slow local model may need long); an operator may cap it here.
    discussion_timeout_seconds: float = Field(
        0.0,
        ge=0,
        le=MAX_DISCUSSION_TIMEOUT_SECONDS,
        description="Longest a whole discussion may take from its creation, queueing included, before it ends "
        "TIMED_OUT; also the most a request's timeout may ask. 0: none (requests may ask up to a week).",
    )
    agents_transport: Literal["lanes", "calls"] = Field(
        "lanes",
        description="How discussions reach the agent service: lanes (many per long-lived stream) or calls (one "
        "RunDiscussion stream each).",
    )
    agent_lanes: int = Field(
        4, ge=1, le=256, description="Lanes (RunLane streams) per session replica, each keyed for the load balancer."
    )
    agent_lane_max_age_seconds: float = Field(
        600.0, gt=0, description="A lane older than this is replaced (drained, a fresh one beside it): rebalancing."
    )
    max_concurrent_agent_runs: int = Field(
        1000,
        ge=1,
        description="RunDiscussion calls open to the agent service at once; more running discussions wait here.",
    )
    # Fault injection for the scale-out tests: widens the window in which a finished document is in the
    # store but its terminal event is not yet in the log, which readers on other replicas must survive.
    terminal_event_delay_seconds: float = Field(
        0.0,
        ge=0,
        le=60,
        description="Testing only: pause between saving a finished discussion and appending its terminal event.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        """Production values fill in whatever the flags and environment left unset."""
        if isinstance(data, dict) and data.get("profile") == "production":
            return {**PRODUCTION, **data}
        return data

    @model_validator(mode="after")
    def _check_identity(self) -> SessionSettings:
        if not self.allow_anonymous and self.api_keys_file is None:
            raise ValueError(
                "allow_anonymous is off (the production default) but no api_keys_file is set: "
                "nobody could call the service; set --api-keys-file or --allow-anonymous true"
            )
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file} does not exist or is not a file")
        return self

    @property
    def principal_cap(self) -> int:
        """Running plus queued discussions one principal may have (all of them when no cap is set)."""
        if self.max_concurrent_sessions_per_principal is None:
            return self.max_concurrent_sessions + self.max_queued_sessions
        return self.max_concurrent_sessions_per_principal

    @property
    def session_timeout_seconds(self) -> float:
        """session_timeout_hours in seconds."""
        return self.session_timeout_hours * 3600
