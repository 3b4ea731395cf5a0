"""Static checks of the Docker Compose deployment and its Dockerfile (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fleetworks import timing
from fleetworks.reaper import control_queue
from fleetworks.settings import Settings
from tests.cli_parse import parse

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = (
    "redis", "postgres", "etcd", "migrate", "worker", "beat", "relay", "controllers", "flower",
    "metrics",
)  # fmt: skip
APP_SERVICES = ("migrate", "worker", "beat", "relay", "controllers", "flower", "metrics")
BACKING_SERVICES = ("redis", "postgres", "etcd")
REQUIRED_ENV = ("FLEET_BROKER_URL", "FLEET_REDIS_URL", "FLEET_DATABASE_URL")
DEPENDS_CONDITIONS = frozenset(
    {"service_started", "service_healthy", "service_completed_successfully"}
)
DOCKERFILE_SOURCES = ("fleetworks", "config", "agents", "tasks", "beat_schedule.py")
MONITORING_SERVICES = ("prometheus", "grafana")

#: ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?err}``, ``${NAME?err}``.
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
_DURATION_PART = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>us|ms|h|m|s)")
_DURATION_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _interpolate(value: str) -> str:
    """``value`` as Compose would expand it with no variables set (defaults applied)."""

    def replace(match: re.Match[str]) -> str:
        op = match.group("op") or ""
        return match.group("arg") if op.endswith("-") else "unset"

    return _VARIABLE.sub(replace, value).replace("$$", "$")


def _parse_duration(value: str | float) -> float:
    """Seconds in a Compose duration such as ``40s``, ``1m30s`` or a bare number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    if not re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", text):
        raise ValueError(f"not a Compose duration: {value!r}")
    return sum(
        float(m.group("value")) * _DURATION_UNITS_S[m.group("unit")]
        for m in _DURATION_PART.finditer(text)
    )


def _command(service: dict[str, Any]) -> str:
    """A service's ``command`` as one string, whichever form the file uses."""
    command = service["command"]
    if isinstance(command, list):
        return shlex.join(str(part) for part in command)
    return " ".join(str(command).split())


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``depends_on`` as ``{target: condition}`` (short form means started)."""
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {
        name: (spec or {}).get("condition", "service_started") for name, spec in depends.items()
    }


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` mapping, values as strings."""
    environment = service.get("environment") or {}
    assert isinstance(environment, dict), "environment must be a mapping"
    return {str(key): str(value) for key, value in environment.items()}


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts of this repository as ``{container path: host path}``."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = str(volume.get("source", "")), str(volume["target"])
        else:
            source, target = str(volume).split(":")[:2]
        if source.startswith(("./", "../")):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def _in_container(mounts: dict[str, Path], path: str) -> Path:
    """The host file behind container ``path``, through the mount that holds it."""
    for target, source in mounts.items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / path[len(target) :].lstrip("/")
    raise AssertionError(f"{path} is not under any bind mount of {sorted(mounts)}")


def _option(service: dict[str, Any], name: str) -> str:
    """The value of ``--name=value`` (or ``--name value``) in a service's command."""
    argv = shlex.split(_command(service))
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    raise AssertionError(f"no --{name} in {argv}")


def _published_on_loopback(service: dict[str, Any]) -> bool:
    ports = service.get("ports") or []
    return bool(ports) and all(
        (port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]) == "127.0.0.1"
        for port in ports
    )


def _copy_sources(dockerfile: str) -> set[str]:
    """Every source path named by a ``COPY`` instruction, without ``./`` or a trailing ``/``."""
    sources: set[str] = set()
    for line in dockerfile.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY":
            continue
        args = [word for word in words[1:] if not word.startswith("--")]
        for source in args[:-1]:
            sources.add(source.removeprefix("./").rstrip("/"))
    return sources


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed Compose file."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``services`` section of the Compose file."""
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def test_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    """The file follows the Compose spec, which has no top-level ``version``."""
    assert "version" not in compose


def test_all_services_defined(services: dict[str, dict[str, Any]]) -> None:
    """The six fleet services are all defined."""
    assert set(SERVICES) <= set(services)


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_image_or_build(services: dict[str, dict[str, Any]], name: str) -> None:
    """Every service either pulls an image or builds one."""
    assert "image" in services[name] or "build" in services[name]


@pytest.mark.parametrize("name", BACKING_SERVICES)
def test_backing_service_has_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    """Redis and PostgreSQL declare a healthcheck test."""
    healthcheck = services[name].get("healthcheck") or {}
    assert healthcheck.get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_command(services: dict[str, dict[str, Any]], name: str) -> None:
    """Every app service runs Celery on the ``config`` app or the ``fleetworks`` CLI,
    and its command line parses with that CLI's own parser, options and all."""
    argv = shlex.split(_command(services[name]))
    chain = parse(argv)
    assert chain[0][0] == "fleetworks" or chain[0][1]["app"] == "config", argv
    assert len(chain) > 1, f"{name}: no subcommand in {argv}"
    if chain[-1][0] == "worker":
        # The fleet's reaper travels on the control queue: every worker consumes it.
        queue = _environment(services[name]).get("FLEET_QUEUE", "fleet")
        assert chain[-1][1]["queues"] == [queue, control_queue(queue)], argv


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_environment(services: dict[str, dict[str, Any]], name: str) -> None:
    """Every app service gets the broker, Redis and PostgreSQL URLs of the stack."""
    environment = _environment(services[name])
    missing = [key for key in REQUIRED_ENV if key not in environment]
    assert not missing, f"{name} lacks {missing}"
    assert _interpolate(environment["FLEET_DATABASE_URL"]).startswith("postgresql+psycopg://")
    assert urlsplit(_interpolate(environment["FLEET_BROKER_URL"])).hostname == "redis"


