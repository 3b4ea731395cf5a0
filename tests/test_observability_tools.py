"""The alert rules, the scrape config and the Grafana dashboard, checked by the real tools.

``promtool`` checks and unit-tests deploy/prometheus; a real worker runs probe
agents and the fleet's exporter serves what it did, which ``promtool check
metrics`` lints; a real ``prometheus`` scrapes that exporter, loads the rules and
evaluates every alert and every dashboard query. Static checks tie the rules and
the dashboard to the metric names the fleet exports (:data:`EXPORTED`), so a
renamed metric turns this module red.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from sqlalchemy import func, select

from fleetworks.db import transaction
from fleetworks.embedded import free_port
from fleetworks.models import OUTCOMES
from fleetworks.procs import Child
from tests.conftest import LOCKS_URL, broker_idle, require, start_worker, truncate, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fleetworks.json"

#: Every metric family the fleet exports, with its labels: the one list to
#: update when a metric is added or renamed (a live scrape must show nothing
#: unlisted, and rules and panels may use nothing else).
EXPORTED: dict[str, tuple[str, ...]] = {
    "fleetworks_queue_backlog": ("queue",),
    "fleetworks_queue_running": ("queue",),
    "fleetworks_queue_oldest_age_seconds": ("queue",),
    "fleetworks_workers_desired": ("queue",),
    "fleetworks_workers_actual": ("queue",),
    "fleetworks_outcomes_total": ("agent", "status"),
    "fleetworks_guard_events_total": ("agent", "kind"),
    "fleetworks_runs_in_progress": ("agent", "status"),
    "fleetworks_dead_letters": ("agent",),
    "fleetworks_events_stored_total": ("topic",),
    "fleetworks_events_pending": (),
    "fleetworks_waits": ("state",),
    "fleetworks_ledger_up": (),
    "fleetworks_run_duration_seconds": ("agent",),
    "fleetworks_queue_wait_seconds": ("agent",),
    "fleetworks_leases_lost_total": ("agent",),
    "fleetworks_fencing_refusals_total": ("agent",),
    "fleetworks_reaper_republished_total": ("agent",),
    "fleetworks_reaper_restored_total": (),
    "fleetworks_beat_leader": (),
    "fleetworks_beat_leader_term": (),
    "fleetworks_beat_failovers_total": (),
    "fleetworks_leader_term": ("group",),
    "fleetworks_leader_failovers_total": ("group",),
    "fleetworks_events_relay_lag_seconds": (),
    "fleetworks_autoscaler_decisions_total": ("queue", "direction"),
    "fleetworks_pricing_products_active": (),
    "fleetworks_pricing_adjustment_seconds": (),
    "fleetworks_pricing_cycle_price_changes": (),
    "fleetworks_pricing_price_changes_total": (),
}
#: Families that are histograms: queried through their ``_bucket``, ``_sum`` and ``_count``.
HISTOGRAMS = frozenset({"fleetworks_run_duration_seconds", "fleetworks_queue_wait_seconds"})
#: Series Prometheus records itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})

#: The panels the dashboard must have, by title.
PANELS = (
    "Products actively managed",
    "Average pricing adjustment time",
    "Messages in the queues",
    "Outcomes by agent and status",
    "Run duration p50 / p95",
    "Queue wait p95",
    "Backlog and running",
    "Oldest waiting message",
    "Workers desired vs actual",
    "Dead letters",
    "Stale writes, fencing refusals, leases lost",
    "Beat leader",
    "Leader term",
    "Event relay lag",
)

#: Grafana's own variables, as a live test substitutes them.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

_NAME = re.compile(r"\bfleetworks_[a-z0-9_]+\b")
_PROMETHEUS_SERIES = re.compile(r"\b(?:" + "|".join(PROMETHEUS_SERIES) + r")\s*\{")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def _require_promtool() -> str:
    require(PROMTOOL is not None, "promtool not installed (make tools)")
    assert PROMTOOL is not None
    return PROMTOOL


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_require_promtool(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of rules.yml."""
    return [
        rule for group in _load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those of collapsed rows too."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_targets() -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def variable_queries() -> list[tuple[str, str]]:
    """``(variable name, query)`` of the dashboard's Prometheus query variables."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((variable["name"], query["query"] if isinstance(query, dict) else query))
    return found


def family(name: str) -> str:
    """The metric family a series name belongs to (a histogram's suffix removed)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_checks_the_scrape_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    config = _load_yaml(PROMETHEUS_CONFIG)
    assert [job["job_name"] for job in config["scrape_configs"]] == ["fleetworks"]


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    """Each alert of rules.yml has a test case where it fires and one where it must not."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in _load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert sorted(alerts - fires) == [], "alerts never tested firing"
    assert sorted(alerts - quiet) == [], "alerts never tested staying quiet"
    assert sorted((fires | quiet) - alerts) == [], "tests of alerts rules.yml lacks"


def test_every_alert_has_a_for_a_severity_and_names_its_queue_or_agent() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("for"), f"{name} has no for:"
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        # The labels every metric of the expression carries: the alert keeps them.
        label_sets = [set(EXPORTED[family(n)]) for n in _NAME.findall(rule["expr"])]
        labels = set.intersection(*label_sets) if label_sets else set()
        for label in {"queue", "agent"} & labels:
            assert f"$labels.{label}" in annotations["summary"], f"{name} does not name the {label}"


def test_rules_and_dashboard_use_only_metrics_the_fleet_exports() -> None:
    expressions = [
        *((f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()),
        *((f"panel {title!r}", expr) for title, expr in panel_targets()),
        *((f"variable ${name}", query) for name, query in variable_queries()),
    ]
    assert len(expressions) > 30
    unknown = []
    for where, expr in expressions:
        names = _NAME.findall(expr)
        if not names and not _PROMETHEUS_SERIES.search(expr):
            unknown.append(f"{where}: no metric in {expr!r}")
        unknown += [f"{where}: {n}" for n in names if family(n) not in EXPORTED]
        unknown += [
            f"{where}: {n} is a histogram: use _bucket, _sum or _count"
            for n in names
            if n in HISTOGRAMS
        ]
    assert unknown == []


def test_dashboard_is_a_grafana_dashboard_on_a_templated_prometheus() -> None:
    board = dashboard()
    assert board["uid"] == "fleetworks" and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    all_panels = list(panels(board))
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = {panel["title"] for panel in all_panels}
    assert sorted(set(PANELS) - titles) == []
    known = set(variables) | set(GRAFANA_BUILTINS)
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            used = {a or b for a, b in _VARIABLE.findall(target["expr"])}
            assert used <= known, f"{panel['title']}: unknown variables {used - known}"
    for name, _ in variable_queries():
        assert variables[name]["datasource"]["uid"] == "${datasource}", name


# A live fleet: a real worker, the probe agent, the exporter on loopback.


def _statuses(database_url: str) -> dict[str, int]:
    with transaction(database_url) as conn:
        rows = conn.execute(
            select(OUTCOMES.c.status, func.count()).group_by(OUTCOMES.c.status)
        ).all()
    return {str(status): int(n) for status, n in rows}


@pytest.fixture(scope="module")
def live_exporter(
    sqlite_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """``(base URL of /metrics, queue)``: the exporter of a fleet whose worker ran
    four probe runs, a duplicate of one and a rejected payload."""
    from config import app
    from fleetworks.metrics import serve
    from fleetworks.settings import Settings

    truncate(sqlite_url)
    redis.Redis.from_url(LOCKS_URL).flushdb()
    worker = start_worker(sqlite_url, tmp_path_factory.mktemp("observability"), f"obs{os.getpid()}")
    server = None
    try:
        for i in range(4):
            worker.enqueue("probe.run", {"id": f"obs-{i}"})
        worker.enqueue("probe.run", {"id": 7})
        wait_for(
            lambda: _statuses(sqlite_url) == {"succeeded": 4, "rejected": 1},
            60,
            "four probe runs and one rejection",
        )
        worker.enqueue("probe.run", {"id": "obs-0"})
        wait_for(lambda: broker_idle(worker.queue), 30, "the duplicate to be handled")
        settings = Settings(queue=worker.queue, database_url=sqlite_url)
        server = serve(app, settings, "127.0.0.1", 0)
        yield f"http://127.0.0.1:{server.server_address[1]}", worker.queue
    finally:
        if server is not None:
            server.shutdown()
        worker.child.stop(15)
        truncate(sqlite_url)


def _get(url: str, timeout_s: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def _answers(url: str) -> bool:
    """``url`` answers 200 (a server still starting refuses the connection)."""
    try:
        return _get(url, 2)[0] == 200
    except OSError:
        return False


def test_promtool_lints_a_live_scrape(live_exporter: tuple[str, str]) -> None:
    base, _ = live_exporter
    status, body = _get(f"{base}/metrics")
    assert status == 200
    text = body.decode()
    served = {
        line.split()[2] for line in text.splitlines() if line.startswith("# TYPE fleetworks_")
    }
    # What a live fleet serves is what this module knows of, and the runs are there
    assert served <= set(EXPORTED) | {n + "_total" for n in EXPORTED}, served - set(EXPORTED)
    assert {"fleetworks_queue_backlog", "fleetworks_outcomes_total"} <= {family(n) for n in served}
    assert 'fleetworks_outcomes_total{agent="probe.run",status="succeeded"} 4.0' in text
    # And the histograms and the figures counted from Redis are served too
    assert {
        "fleetworks_run_duration_seconds",
        "fleetworks_queue_wait_seconds",
        "fleetworks_beat_leader",
        "fleetworks_fencing_refusals_total",
        "fleetworks_events_relay_lag_seconds",
    } <= served
    # And promtool finds no problem in any of them
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


def _label_values(query: str) -> str:
    """Grafana's ``label_values(SELECTOR, LABEL)`` as the PromQL Prometheus evaluates."""
    match = re.fullmatch(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)", query.strip())
    assert match, f"not a label_values() query: {query!r}"
    return f"group by ({match['label']}) ({match['selector']})"


def _substitute(expr: str, queue: str) -> str:
    values = GRAFANA_BUILTINS | {"queue": queue, "agent": "probe.run"}
    return _VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], expr)


