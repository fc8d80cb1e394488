"""The settings every gRPC service shares; each service subclasses them with its own fields."""

from __future__ import annotations

import importlib.util
import pathlib
import socket
import uuid
from typing import Any, Literal, Self, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.service_auth import INTERNAL_TOKEN_ENV, MIN_TOKEN_CHARS

Profile = Literal["development", "production"]
LogFormat = Literal["text", "json"]
EventLoop = Literal["auto", "uvloop", "asyncio"]
TLS_FILE_FIELDS = (
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "tls_ca_file",
    "tls_client_cert_file",
    "tls_client_key_file",
)


def default_instance_id() -> str:
    """A per-process instance id: host name plus a short random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class ServiceSettings(BaseSettings):
    """Listener, logging, metrics and shutdown settings common to all services.

    Each value comes from (highest first) a command-line flag, an environment
    variable with the service's prefix, or the default here.
    """

    # populate_by_name: internal_token=… works in code although its environment name is unprefixed.
    model_config = SettingsConfigDict(frozen=True, extra="forbid", cli_kebab_case=True, populate_by_name=True)

    profile: Profile = Field(
        "development",
        description="development, or production: the production defaults (session: the seed's production "
        "values), and no start without the service credential (--internal-token) or mTLS both ways.",
    )
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        0, ge=-1, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables."
    )
    log_level: str = Field("INFO", description="Root log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: LogFormat = Field(
        "text", description="Log format, console and session files: text or json (one object a line)."
    )
    session_log_dir: pathlib.Path | None = Field(
        pathlib.Path("logs"), description="Where each session's own log file goes (session_<id>.log); empty: none."
    )
    session_log_max_bytes: int = Field(
        1_000_000, ge=1024, description="Size cap of one session's log file; past it lines are dropped."
    )
    session_log_max_open_files: int = Field(
        256, ge=1, description="Session log files held open at once (least recently written closed first)."
    )
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
    max_unrequested_rpc_seconds: int = Field(
        1800,
        ge=1,
        description="How long gRPC core holds a call the application has not picked up yet before cancelling it; "
        "at least the longest deadline callers give (the session's --agents-call-timeout-seconds).",
    )
    event_loop: EventLoop = Field(
        "auto", description="Event loop: uvloop, asyncio's own, or auto (uvloop when it is installed)."
    )
    event_loop_lag_interval_seconds: float = Field(
        0.1, gt=0, description="How often event-loop lag is sampled into roundtable_event_loop_lag_seconds."
    )
    health_check_interval_seconds: float = Field(
        5.0, gt=0, description="How often the service's health components (store, channels) are checked."
    )
    health_failures_before_not_serving: int = Field(
        3, ge=1, description="Failed checks in a row before a passing health component turns the service NOT_SERVING."
    )
    health_check_timeout_seconds: float = Field(
        2.0, gt=0, description="A health check not answered within this time counts as failing."
    )
    monitor_address: str = Field("", description="host:port of the monitor service; empty disables reports.")
    report_interval_seconds: float = Field(10.0, gt=0, description="How often to report to the monitor.")
    tls_cert_file: pathlib.Path | None = Field(
        None, description="PEM certificate chain the gRPC server presents; with --tls-key-file, serve TLS only."
    )
    tls_key_file: pathlib.Path | None = Field(None, description="PEM private key of --tls-cert-file.")
    tls_client_ca_file: pathlib.Path | None = Field(
        None, description="PEM CA certificates; when set, clients must present a certificate they signed (mTLS)."
    )
    tls_ca_file: pathlib.Path | None = Field(
        None, description="PEM CA certificates servers this service calls must chain to; when set, calls use TLS."
    )
    tls_client_cert_file: pathlib.Path | None = Field(
        None, description="PEM certificate chain this service presents when it calls a server requiring mTLS."
    )
    tls_client_key_file: pathlib.Path | None = Field(None, description="PEM private key of --tls-client-cert-file.")
    # One variable for every service (not prefixed): all of them must hold the same secret.
    internal_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices(INTERNAL_TOKEN_ENV, "internal-token"),
        description=f"Shared secret (at least {MIN_TOKEN_CHARS} characters) sent on calls to the agent and "
        "monitor services, which then refuse calls without it; environment: "
        f"{INTERNAL_TOKEN_ENV} for every service.",
    )

    @field_validator(*TLS_FILE_FIELDS, "session_log_dir", "internal_token", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        # An empty flag or environment variable turns TLS off, like an empty --monitor-address.
        return None if value == "" else value

    @field_validator("event_loop")
    @classmethod
    def _uvloop_installed(cls, event_loop: EventLoop) -> EventLoop:
        if event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed (it has no Windows build); use auto or asyncio")
        return event_loop

    @field_validator(*TLS_FILE_FIELDS)
    @classmethod
    def _readable_pem(cls, path: pathlib.Path | None, info: ValidationInfo) -> pathlib.Path | None:
        if path is None:
            return None
        try:
            content = path.read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
        kind = "PRIVATE KEY" if info.field_name in ("tls_key_file", "tls_client_key_file") else "CERTIFICATE"
        if b"-----BEGIN " not in content or f"{kind}-----".encode() not in content:
            raise ValueError(f"{path} holds no PEM {kind.lower()}")
        return path

    @field_validator("internal_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"internal_token must be at least {MIN_TOKEN_CHARS} characters")
        return token

    @model_validator(mode="after")
    def _production_authenticates_services(self) -> Self:
        mutual_tls = self.tls_client_ca_file is not None and self.tls_client_cert_file is not None
        if self.profile == "production" and self.internal_token is None and not mutual_tls:
            raise ValueError(
                f"the production profile needs the service credential: set {INTERNAL_TOKEN_ENV} "
                "(--internal-token, the same on every service) or mTLS both ways "
                "(--tls-client-ca-file and --tls-client-cert-file)"
            )
        return self

    @property
    def internal_token_value(self) -> str:
        """The service credential in clear, or "" when none is set."""
        return "" if self.internal_token is None else self.internal_token.get_secret_value()

    @model_validator(mode="after")
    def _tls_settings_fit_together(self) -> Self:
        for cert, key in (("tls_cert_file", "tls_key_file"), ("tls_client_cert_file", "tls_client_key_file")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                missing = key if getattr(self, key) is None else cert
                raise ValueError(f"{cert} and {key} go together, but {missing} is not set")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs the server's own tls_cert_file and tls_key_file")
        if self.tls_client_cert_file is not None and self.tls_ca_file is None:
            raise ValueError("tls_client_cert_file needs tls_ca_file: a client certificate is only sent over TLS")
        return self


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
            if not field:  # a check across settings: its message names them
                lines.append(f"  {problem['msg']}")
                continue
            lines.append(
                f"  {field} (--{field.replace('_', '-')} or {prefix}{field.upper()}): {problem['msg']}"
                f" (got {problem.get('input')!r})"
            )
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
