"""The fleet's Prometheus endpoint and the scaling signal KEDA reads.

``GET /metrics`` (Prometheus text), sampled from the broker at scrape time:

- ``fleetworks_queue_backlog{queue}``: messages waiting, all priority
  sub-queues summed (:mod:`fleetworks.autoscale.depth`);
- ``fleetworks_queue_running{queue}``: delivered, not yet acknowledged;
- ``fleetworks_queue_oldest_age_seconds{queue}``: age of the oldest waiting
  message (absent when unknown);
- ``fleetworks_workers_desired{queue}``: what the scaling policy asks for
  that load (``FLEET_AUTOSCALE_*``);
- ``fleetworks_workers_actual{queue}``: pool processes of the autoscaled
  workers consuming the queue, as they last reported (absent if none does:
  on Kubernetes the replica count is the HPA's own metric).

from ``FLEET_LEADERSHIP_URL``'s backend (the lock store's Redis, or etcd):

- ``fleetworks_leader_term{group}``: the term of each group's leader now
  (absent for a group nobody leads);

from the lock store's Redis:

- ``fleetworks_beat_leader``: 1 while a beat holds the leader lease, else 0;
- ``fleetworks_beat_leader_term``: the leader's term (its fencing token);
- ``fleetworks_beat_failovers_total``: leaderships won after the first;
- ``fleetworks_leader_failovers_total{group}``: the same for every leader
  group (:mod:`fleetworks.leadership`);
- ``fleetworks_reaper_restored_total``: stranded messages the reaper restored;
- ``fleetworks_autoscaler_decisions_total{queue,direction}``: pool resizes,
  ``up`` or ``down`` (:mod:`fleetworks.stats`);

what the fleet did, counted from the results database
(:mod:`fleetworks.ledger_metrics`): outcomes by agent and status, run
durations and queue waits, guard events, leases lost and fencing refusals,
dead letters, runs in progress, events, relay lag and waits; and what the
deployment adds with :func:`add_collector` (its business figures).

``GET /scale?queue=NAME`` returns the same for one queue as JSON, with
``load = backlog + running``: the value KEDA's ``metrics-api`` trigger
divides by its target, which is the policy's own formula.

``fleetworks up`` serves it on ``FLEET_METRICS_ADDRESS:FLEET_METRICS_PORT``;
``fleetworks metrics`` serves it alone (the Kubernetes exporter).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetworks import constants as c
from fleetworks import stats
from fleetworks.autoscale.depth import DepthProbe, QueueDepth, probe_for
from fleetworks.autoscale.policy import Policy
from fleetworks.leadership import Backend, LeadershipError, backend_for
from fleetworks.ledger_metrics import LedgerCollector
from fleetworks.redisconn import get_redis
from fleetworks.settings import Settings

log = logging.getLogger(__name__)


#: Factories of the deployment's own collectors (see :func:`add_collector`).
_EXTRA: list[Callable[[Settings], Collector]] = []


def add_collector(factory: Callable[[Settings], Collector]) -> None:
    """Serve ``factory(settings)``'s metrics on every ``/metrics`` made after this
    call: how a deployment adds its business figures (call it where its app is
    made, so ``fleetworks metrics -A app`` finds it)."""
    if factory not in _EXTRA:
        _EXTRA.append(factory)


class FleetState:
    """Reads what the metrics report: depth from the broker, pools from Redis."""

    def __init__(self, app: Celery, settings: Settings, queues: list[str]) -> None:
        self.app = app
        self.settings = settings
        self.queues = queues
        management = settings.rabbitmq_management_url
        self._probe: DepthProbe = probe_for(
            app, management.get_secret_value() if management else None
        )
        self._lock = threading.Lock()
        self._leadership: Backend | None = None
        self.policy = Policy(
            min_workers=settings.autoscale_min_workers,
            max_workers=settings.autoscale_max_workers,
            target_per_worker=settings.autoscale_target_per_worker,
            scale_down_after_s=settings.autoscale_scale_down_after_s,
        )

    def depth(self, queues: list[str] | None = None) -> dict[str, QueueDepth]:
        with self._lock:  # one broker connection, shared by request threads
            return self._probe.sample(queues or self.queues)

    def redis(self) -> redis.Redis:
        s = self.settings
        return get_redis(s.redis, **s.redis_tls(s.redis))

    def leadership(self) -> Backend:
        if self._leadership is None:
            self._leadership = backend_for(self.settings)
        return self._leadership

    def actual_workers(self) -> dict[str, int]:
        """queue -> pool processes reported by autoscaled workers consuming it."""
        client = self.redis()
        totals: dict[str, int] = {}
        for key in client.scan_iter(match=c.AUTOSCALE_KEY + "*", count=100):
            report = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
            for queue in filter(None, report.get("queues", "").split(",")):
                totals[queue] = totals.get(queue, 0) + int(report.get("actual", 0))
        return totals

    def scale(self, queue: str) -> dict[str, Any]:
        d = self.depth([queue])[queue]
        return {
            "queue": queue,
            "backlog": d.backlog,
            "running": d.running,
            "load": d.backlog + d.running,
            "oldest_age_s": d.oldest_age_s,
            "desired_workers": self.policy.desired(d.backlog, d.running),
            "target_per_worker": self.policy.target_per_worker,
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class FleetCollector(Collector):
    def __init__(self, state: FleetState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        depth = self.state.depth()
        actual = self.state.actual_workers()
        gauges = {
            name: GaugeMetricFamily(f"fleetworks_{name}", text, labels=["queue"])
            for name, text in (
                ("queue_backlog", "Messages waiting, all priority sub-queues summed."),
                ("queue_running", "Messages delivered to a worker and not yet acknowledged."),
                ("queue_oldest_age_seconds", "Age of the oldest waiting message."),
                ("workers_desired", "Worker processes the scaling policy asks for."),
                ("workers_actual", "Pool processes of the autoscaled workers on the queue."),
            )
        }
        for q, d in depth.items():
            gauges["queue_backlog"].add_metric([q], d.backlog)
            gauges["queue_running"].add_metric([q], d.running)
            if d.oldest_age_s is not None:
                gauges["queue_oldest_age_seconds"].add_metric([q], d.oldest_age_s)
            gauges["workers_desired"].add_metric(
                [q], self.state.policy.desired(d.backlog, d.running)
            )
            if q in actual:
                gauges["workers_actual"].add_metric([q], actual[q])
        yield from gauges.values()
        yield from self._decisions()
        yield from self._leaders()

    def _leaders(self) -> Iterator[Metric]:
        terms = GaugeMetricFamily(
            "fleetworks_leader_term", "The term of each group's leader now.", labels=["group"]
        )
        try:
            for info in self.state.leadership().list_groups():
                terms.add_metric([info.group], info.term)
        except LeadershipError as exc:
            log.warning("metrics: leaders unknown (%s)", exc)
        failovers = CounterMetricFamily(
            "fleetworks_leader_failovers", "Leaderships of a group won after its first.",
            labels=["group"],
        )  # fmt: skip
        head = stats.LEADER_FAILOVERS + ":"
        for field, n in sorted(stats.read(self.state.redis()).items()):
            if field.startswith(head):
                failovers.add_metric([field[len(head) :]], n)
        yield from (terms, failovers)

    def _decisions(self) -> Iterator[Metric]:
        client = self.state.redis()
        counts = stats.read(client)
        entity = c.BEAT_LEADER_ENTITY + (self.state.app.main or "fleet")
        held = client.exists(c.LOCK_KEY + entity)
        term = int(client.get(c.FENCE_KEY + entity) or 0)
        leader = GaugeMetricFamily("fleetworks_beat_leader", "1 while a beat leads, else 0.")
        leader.add_metric([], 1 if held else 0)
        terms = GaugeMetricFamily("fleetworks_beat_leader_term", "The beat leader's term.")
        terms.add_metric([], term)
        failovers = CounterMetricFamily(
            "fleetworks_beat_failovers", "Beat leaderships won after the first."
        )
        failovers.add_metric([], counts.get(stats.BEAT_FAILOVERS, 0))
        restored = CounterMetricFamily(
            "fleetworks_reaper_restored", "Stranded messages the reaper gave back to their queue."
        )
        restored.add_metric([], counts.get(stats.REAPER_RESTORED, 0))
        decisions = CounterMetricFamily(
            "fleetworks_autoscaler_decisions", "Pool resizes by the autoscaler, by direction.",
            labels=["queue", "direction"],
        )  # fmt: skip
        for field, n in sorted(counts.items()):
            kind, _, rest = field.partition(":")
            if kind == "autoscale":
                direction, _, queue = rest.partition(":")
                decisions.add_metric([queue, direction], n)
        yield from (leader, terms, failovers, restored, decisions)


def _handler(state: FleetState, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            try:
                if url.path == "/metrics":
                    self._reply(200, generate_latest(registry), "text/plain; version=0.0.4")
                elif url.path == "/scale":
                    queue = parse_qs(url.query).get("queue", [state.queues[0]])[0]
                    body = json.dumps(state.scale(queue)).encode()
                    self._reply(200, body, "application/json")
                else:
                    self._reply(404, b"not found: try /metrics or /scale\n", "text/plain")
            except Exception as exc:
                log.warning("metrics: %s failed: %s", url.path, exc)
                self._reply(
                    503, f"broker unavailable: {type(exc).__name__}\n".encode(), "text/plain"
                )

        def _reply(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics: " + format, *args)

    return Handler


def serve(app: Celery, settings: Settings, address: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/scale`` from a daemon thread; returns the server."""
    state = FleetState(app, settings, [settings.queue])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(state))
    client = get_redis(settings.redis, **settings.redis_tls(settings.redis))
    registry.register(LedgerCollector(settings.database, client))
    for factory in _EXTRA:
        registry.register(factory(settings))
    server = ThreadingHTTPServer((address, port), _handler(state, registry))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fleet-metrics", daemon=True).start()
    return server