def test_prometheus_scrapes_the_fleet_and_evaluates_every_alert_and_panel(
    live_exporter: tuple[str, str], tmp_path: Path
) -> None:
    require(PROMETHEUS is not None, "prometheus not installed (make tools)")
    assert PROMETHEUS is not None
    base, queue = live_exporter
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "fleetworks",
                "static_configs": [{"targets": [urllib.parse.urlsplit(base).netloc]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    api = f"http://127.0.0.1:{free_port()}"
    server = Child(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={urllib.parse.urlsplit(api).netloc}",
        ],
        dict(os.environ),
        log_path=tmp_path / "prometheus.log",
    ).start()

    def query(expr: str) -> dict[str, Any]:
        status, body = _get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        reply = json.loads(body)
        assert isinstance(reply, dict), body
        reply["http_status"] = status
        return reply

    try:
        wait_for(
            lambda: not server.alive() or _answers(f"{api}/-/ready"),
            60,
            "prometheus to be ready",
        )
        assert server.alive(), server.log_tail()
        # Given the fleet's numbers readable through the API
        succeeded = wait_for(
            lambda: query('sum(fleetworks_outcomes_total{status="succeeded"})')["data"]["result"],
            30,
            "a scrape of the fleet",
        )
        assert float(succeeded[0]["value"][1]) == 4
        # When every dashboard query and every alert is evaluated, Then none fails
        failures = []
        for where, expr in [
            *((f"panel {title!r}", _substitute(e, queue)) for title, e in panel_targets()),
            *((f"variable ${name}", _label_values(q)) for name, q in variable_queries()),
            *((f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()),
        ]:
            reply = query(expr)
            if reply["status"] != "success":
                failures.append(f"{where}: {reply.get('error')} in {expr}")
        assert failures == []
        # And the dashboard's queue panel shows the worker's queue
        (messages,) = [e for title, e in panel_targets() if title == "Messages in the queues"]
        backlog = query(_substitute(messages, queue))["data"]["result"]
        assert [(r["metric"]["queue"], r["value"][1]) for r in backlog] == [(queue, "0")]
        # And the rule groups are loaded and evaluate cleanly
        groups = {g["name"] for g in _load_yaml(RULES)["groups"]}

        def rules_healthy() -> list[dict[str, Any]] | None:
            _, body = _get(f"{api}/api/v1/rules")
            loaded = json.loads(body)["data"]["groups"]
            rules = [rule for group in loaded for rule in group["rules"]]
            if {g["name"] for g in loaded} == groups and all(r["health"] == "ok" for r in rules):
                return rules
            return None

        rules = wait_for(rules_healthy, 20, "the rule groups to be evaluated")
        assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
        assert all(not r.get("lastError") for r in rules)
    finally:
        server.stop(10)
