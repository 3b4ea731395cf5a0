"""What the fleet did, as Prometheus metrics counted from the results database.

Served with the queue gauges on ``/metrics`` (:mod:`fleetworks.metrics`):

- ``fleetworks_outcomes_total{agent,status}``: finished runs by how they
  ended: ``succeeded``, ``rejected``, ``dead`` (outcome rows), and what the
  guard did instead of running: ``skipped_duplicate``, ``skipped_locked``,
  ``skipped_dead``, ``stale_write``, ``duplicate_effect`` (guard events);
- ``fleetworks_guard_events_total{agent,kind}``: every guard event, the
  ones above and ``lock_contended``, ``republished``, ``replayed``, ``deferred``;
- ``fleetworks_runs_in_progress{agent,status}``: keys ``claimed`` (running:
  a ``claimed`` row, or a first delivery's in-flight record in Redis whose
  key has no row yet, :mod:`fleetworks.inflight`) or ``failed`` (waiting
  for a retry);
- ``fleetworks_dead_letters{agent}``: keys that are ``dead`` now;
- ``fleetworks_events_stored_total{topic}``, ``fleetworks_events_pending``
  (stored, not yet relayed) and ``fleetworks_waits{state}``;
- ``fleetworks_run_duration_seconds{agent}`` (histogram): claim to outcome of
  each key's latest attempt (``succeeded``, ``failed``, ``dead``);
- ``fleetworks_queue_wait_seconds{agent}`` (histogram): publish (the message's
  ``fleet_sent_at``) to claim, for the delivery that claimed each key;
- ``fleetworks_leases_lost_total{agent}`` and
  ``fleetworks_fencing_refusals_total{agent}``: ``stale_write`` events by cause
  (the lease was gone before the write; the fencing token refused the write);
- ``fleetworks_reaper_republished_total{agent}``: claims the reaper published
  again because their holder was gone;
- ``fleetworks_events_relay_lag_seconds``: age of the oldest stored event not
  yet relayed (0 when none waits);
- ``fleetworks_ledger_up``: 1 when the results database answered this scrape.

Why the database and not ``prometheus_client`` counters in the workers: every
worker process on every host writes its outcome and guard events to one
results database already, in the run's own transaction, so a count there
adds up across processes and hosts by construction, survives restarts of
workers and of the exporter, and costs the guarded path nothing (no
multiprocess files, no extra write per run). The price is one grouped query
per family per scrape, over indexed columns (``agent, status`` and ``kind,
agent``); the two histograms are one more pass over ``outcomes`` (bucket
counts summed in SQL, never rows fetched), which an outcome retention keeps
bounded. A key counts once, with its latest attempt: a retried key's earlier
attempts are its ``attempt_failed`` events. A ``_total`` here only grows,
except when an operator replays a dead letter (it leaves ``dead``), which
Prometheus reads as a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Connection, case, func, literal_column, select
from sqlalchemy.exc import SQLAlchemyError

from fleetworks import inflight
from fleetworks.db import transaction
from fleetworks.guard import LEASE_LOST
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

#: Seconds: upper bounds of the run duration buckets (agents poll, call
#: services and write; a run near its time limit lands in the last ones).
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Seconds: upper bounds of the queue wait buckets (a backlog drains in
#: minutes; a retry's back-off or a wait for a busy entity adds to it).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: Statuses whose row holds a finished attempt (start and finish times).
TIMED = (Status.SUCCEEDED, Status.FAILED, Status.DEAD)


class LedgerCollector(Collector):
    def __init__(self, database_url: str, client: redis.Redis | None = None) -> None:
        self.database_url = database_url
        #: The lock store, for the in-flight records of first deliveries.
        self.client = client

    def _unclaimed_running(self, conn: Connection) -> dict[str, int]:
        """First deliveries running now (an in-flight record, no row yet), by agent."""
        if self.client is None:
            return {}
        try:
            records = inflight.all_records(self.client)
        except redis.RedisError as exc:
            log.warning("metrics: lock store unavailable: %s", exc)
            return {}
        if not records:
            return {}
        keys = [r.key for r in records]
        with_row = set(
            conn.execute(
                select(OUTCOMES.c.idempotency_key).where(OUTCOMES.c.idempotency_key.in_(keys))
            ).scalars()
        )
        running: dict[str, int] = {}
        for r in records:
            if r.key not in with_row:
                running[r.agent] = running.get(r.agent, 0) + 1
        return running

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
            oldest = conn.execute(
                select(func.min(EVENTS.c.created_at)).where(EVENTS.c.relayed_at.is_(None))
            ).scalar()
            lost = conn.execute(
                select(e.agent, func.count())
                .where((e.kind == EventKind.STALE_WRITE) & e.detail.startswith(LEASE_LOST + ":"))
                .group_by(e.agent)
            ).all()
            run_s = seconds_between(conn, o.started_at, o.finished_at)
            runs = _histogram_rows(conn, run_s, RUN_BUCKETS, o.status.in_(TIMED))
            wait_s = seconds_between(conn, o.queued_at, o.started_at)
            waited = _histogram_rows(conn, wait_s, WAIT_BUCKETS, o.queued_at.is_not(None))
            running = self._unclaimed_running(conn)
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
            elif status == Status.CLAIMED:
                progress.add_metric([agent, status], n + running.pop(agent, 0))
            else:
                progress.add_metric([agent, status], n)
            if status == Status.DEAD:
                dead.add_metric([agent], n)
        for agent, n in running.items():
            progress.add_metric([agent, Status.CLAIMED], n)
        guard = CounterMetricFamily(
            "fleetworks_guard_events", "What the guard did, by agent and kind.",
            labels=["agent", "kind"],
        )  # fmt: skip
        leases_lost: dict[str, int] = {agent: int(n) for agent, n in lost}
        stale = {agent: n for agent, kind, n in kinds if kind == EventKind.STALE_WRITE}
        for agent, kind, n in kinds:
            guard.add_metric([agent, kind], n)
            if kind in INSTEAD:
                outcomes.add_metric([agent, kind], n)
        yield from _by_agent(
            "fleetworks_leases_lost", "Runs that found their lease gone before writing.",
            leases_lost,
        )  # fmt: skip
        yield from _by_agent(
            "fleetworks_fencing_refusals", "Writes the fencing token refused (a newer holder).",
            {a: n - leases_lost.get(a, 0) for a, n in stale.items()},
        )  # fmt: skip
        yield from _by_agent(
            "fleetworks_reaper_republished", "Claims republished because their holder was gone.",
            {agent: n for agent, kind, n in kinds if kind == EventKind.REPUBLISHED},
        )  # fmt: skip
        yield _histogram(
            "fleetworks_run_duration_seconds", "Claim to outcome of each key's latest attempt.",
            runs, RUN_BUCKETS,
        )  # fmt: skip
        yield _histogram(
            "fleetworks_queue_wait_seconds", "Publish to claim of the delivery that ran each key.",
            waited, WAIT_BUCKETS,
        )  # fmt: skip
        lag = GaugeMetricFamily(
            "fleetworks_events_relay_lag_seconds",
            "Age of the oldest stored event not yet relayed (0 when none waits).",
        )
        lag.add_metric([], _age_s(oldest))
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
        yield from (outcomes, progress, dead, guard, stored, unrelayed, waiting, lag)


def seconds_between(conn: Connection, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, as SQL of the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * literal_column("86400.0")


def epoch_seconds(conn: Connection, moment: Any) -> ColumnElement[Any]:
    """``moment`` as seconds since the epoch, as SQL of the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return func.extract("epoch", moment)
    return (func.julianday(moment) - literal_column("2440587.5")) * literal_column("86400.0")


