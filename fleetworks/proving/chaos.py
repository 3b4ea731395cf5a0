"""``fleetworks chaos``: a bounded run that proves nothing is lost or done twice.

The rig is what ``up`` runs: the broker (the embedded Redis, owned by the
run so it can be restarted), two workers and beat (whose reaper entry
republishes orphaned claims), supervised so that a killed worker comes back
after a second. The run publishes N probe tasks with real effects in waves,
each emitting ``probe.done``, which two subscribers handle through the
rig's events relay (``probe.done_a``, ``probe.done_b``),
and before each wave but the first injects one fault
(:mod:`fleetworks.proving.faults`) while work is in flight. Then it waits for
every key to settle and counts from the database.

Each effect is a row in ``probe_effect_log``, which has no UNIQUE key: a
key whose effect committed twice shows as two rows, so "duplicated" counts
what happened (rows beyond one per key, plus ``duplicate_effect`` events),
not what a constraint allowed. That ledger is counted on its own, apart
from the outcome rows, and must hold one row per ``succeeded`` outcome.

``max_recovery_s`` is, over all faults, the longest time from a fault to the
moment every key that was in flight when it hit had its final outcome,
counted from when the fault ends (a database pause, a Redis restart, the
last round of client kills), or, where a holder goes on believing it holds
its key (``stop-cont``, ``partition``), from when its lease expired.

Beat also sends a probe tick every second (:mod:`fleetworks.proving.slots`),
keyed by its slot: the report counts the slots that ran, ran twice (must be
none) and were missed. With ``partition`` or ``beat-partition`` among the
faults, every worker and beat runs on a test host of its own and there are
two beats (:mod:`fleetworks.proving.partition`).

On RabbitMQ (``fleetworks chaos --broker amqp://...``) the rig's workers,
beat and relay and the run's publisher use a vhost the run creates and
deletes (:mod:`fleetworks.proving.rabbitmq`), with classic or quorum queues;
Redis (the embedded one, or ``FLEET_REDIS_URL``) holds the leases only, and
the faults are those of :data:`fleetworks.proving.faults.RABBITMQ_KINDS`.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis as redis_client
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from fleetworks import inflight, progress
from fleetworks.db import transaction
from fleetworks.embedded import EmbeddedRedis
from fleetworks.enqueue import enqueue_many
from fleetworks.models import GUARD_EVENTS, OUTCOMES, PROBE_EFFECT_LOG, TERMINAL, EventKind
from fleetworks.procs import Child, celery_argv, fleet_env, stop_all, wait_workers, worker_args
from fleetworks.proving import faults as f
from fleetworks.proving import probe, slots
from fleetworks.proving.partition import LONG_WORK_MS, HostFaults, annotate
from fleetworks.proving.partition import render as render_hosts
from fleetworks.services import echo
from fleetworks.settings import Settings

AGENT = "probe.run"
#: The app the rig's beats run: the fleet's own plus the probe tick.
CHAOS_APP = "fleetworks.proving.chaos_app"
#: Seconds a killed worker stays down before the rig's supervisor restarts it.
RESTART_DELAY_S = 1.0
#: Seconds one wave may take to settle before the next fault is injected anyway.
WAVE_TIMEOUT_S = 120.0
#: Seconds given to a paused holder, after its SIGCONT, to attempt its late write.
RESUME_GRACE_S = 3.0


class Stopped(BaseException):
    """A stop signal reached the run, which stopped at its next wait (a
    BaseException, like KeyboardInterrupt, so no broad ``except`` takes it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class StopFlag:
    """SIGINT and SIGTERM, deferred to the run's own waits.

    An exception raised from a signal handler lands wherever the main thread
    is, possibly inside py-amqp reading a frame: the frame half read, the
    connection's close then waits forever for a reply it cannot parse, and
    the run never stops its rig nor deletes its vhost. Here the handler only
    notes the signal; the run raises :class:`Stopped` between steps.
    """

    signum: int = 0

    def handle(self, signum: int, _frame: Any = None) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum:
            raise Stopped(self.signum)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until a stop signal (then raise :class:`Stopped`)."""
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))


@dataclass
class Rig:
    settings: Settings
    redis: EmbeddedRedis | None
    workers: list[Child] = field(default_factory=list)
    others: list[Child] = field(default_factory=list)
    relay: Child | None = None
    restarts: int = 0
    relay_restarts: int = 0
    #: Beats to run (two for beat-partition) and, for faults across hosts,
    #: the test hosts every worker and beat runs on.
    beats: int = 1
    hosts: HostFaults | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, count: int = 2) -> None:
        env = fleet_env(
            self.settings, FLEET_MENTIONS_PER_POLL="0", FLEET_PRICING_PRODUCTS="0",
            FLEET_TASK_MODULES=probe.task_modules(self.settings),
        )  # fmt: skip
        logs = self.settings.home / "logs"
        for i in range(count):
            name = f"chaos{i}"
            argv = celery_argv(self.settings.app, "worker", *worker_args(self.settings, name))
            self.workers.append(self._spawn(name, argv, env))
        for i in range(self.beats):
            name = "chaos-beat" + (str(i) if i else "")
            schedule = str((self.settings.home / f"{name}-schedule").resolve())
            beat = celery_argv(
                CHAOS_APP, "beat", "-s", schedule, "--pidfile=", "--loglevel", "INFO"
            )
            self.others.append(self._spawn(name, beat, env))
        relay = [sys.executable, "-m", "fleetworks", "-A", self.settings.app, "relay"]
        self.relay = Child("chaos-relay", relay, env, logs / "chaos-relay.log").start()
        threading.Thread(target=self._supervise, daemon=True).start()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """Start a child, on its own test host when the rig has them."""
        if self.hosts is not None:
            argv, env = self.hosts.place(name, argv, env)
        return Child(name, argv, env, self.settings.home / "logs" / f"{name}.log").start()

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for w in self.workers:
                if self._restart(w):
                    self.restarts += 1
            if self.relay is not None and self._restart(self.relay):
                self.relay_restarts += 1

    def _restart(self, child: Child) -> bool:
        if child.alive() or self._stop.is_set():
            return False
        time.sleep(RESTART_DELAY_S)
        child.stop(0)
        child.start()
        return True

    def stop_beats(self) -> None:
        stop_all(self.others, grace_s=10)

    def stop(self) -> None:
        self._stop.set()
        relay = [self.relay] if self.relay is not None else []
        try:
            stop_all([*self.workers, *self.others, *relay], grace_s=15)
        finally:
            if self.hosts is not None:
                self.hosts.close()


@dataclass
class ChaosReport:
    tasks: int
    faults: dict[str, int]
    tasks_settled: int
    tasks_lost: int
    succeeded: int
    dead: int
    effects: int
    effects_duplicated: int
    stale_writes_refused: int
    republished: int
    worker_restarts: int
    max_recovery_s: float
    recovery_s: dict[str, float]
    wall_s: float
    database: str
    #: Per subscriber of ``probe.done``: handled, lost and duplicated.
    subscribers: dict[str, dict[str, int]]
    relay_restarts: int
    ok: bool
    fault_log: list[dict[str, Any]]
    #: The beat-scheduled probe: slots run, run twice, missed; late ticks skipped.
    slots: dict[str, int] = field(default_factory=dict)
    #: ``redis`` or ``rabbitmq``; on RabbitMQ, the queue type and the run's vhost.
    broker: str = "redis"
    queue_type: str | None = None
    vhost: str | None = None


def _keys_where(run: str) -> Any:
    return OUTCOMES.c.idempotency_key.like(f"probe:{run}-%")


def _in_flight(url: str, run: str, locks_url: str | None) -> list[tuple[str, int, int]]:
    """(key, pid, work ms) of every run of this chaos run in flight now, most
    work first: a first delivery shows as its in-flight record in Redis, a
    later one as its ``claimed`` row."""
    prefix = f"probe:{run}-"
    found: dict[str, tuple[str, int, int]] = {}
    if locks_url is not None:
        client = redis_client.Redis.from_url(locks_url)
        try:
            for rec in inflight.all_records(client):
                if rec.key.startswith(prefix) and "/" in rec.worker:
                    work = int((rec.payload or {}).get("work_ms", 0))
                    found[rec.key] = (rec.key, int(rec.worker.rsplit("/", 1)[1]), work)
        except redis_client.RedisError:
            pass  # Redis is down: the rows may still say
        finally:
            client.close()
    try:
        with transaction(url) as conn:
            rows = conn.execute(
                select(OUTCOMES.c.idempotency_key, OUTCOMES.c.worker, OUTCOMES.c.payload).where(
                    _keys_where(run) & (OUTCOMES.c.status == "claimed")
                )
            ).all()
    except DBAPIError:
        rows = []  # the database is paused: the records may still say
    for r in rows:
        if r.worker:
            work = int((r.payload or {}).get("work_ms", 0))
            found[r.idempotency_key] = (r.idempotency_key, int(r.worker.rsplit("/", 1)[1]), work)
    return sorted(found.values(), key=lambda x: -x[2])


def _settled(url: str, run: str) -> dict[str, Any]:
    """``key -> finished_at`` of every key of this run with a final outcome."""
    try:
        with transaction(url) as conn:
            rows = conn.execute(
                select(OUTCOMES.c.idempotency_key, OUTCOMES.c.finished_at).where(
                    _keys_where(run) & OUTCOMES.c.status.in_(TERMINAL)
                )
            ).all()
    except DBAPIError:
        return {}
    return {r.idempotency_key: r.finished_at for r in rows}


def _wait_for_work(
    url: str,
    run: str,
    stop: StopFlag,
    *,
    locks_url: str | None,
    timeout_s: float = 15,
    long_ms: int = 0,
) -> list[tuple[str, int]]:
    """(key, pid) of what is in flight once anything is (with ``long_ms``,
    once a task of that much work is, if one comes within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    busy: list[tuple[str, int, int]] = []
    while time.monotonic() < deadline:
        busy = _in_flight(url, run, locks_url) or busy
        if busy and (not long_ms or busy[0][2] >= long_ms):
            break
        stop.sleep(0.05)
    return [(key, pid) for key, pid, _ in busy]


def plan(
    kinds: list[str], per_kind: int, rng: random.Random, *, rabbitmq: bool = False
) -> list[str]:
    unknown = set(kinds) - set(f.ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(f.ALL_KINDS)}")
    elsewhere = [k for k in kinds if k not in f.RABBITMQ_KINDS]
    if rabbitmq and elsewhere:
        raise ValueError(
            f"{', '.join(elsewhere)} not applicable on RabbitMQ: it takes "
            f"{', '.join(f.RABBITMQ_KINDS)} (redis-restart restarts a Redis broker; db-pause, "
            "stop-cont and relay-kill fault the database, a paused holder and the relay, "
            "which do not involve the broker; partitions need the Redis rig: run them on Redis)"
        )
    faults = [k for k in kinds for _ in range(per_kind)]
    rng.shuffle(faults)
    return faults


def run_chaos(
    app: Celery,
    settings: Settings,
    redis: EmbeddedRedis | None,
    *,
    tasks: int,
    kinds: list[str],
    per_kind: int,
    seed: int,
    db_pause_s: float,
    timeout_s: float,
    vhost: str | None = None,
    stop: StopFlag | None = None,
) -> ChaosReport:
    """A chaos run on ``app``; ``redis`` is the embedded Redis the run owns
    (its broker, or on RabbitMQ its lock store), ``vhost`` the run's own
    RabbitMQ vhost; ``stop`` (set by a signal handler) ends it at its next
    wait, the rig stopped, with :class:`Stopped`."""
    stop = stop or StopFlag()
    rng = random.Random(seed)
    schedule = plan(kinds, per_kind, rng, rabbitmq=settings.amqp)
    run = f"chaos{uuid.uuid4().hex[:8]}"
    url = settings.database
    app_name = app.main or "fleet"
    across_hosts = bool(set(kinds) & set(f.HOST_KINDS))
    hosts = HostFaults(settings, app_name) if across_hosts else None
    rig = Rig(settings, redis, beats=2 if "beat-partition" in kinds else 1, hosts=hosts)
    locks = redis_client.Redis.from_url(settings.redis)
    since = f.now()
    done: list[f.Fault] = []
    ticks = slots.Slots()
    started = time.monotonic()
    try:
        stop.check()
        slots.reset(locks, app_name)
        rig.start()
        injector = f.Injector(
            rig.workers, None if settings.amqp else redis, url, rng, db_pause_s=db_pause_s,
            queue=settings.queue, relay=rig.relay, broker_url=settings.broker,
            broker_tls=settings.redis_tls(settings.broker), vhost=vhost,
            locks_url=settings.redis, beats=rig.others, hosts=hosts,
        )  # fmt: skip
        _wait_workers(app, rig, stop)
        waves = _payloads(run, tasks, schedule, rng)
        done = _waves(app, url, run, schedule=schedule, waves=waves, injector=injector, stop=stop)
        settled = _wait_settled(url, run, tasks, started + timeout_s, stop)
        _wait_handled(url, run, started + timeout_s, stop)
        while injector.busy():
            stop.sleep(0.2)
        # A resumed paused holder writes (and is refused) right after SIGCONT.
        stop.sleep(RESUME_GRACE_S)
        rig.stop_beats()
        ticks = slots.settle(url, locks, app_name, since)
    finally:
        rig.stop()
        locks.close()
    report = _report(
        url,
        run,
        tasks=tasks,
        faults=done,
        settled=settled,
        restarts=rig.restarts,
        relay_restarts=rig.relay_restarts,
        wall_s=time.monotonic() - started,
        ticks=ticks,
    )
    if settings.amqp:
        report.broker, report.queue_type, report.vhost = "rabbitmq", settings.queue_type, vhost
    return report


def _payloads(
    run: str, tasks: int, schedule: list[str], rng: random.Random
) -> list[list[dict[str, Any]]]:
    """The run's probe tasks in one wave per fault, plus a last one; the wave a
    partition hits carries a task long enough to outlive the cut."""
    payloads = [
        {"id": f"{run}-{i}", "work_ms": _work_ms(rng), "unique": False, "emit": True}
        for i in range(tasks)
    ]
    waves = [payloads[i :: len(schedule) + 1] for i in range(len(schedule) + 1)]
    for aimed, first in zip(schedule, waves, strict=False):
        if aimed == "partition" and first:
            # A holder still running after the takeover; the run that takes
            # over ends when it would have.
            first[0].update(work_ms=LONG_WORK_MS, shared_start=True)
    return waves


def _waves(
    app: Celery,
    url: str,
    run: str,
    *,
    schedule: list[str],
    waves: list[list[dict[str, Any]]],
    injector: f.Injector,
    stop: StopFlag,
) -> list[f.Fault]:
    """One wave at a time: publish it, hit it with a fault while it runs, and
    let everything published so far settle before the next one, so a recovery
    time measures recovery, not a queue behind it."""
    done: list[f.Fault] = []
    published = 0
    for kind, wave in zip([*schedule, None], waves, strict=True):
        _publish_retrying(app, wave, stop)
        published += len(wave)
        if kind is not None:
            long_ms = LONG_WORK_MS if kind == "partition" else 0
            busy = _wait_for_work(url, run, stop, locks_url=injector.locks_url, long_ms=long_ms)
            fault = f.Fault(kind, f.now(), "", in_flight=[k for k, _ in busy])
            fault.detail = injector.inject(kind, [pid for _, pid in busy], fault)
            echo(f"chaos {run}: {kind}: {fault.detail}")
            done.append(fault)
        _wait_settled(url, run, published, time.monotonic() + WAVE_TIMEOUT_S, stop)
    return done


def _work_ms(rng: random.Random) -> int:
    """Mostly short tasks, one in ten long enough to be caught mid-run by a fault."""
    return rng.randint(1000, 3000) if rng.random() < 0.1 else rng.randint(20, 200)


def _host() -> str:
    import socket

    return socket.gethostname()


def _wait_workers(app: Any, rig: Rig, stop: StopFlag, timeout_s: float = 60) -> None:
    """Until every worker of the rig answers a ping (one short ping at a time,
    so a stop signal is seen between two)."""
    names = [f"{w.name}@{_host()}" for w in rig.workers]
    deadline = time.monotonic() + timeout_s
    while True:
        stop.check()
        try:
            wait_workers(app, names, timeout_s=1)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def _publish_retrying(
    app: Any, wave: list[dict[str, Any]], stop: StopFlag, timeout_s: float = 30
) -> None:
    """Publish a wave; while the broker restarts, try again (the caller's side of
    'no task lost' is to retry its publish until the broker takes it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stop.check()
        try:
            enqueue_many(app, AGENT, wave)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            stop.sleep(0.5)


def _wait_settled(
    url: str, run: str, tasks: int, deadline: float, stop: StopFlag
) -> dict[str, Any]:
    settled: dict[str, Any] = {}
    while time.monotonic() < deadline:
        settled = _settled(url, run) or settled
        progress.update("chaos: keys settled", len(settled), tasks)
        if len(settled) >= tasks:
            break
        stop.sleep(0.5)
    return settled


def _subscribers(url: str, run: str) -> dict[str, dict[str, int]]:
    """Per subscriber of ``probe.done``: keys of this run it handled (distinct),
    keys that succeeded and it never handled, and runs beyond one per key."""
    log = PROBE_EFFECT_LOG.c
    with transaction(url) as conn:
        succeeded = set(
            conn.execute(
                select(OUTCOMES.c.idempotency_key).where(
                    _keys_where(run) & (OUTCOMES.c.status == "succeeded")
                )
            ).scalars()
        )
        out: dict[str, dict[str, int]] = {}
        for name in probe.DONE_SUBSCRIBERS:
            rows = conn.execute(
                select(log.effect_key, func.count())
                .where(log.effect_key.like(f"{name}|{run}-%"))
                .group_by(log.effect_key)
            ).all()
            handled = {f"probe:{k.split('|', 1)[1]}": int(n) for k, n in rows}
            out[name] = {
                "handled": len(handled),
                "lost": len(succeeded - set(handled)),
                "duplicated": sum(n - 1 for n in handled.values()),
            }
    return out


def _wait_handled(url: str, run: str, deadline: float, stop: StopFlag) -> None:
    """Until every subscriber has handled every succeeded key, or the deadline."""
    while time.monotonic() < deadline:
        try:
            if all(s["lost"] == 0 for s in _subscribers(url, run).values()):
                return
        except DBAPIError:
            pass
        stop.sleep(0.5)


def _count(url: str, query: Any) -> int:
    with transaction(url) as conn:
        return int(conn.execute(query).scalar_one())


def _utc(at: datetime) -> datetime:
    """SQLite returns naive datetimes; fleetworks stores UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _report(
    url: str,
    run: str,
    *,
    tasks: int,
    faults: list[f.Fault],
    settled: dict[str, Any],
    restarts: int,
    wall_s: float,
    relay_restarts: int = 0,
    ticks: slots.Slots | None = None,
) -> ChaosReport:
    like = f"probe:{run}-%"
    e = GUARD_EVENTS.c

    def events(kind: EventKind) -> int:
        return _count(
            url, select(func.count()).where((e.kind == kind) & e.idempotency_key.like(like))
        )

    statuses = _status_counts(url, run)
    mine = PROBE_EFFECT_LOG.c.effect_key.like(f"{run}-%")
    effect_rows = _count(url, select(func.count()).where(mine))
    distinct_effects = _count(
        url, select(func.count(func.distinct(PROBE_EFFECT_LOG.c.effect_key))).where(mine)
    )
    duplicated = events(EventKind.DUPLICATE_EFFECT) + (effect_rows - distinct_effects)
    ticks = ticks or slots.Slots()
    ended = {**ticks.finished, **settled}
    for fault in faults:
        # A beat partition ends when the new leader has sent the slots due
        # while nobody led; every other fault when its keys have settled.
        seen = ticks.sent if fault.kind == "beat-partition" else ended
        finished = [seen[k] for k in fault.in_flight if k in seen]
        if finished and len(finished) == len(fault.in_flight):
            last = max(_utc(t) for t in finished)
            fault.recovery_s = round((last - (fault.recover_from or fault.at)).total_seconds(), 2)
        annotate(url, fault)
    recovery: dict[str, float] = {}
    for fault in faults:
        if fault.recovery_s is not None:
            recovery[fault.kind] = max(recovery.get(fault.kind, 0.0), fault.recovery_s)
    lost = tasks - len(settled)
    succeeded = statuses.get("succeeded", 0)
    subscribers = _subscribers(url, run)
    events_ok = all(v["lost"] == 0 and v["duplicated"] == 0 for v in subscribers.values())
    return ChaosReport(
        tasks=tasks,
        faults={k: sum(1 for x in faults if x.kind == k) for k in sorted({x.kind for x in faults})},
        tasks_settled=len(settled),
        tasks_lost=lost,
        succeeded=succeeded,
        dead=statuses.get("dead", 0),
        effects=effect_rows,
        effects_duplicated=duplicated,
        stale_writes_refused=events(EventKind.STALE_WRITE),
        republished=events(EventKind.REPUBLISHED),
        worker_restarts=restarts,
        max_recovery_s=max(recovery.values(), default=0.0),
        recovery_s=recovery,
        wall_s=round(wall_s, 1),
        database=make_backend(url),
        subscribers=subscribers,
        relay_restarts=relay_restarts,
        ok=lost == 0
        and duplicated == 0
        and effect_rows == succeeded
        and events_ok
        and ticks.run_twice == 0
        and ticks.missed == 0,
        fault_log=[_fault_entry(x) for x in faults],
        slots=ticks.as_report(),
    )


def _fault_entry(fault: f.Fault) -> dict[str, Any]:
    return {
        "kind": fault.kind,
        "detail": fault.detail,
        "in_flight": len(fault.in_flight),
        "recovery_s": fault.recovery_s,
        **fault.extra,
    }


def _status_counts(url: str, run: str) -> dict[str, int]:
    with transaction(url) as conn:
        rows = conn.execute(
            select(OUTCOMES.c.status, func.count())
            .where(_keys_where(run))
            .group_by(OUTCOMES.c.status)
        )
        return {status: int(n) for status, n in rows}


def make_backend(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).get_backend_name()


def _broker_line(report: ChaosReport) -> str:
    if report.broker == "rabbitmq":
        return f"RabbitMQ {report.queue_type} queues on vhost {report.vhost}"
    return "Redis broker"


def render(report: ChaosReport) -> str:
    faults = ", ".join(f"{k} x{n}" for k, n in report.faults.items())
    return "\n".join(
        [
            f"fleetworks chaos: {'OK' if report.ok else 'NOT OK'} ({report.database}, "
            f"{_broker_line(report)})",
            f"  tasks     {report.tasks}, settled {report.tasks_settled}, lost {report.tasks_lost}"
            f", dead {report.dead}, in {report.wall_s} s",
            f"  faults    {faults}; workers restarted {report.worker_restarts}",
            f"  effects   {report.effects} (succeeded {report.succeeded}), duplicated "
            f"{report.effects_duplicated}, stale writes refused {report.stale_writes_refused}",
            "  events    "
            + "; ".join(
                f"{name} handled {v['handled']}, lost {v['lost']}, duplicated {v['duplicated']}"
                for name, v in report.subscribers.items()
            )
            + f"; relay restarted {report.relay_restarts}",
            f"  recovery  max {report.max_recovery_s} s; by kind {report.recovery_s}; "
            f"republished by the reaper {report.republished}",
            "  slots     "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.slots.items()),
            *render_hosts(report.fault_log),
        ]
    )
