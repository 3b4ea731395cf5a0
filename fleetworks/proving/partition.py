"""Faults across hosts for ``fleetworks chaos``: ``partition`` and ``beat-partition``.

With either kind in a run, the rig puts each worker and each beat on a test
host of its own (:mod:`fleetworks.proving.netns`); the driver, the events
relay and the services stay on this machine. A host reaches Redis (the
broker and the lock store) over one link and the database over another, so
a cut can take Redis away and leave the database, or take both.

- ``partition`` cuts the host of the worker running the longest task off
  from Redis for :data:`PARTITION_S` (longer than a lease): on PostgreSQL
  from Redis alone and from Redis and the database, alternately; on SQLite,
  a file on this machine that the host shares, from Redis only. The holder
  goes on running; its lease runs out, the reaper on the other worker
  republishes its claim, the other worker runs it with a higher fencing
  token, and the holder's late write is refused. The wave before a
  partition carries one task long enough (:data:`LONG_WORK_MS`) for the
  holder to still be running when the other worker has taken over; its work
  counts from its first start (:data:`LONG_WORK_MS`), as a job bounded by a
  deadline would, so the run that took over does not start it afresh.
  Recovery counts from the moment the holder's lease expired (its TTL left,
  read right after the cut).
- ``beat-partition`` cuts the leading beat's host off from everything for
  :data:`BEAT_PARTITION_S` (past the beat lease), while a second beat on
  another host campaigns; measured: the failover (cut to the other beat
  leading, which should take at most a lease and a loop) and the slots due
  while no beat led, which the new leader sends late (misfire ``catch_up``)
  and which must each run once. Recovery counts from the cut leader's lease
  expiry to the moment the new leader has sent those slots (each then runs
  when a process is free, behind the wave like any tick).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import select
from sqlalchemy.engine import make_url

from fleetworks import constants as c
from fleetworks import timing
from fleetworks.db import transaction
from fleetworks.guard import FENCING_REFUSED, LEASE_LOST
from fleetworks.leader import Leadership
from fleetworks.locks import EntityLocks
from fleetworks.models import GUARD_EVENTS, OUTCOMES, EventKind
from fleetworks.proving import netns, probe, slots
from fleetworks.settings import Settings

if TYPE_CHECKING:
    from fleetworks.proving.faults import Fault, Injector

#: Seconds a ``partition`` lasts: a lease, then two reaper ticks and a
#: margin for the other worker to free a process, so the lease runs out and
#: the other worker takes over while the holder is still cut off.
PARTITION_S = timing.LEASE_TTL_MAX_S + 2 * timing.REAP_INTERVAL_S + 4.0
#: Milliseconds of work of the task a ``partition`` is aimed at, counted from
#: its first start (``Probe.shared_start``; the cut is made then): past the
#: lease and the takeover, so the cut holder writes late (refused by its lost
#: lease, or by the fencing token once the heal lets its write through), and
#: the run that took over ends at the same moment instead of working afresh.
LONG_WORK_MS = int((PARTITION_S - 0.5) * 1000)
#: Seconds a ``beat-partition`` lasts: three beat leases.
BEAT_PARTITION_S = 3 * c.BEAT_LEASE_TTL_S
#: Seconds within which another beat should lead after the leader is cut:
#: the rest of its lease (at most a lease) and one loop of the other beat.
FAILOVER_BOUND_S = c.BEAT_LEASE_TTL_S + c.BEAT_LOOP_S

#: What a child's environment names the services by: rewritten per host.
URL_VARS = ("FLEET_BROKER_URL", "FLEET_REDIS_URL", "FLEET_DATABASE_URL")
#: The links of a host: Redis (the broker and the lock store), the database.
REDIS, DB = "redis", "db"


def services_of(settings: Settings) -> dict[str, list[netns.Endpoint]]:
    """The links a host needs and the endpoints each forwards: the broker and
    the lock store on the Redis link; the database (unless SQLite) on its own."""
    urls = [settings.broker, settings.redis]
    coordination = list(dict.fromkeys(e for u in urls if (e := netns.endpoint_of(u)) is not None))
    services: dict[str, list[netns.Endpoint]] = {REDIS: coordination}
    database = netns.endpoint_of(settings.database)
    if database is not None:
        services[DB] = [database]
    return services


class HostFaults:
    """The rig's test hosts (one per worker and per beat) and the faults on them."""

    def __init__(self, settings: Settings, app_name: str) -> None:
        self.settings = settings
        self.app_name = app_name
        self.network = netns.Network(services_of(settings))
        #: Child name -> its host.
        self.hosts: dict[str, netns.Host] = {}
        self._partitions = 0
        self._client = redis.Redis.from_url(settings.redis)
        self._leadership = Leadership(lambda: EntityLocks(self._client), app_name, "chaos")

    @property
    def sqlite(self) -> bool:
        return make_url(self.settings.database).get_backend_name() == "sqlite"

    def place(
        self, name: str, argv: Sequence[str], env: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """``argv`` and ``env`` of child ``name`` run on its own host (made on first use)."""
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = self.network.add_host(name)
        env = dict(env)
        for var in URL_VARS:
            if env.get(var):
                env[var] = host.url(env[var])
        return host.argv(argv), env

    def close(self) -> None:
        try:
            self.network.close()
        finally:
            self._client.close()

    def inject(self, kind: str, injector: Injector, busy_pids: list[int], fault: Fault) -> str:
        if kind == "partition":
            return self.partition(injector, busy_pids, fault)
        if kind == "beat-partition":
            return self.beat_partition(injector, fault)
        raise ValueError(f"{kind!r} is not a fault across hosts")

    # -- partition ---------------------------------------------------------------

    def _cut_services(self) -> tuple[str, ...]:
        if DB not in self.network.services:
            return (REDIS,)
        self._partitions += 1
        return (REDIS,) if self._partitions % 2 == 1 else (REDIS, DB)

    def partition(self, injector: Injector, busy_pids: list[int], fault: Fault) -> str:
        from fleetworks.proving.faults import _pool_of, now

        placed = [w for w in injector.workers if w.alive() and w.name in self.hosts]
        pools = {w.name: _pool_of(w) for w in placed}
        busy = list(zip(fault.in_flight, busy_pids, strict=False))
        target = next(
            ((k, name) for k, pid in busy if pid not in injector.paused
             for name, pool in pools.items() if pid in pool),
            None,
        )  # fmt: skip
        if target is None:
            return "no busy worker on a test host to cut off"
        key, name = target
        host = self.hosts[name]
        services = self._cut_services()
        # The holder's work counts from now, if it has not noted its start yet.
        probe.first_start(self._client, key.removeprefix("probe:"))
        self.network.cut(host, services)
        fault.at = now()
        left_s = self._ttl_s(c.LOCK_KEY + self._entity(key))
        fault.recover_from = fault.at + timedelta(seconds=left_s)
        fault.in_flight = [k for k, pid in busy if pid in pools[name]]
        fault.extra.update(
            host=host.namespace, worker=name, holder=key, cut=list(services),
            cut_s=PARTITION_S, lease_left_s=round(left_s, 2),
        )  # fmt: skip
        timer = threading.Timer(PARTITION_S, self._heal, args=(host, services, fault))
        timer.daemon = True
        timer.start()
        injector.background.append(timer)
        what = "Redis and the database" if DB in services else "Redis"
        note = (
            " (SQLite is a file on this machine that every host shares: only Redis can be cut)"
            if self.sqlite
            else ""
        )
        return (
            f"worker {name} on host {host.namespace} cut from {what} for {PARTITION_S:g}s{note}, "
            f"holding {len(fault.in_flight)} key(s), the longest {key} with {left_s:.1f}s of "
            "lease left"
        )

    def _heal(self, host: netns.Host, services: Sequence[str], fault: Fault) -> None:
        from fleetworks.proving.faults import now

        try:
            self.network.heal(host, services)
        except netns.NetnsError:
            if host in self.network.hosts:
                raise
            return  # the run ended first and removed the host
        fault.extra["healed_after_s"] = round((now() - fault.at).total_seconds(), 2)

    def _entity(self, key: str) -> str:
        with transaction(self.settings.database) as conn:
            entity = conn.execute(
                select(OUTCOMES.c.entity_key).where(OUTCOMES.c.idempotency_key == key)
            ).scalar()
        return str(entity) if entity is not None else key

    def _ttl_s(self, key: str) -> float:
        """Seconds left on a lease key (0 if it is gone)."""
        return max(0, int(self._client.pttl(key))) / 1000

    # -- beat-partition ----------------------------------------------------------

    def _leader_pid(self) -> int | None:
        identity = self._leadership.leader()
        match = re.search(r"/(\d+)$", identity or "")
        return int(match.group(1)) if match else None

    def beat_partition(self, injector: Injector, fault: Fault) -> str:
        from fleetworks.proving.faults import now

        deadline = time.monotonic() + 10
        leader = self._leader_pid()
        while leader is None and time.monotonic() < deadline:
            time.sleep(0.1)
            leader = self._leader_pid()
        beat = next((b for b in injector.beats if b.alive() and b.pid == leader), None)
        if beat is None or beat.name not in self.hosts:
            return f"no leading beat on a test host (leader pid {leader})"
        host = self.hosts[beat.name]
        self.network.cut(host)
        started = time.monotonic()
        fault.at = now()
        left_s = self._ttl_s(c.LOCK_KEY + self._leadership.entity)
        fault.recover_from = fault.at + timedelta(seconds=left_s)
        successor = None
        while time.monotonic() - started < BEAT_PARTITION_S:
            pid = self._leader_pid()
            if pid is not None and pid != leader:
                successor = pid
                break
            time.sleep(0.05)
        failover_s = time.monotonic() - started if successor is not None else None
        took_over = now()
        time.sleep(max(0.0, BEAT_PARTITION_S - (time.monotonic() - started)))
        self.network.heal(host)
        # The slots no beat led for: the new leader sends them late, each once.
        fault.in_flight = slots.between(fault.at, took_over) if successor is not None else []
        new = next((b.name for b in injector.beats if b.pid == successor), str(successor))
        fault.extra.update(
            host=host.namespace, beat=beat.name, cut=sorted(host.links), cut_s=BEAT_PARTITION_S,
            lease_left_s=round(left_s, 2),
            failover_s=round(failover_s, 2) if failover_s is not None else None,
            failover_bound_s=FAILOVER_BOUND_S, new_leader=new,
            slots_leaderless=len(fault.in_flight),
        )  # fmt: skip
        if failover_s is None:
            return (
                f"leading beat {beat.name} on host {host.namespace} cut off for "
                f"{BEAT_PARTITION_S:g}s; no other beat took the lead"
            )
        return (
            f"leading beat {beat.name} on host {host.namespace} cut off for "
            f"{BEAT_PARTITION_S:g}s ({left_s:.1f}s of lease left); {new} led after "
            f"{failover_s:.1f}s, {len(fault.in_flight)} slot(s) due without a leader"
        )


def annotate(url: str, fault: Fault) -> None:
    """Where a host fault's recovery time went, once the run is over: for a
    partition, the stale writes refused for the keys it cut off and, for its
    longest key, when (after the lease expired) the reaper republished it,
    the other worker claimed it and its run finished."""
    if fault.kind != "partition" or not fault.in_flight or fault.recover_from is None:
        return
    expired = fault.recover_from
    e, o = GUARD_EVENTS.c, OUTCOMES.c
    with transaction(url) as conn:
        refused = conn.execute(
            select(e.detail).where(
                (e.kind == EventKind.STALE_WRITE) & e.idempotency_key.in_(fault.in_flight)
            )
        ).scalars()
        causes = [str(d or "").split(":", 1)[0] for d in refused]
        # Found by the holder's heartbeat (lease lost) before writing, or by
        # the database (fencing token refused) when it wrote anyway.
        fault.extra["stale_writes_refused"] = {
            LEASE_LOST: causes.count(LEASE_LOST),
            FENCING_REFUSED: causes.count(FENCING_REFUSED),
        }
        row = conn.execute(
            select(o.queued_at, o.started_at, o.finished_at, o.attempts, o.worker).where(
                o.idempotency_key == fault.extra.get("holder", fault.in_flight[0])
            )
        ).first()
    if row is None:
        return

    def after(at: datetime | None) -> float | None:
        return None if at is None else round((_utc(at) - expired).total_seconds(), 2)

    fault.extra["longest"] = {
        "republished_s": after(row.queued_at),
        "claimed_s": after(row.started_at),
        "finished_s": after(row.finished_at),
        "deliveries": int(row.attempts),
        "by": row.worker,
    }


def render(fault_log: list[dict[str, Any]]) -> list[str]:
    """One line per host fault of a report's fault log: what the cut did and
    where the recovery time went (seconds after the lease expired)."""
    lines = []
    for x in fault_log:
        if x["kind"] == "partition" and "holder" in x:
            took = x.get("longest", {})
            refused = ", ".join(f"{k} {n}" for k, n in x.get("stale_writes_refused", {}).items())
            cut = " and ".join(x["cut"])
            lines.append(
                f"  partition cut from {cut} for {x['cut_s']:g} s, lease expired "
                f"after {x['lease_left_s']} s; then republished +{took.get('republished_s')} s, "
                f"claimed +{took.get('claimed_s')} s, done +{took.get('finished_s')} s; "
                f"stale writes refused: {refused}"
            )
        elif x["kind"] == "beat-partition" and "beat" in x:
            lines.append(
                f"  beat-partition: {x['new_leader']} led {x['failover_s']} s after the cut "
                f"(bound {x['failover_bound_s']:g} s; lease left {x['lease_left_s']} s); "
                f"{x['slots_leaderless']} slot(s) due without a leader ran "
                f"+{x['recovery_s']} s after the lease expired"
            )
    return lines


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


__all__ = ["HostFaults", "annotate", "render", "services_of"]