def _histogram_rows(
    conn: Connection, seconds: ColumnElement[Any], buckets: Sequence[float], where: Any
) -> list[Any]:
    """Per agent: count, sum and the count at or under each bucket, summed in SQL."""
    clamped = case((seconds < 0, 0.0), else_=seconds)  # clocks of two hosts may disagree
    columns = [func.sum(case((clamped <= bound, 1), else_=0)) for bound in buckets]
    query = (
        select(OUTCOMES.c.agent, func.count(clamped), func.sum(clamped), *columns)
        .where(where)
        .group_by(OUTCOMES.c.agent)
    )
    return list(conn.execute(query).all())


def _histogram(
    name: str, text: str, rows: list[Any], bounds: Sequence[float]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, text, labels=["agent"])
    for agent, n, total, *under in rows:
        buckets = [(_le(b), int(u or 0)) for b, u in zip(bounds, under, strict=True)]
        buckets.append(("+Inf", int(n)))
        family.add_metric([agent], buckets, float(total or 0.0))
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


def _by_agent(name: str, text: str, counts: dict[str, int]) -> Iterator[Metric]:
    family = CounterMetricFamily(name, text, labels=["agent"])
    for agent, n in sorted(counts.items()):
        family.add_metric([agent], n)
    yield family


def _age_s(oldest: datetime | None) -> float:
    if oldest is None:
        return 0.0
    if oldest.tzinfo is None:  # SQLite hands back naive UTC
        oldest = oldest.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - oldest).total_seconds())
