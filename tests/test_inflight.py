"""In-flight records: a key's first delivery claims nothing before its outcome.

Its lease writes the run's record in Redis; the reaper publishes a record
whose holder is gone again, and the key's next delivery claims first and
counts the delivery that died. Real worker, real broker, real database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from sqlalchemy import func, select

from fleetworks import claims, inflight
from fleetworks import constants as c
from fleetworks.db import transaction
from fleetworks.embedded import free_port
from fleetworks.ledger import Ledger
from fleetworks.locks import EntityLocks, Lease
from fleetworks.models import GUARD_EVENTS, OUTCOMES, PROBE_EFFECTS, EventKind, Status
from fleetworks.reaper import reap_inflight
from fleetworks.timing import Timings
from tests.conftest import start_worker, wait_for

TIMINGS = Timings.derive(60.0)


def _died_holding(locks: EntityLocks, key: str, queue: str, payload: dict[str, object]) -> str:
    """A first delivery that leased ``key`` and died before any outcome: its
    lock is gone (expired), its in-flight record stays, dated a lease ago."""
    task_id = str(uuid.uuid4())
    record = inflight.encode(agent="probe.run", entity=key, task_id=task_id,
                             worker="gone@host/1", queue=queue, payload=payload)  # fmt: skip
    lease = locks.acquire_run(key, 6.0, "", task_id, key=key, record=record)
    assert isinstance(lease, Lease) and lease.deliveries == 1
    locks.release(lease)
    (found,) = [r for r in inflight.all_records(locks.client) if r.key == key]
    long_ago = time.time() - TIMINGS.orphaned_after_s - 1
    assert inflight.touch(locks.client, key, found.owner, long_ago)
    return task_id


def _row(url: str, key: str) -> dict[str, object] | None:
    with transaction(url) as conn:
        row = conn.execute(select(OUTCOMES).where(OUTCOMES.c.idempotency_key == key)).first()
    return None if row is None else dict(row._mapping)


def test_a_first_delivery_whose_holder_died_is_republished_and_runs_once(
    database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from config import app

    locks, ledger = EntityLocks(redis_client), Ledger(database_url)
    queue = f"inflight-{uuid.uuid4().hex[:8]}"
    name = f"died{uuid.uuid4().hex[:6]}"
    key = f"probe:{name}"
    task_id = _died_holding(locks, key, queue, {"id": name, "work_ms": 10})
    assert _row(database_url, key) is None, "a first delivery writes no row before its outcome"
    assert reap_inflight(app, ledger, locks, TIMINGS) == [key]
    assert reap_inflight(app, ledger, locks, TIMINGS) == [], "not again before republish_after_s"
    w = start_worker(database_url, tmp_path, f"inflight-{os.getpid()}", queue=queue, control=True)
    try:
        row = wait_for(lambda: (r := _row(database_url, key)) and r["status"] == "succeeded" and r)
    finally:
        w.child.stop(15)
    # The republished delivery found the record and claimed first: it counts
    # the delivery that died, and ran under the same task id.
    assert row["attempts"] == 2
    assert row["task_id"] == task_id
    with transaction(database_url) as conn:
        effects = conn.execute(
            select(func.count()).where(PROBE_EFFECTS.c.effect_key == name)
        ).scalar_one()
        republished = conn.execute(
            select(func.count()).where(
                (GUARD_EVENTS.c.idempotency_key == key)
                & (GUARD_EVENTS.c.kind == EventKind.REPUBLISHED)
            )
        ).scalar_one()
    assert (effects, republished) == (1, 1)
    assert [r.key for r in inflight.all_records(redis_client)] == []
    assert redis_client.exists(c.DONE_KEY + key), "the key's done mark"


def test_the_reaper_leaves_records_it_does_not_own(
    database_url: str, redis_client: redis.Redis
) -> None:
    """A record whose key is final is dropped (its holder committed and died
    before its release); one whose key has a ``claimed`` row is the database
    reaper's; one whose entity is leased is running."""
    from config import app

    locks, ledger = EntityLocks(redis_client), Ledger(database_url)
    queue = f"inflight-{uuid.uuid4().hex[:8]}"
    final, claimed, running = (f"probe:own{uuid.uuid4().hex[:6]}-{i}" for i in range(3))
    for key in (final, claimed, running):
        _died_holding(locks, key, queue, {"id": key.removeprefix("probe:")})
    with transaction(database_url) as conn:
        for key, token in ((final, 1), (claimed, 1)):
            claims.claim(conn, agent="probe.run", entity_key=key, idempotency_key=key,
                         fencing_token=token, task_id="t", worker="w")  # fmt: skip
        claims.finish(conn, idempotency_key=final, fencing_token=1, status=Status.SUCCEEDED)
    held = locks.acquire(running, 6.0)
    assert held is not None
    try:
        assert reap_inflight(app, ledger, locks, TIMINGS) == []
    finally:
        locks.release(held)
    left = {r.key: r.at for r in inflight.all_records(redis_client)}
    assert set(left) == {claimed, running}
    assert left[claimed] > time.time() - 5, "looked at again a lease later"


def test_running_lists_runs_in_flight_with_and_without_an_outcome_row(
    database_url: str, redis_client: redis.Redis
) -> None:
    """`fleetworks running`: every run whose lease holds an in-flight record, a
    key's first delivery (no row until its outcome) and a later one (its
    ``claimed`` row); gone once released; a clear error when Redis is down."""
    from fleetworks.reports import in_flight

    locks = EntityLocks(redis_client)
    name = uuid.uuid4().hex[:8]
    first, later = f"probe:{name}-first", f"probe:{name}-later"
    leases: list[Lease] = []
    for key in (first, later):
        record = inflight.encode(agent="probe.run", entity=key, task_id=f"t-{key}",
                                 worker="w@host/7", queue="q", payload={"id": key})  # fmt: skip
        lease = locks.acquire_run(key, 6.0, "", f"t-{key}", key=key, record=record)
        assert isinstance(lease, Lease)
        leases.append(lease)
    with transaction(database_url) as conn:
        claims.claim(conn, agent="probe.run", entity_key=later, idempotency_key=later,
                     fencing_token=leases[1].fencing_token, task_id=f"t-{later}",
                     worker="w@host/7")  # fmt: skip
    env = dict(os.environ, FLEET_DATABASE_URL=database_url)
    argv = [sys.executable, "-m", "fleetworks", "running", "--limit", "10000", "--json"]
    try:
        done = subprocess.run(
            argv, check=False, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs = {r["idempotency_key"]: r for r in json.loads(done.stdout)["running"]}
        assert runs[first]["row"] is None, "a first delivery has no row while it runs"
        assert runs[first]["worker"] == "w@host/7" and runs[first]["task_id"] == f"t-{first}"
        assert runs[later]["row"] == Status.CLAIMED
        assert runs[first]["running_s"] >= 0
    finally:
        for key, lease in zip((first, later), leases, strict=True):
            locks.release(lease, key)
    left = in_flight(redis_client, database_url, agent="probe.run", limit=10_000, now=time.time())
    assert not {first, later} & {r["idempotency_key"] for r in left}
    # Redis down: the command says so, naming where it looked.
    down = dict(env, FLEET_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    done = subprocess.run(argv, check=False, env=down, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "not reachable" in done.stderr, done.stderr[-2000:]
