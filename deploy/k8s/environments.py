"""The overlays: what differs between environments, as typed values the base manifests are built from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Resources:
    """Requests and the memory limit of one container.

    No CPU limit: throttling a gRPC event loop shows up as latency everywhere; the CPU request
    still reserves capacity and is what the HorizontalPodAutoscaler's utilisation is measured against.
    """

    cpu_request: str
    memory_request: str
    memory_limit: str


@dataclass(frozen=True)
class Scaling:
    """HorizontalPodAutoscaler bounds of one Deployment."""

    min_replicas: int
    max_replicas: int
    target_cpu_percent: int = 70


@dataclass(frozen=True)
class Environment:
    """One deployment target; `render` turns it into manifests."""

    name: str
    namespace: str
    session_profile: str
    log_level: str
    session: Scaling
    agents: Scaling
    envoy: Scaling
    session_resources: Resources
    agents_resources: Resources
    monitor_resources: Resources
    envoy_resources: Resources
    # dev: Redis as a StatefulSet with a PersistentVolumeClaim in the namespace. prod: a managed Redis
    # (Memorystore, ElastiCache, Azure Cache, …) whose rediss:// URL is in Secret roundtable-redis;
    # `managed_redis_cidr` and `managed_redis_port` open the egress to it.
    in_cluster_redis: bool
    redis_resources: Resources = Resources("100m", "128Mi", "512Mi")
    redis_storage: str = "1Gi"
    redis_maxmemory: str = "400mb"
    managed_redis_cidr: str = ""
    managed_redis_port: int = 6380
    # dev: the built-in LLM simulator in the namespace. prod: a provider over HTTPS egress.
    simulator: bool = False
    simulator_resources: Resources = Resources("50m", "64Mi", "256Mi")
    llm_backend: str = "openai"
    llm_base_url: str = "https://api.example.com/v1"
    llm_model: str = "some-model"
    # Spread replicas over nodes (prod): losing a node then costs one replica of each.
    spread_over_nodes: bool = False
    # Where Prometheus runs, and the labels its serviceMonitorSelector / ruleSelector match.
    prometheus_namespace: str = "monitoring"
    prometheus_pod_labels: dict[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "prometheus"})
    prometheus_selector_labels: dict[str, str] = field(default_factory=lambda: {"release": "prometheus"})
    dns_namespace: str = "kube-system"
    dns_pod_labels: dict[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})


DEV = Environment(
    name="dev",
    namespace="roundtable-dev",
    session_profile="development",
    log_level="DEBUG",
    session=Scaling(min_replicas=1, max_replicas=2),
    agents=Scaling(min_replicas=1, max_replicas=2),
    envoy=Scaling(min_replicas=1, max_replicas=2),
    session_resources=Resources("100m", "128Mi", "512Mi"),
    agents_resources=Resources("100m", "128Mi", "512Mi"),
    monitor_resources=Resources("50m", "64Mi", "256Mi"),
    envoy_resources=Resources("50m", "64Mi", "256Mi"),
    in_cluster_redis=True,
    simulator=True,
    llm_backend="simulator",
    llm_base_url="http://roundtable-simulator:50060/v1",
    llm_model="roundtable-sim-1",
)

PROD = Environment(
    name="prod",
    namespace="roundtable",
    session_profile="production",
    log_level="INFO",
    session=Scaling(min_replicas=3, max_replicas=12),
    agents=Scaling(min_replicas=3, max_replicas=12),
    envoy=Scaling(min_replicas=2, max_replicas=6),
    session_resources=Resources("500m", "512Mi", "2Gi"),
    agents_resources=Resources("500m", "512Mi", "2Gi"),
    monitor_resources=Resources("100m", "128Mi", "512Mi"),
    envoy_resources=Resources("250m", "128Mi", "512Mi"),
    in_cluster_redis=False,
    # Placeholders (the Environment defaults): the provider's base URL and model, and the private
    # range your managed Redis answers on.
    managed_redis_cidr="10.0.0.0/8",
    spread_over_nodes=True,
)

ENVIRONMENTS: tuple[Environment, ...] = (DEV, PROD)
