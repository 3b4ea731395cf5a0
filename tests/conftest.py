"""Fixtures: real Redis, a real database and real worker processes.

Redis: ``FLEET_TEST_REDIS_URL``, else the server on 127.0.0.1:6379 when it
answers, else an embedded redis-server started for the session. The broker
and the lock store use two different databases of it, so a test can flush
the lock store without touching kombu's bindings.

Databases: SQLite always; PostgreSQL at ``FLEET_TEST_POSTGRES_URL`` (default
the local server's ``test`` database). Unreachable PostgreSQL skips its tests
with the reason, except under ``CI=true``, where it fails them: CI runs on a
machine that has it, and a silent skip there would hide a regression.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from fleetworks.embedded import EmbeddedRedis, free_port, ping

SYSTEM_REDIS = "redis://127.0.0.1:6379"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: ``make test`` runs the suite in several pytest processes (pytest-xdist):
#: each has Redis databases, a PostgreSQL database and names of its own, so
#: no test sees another's keys, rows or queues. ``""`` outside xdist.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_worker_index = int(XDIST_WORKER.removeprefix("gw") or 0)
#: (broker, lock store, the plugin's ``fleet`` fixture) Redis databases of
#: each pytest process, in order.
_REDIS_DBS = [(11, 12, 13), (14, 15, 10), (7, 8, 9), (4, 5, 6), (1, 2, 3)]
if _worker_index >= len(_REDIS_DBS):
    raise RuntimeError(
        f"pytest process {XDIST_WORKER}: at most {len(_REDIS_DBS)} run in parallel "
        "(three Redis databases each); pass a smaller -n"
    )
#: Appended to the names of what a test makes on a shared server (databases).
WORKER_SUFFIX = f"_{XDIST_WORKER}" if _worker_index else ""


def _worker_database(url: str) -> str:
    """``url`` itself for the first pytest process, else a database of the
    process's own beside it (made on first use)."""
    if not WORKER_SUFFIX:
        return url
    base, name = url.rsplit("/", 1)
    return f"{base}/{name}{WORKER_SUFFIX}"


_POSTGRES_BASE_URL = os.environ.get(
    "FLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
POSTGRES_URL = _worker_database(_POSTGRES_BASE_URL)

# The in-process Celery app (config.app) reads FLEET_* once, at import: set
# them before any test module imports it.
_redis_base = os.environ.get("FLEET_TEST_REDIS_URL", SYSTEM_REDIS).rstrip("/")
_embedded: EmbeddedRedis | None = None
if not ping(_redis_base):
    import tempfile

    _embedded = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="fleet-test-redis-")), port=free_port())
    _embedded.start()
    _redis_base = f"redis://127.0.0.1:{_embedded.port}"
BROKER_URL = f"{_redis_base}/{_REDIS_DBS[_worker_index][0]}"
LOCKS_URL = f"{_redis_base}/{_REDIS_DBS[_worker_index][1]}"
os.environ["FLEET_BROKER_URL"] = BROKER_URL
os.environ["FLEET_REDIS_URL"] = LOCKS_URL
# The plugin's ``fleet`` fixture flushes its database around every test.
os.environ["FLEET_TEST_REDIS_DB"] = str(_REDIS_DBS[_worker_index][2])
os.environ.setdefault("FLEET_LOG_LEVEL", "INFO")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _embedded is not None:
        _embedded.stop()


def _clean_redis() -> None:
    redis.Redis.from_url(LOCKS_URL).flushdb()


@pytest.fixture(scope="session", autouse=True)
def _broker_flushed() -> Iterator[None]:
    redis.Redis.from_url(BROKER_URL).flushdb()
    yield
    redis.Redis.from_url(BROKER_URL).flushdb()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """The lock store, flushed before and after the test."""
    _clean_redis()
    client = redis.Redis.from_url(LOCKS_URL)
    yield client
    _clean_redis()
    client.close()


def create_postgres_database(name: str, *, fresh: bool) -> str:
    """The URL of database ``name`` beside :data:`POSTGRES_URL`, made if
    missing (dropped and made again with ``fresh``)."""
    import psycopg

    admin = _POSTGRES_BASE_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
        if fresh:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"


def postgres_available() -> bool:
    try:
        import psycopg

        if WORKER_SUFFIX:
            create_postgres_database(POSTGRES_URL.rsplit("/", 1)[1], fresh=False)
        dsn = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except Exception:
        return False


