"""Static checks of the Kubernetes manifests under ``deploy/k8s`` (no cluster needed)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click
import pytest
import yaml

from fleetworks import timing
from fleetworks.reaper import control_queue
from fleetworks.settings import Settings
from tests.cli_parse import parse
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
DOCKERFILE = ROOT / "Dockerfile"

NAMESPACE = "fleetworks"
CONFIG_MAP = "fleetworks-config"
SECRET = "fleetworks-secrets"
WORKER = "fleetworks-worker"
BEAT = "fleetworks-beat"
RELAY = "fleetworks-relay"
CONTROLLERS = "fleetworks-controllers"
FLOWER = "fleetworks-flower"
METRICS = "fleetworks-metrics"
ETCD = "etcd"
COMPOSE_FILE = ROOT / "docker-compose.yml"
IMAGE = "fleetworks:latest"

#: Kinds without a namespace of their own.
CLUSTER_SCOPED = frozenset({"Namespace"})
#: Kinds whose pod template runs fleetworks containers.
WORKLOADS = frozenset({"Deployment", "Job"})
#: Fragments of a variable name that mark it as a secret.
SECRET_MARKERS = ("URL", "AUTH", "PASSWORD", "SECRET", "TOKEN")

#: ``$(NAME)`` as Kubernetes expands it in ``command`` and ``args`` (``$$(NAME)`` is literal).
_REFERENCE = re.compile(r"(?<!\$)\$\((?P<name>[A-Za-z_][A-Za-z0-9_]*)\)")


def _manifest_files() -> list[Path]:
    """Every YAML file under ``deploy/k8s`` except the kustomization itself."""
    return sorted(
        path
        for path in K8S_DIR.iterdir()
        if path.suffix in (".yaml", ".yml") and path != KUSTOMIZATION
    )


def _find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one resource of ``kind`` named ``name``."""
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Deployments and Jobs."""
    return [r for r in resources if r["kind"] in WORKLOADS]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    """A workload's init containers and containers."""
    spec = _pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _argv(container: dict[str, Any]) -> list[str]:
    """A container's ``command`` followed by its ``args``, as strings."""
    return [str(part) for part in [*container.get("command", []), *container.get("args", [])]]


