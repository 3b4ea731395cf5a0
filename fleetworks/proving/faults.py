"""Fault injectors for ``fleetworks chaos``, each a real fault on a real process.

- ``child-kill``: SIGKILL of a pool process that is running a task;
- ``worker-kill``: SIGKILL of a whole worker (main process and pool), which
  the rig's supervisor restarts after a second, as systemd or Kubernetes would;
- ``redis-restart``: the embedded Redis stopped (its AOF flushed) and started
  again on the same port and data directory;
- ``db-pause``: the results database unreachable for ``db_pause_s``: SQLite
  held under an exclusive lock (every writer waits), PostgreSQL refusing new
  connections with every existing one of the database terminated;
- ``stop-cont``: SIGSTOP of a pool process running a task, past its lease,
  then SIGCONT: the paused holder comes back after its work was taken over;
- ``relay-kill``: the events relay frozen while events pile up, thawed and
  killed 20 ms later (most likely inside a batch: sent, not yet marked),
  restarted after a second;
- ``client-kill``: the workers' broker connections cut while they wait for
  work. On Redis, ``CLIENT KILL`` of every connection the workers' processes
  (main and pool) hold to the broker Redis, five times over a second, from
  a connection of its own, so the workers' consumers die mid-BRPOP and die
  again while they reconnect; the run's own connections (the publisher),
  beat's and the relay's are spared. On RabbitMQ, every client connection
  of the run's vhost closed by the broker (``rabbitmqctl
  close_all_connections``), the workers', beat's, the relay's and the
  publisher's alike. On Redis a message a worker has popped but not yet
  recorded as unacknowledged dies with its connection (kombu#1733); the
  outbox (:mod:`fleetworks.outbox`) publishes it again.
- ``partition``: the host of the worker running the longest task cut off
  from Redis (on PostgreSQL alternately from Redis alone and from Redis and
  the database) past its lease, then healed: the holder runs on, the other
  worker takes over, the holder's late write is refused;
- ``beat-partition``: the leading beat's host cut off past the beat lease,
  then healed, while a second beat takes the lead.

The last two are faults across hosts: the rig runs each worker and each beat
on a test host of its own (a network namespace, :mod:`fleetworks.proving.netns`),
which takes root; :mod:`fleetworks.proving.partition` has them.

On RabbitMQ only the faults that concern the broker's delivery apply
(:data:`RABBITMQ_KINDS`): ``redis-restart`` restarts a Redis broker the run
does not have, and ``db-pause``, ``stop-cont`` and ``relay-kill`` fault the
database, a paused holder and the relay, which the broker plays no part in;
they are proven on the Redis rig.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psutil
import redis as redis_client
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fleetworks.embedded import EmbeddedRedis
from fleetworks.procs import Child

if TYPE_CHECKING:
    from fleetworks.proving.partition import HostFaults

KINDS = (
    "child-kill", "worker-kill", "redis-restart", "db-pause", "stop-cont", "relay-kill",
    "client-kill",
)  # fmt: skip
#: What ``fleetworks chaos`` injects unless told otherwise (on Redis).
DEFAULT_KINDS = KINDS
#: Faults across hosts: they need network namespaces (root).
HOST_KINDS = ("partition", "beat-partition")
ALL_KINDS = (*KINDS, *HOST_KINDS)
#: The kinds a run on RabbitMQ takes, and its default.
RABBITMQ_KINDS = ("child-kill", "worker-kill", "client-kill")
RABBITMQ_DEFAULT_KINDS = ("child-kill", "worker-kill")
#: client-kill on Redis: rounds of kills, and seconds between two (a second in all).
CLIENT_KILL_ROUNDS = 5
CLIENT_KILL_GAP_S = 0.2


@dataclass
class Fault:
    kind: str
    at: datetime
    detail: str
    #: Idempotency keys claimed (in flight) when the fault hit.
    in_flight: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    #: When recovery counts from, if not ``at`` (a cut: when the lease expired).
    recover_from: datetime | None = None
    #: What a host fault measured (lease left, failover, services cut...).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Injector:
    """Injects faults into a rig: its workers, its embedded Redis, its database."""

    workers: list[Child]
    redis: EmbeddedRedis | None
    database_url: str
    rng: random.Random
    db_pause_s: float = 10.0
    queue: str = "fleet"
    stop_s: float = 20.0
    background: list[threading.Thread] = field(default_factory=list)
    #: Pool processes paused by stop-cont: not targets until resumed.
    paused: set[int] = field(default_factory=set)
    #: The events relay (relay-kill), supervised by the rig.
    relay: Child | None = None
    #: The rig's beats, and its test hosts (faults across hosts).
    beats: list[Child] = field(default_factory=list)
    hosts: HostFaults | None = None
    #: The lock store (stop-cont reads the paused holder's lease from it).
    locks_url: str | None = None
    #: Set by a fault that lasts, or whose effect starts later: when recovery counts from.
    _recover_from: datetime | None = None
    _in_flight: list[str] = field(default_factory=list)
    #: The broker (client-kill): a Redis URL and the redis-py TLS options for it,
    broker_url: str = ""
    broker_tls: dict[str, Any] = field(default_factory=dict)
    #: or, on RabbitMQ, the run's vhost.
    vhost: str | None = None

    def inject(self, kind: str, busy_pids: list[int], fault: Fault | None = None) -> str:
        """Inject one fault of ``kind``; returns what was done. A fault across
        hosts also records on ``fault`` what it measured. Recovery counts from
        when the fault ends (a pause, a restart), or from when the lease of a
        holder that goes on believing it holds it expires (stop-cont, a cut)."""
        if kind in HOST_KINDS:
            if self.hosts is None or fault is None:
                raise RuntimeError(f"{kind} needs the rig on test hosts (network namespaces)")
            return self.hosts.inject(kind, self, busy_pids, fault)
        action: Callable[[list[int]], str] = getattr(self, kind.replace("-", "_"))
        self._recover_from = None
        self._in_flight = list(fault.in_flight) if fault is not None else []
        detail = action(busy_pids)
        if fault is not None and self._recover_from is not None:
            fault.recover_from = self._recover_from
        return detail

    def _pool_pids(self) -> list[int]:
        return [pid for w in self.workers if w.alive() for pid in _pool_of(w)]

    def _busy_child(self, busy_pids: list[int]) -> int | None:
        """The pool process with the most work left (``busy_pids`` comes sorted
        that way), else any pool process."""
        pool = set(self._pool_pids()) - self.paused
        busy = [p for p in busy_pids if p in pool]
        if busy:
            return busy[0]
        return self.rng.choice(sorted(pool)) if pool else None

    def child_kill(self, busy_pids: list[int]) -> str:
        pid = self._busy_child(busy_pids)
        if pid is None:
            return "no pool process to kill"
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL pool process {pid}"

    def worker_kill(self, busy_pids: list[int]) -> str:
        alive = [w for w in self.workers if w.alive()]
        if not alive:
            return "no live worker"
        # Spare a worker holding a paused process, so the pause plays out.
        unpaused = [w for w in alive if not self.paused & _pool_of(w)]
        victim = self.rng.choice(unpaused or alive)
        os.killpg(victim.pid, signal.SIGKILL)
        return f"SIGKILL worker {victim.name} (pid {victim.pid}) and its pool"

    def relay_kill(self, busy_pids: list[int]) -> str:
        if self.relay is None or not self.relay.alive():
            return "no live relay"
        # Frozen for half a second so events pile up, thawed, and killed 20 ms
        # later: most likely inside the batch it started on them.
        self.relay.signal(signal.SIGSTOP)
        time.sleep(0.5)
        pending = _pending_events(self.database_url)
        self.relay.signal(signal.SIGCONT)
        time.sleep(0.02)
        self.relay.signal(signal.SIGKILL)
        return f"SIGKILL relay (pid {self.relay.pid}) 20 ms after {pending} event(s) piled up"

    def client_kill(self, busy_pids: list[int]) -> str:
        if self.vhost is not None:
            from fleetworks.proving.rabbitmq import close_connections

            closed = close_connections(self.vhost, "fleetworks chaos: client-kill")
            self._recover_from = now()
            return f"RabbitMQ closed all {closed} client connection(s) of vhost {self.vhost}"
        if not self.broker_url.startswith(("redis://", "rediss://")):
            raise RuntimeError("client-kill needs a Redis broker or the run's RabbitMQ vhost")
        parts = urlsplit(self.broker_url)
        port = parts.port or 6379
        killed, waiting = 0, 0
        started = time.monotonic()
        client = redis_client.Redis.from_url(self.broker_url, **self.broker_tls)
        try:
            for i in range(CLIENT_KILL_ROUNDS):
                if i:
                    time.sleep(CLIENT_KILL_GAP_S)
                theirs = _connections_to(self._worker_pids(), port) | self._relayed(parts)
                for entry in client.client_list():
                    if _address(str(entry.get("addr", ""))) not in theirs:
                        continue  # beat's, the relay's, this run's own, another client's
                    if client.client_kill_filter(_id=entry["id"], skipme=True):
                        killed += 1
                        waiting += entry.get("cmd") == "brpop"
        finally:
            client.close()
        took = time.monotonic() - started
        self._recover_from = now()
        return (
            f"CLIENT KILL of {killed} worker connection(s) to the broker ({waiting} in BRPOP), "
            f"{CLIENT_KILL_ROUNDS} rounds in {took:.1f}s"
        )

    def _relayed(self, broker: Any) -> set[tuple[str, int] | None]:
        """Workers on test hosts reach the broker through a forwarder: the
        connections the broker sees are the forwarder's, made for them."""
        if self.hosts is None:
            return set()
        target = (str(broker.hostname or "127.0.0.1"), int(broker.port or 6379))
        found: set[tuple[str, int] | None] = set()
        for w in self.workers:
            host = self.hosts.hosts.get(w.name)
            if host is not None:
                found |= host.relayed_to(target)
        return found

    def _worker_pids(self) -> list[int]:
        """The workers' main processes and their pools."""
        return [pid for w in self.workers if w.alive() for pid in (w.pid, *_pool_of(w))]

    def redis_restart(self, busy_pids: list[int]) -> str:
        if self.redis is None:
            raise RuntimeError("redis-restart needs the embedded Redis (unset FLEET_BROKER_URL)")
        before = self._broker_backlog()
        started = time.monotonic()
        self.redis.stop()
        self.redis.start()
        self._recover_from = now()
        took = time.monotonic() - started
        # What was queued or unacked must all be there again (AOF): say so.
        return (
            f"embedded Redis restarted in {took:.2f}s; queued+unacked "
            f"{before} before, {self._broker_backlog()} after"
        )

    def _broker_backlog(self) -> tuple[int, int]:
        if self.redis is None:
            return (0, 0)
        client = redis_client.Redis.from_url(self.redis.url)
        try:
            return (int(client.llen(self.queue)), int(client.hlen("unacked")))
        finally:
            client.close()

    def db_pause(self, busy_pids: list[int]) -> str:
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite":
            target: Callable[[], None] = lambda: self._pause_sqlite(url.database or "")  # noqa: E731
            how = "SQLite held under an exclusive lock"
        else:
            target = lambda: self._pause_postgres(url)  # noqa: E731
            how = "PostgreSQL refusing connections, sessions terminated"
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.background.append(thread)
        self._recover_from = now() + timedelta(seconds=self.db_pause_s)
        return f"{how} for {self.db_pause_s:.0f}s"

    def _pause_sqlite(self, path: str) -> None:
        conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            time.sleep(self.db_pause_s)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    def _pause_postgres(self, url: Any) -> None:
        name = url.database
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                try:
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": name},
                    )
                    time.sleep(self.db_pause_s)
                finally:
                    conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        finally:
            admin.dispose()

    def stop_cont(self, busy_pids: list[int]) -> str:
        pid = self._busy_child(busy_pids)
        if pid is None:
            return "no pool process to pause"
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(pid)
        left_s = self._lease_left_s(pid, busy_pids)
        self._recover_from = now() + timedelta(seconds=left_s)
        timer = threading.Timer(self.stop_s, self._resume, args=(pid,))
        timer.daemon = True
        timer.start()
        self.background.append(timer)
        return f"SIGSTOP pool process {pid} for {self.stop_s:.0f}s ({left_s:.1f}s of lease left)"

    def _lease_left_s(self, pid: int, busy_pids: list[int]) -> float:
        """Seconds left on the lease of the key ``pid`` runs (0 if unknown)."""
        from sqlalchemy import select

        from fleetworks import constants as c
        from fleetworks.db import transaction
        from fleetworks.models import OUTCOMES

        keys = [k for k, p in zip(self._in_flight, busy_pids, strict=False) if p == pid]
        if not keys or self.locks_url is None:
            return 0.0
        with transaction(self.database_url) as conn:
            entity = conn.execute(
                select(OUTCOMES.c.entity_key).where(OUTCOMES.c.idempotency_key == keys[0])
            ).scalar()
        client = redis_client.Redis.from_url(self.locks_url)
        try:
            return max(0, int(client.pttl(c.LOCK_KEY + str(entity or keys[0])))) / 1000
        finally:
            client.close()

    def _resume(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # its worker may have been killed
            os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)

    def busy(self) -> bool:
        """Whether a fault still plays out in the background (a pause, a paused holder)."""
        return any(thread.is_alive() for thread in self.background)


