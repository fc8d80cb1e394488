"""The settings every gRPC service shares; each service subclasses them with its own fields."""

from __future__ import annotations

import socket
import uuid
from typing import Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogFormat = Literal["text", "json"]


def default_instance_id() -> str:
    """A per-process instance id: host name plus a short random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class ServiceSettings(BaseSettings):
    """Listener, logging, metrics and shutdown settings common to all services.

    Each value comes from (highest first) a command-line flag, an environment
    variable with the service's prefix, or the default here.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", cli_kebab_case=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        0, ge=-1, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables."
    )
    log_level: str = Field("INFO", description="Root log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: LogFormat = Field("text", description="Console log format: text or json (one object a line).")
    enable_reflection: bool = Field(True, description="Serve gRPC server reflection.")
    instance_id: str = Field(default_factory=default_instance_id, description="Id in monitor reports.")
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight RPCs may take to finish."
    )
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent.")
    max_pending_rpcs: int = Field(
        10_000,
        ge=1,
        description="RPCs gRPC core may hold before the application picks them up; past it calls are "
        "cancelled, so it sits above what admission control lets through.",
    )
    monitor_address: str = Field("", description="host:port of the monitor service; empty disables reports.")
    report_interval_seconds: float = Field(10.0, gt=0, description="How often to report to the monitor.")


S = TypeVar("S", bound=ServiceSettings)


def load_settings(settings_cls: type[S], argv: list[str] | None = None) -> S:
    """Parse flags over environment over defaults; exit 2 with a readable message when invalid."""
    import sys

    from pydantic import ValidationError

    try:
        return settings_cls(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as error:
        prefix = settings_cls.model_config.get("env_prefix", "")
        lines = [f"invalid settings for {settings_cls.__name__}:"]
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"])
            lines.append(
                f"  {field} (--{field.replace('_', '-')} or {prefix}{field.upper()}): {problem['msg']}"
                f" (got {problem.get('input')!r})"
            )
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