def _option(argv: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` in ``argv`` (``-c 2`` or ``--concurrency=2``)."""
    for index, word in enumerate(argv):
        for name in names:
            if word == name and index + 1 < len(argv):
                return argv[index + 1]
            if word.startswith(f"{name}="):
                return word.split("=", 1)[1]
    return None


def _only_container(resources: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    containers = _pod_spec(_find(resources, "Deployment", deployment))["containers"]
    assert len(containers) == 1, f"{deployment} should run one container"
    container: dict[str, Any] = containers[0]
    return container


def _container_ports(workload: dict[str, Any]) -> set[int | str]:
    """Every container port of a workload, by number and by name."""
    ports: set[int | str] = set()
    for container in _containers(workload):
        for port in container.get("ports", []):
            ports.add(int(port["containerPort"]))
            if "name" in port:
                ports.add(str(port["name"]))
    return ports


def _secret_keys(secret: dict[str, Any]) -> set[str]:
    return set(secret.get("stringData") or {}) | set(secret.get("data") or {})


def _env_from_keys(resources: list[dict[str, Any]], container: dict[str, Any]) -> set[str]:
    """The variables a container gets from ``env`` and from its ``envFrom`` sources."""
    names = {str(entry["name"]) for entry in container.get("env", [])}
    for source in container.get("envFrom", []):
        prefix = str(source.get("prefix", ""))
        if "configMapRef" in source:
            config = _find(resources, "ConfigMap", source["configMapRef"]["name"])
            names |= {prefix + key for key in config.get("data") or {}}
        if "secretRef" in source:
            secret = _find(resources, "Secret", source["secretRef"]["name"])
            names |= {prefix + key for key in _secret_keys(secret)}
    return names


def _scaled_object(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return _find(resources, "ScaledObject", WORKER)


def _behavior(resources: list[dict[str, Any]], direction: str) -> dict[str, Any]:
    """``scaleUp`` or ``scaleDown`` of the worker ScaledObject's HPA behaviour."""
    advanced = _scaled_object(resources)["spec"]["advanced"]
    rules: dict[str, Any] = advanced["horizontalPodAutoscalerConfig"]["behavior"][direction]
    return rules


def _metrics_trigger(resources: list[dict[str, Any]]) -> dict[str, Any]:
    triggers = _scaled_object(resources)["spec"]["triggers"]
    found = [t for t in triggers if t["type"] == "metrics-api"]
    assert len(found) == 1, "the worker ScaledObject should have one metrics-api trigger"
    metadata: dict[str, Any] = found[0]["metadata"]
    return metadata


def _dockerfile_value(pattern: str) -> str:
    match = re.search(pattern, DOCKERFILE.read_text(encoding="utf-8"))
    assert match, f"Dockerfile has no match for {pattern!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    """The parsed ``kustomization.yaml``."""
    data = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    """Every YAML document of every manifest file."""
    docs: list[dict[str, Any]] = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            docs.append(doc)
    assert docs, "no manifests under deploy/k8s"
    return docs


@pytest.fixture(scope="module")
def config(resources: list[dict[str, Any]]) -> dict[str, str]:
    """The ``data`` of the shared ConfigMap."""
    data = _find(resources, "ConfigMap", CONFIG_MAP).get("data") or {}
    return {str(key): str(value) for key, value in data.items()}


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    """Every file the kustomization lists exists, and every manifest file is listed."""
    listed = [str(entry) for entry in kustomization.get("resources", [])]
    missing = [name for name in listed if not (K8S_DIR / name).is_file()]
    assert not missing, f"listed but absent: {missing}"
    unlisted = sorted({p.name for p in _manifest_files()} - set(listed))
    assert not unlisted, f"not in kustomization.yaml: {unlisted}"
    assert kustomization.get("namespace") == NAMESPACE


def test_resources_named_and_namespaced(resources: list[dict[str, Any]]) -> None:
    """Every resource has apiVersion, kind and a name, and lives in the fleetworks namespace."""
    for resource in resources:
        assert resource.get("apiVersion"), f"no apiVersion: {resource}"
        assert resource.get("kind"), f"no kind: {resource}"
        metadata = resource.get("metadata") or {}
        assert metadata.get("name"), f"{resource['kind']} has no name"
        label = f"{resource['kind']} {metadata['name']}"
        if resource["kind"] in CLUSTER_SCOPED:
            assert metadata["name"] == NAMESPACE, label
        else:
            assert metadata.get("namespace") == NAMESPACE, f"{label} is not in {NAMESPACE}"


def test_deployment_selectors_match_template_labels(resources: list[dict[str, Any]]) -> None:
    """Each Deployment's selector picks the pods of its own template."""
    for deployment in (r for r in resources if r["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector, f"{name} has an empty selector"
        assert selector.items() <= labels.items(), f"{name}: {selector} vs {labels}"


def test_services_select_deployments_and_ports(resources: list[dict[str, Any]]) -> None:
    """Each Service selects some Deployment's or StatefulSet's pods and targets one
    of their container ports."""
    deployments = [r for r in resources if r["kind"] in ("Deployment", "StatefulSet")]
    for service in (r for r in resources if r["kind"] == "Service"):
        name = service["metadata"]["name"]
        selector = service["spec"]["selector"]
        targets = [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert targets, f"Service {name} selects no Deployment"
        ports = set().union(*(_container_ports(d) for d in targets))
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports, f"Service {name}: targetPort {target} not in {ports}"


def test_container_programs(resources: list[dict[str, Any]]) -> None:
    """Every container runs Celery on the ``config`` app or the ``fleetworks`` CLI."""
    for workload in _workloads(resources):
        for container in _containers(workload):
            argv = _argv(container)
            label = f"{workload['metadata']['name']}/{container['name']}"
            assert argv, f"{label} has no command"
            if argv[0] == "celery":
                assert argv[1:3] == ["-A", "config"], f"{label}: {argv}"
            else:
                assert argv[0] == "fleetworks", f"{label} runs {argv[0]}"


def test_every_container_command_parses_with_its_cli(resources: list[dict[str, Any]]) -> None:
    """Every ``fleetworks ...`` or ``celery -A config ...`` a container runs goes
    through that CLI's own parser: commands, options and values all exist."""
    wrong: list[str] = []
    for workload in _workloads(resources):
        for container in _containers(workload):
            argv = _argv(container)
            try:
                chain = parse(argv)
            except click.ClickException as exc:
                wrong.append(f"{workload['metadata']['name']}: {' '.join(argv)}: {exc}")
                continue
            if len(chain) < 2:
                wrong.append(f"{workload['metadata']['name']}: no subcommand in {argv}")
    assert not wrong, wrong


def test_worker_grace_period_covers_longest_task(
    resources: list[dict[str, Any]], config: dict[str, str]
) -> None:
    """The worker's grace period covers the longest task, the retry back-off and the slack."""
    time_limit = max(Settings().max_time_limit_s, float(config["FLEET_MAX_TIME_LIMIT_S"]))
    needed = time_limit + timing.RETRY_BACKOFF_MAX_S + timing.VISIBILITY_SLACK_S
    grace = _pod_spec(_find(resources, "Deployment", WORKER))["terminationGracePeriodSeconds"]
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < {needed}"


def test_worker_replicas_left_to_keda(resources: list[dict[str, Any]]) -> None:
    """The worker Deployment sets no replica count, which would fight the autoscaler."""
    assert "replicas" not in _find(resources, "Deployment", WORKER)["spec"]


def test_worker_command_matches_config(
    resources: list[dict[str, Any]], config: dict[str, str]
) -> None:
    """The worker consumes FLEET_QUEUE with FLEET_WORKER_CONCURRENCY processes."""
    argv = _argv(_only_container(resources, WORKER))
    assert argv[3] == "worker", argv
    queue = config["FLEET_QUEUE"]
    assert _option(argv, "-Q", "--queues") == f"{queue},{control_queue(queue)}"
    assert _option(argv, "-c", "--concurrency") == config["FLEET_WORKER_CONCURRENCY"]


def test_beat_is_highly_available(resources: list[dict[str, Any]]) -> None:
    """At least two beat replicas run: one leads, another takes over."""
    assert _find(resources, "Deployment", BEAT)["spec"]["replicas"] >= 2


def test_the_events_relay_runs_twice(resources: list[dict[str, Any]]) -> None:
    """Two relay replicas: any number is safe, and one survives a node."""
    relay = _find(resources, "Deployment", RELAY)
    assert relay["spec"]["replicas"] >= 2
    assert _argv(_containers(relay)[0])[-1] == "relay"


def test_controllers_run_twice(resources: list[dict[str, Any]]) -> None:
    """Two controllers replicas: the groups spread between them, and one takes
    the other's groups when it goes."""
    controllers = _find(resources, "Deployment", CONTROLLERS)
    assert controllers["spec"]["replicas"] >= 2
    assert _argv(_containers(controllers)[0])[-1] == "controllers"


def _etcd_members(resources: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The etcd StatefulSet and its one container's argv."""
    etcd = _find(resources, "StatefulSet", ETCD)
    (container,) = _pod_spec(etcd)["containers"]
    return etcd, _argv(container)


def test_controllers_elect_on_the_etcd_cluster(resources: list[dict[str, Any]]) -> None:
    """The Secret's FLEET_LEADERSHIP_URL names the etcd Service's client port,
    which selects the StatefulSet's members."""
    url = _find(resources, "Secret", SECRET)["stringData"]["FLEET_LEADERSHIP_URL"]
    parts = urlsplit(url)
    assert parts.scheme == "etcd" and parts.hostname == ETCD, url
    service = _find(resources, "Service", ETCD)
    assert parts.port in [p["port"] for p in service["spec"]["ports"]], url
    etcd, _ = _etcd_members(resources)
    labels = etcd["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # The settings accept it.
    assert Settings(leadership_url=url).leadership_url == url


def test_etcd_members_form_one_cluster(resources: list[dict[str, Any]]) -> None:
    """An odd number of members (3 or more: a majority survives one), started
    together, each named by its pod and listed in ``--initial-cluster`` at its
    stable address behind the headless peer Service, with its data on a volume
    claim; the image pinned to the Compose file's."""
    etcd, argv = _etcd_members(resources)
    spec = etcd["spec"]
    replicas = int(spec["replicas"])
    assert replicas >= 3 and replicas % 2 == 1, replicas
    # OrderedReady would wait for etcd-0 to be ready, which needs a majority.
    assert spec["podManagementPolicy"] == "Parallel"
    peers = _find(resources, "Service", spec["serviceName"])["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    domain = f"{spec['serviceName']}.{NAMESPACE}.svc"
    members = dict(
        entry.split("=", 1) for entry in (_option(argv, "--initial-cluster") or "").split(",")
    )
    expected = {f"{ETCD}-{i}": f"http://{ETCD}-{i}.{domain}:2380" for i in range(replicas)}
    assert members == expected
    assert _option(argv, "--name") == "$(POD_NAME)"
    assert _option(argv, "--initial-advertise-peer-urls") == f"http://$(POD_NAME).{domain}:2380"
    (container,) = _pod_spec(etcd)["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    data_dir = _option(argv, "--data-dir") or ""
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert any(data_dir.startswith(path + "/") and mounts[path] in claims for path in mounts)
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert container["image"] == compose["services"]["etcd"]["image"]


def test_etcd_flags_known_to_etcd(resources: list[dict[str, Any]]) -> None:
    """Every flag the members start with is one the ``etcd`` binary documents."""
    binary = shutil.which("etcd")
    require(binary is not None, "etcd not installed (Debian: etcd-server)")
    assert binary is not None
    usage = subprocess.run(
        [binary, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    documented = set(re.findall(r"(--[a-z][a-z0-9-]*)", usage.stdout + usage.stderr))
    _, argv = _etcd_members(resources)
    flags = [word.split("=", 1)[0] for word in argv[1:]]
    assert argv[0] == "etcd"
    unknown = sorted(set(flags) - documented)
    assert not unknown, f"flags etcd --help does not list: {unknown}"


def test_scaled_object_targets_worker(resources: list[dict[str, Any]]) -> None:
    """The ScaledObject scales the worker Deployment."""
    target = _scaled_object(resources)["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == WORKER
    _find(resources, "Deployment", WORKER)


def test_scaled_object_reads_metrics_service(
    resources: list[dict[str, Any]], config: dict[str, str]
) -> None:
    """The trigger URL is the metrics Service's in-cluster name and port, for our queue."""
    url = urlsplit(_metrics_trigger(resources)["url"])
    service = _find(resources, "Service", METRICS)
    assert url.hostname == f"{METRICS}.{NAMESPACE}.svc.cluster.local"
    assert url.port in {port["port"] for port in service["spec"]["ports"]}
    assert url.path == "/scale"
    assert parse_qs(url.query).get("queue") == [config["FLEET_QUEUE"]]


def test_scaled_object_target_value(
    resources: list[dict[str, Any]], config: dict[str, str]
) -> None:
    """targetValue is the target per worker process times the processes per pod."""
    trigger = _metrics_trigger(resources)
    per_pod = int(config["FLEET_AUTOSCALE_TARGET_PER_WORKER"]) * int(
        config["FLEET_WORKER_CONCURRENCY"]
    )
    assert math.isclose(float(trigger["targetValue"]), per_pod), trigger
    assert trigger["valueLocation"] == "load"


def test_scale_down_is_gradual(resources: list[dict[str, Any]]) -> None:
    """Scale-down removes at most one pod per period, after a stabilization window."""
    rules = _behavior(resources, "scaleDown")
    assert rules["stabilizationWindowSeconds"] > 0
    policies = rules["policies"]
    assert policies
    for policy in policies:
        assert policy["type"] == "Pods" and policy["value"] <= 1, policy
        assert policy["periodSeconds"] > 0, policy


def test_scale_up_is_immediate(resources: list[dict[str, Any]]) -> None:
    """Scale-up has no stabilization window."""
    assert _behavior(resources, "scaleUp")["stabilizationWindowSeconds"] == 0


def test_flower_requires_basic_auth(resources: list[dict[str, Any]]) -> None:
    """Flower listens beyond loopback, so it is started with ``--basic-auth``."""
    argv = _argv(_only_container(resources, FLOWER))
    assert argv[3] == "flower", argv
    assert _option(argv, "--basic-auth"), f"flower runs without --basic-auth: {argv}"


def test_command_variables_are_defined(resources: list[dict[str, Any]]) -> None:
    """Every ``$(NAME)`` in a command comes from the container's env or envFrom sources."""
    for workload in _workloads(resources):
        for container in _containers(workload):
            referenced = {m.group("name") for m in _REFERENCE.finditer(" ".join(_argv(container)))}
            undefined = sorted(referenced - _env_from_keys(resources, container))
            label = f"{workload['metadata']['name']}/{container['name']}"
            assert not undefined, f"{label} references undefined {undefined}"


def test_config_map_holds_no_secrets(config: dict[str, str]) -> None:
    """URLs, credentials and passwords are in the Secret, never in the ConfigMap."""
    leaked = sorted(key for key in config if any(m in key.upper() for m in SECRET_MARKERS))
    assert not leaked, f"secret-looking keys in the ConfigMap: {leaked}"


def test_fleet_variables_are_settings_fields(resources: list[dict[str, Any]]) -> None:
    """Every ``FLEET_*`` key of the ConfigMap and the Secret is read by the settings class."""
    known = {"FLEET_" + field.upper() for field in Settings.model_fields}
    keys = set(_find(resources, "ConfigMap", CONFIG_MAP).get("data") or {})
    keys |= _secret_keys(_find(resources, "Secret", SECRET))
    unknown = sorted(key for key in keys if key.startswith("FLEET_") and key not in known)
    assert not unknown, f"not settings fields: {unknown}"


def test_containers_hardened(resources: list[dict[str, Any]]) -> None:
    """Every container: our image, both env sources, the Dockerfile's non-root user, no
    privilege escalation, and a writable FLEET_HOME when the root filesystem is read-only."""
    uid = int(_dockerfile_value(r"useradd\b[^\n]*--uid\s+(\d+)"))
    home = _dockerfile_value(r"FLEET_HOME=(\S+)")
    for workload in _workloads(resources):
        pod = _pod_spec(workload)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in _containers(workload):
            label = f"{workload['metadata']['name']}/{container['name']}"
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert container["image"] == IMAGE, label
            sources = {
                (s.get("configMapRef") or s.get("secretRef") or {}).get("name")
                for s in container.get("envFrom", [])
            }
            assert {CONFIG_MAP, SECRET} <= sources, f"{label} envFrom {sources}"
            assert context.get("runAsNonRoot") is True, label
            assert context.get("runAsUser") == uid, label
            assert context.get("allowPrivilegeEscalation") is False, label
            if context.get("readOnlyRootFilesystem"):
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert home in mounts, f"{label}: read-only root and no volume at {home}"
                assert "emptyDir" in volumes[mounts[home]], label


def test_metrics_exporter_scraped_and_probed(resources: list[dict[str, Any]]) -> None:
    """The exporter's pods are annotated for Prometheus and ready when /metrics answers."""
    deployment = _find(resources, "Deployment", METRICS)
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    ports = _container_ports(deployment)
    assert annotations.get("prometheus.io/scrape") == "true"
    assert int(annotations["prometheus.io/port"]) in ports
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    probe = _only_container(resources, METRICS)["readinessProbe"]["httpGet"]
    assert probe["path"] == "/metrics"
    assert probe["port"] in ports