def heal(database_url: str) -> None:
    """Let a PostgreSQL database accept connections again, in case a run killed
    in the middle of a db-pause left it refusing them (SQLite needs nothing)."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            refusing = conn.execute(
                text("SELECT NOT datallowconn FROM pg_database WHERE datname = :n"),
                {"n": url.database},
            ).scalar()
            if refusing:
                conn.execute(text(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()


def _pool_of(worker: Child) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(worker.pid).children()}
    except psutil.NoSuchProcess:
        return set()


def _address(addr: str) -> tuple[str, int] | None:
    """``(ip, port)`` of a Redis ``CLIENT LIST`` address (``ip:port``, ``[ip6]:port``)."""
    host, _, port = addr.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else None


def _connections_to(pids: list[int], port: int) -> set[tuple[str, int] | None]:
    """The local ``(ip, port)`` of every TCP connection of ``pids`` to ``port``
    (as the server sees it: the address its ``CLIENT LIST`` shows)."""
    found: set[tuple[str, int] | None] = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue  # gone since it was listed
        found.update((c.laddr.ip, c.laddr.port) for c in conns if c.raddr and c.raddr.port == port)
    return found


def _pending_events(url: str) -> int | str:
    from sqlalchemy import func, select

    from fleetworks.db import transaction
    from fleetworks.models import EVENTS

    try:
        with transaction(url) as conn:
            return int(
                conn.execute(select(func.count()).where(EVENTS.c.relayed_at.is_(None))).scalar_one()
            )
    except Exception as exc:  # the database may be the fault's neighbour
        return f"unknown ({type(exc).__name__})"


def now() -> datetime:
    return datetime.now(UTC)