def require(available: bool, reason: str) -> None:
    """The one skip rule: a test whose service or tool is missing skips with
    ``reason``, except under ``CI=true``, where it fails (CI runs where all
    of them are, and a silent skip there would hide a regression)."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(reason)


def _require_postgres() -> None:
    require(
        postgres_available(),
        f"PostgreSQL not reachable at {POSTGRES_URL} (set FLEET_TEST_POSTGRES_URL)",
    )


def all_tables() -> list[Any]:
    """The runtime's tables and this deployment's."""
    from fleetworks.models import Base
    from tasks.schema import metadata

    return [*Base.metadata.sorted_tables, *metadata.sorted_tables]


def _fresh_database(url: str) -> str:
    from config import fleet
    from fleetworks import db
    from fleetworks.migrate import upgrade

    engine = db.get_engine(url)
    with engine.begin() as conn:
        for table in reversed(all_tables()):
            table.drop(conn, checkfirst=True)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    upgrade(url, fleet.migrations)
    return url


def truncate(url: str) -> None:
    from fleetworks import db

    with db.transaction(url) as conn:
        for table in reversed(all_tables()):
            conn.execute(table.delete())


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _fresh_database(f"sqlite:///{tmp_path_factory.mktemp('db') / 'fleet.db'}")


@pytest.fixture(scope="session")
def postgresql_url() -> str:
    _require_postgres()
    return _fresh_database(POSTGRES_URL)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each results database in turn, emptied before and after the test."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    truncate(url)
    yield url
    truncate(url)


@dataclass
class Worker:
    """A real ``celery -A config worker`` subprocess on its own queue."""

    child: Any
    queue: str
    database_url: str
    name: str

    def enqueue(self, agent: str, payload: Any, key: str | None = None) -> str:
        from config import app
        from fleetworks.enqueue import enqueue

        return enqueue(app, agent, payload, key=key, queue=self.queue)

    def pool_pids(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process(self.child.pid).children()]


def start_worker(
    database_url: str,
    log_dir: Path,
    name: str,
    *,
    concurrency: int = 2,
    queue: str | None = None,
    ready_app: Any = None,
    autoscale: str | None = None,
    control: bool = False,
    app_ref: str = "config",
    **env: str,
) -> Worker:
    """A worker subprocess on ``queue`` (default: its own), ready to consume;
    with ``control``, on its control queue too (where the reaper republishes).

    ``ready_app`` is the Celery app to ping it with when its broker is not the
    test broker; ``autoscale`` (``"MAX,MIN"``) replaces the fixed pool.
    """
    from config import app as test_app
    from fleetworks.procs import Child, celery_argv, wait_workers
    from fleetworks.reaper import control_queue

    app = ready_app or test_app
    queue = queue or f"test-{name}"
    pool = ["--autoscale", autoscale] if autoscale else ["-c", str(concurrency)]
    queues = ",".join([queue, *([control_queue(queue)] if control else [])])
    argv = celery_argv(
        app_ref, "worker", "-n", f"{name}@%h", "-Q", queues, *pool,
        "--loglevel", "INFO", "--without-mingle", "--without-gossip",
    )  # fmt: skip
    child_env = dict(os.environ, FLEET_DATABASE_URL=database_url, FLEET_QUEUE=queue, **env)
    child = Child(name, argv, child_env, log_path=log_dir / f"{name}.log").start()
    try:
        wait_workers(app, [f"{name}@{socket.gethostname()}"], timeout_s=60)
    except TimeoutError:
        child.stop(5)
        raise AssertionError(f"worker {name} did not start:\n{child.log_tail()}") from None
    return Worker(child, queue, database_url, name)


@pytest.fixture
def worker(
    database_url: str, redis_client: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Worker]:
    """A worker against the test Redis and ``database_url``, stopped after the test."""
    name = f"w{os.getpid()}-{request.node.name}".replace("[", "-").replace("]", "")[:60]
    w = start_worker(database_url, tmp_path, name)
    yield w
    w.child.stop(15)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def broker_idle(queue: str) -> bool:
    """No message of ``queue`` waiting and none of it delivered but unacked.

    Scoped to the queue: another test's killed worker may leave its own
    messages in the broker's shared unacked hash until the visibility timeout.
    """
    client = redis.Redis.from_url(BROKER_URL)
    held = [json.loads(raw)[2] for raw in client.hvals("unacked")]
    return bool(client.llen(queue) == 0 and queue not in held)


class EtcdServer:
    """One ``etcd`` member on loopback ports of its own, data in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.client_port}"
        argv = [
            str(shutil.which("etcd")), "--name", "test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
        ]  # fmt: skip
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_for(self._healthy, 30, f"etcd on {client}")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "etcd exited"
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.client_port}/health", timeout=1
            ) as reply:
                return bool(json.loads(reply.read()).get("health") == "true")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(15)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    require(shutil.which("etcd") is not None, "etcd not installed (Debian: etcd-server)")
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data").start()
    yield server
    server.stop()
