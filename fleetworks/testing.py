"""A pytest plugin for testing agents: a real fleet in the test process.

Installed with fleetworks (entry point ``pytest11``), so a project's tests
get these fixtures without configuration:

- ``fleet``: a :class:`~fleetworks.agent.Fleet` on a fresh Celery app, with a
  real Redis (``FLEET_TEST_REDIS_URL``; else 127.0.0.1:6379 when it answers;
  else an embedded ``redis-server`` started for the session) and a SQLite
  results database in a temporary folder, migrated to head. Its app imports
  the task modules named by the ``fleetworks_modules`` ini option (or
  ``--fleetworks-modules``), so agents declared with
  :func:`fleetworks.shared_agent` join it. Redis database
  ``FLEET_TEST_REDIS_DB`` (default 13; under pytest-xdist, 13 minus the
  process's index, so parallel processes never flush each other's keys) is
  flushed before and after each test.
- ``run_agent(name, payload, key=None)``: one guarded run in the test
  process, through the same guard a worker runs; returns a :class:`RunResult`
  with the outcome row, the guard events of the run and what the task would
  have done (returned, asked for a retry, or raised).
- ``fleet_worker``: a real Celery worker of the fleet's app in a thread of the
  test process (``celery.contrib.testing.worker``), consuming the app's queue.

Celery's own ``celery.contrib.testing`` runs the worker; nothing is mocked:
the lease, the fencing token, the claim and the outcome go through Redis and
SQLite exactly as in production. Tests about lost processes, acks and broker
faults still need a worker subprocess.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from fleetworks.agent import AgentTask, Fleet
from fleetworks.app import create_app, fleet_of
from fleetworks.db import transaction
from fleetworks.embedded import EmbeddedRedis, free_port, ping
from fleetworks.guard import Delivery, RetryRequested
from fleetworks.migrate import upgrade
from fleetworks.models import GUARD_EVENTS, OUTCOMES
from fleetworks.settings import Settings

SYSTEM_REDIS = "redis://127.0.0.1:6379"


@dataclass
class RunResult:
    """What one in-process guarded run did."""

    #: The ``outcomes`` row of the run's key (or of its rejection), as a dict; None if none.
    outcome: dict[str, Any] | None
    #: The ``guard_events`` rows of the run's task id, oldest first, as dicts.
    events: list[dict[str, Any]] = field(default_factory=list)
    #: What the task returned (None if it raised or asked for a retry).
    returned: Any = None
    #: The retry the guard asked Celery for, if any.
    retry: RetryRequested | None = None
    #: The exception the task raised (a run declared dead re-raises its error).
    raised: BaseException | None = None

    @property
    def status(self) -> str | None:
        return None if self.outcome is None else str(self.outcome["status"])

    @property
    def event_kinds(self) -> list[str]:
        return [str(e["kind"]) for e in self.events]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("fleetworks_modules", "task modules the test fleet imports", type="linelist")
    parser.addoption(
        "--fleetworks-modules",
        default=None,
        help="comma-separated task modules the test fleet imports (overrides the ini option)",
    )


@pytest.fixture(scope="session")
def fleet_redis_base() -> Iterator[str]:
    """A Redis server for tests: ``FLEET_TEST_REDIS_URL``, the local one, or an embedded one."""
    base = os.environ.get("FLEET_TEST_REDIS_URL", SYSTEM_REDIS).rstrip("/")
    if ping(base):
        yield base
        return
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="fleet-plugin-redis-")), port=free_port())
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}"
    finally:
        server.stop()


def _modules(config: pytest.Config) -> list[str]:
    option = config.getoption("--fleetworks-modules")
    if option:
        return [m.strip() for m in str(option).split(",") if m.strip()]
    return [str(m) for m in config.getini("fleetworks_modules")]


@pytest.fixture
def fleet(
    fleet_redis_base: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Fleet]:
    """A fleet on a fresh app: real Redis (flushed), SQLite in a temporary folder."""
    url = f"{fleet_redis_base}/{_redis_db()}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    home = tmp_path_factory.mktemp("fleet")
    settings = Settings(
        broker_url=url,
        redis_url=url,
        database_url=f"sqlite:///{home / 'fleet.db'}",
        home=home,
        queue=f"fleet-test-{uuid.uuid4().hex[:8]}",
    )
    app = create_app(
        settings, name=f"fleet-test-{uuid.uuid4().hex[:6]}", modules=_modules(request.config)
    )
    app.loader.import_default_modules()
    upgrade(settings.database, fleet_of(app).migrations)
    try:
        yield fleet_of(app)
    finally:
        client.flushdb()
        client.close()


def _redis_db() -> str:
    """``FLEET_TEST_REDIS_DB``, else 13; under pytest-xdist, 13 minus the
    process's index, so two processes never flush each other's keys."""
    explicit = os.environ.get("FLEET_TEST_REDIS_DB")
    if explicit:
        return explicit
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    if index > 13:
        raise pytest.UsageError(
            f"pytest-xdist process {index}: set FLEET_TEST_REDIS_DB per process "
            "(the default database 13 minus the index runs out)"
        )
    return str(13 - index)


def _rows(database_url: str, stmt: Any) -> list[dict[str, Any]]:
    with transaction(database_url) as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]


def outcome_of(fleet: Fleet, key: str) -> dict[str, Any] | None:
    """The ``outcomes`` row of ``key`` as a dict, or None."""
    found = _rows(
        fleet.settings.database, select(OUTCOMES).where(OUTCOMES.c.idempotency_key == key)
    )
    return found[0] if found else None


def run_in_process(
    fleet: Fleet,
    name: str,
    payload: Any,
    key: str | None = None,
    *,
    task_id: str | None = None,
    retries: int = 0,
    kwargs: dict[str, Any] | None = None,
    sent_at: float | None = None,
) -> RunResult:
    """One guarded run of agent ``name`` in this process; see :class:`RunResult`."""
    fleet.require_agent(name)
    task = fleet.app.tasks[name]
    assert isinstance(task, AgentTask)
    task_id = task_id or f"test-{uuid.uuid4()}"
    args = kwargs if kwargs is not None else ({"payload": payload} | ({"key": key} if key else {}))
    delivery = Delivery(
        task_id=task_id, worker="pytest/inprocess", args=(), kwargs=args, retries=retries,
        sent_at=sent_at,
    )  # fmt: skip
    result = RunResult(outcome=None)
    try:
        result.returned = fleet.guard.run(task.agent_spec, type(task).behaviour, delivery)
    except RetryRequested as again:
        result.retry = again
    except Exception as exc:
        result.raised = exc
    events = _rows(
        fleet.settings.database,
        select(GUARD_EVENTS).where(GUARD_EVENTS.c.task_id == task_id).order_by(GUARD_EVENTS.c.id),
    )
    result.events = events
    keys = [e["idempotency_key"] for e in events if e["idempotency_key"]]
    by_task = _rows(fleet.settings.database, select(OUTCOMES).where(OUTCOMES.c.task_id == task_id))
    if by_task:
        result.outcome = by_task[0]
    elif keys:
        result.outcome = outcome_of(fleet, keys[-1])
    return result


@pytest.fixture
def run_agent(fleet: Fleet) -> Callable[..., RunResult]:
    """``run_agent(name, payload, key=None, **options)``: one in-process guarded run."""

    def run(name: str, payload: Any, key: str | None = None, **options: Any) -> RunResult:
        return run_in_process(fleet, name, payload, key, **options)

    return run


@pytest.fixture
def fleet_worker(fleet: Fleet) -> Iterator[Any]:
    """A real Celery worker of the fleet's app, in a thread, consuming its queue."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        fleet.app, pool="solo", concurrency=1, perform_ping_check=False, loglevel="WARNING"
    ) as worker:
        yield worker
