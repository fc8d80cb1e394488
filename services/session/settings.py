"""Settings of the session service (the seed's names: max_concurrent_sessions, session_timeout_hours, …)."""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings


class SessionSettings(ServiceSettings):
    """Session service settings: listener, store, limits, expiry."""

    model_config = SettingsConfigDict(env_prefix="ROUNDTABLE_SESSION_")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9101, ge=-1, le=65535, description="Prometheus port; 0 picks one, -1 disables.")
    agents_address: str = Field("127.0.0.1:50052", description="host:port of the agent service.")
    store: Literal["sqlite", "memory"] = Field("sqlite", description="Where discussions live.")
    sqlite_path: pathlib.Path = Field(pathlib.Path("var/roundtable.db"), description="SQLite database file.")
    max_concurrent_sessions: int = Field(100, ge=1, description="Discussions running at once on this replica.")
    session_timeout_hours: float = Field(
        24.0, gt=0, description="Idle time after which a discussion expires; also the longest ttl a client may ask."
    )
    cleanup_interval_seconds: float = Field(3600.0, gt=0, description="How often expired discussions are swept.")
    max_rounds: int = Field(5, ge=1, le=10, description="Most debate rounds a discussion may ask for.")
    max_topic_chars: int = Field(4000, ge=1, le=100_000, description="Longest topic accepted.")
    max_personas: int = Field(12, ge=1, description="Most personas a discussion may name.")
    agents_call_timeout_seconds: float = Field(
        1800.0, gt=0, description="Deadline of one discussion's run on the agent service."
    )

    @property
    def session_timeout_seconds(self) -> float:
        """session_timeout_hours in seconds."""
        return self.session_timeout_hours * 3600