def test_fleet_variables_are_settings_fields(services: dict[str, dict[str, Any]]) -> None:
    """Every ``FLEET_*`` variable set in the file is read by the settings class."""
    known = {"FLEET_" + field.upper() for field in Settings.model_fields}
    used = {key for service in services.values() for key in _environment(service)}
    unknown = sorted(key for key in used if key.startswith("FLEET_") and key not in known)
    assert not unknown, f"not settings fields: {unknown}"


def test_depends_on_targets_and_conditions(services: dict[str, dict[str, Any]]) -> None:
    """Every dependency names a defined service with a valid condition."""
    for name, service in services.items():
        for target, condition in _depends_on(service).items():
            assert target in services, f"{name} depends on undefined {target}"
            assert condition in DEPENDS_CONDITIONS, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{target} has no healthcheck"


def test_worker_waits_for_migrations(services: dict[str, dict[str, Any]]) -> None:
    """The worker starts only after the migrate job has completed successfully."""
    assert _depends_on(services["worker"]).get("migrate") == "service_completed_successfully"


def test_flower_is_local_and_authenticated(services: dict[str, dict[str, Any]]) -> None:
    """Flower publishes on the loopback interface only and requires basic auth."""
    flower = services["flower"]
    ports = flower.get("ports") or []
    assert ports, "flower publishes no port"
    for port in ports:
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
        assert host_ip == "127.0.0.1", f"flower port {port!r} is not bound to 127.0.0.1"
    assert "--basic-auth" in _command(flower)


def test_controllers_replicated_and_etcd_pinned(services: dict[str, dict[str, Any]]) -> None:
    """Two controllers replicas electing on Redis unless told etcd; etcd's image pinned."""
    controllers = services["controllers"]
    assert parse(shlex.split(_command(controllers)))[-1][0] == "controllers"
    assert controllers["deploy"]["replicas"] >= 2
    leadership = _interpolate(_environment(controllers)["FLEET_LEADERSHIP_URL"])
    assert leadership == "", "the default election store is the stack's Redis"
    image = services["etcd"]["image"]
    name, _, tag = image.rpartition(":")
    assert name == "quay.io/coreos/etcd" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), image


def test_worker_stop_grace_period(services: dict[str, dict[str, Any]]) -> None:
    """The worker's stop grace period covers the longest time limit and retry wait."""
    needed = Settings().max_time_limit_s + timing.RETRY_BACKOFF_MAX_S + timing.VISIBILITY_SLACK_S
    assert _parse_duration(services["worker"]["stop_grace_period"]) >= needed


def test_dockerfile_copies_packages() -> None:
    """The Dockerfile exists and copies every package the image installs."""
    assert DOCKERFILE.is_file()
    sources = _copy_sources(DOCKERFILE.read_text(encoding="utf-8"))
    missing = [source for source in DOCKERFILE_SOURCES if source not in sources]
    assert not missing, f"Dockerfile does not copy {missing}"


@pytest.mark.parametrize("name", MONITORING_SERVICES)
def test_monitoring_service_mounts_exist(services: dict[str, dict[str, Any]], name: str) -> None:
    """Prometheus and Grafana pull an image, publish on the loopback interface only,
    and every folder of this repository they mount exists."""
    service = services[name]
    assert "image" in service, f"{name} pulls no image"
    assert _published_on_loopback(service), f"{name} is not published on 127.0.0.1 only"
    mounts = _bind_mounts(service)
    assert mounts, f"{name} mounts nothing of this repository"
    missing = [str(path) for path in mounts.values() if not path.exists()]
    assert not missing, f"{name} mounts missing paths {missing}"


def test_prometheus_scrapes_the_metrics_service(services: dict[str, dict[str, Any]]) -> None:
    """Prometheus reads deploy/prometheus/prometheus.yml, which loads the alert
    rules and scrapes the metrics service on the port it listens on."""
    prometheus = services["prometheus"]
    mounts = _bind_mounts(prometheus)
    config_file = _in_container(mounts, _option(prometheus, "config.file"))
    assert config_file == ROOT / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    for rules in config["rule_files"]:
        assert (config_file.parent / rules).is_file(), f"rule file {rules} missing"
    targets = [
        target
        for job in config["scrape_configs"]
        if job["job_name"] == "fleetworks"
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    port = _option(services["metrics"], "port")
    assert targets == [f"metrics:{port}"]
    assert "metrics" in _depends_on(prometheus)


def test_grafana_provisions_the_datasource_and_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    """Grafana's provisioning points at the prometheus service and at the folder
    where the fleet's dashboard is mounted; its admin password has no default."""
    grafana = services["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = _in_container(mounts, "/etc/grafana/provisioning")
    (datasource_file,) = sorted((provisioning / "datasources").glob("*.yml"))
    datasources = yaml.safe_load(datasource_file.read_text(encoding="utf-8"))["datasources"]
    (prometheus_ds,) = [d for d in datasources if d["type"] == "prometheus"]
    listen = _option(services["prometheus"], "web.listen-address")
    assert urlsplit(prometheus_ds["url"]).netloc == f"prometheus:{listen.rsplit(':', 1)[1]}"
    (provider_file,) = sorted((provisioning / "dashboards").glob("*.yml"))
    (provider,) = yaml.safe_load(provider_file.read_text(encoding="utf-8"))["providers"]
    dashboards = _in_container(mounts, provider["options"]["path"])
    assert (dashboards / "fleetworks.json").is_file()
    environment = _environment(grafana)
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _in_container(mounts, home) == dashboards / "fleetworks.json"
    assert ":?" in environment["GF_SECURITY_ADMIN_PASSWORD"], "the admin password has a default"
