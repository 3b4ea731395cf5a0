"""What the fleet did, as Prometheus metrics counted from the results database.

Served with the queue gauges on ``/metrics`` (:mod:`fleetworks.metrics`):

- ``fleetworks_outcomes_total{agent,status}``: finished runs by how they
  ended: ``succeeded``, ``rejected``, ``dead`` (outcome rows), and what the
  guard did instead of running: ``skipped_duplicate``, ``skipped_locked``,
  ``skipped_dead``, ``stale_write``, ``duplicate_effect`` (guard events);
- ``fleetworks_guard_events_total{agent,kind}``: every guard event, the
  ones above and ``lock_contended``, ``republished``, ``replayed``, ``deferred``;
- ``fleetworks_runs_in_progress{agent,status}``: keys ``claimed`` (running)
  or ``failed`` (waiting for a retry);
- ``fleetworks_dead_letters{agent}``: keys that are ``dead`` now;
- ``fleetworks_events_stored_total{topic}``, ``fleetworks_events_pending``
  (stored, not yet relayed) and ``fleetworks_waits{state}``;
- ``fleetworks_ledger_up``: 1 when the results database answered this scrape.

Why the database and not ``prometheus_client`` counters in the workers: every
worker process on every host writes its outcome and guard events to one
results database already, in the run's own transaction, so a count there
adds up across processes and hosts by construction, survives restarts of
workers and of the exporter, and costs the guarded path nothing (no
multiprocess files, no extra write per run). The price is one grouped query
per family per scrape, over indexed columns (``agent, status`` and ``kind,
agent``). A ``_total`` here only grows, except when an operator replays a
dead letter (it leaves ``dead``), which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from fleetworks.db import transaction
from fleetworks.models import EVENTS, GUARD_EVENTS, OUTCOMES, WAITS, EventKind, Status

log = logging.getLogger(__name__)

#: Outcome statuses that end a key, and guard events that end a delivery.
FINISHED = (Status.SUCCEEDED, Status.REJECTED, Status.DEAD)
INSTEAD = (
    EventKind.SKIPPED_DUPLICATE,
    EventKind.SKIPPED_LOCKED,
    EventKind.SKIPPED_DEAD,
    EventKind.STALE_WRITE,
    EventKind.DUPLICATE_EFFECT,
)


class LedgerCollector(Collector):
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "fleetworks_ledger_up", "1 when the results database answered this scrape."
        )
        try:
            families = list(self._families())
        except SQLAlchemyError as exc:
            log.warning("metrics: results database unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        o, e = OUTCOMES.c, GUARD_EVENTS.c
        with transaction(self.database_url) as conn:
            statuses = conn.execute(
                select(o.agent, o.status, func.count()).group_by(o.agent, o.status)
            ).all()
            kinds = conn.execute(
                select(e.agent, e.kind, func.count()).group_by(e.agent, e.kind)
            ).all()
            topics = conn.execute(
                select(EVENTS.c.topic, func.count()).group_by(EVENTS.c.topic)
            ).all()
            pending = conn.execute(
                select(func.count()).where(EVENTS.c.relayed_at.is_(None))
            ).scalar_one()
            waits = conn.execute(select(WAITS.c.state, func.count()).group_by(WAITS.c.state)).all()
        outcomes = CounterMetricFamily(
            "fleetworks_outcomes", "Finished runs by agent and how they ended.",
            labels=["agent", "status"],
        )  # fmt: skip
        progress = GaugeMetricFamily(
            "fleetworks_runs_in_progress", "Keys claimed (running) or failed (to be retried).",
            labels=["agent", "status"],
        )  # fmt: skip
        dead = GaugeMetricFamily(
            "fleetworks_dead_letters", "Keys that are dead now.", labels=["agent"]
        )
        for agent, status, n in statuses:
            if status in FINISHED:
                outcomes.add_metric([agent, status], n)
            else:
                progress.add_metric([agent, status], n)
            if status == Status.DEAD:
                dead.add_metric([agent], n)
        guard = CounterMetricFamily(
            "fleetworks_guard_events", "What the guard did, by agent and kind.",
            labels=["agent", "kind"],
        )  # fmt: skip
        for agent, kind, n in kinds:
            guard.add_metric([agent, kind], n)
            if kind in INSTEAD:
                outcomes.add_metric([agent, kind], n)
        stored = CounterMetricFamily(
            "fleetworks_events_stored", "Events stored, by topic.", labels=["topic"]
        )
        for topic, n in topics:
            stored.add_metric([topic], n)
        unrelayed = GaugeMetricFamily(
            "fleetworks_events_pending", "Events stored and not yet relayed."
        )
        unrelayed.add_metric([], int(pending))
        waiting = GaugeMetricFamily(
            "fleetworks_waits", "Waits for an event, by state.", labels=["state"]
        )
        for state, n in waits:
            waiting.add_metric([state], n)
        yield from (outcomes, progress, dead, guard, stored, unrelayed, waiting)
