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
  restarted after a second.
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
from datetime import UTC, datetime
from typing import Any

import psutil
import redis as redis_client
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fleetworks.embedded import EmbeddedRedis
from fleetworks.procs import Child

KINDS = ("child-kill", "worker-kill", "redis-restart", "db-pause", "stop-cont", "relay-kill")


@dataclass
class Fault:
    kind: str
    at: datetime
    detail: str
    #: Idempotency keys claimed (in flight) when the fault hit.
    in_flight: list[str] = field(default_factory=list)
    recovery_s: float | None = None


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

    def inject(self, kind: str, busy_pids: list[int]) -> str:
        """Inject one fault of ``kind``; returns what was done."""
        action: Callable[[list[int]], str] = getattr(self, kind.replace("-", "_"))
        return action(busy_pids)

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

    def redis_restart(self, busy_pids: list[int]) -> str:
        if self.redis is None:
            raise RuntimeError("redis-restart needs the embedded Redis (unset FLEET_BROKER_URL)")
        before = self._broker_backlog()
        started = time.monotonic()
        self.redis.stop()
        self.redis.start()
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
        timer = threading.Timer(self.stop_s, self._resume, args=(pid,))
        timer.daemon = True
        timer.start()
        self.background.append(timer)
        return f"SIGSTOP pool process {pid} for {self.stop_s:.0f}s"

    def _resume(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # its worker may have been killed
            os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)

    def wait(self) -> None:
        for thread in self.background:
            thread.join()


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
