"""The guard's rules, run in the test process through the pytest plugin.

Each test is one or a few guarded runs of the probe agent through the same
guard a worker runs, against real Redis and SQLite (the plugin's ``fleet``):
vetoes, retries, dead letters, duplicates and stale writes in milliseconds.
What only a real worker shows (lost children, acks, broker faults) stays in
test_guard_integration and test_faults.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest
import redis
from sqlalchemy import select

from fleetworks import constants as c
from fleetworks import context, inflight
from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.locks import Lease
from fleetworks.models import PROBE_EFFECT_LOG, PROBE_EFFECTS
from fleetworks.retry import backoff_bound
from fleetworks.testing import RunResult, outcome_of
from fleetworks.timing import RETRY_BACKOFF_BASE_S, RETRY_BACKOFF_MAX_S

PROBE = "probe.run"


def effects(fleet: Fleet, effect_key: str) -> list[int]:
    with transaction(fleet.settings.database) as conn:
        rows = conn.execute(
            select(PROBE_EFFECTS.c.fencing_token).where(PROBE_EFFECTS.c.effect_key == effect_key)
        )
        return [r.fencing_token for r in rows]


def test_a_run_succeeds_once_and_its_effect_carries_its_token(fleet: Fleet, run_agent: Any) -> None:
    done: RunResult = run_agent(PROBE, {"id": "a"})
    assert done.status == "succeeded" and done.outcome is not None
    assert done.outcome["attempts"] == 1
    assert effects(fleet, "a") == [done.outcome["fencing_token"]]
    assert done.events == []


def test_the_same_key_again_is_a_counted_duplicate(fleet: Fleet, run_agent: Any) -> None:
    first = run_agent(PROBE, {"id": "b"})
    again = run_agent(PROBE, {"id": "b"})
    assert again.event_kinds == ["skipped_duplicate"]
    assert again.returned == {"status": "skipped_duplicate", "detail": "key already succeeded"}
    assert effects(fleet, "b") == [first.outcome["fencing_token"]]


def test_a_first_delivery_writes_its_row_once_with_its_effects(
    fleet: Fleet, run_agent: Any
) -> None:
    """No row while it runs (its in-flight record is in Redis); one fenced
    upsert with the effects; the record dropped and the done mark set."""
    seen: list[object] = []
    from fleetworks.proving import probe

    real = probe.SqlProbeSink.record

    def record(self: Any, effect_key: str, token: int, *, unique: bool = True) -> None:
        seen.append(outcome_of(fleet, "probe:first"))
        seen.append([r.key for r in inflight.all_records(fleet.locks.client)])
        real(self, effect_key, token, unique=unique)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe.SqlProbeSink, "record", record)
        done = run_agent(PROBE, {"id": "first"})
    assert seen == [None, ["probe:first"]]
    assert done.status == "succeeded" and done.outcome is not None
    assert done.outcome["attempts"] == 1 and done.outcome["payload"] == {"id": "first"}
    assert inflight.all_records(fleet.locks.client) == []
    assert fleet.locks.client.exists(c.DONE_KEY + "probe:first")


def test_a_late_duplicate_runs_and_its_effects_roll_back(fleet: Fleet, run_agent: Any) -> None:
    """Past its done mark, a duplicate runs its behaviour; the fenced upsert
    finds the key done: its effects roll back, it is a counted duplicate, and
    the row keeps the first run's outcome."""
    first = run_agent(PROBE, {"id": "late", "unique": False})
    assert fleet.locks.client.delete(c.DONE_KEY + "probe:late") == 1
    again = run_agent(PROBE, {"id": "late", "unique": False})
    assert again.event_kinds == ["skipped_duplicate"]
    assert again.returned["status"] == "skipped_duplicate"
    assert "effects rolled back" in again.returned["detail"]
    assert again.outcome == first.outcome
    with transaction(fleet.settings.database) as conn:
        logged = conn.execute(
            select(PROBE_EFFECT_LOG.c.fencing_token).where(PROBE_EFFECT_LOG.c.effect_key == "late")
        ).all()
    assert [r.fencing_token for r in logged] == [first.outcome["fencing_token"]]
    assert inflight.all_records(fleet.locks.client) == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"id": ""}, "id: String should have at least 1 character"),
        ({"id": "c", "work_ms": -1}, "work_ms: Input should be greater than or equal to 0"),
        ({"id": "c", "surprise": 1}, "surprise: Extra inputs are not permitted"),
        ([1, 2], "payload must be a JSON object, got list"),
        ({"id": "nul\x00"}, "id: text must be valid Unicode without NUL characters"),
        ({"id": "half\ud800"}, "id: text must be valid Unicode without NUL characters"),
    ],
)
def test_bad_input_is_one_rejected_row_naming_the_problem_never_retried(
    fleet: Fleet, run_agent: Any, payload: Any, reason: str
) -> None:
    first = run_agent(PROBE, payload, task_id="t-bad")
    assert first.status == "rejected" and reason in first.outcome["error"]
    assert first.retry is None and first.raised is None
    # The same message delivered again adds nothing and is not retried either.
    again = run_agent(PROBE, payload, task_id="t-bad")
    assert again.status == "rejected" and again.retry is None
    with transaction(fleet.settings.database) as conn:
        from fleetworks.models import OUTCOMES

        assert conn.execute(select(OUTCOMES.c.id)).all().__len__() == 1


def test_a_payload_the_model_takes_but_no_json_column_stores_is_rejected(
    fleet: Fleet, run_agent: Any
) -> None:
    """bytes, Decimal or NaN (what kombu's JSON decoder and Python's make of
    some messages) passed the model, then failed the claim's JSON column."""
    cases = {
        "id": ({"id": b"abc"}, "id: bytes is not JSON data"),
        "work_ms": ({"id": "d", "work_ms": Decimal(5)}, "work_ms: Decimal is not JSON data"),
    }
    for payload, reason in cases.values():
        done = run_agent(PROBE, payload)
        assert done.status == "rejected" and reason in done.outcome["error"], done
    mention = {"mention_id": "m", "brand": "b", "author": "a", "text": "t", "followers": 1}
    done = run_agent("mentions.respond", {**mention, "sentiment": float("nan")})
    assert done.status == "rejected", done
    assert "sentiment: nan is not a JSON number" in done.outcome["error"]
    assert effects(fleet, "abc") == effects(fleet, "d") == []


def test_a_key_with_a_lone_surrogate_is_rejected(run_agent: Any) -> None:
    done = run_agent(PROBE, {"id": "d"}, key="k\ud800")
    assert done.status == "rejected"
    assert "idempotency key must be valid Unicode" in done.outcome["error"]


def test_a_message_of_the_wrong_shape_is_rejected(run_agent: Any) -> None:
    done = run_agent(PROBE, None, kwargs={"payload": {"id": "e"}, "extra": 1})
    assert done.status == "rejected"
    assert "agent tasks take payload=<object> and optional key=<str>" in done.outcome["error"]


def test_failures_back_off_within_bounds_then_go_dead(fleet: Fleet, run_agent: Any) -> None:
    """A behaviour that keeps failing: max_retries retries, each asked with a
    back-off within its bound, then dead with its last error, re-raised."""
    waits = []
    for attempt in range(1, context.DEFAULT_MAX_RETRIES + 1):
        run = run_agent(PROBE, {"id": "flaky", "fail_attempts": 50})
        assert run.status == "failed" and run.outcome["attempts"] == attempt
        assert run.retry is not None, attempt
        bound = backoff_bound(attempt, RETRY_BACKOFF_BASE_S, RETRY_BACKOFF_MAX_S)
        assert 0 <= run.retry.countdown <= bound
        waits.append(run.retry.countdown)
    last = run_agent(PROBE, {"id": "flaky", "fail_attempts": 50})
    assert last.status == "dead" and last.retry is None
    assert type(last.raised).__name__ == "ProbeFailure"
    assert "failing attempt 4" in last.outcome["error"]
    assert effects(fleet, "flaky") == []
    assert len(set(waits)) > 1, "jittered waits differ"


def test_a_retry_count_from_a_message_past_any_real_one_waits_the_cap() -> None:
    """A ``retries`` header of 10**30 made the back-off compute 2**(10**30),
    which never finished; the bound is the cap, at once."""
    assert backoff_bound(10**30, RETRY_BACKOFF_BASE_S, RETRY_BACKOFF_MAX_S) == RETRY_BACKOFF_MAX_S
    assert backoff_bound(64, 1.0, 30.0) == backoff_bound(65, 1.0, 30.0) == 30.0
    assert backoff_bound(2, 1.0, 30.0) == 4.0  # unchanged below the cap


def test_a_failure_then_success_is_one_effect(fleet: Fleet, run_agent: Any) -> None:
    assert run_agent(PROBE, {"id": "f", "fail_attempts": 2}).retry is not None
    assert run_agent(PROBE, {"id": "f", "fail_attempts": 2}).retry is not None
    done = run_agent(PROBE, {"id": "f", "fail_attempts": 2})
    assert done.status == "succeeded" and done.outcome["attempts"] == 3
    assert effects(fleet, "f") == [done.outcome["fencing_token"]]


def test_two_keys_writing_one_unique_effect_give_duplicate_effect_and_dead(
    fleet: Fleet, run_agent: Any
) -> None:
    first = run_agent(PROBE, {"id": "same"}, key="k1")
    second = run_agent(PROBE, {"id": "same"}, key="k2")
    assert first.status == "succeeded"
    assert second.status == "dead" and second.retry is None
    assert second.event_kinds == ["duplicate_effect"]
    assert effects(fleet, "same") == [first.outcome["fencing_token"]]


def test_a_key_claimed_too_often_is_declared_dead(fleet: Fleet, run_agent: Any) -> None:
    """Deliveries that never finish (a message that kills its worker) stop at
    max_deliveries: each one leased the key and died before any outcome, so
    only its in-flight record counts it; the next delivery claims first."""
    record = inflight.encode(agent=PROBE, entity="probe:poison", task_id="t-poison",
                             worker="test", queue=None, payload={"id": "poison"})  # fmt: skip
    for _ in range(context.DEFAULT_MAX_DELIVERIES):
        lease = fleet.locks.acquire_run("probe:poison", 6.0, "", "t-poison", key="probe:poison",
                                        record=record)  # fmt: skip
        assert isinstance(lease, Lease)
        fleet.locks.release(lease)  # the lock only: the run died with no outcome
    assert [r.key for r in inflight.all_records(fleet.locks.client)] == ["probe:poison"]
    done = run_agent(PROBE, {"id": "poison"})
    assert done.status == "dead" and done.event_kinds == ["skipped_dead"]
    assert "max_deliveries" in done.outcome["error"]
    assert effects(fleet, "poison") == []


def test_contention_retries_with_back_off_then_skips(fleet: Fleet, run_agent: Any) -> None:
    held = fleet.locks.acquire("probe:busy", 6.0)
    assert held is not None
    busy = run_agent(PROBE, {"id": "busy"})
    assert busy.event_kinds == ["lock_contended"] and busy.retry is not None
    assert busy.retry.countdown <= 0.2
    exhausted = run_agent(PROBE, {"id": "busy"}, retries=100)
    assert exhausted.event_kinds == ["skipped_locked"] and exhausted.retry is None
    fleet.locks.release(held)
    assert run_agent(PROBE, {"id": "busy"}).status == "succeeded"


def test_a_lost_lease_refuses_the_write_and_records_stale_write(
    fleet: Fleet, run_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is lost while the behaviour runs (it expired and another
    holder took the entity): nothing the run wrote commits, never retried."""
    from fleetworks.proving import probe

    real = probe.SqlProbeSink.record

    def record_then_lose(self: Any, effect_key: str, token: int, *, unique: bool = True) -> None:
        real(self, effect_key, token, unique=unique)
        self._ctx.lease.lost.set()

    monkeypatch.setattr(probe.SqlProbeSink, "record", record_then_lose)
    done = run_agent(PROBE, {"id": "stale"})
    assert done.event_kinds == ["stale_write"] and done.retry is None
    assert done.status is None, "no outcome: the key stays with whoever holds it now"
    # Its in-flight record stays: the key's next delivery claims first, and
    # the reaper publishes it again if no one holds it.
    assert [r.key for r in inflight.all_records(fleet.locks.client)] == ["probe:stale"]
    assert effects(fleet, "stale") == []


def test_fence_counters_lost_make_the_claim_stale_then_it_runs_higher(
    fleet: Fleet, run_agent: Any
) -> None:
    """Redis lost its data: the next lease's token is far below the stored one.
    The claim is refused, the fence is raised past it, and the rerun succeeds."""
    fleet.locks.raise_fence("probe:g", 50)
    failed = run_agent(PROBE, {"id": "g", "fail_attempts": 1})
    stored = failed.outcome["fencing_token"]
    assert stored == 51
    redis.Redis.from_url(fleet.settings.redis).flushdb()
    stale = run_agent(PROBE, {"id": "g", "fail_attempts": 1})
    assert stale.event_kinds == ["stale_write"] and stale.retry is not None
    assert stale.retry.countdown == 0
    done = run_agent(PROBE, {"id": "g", "fail_attempts": 1})
    assert done.status == "succeeded" and done.outcome["fencing_token"] > stored
    assert effects(fleet, "g") == [done.outcome["fencing_token"]]


def test_an_unknown_agent_is_refused_naming_the_known_ones(fleet: Fleet) -> None:
    from fleetworks import UnknownAgentError, enqueue

    with pytest.raises(UnknownAgentError, match=r"unknown agent 'probe\.nope'.*probe\.run"):
        enqueue(fleet.app, "probe.nope", {"id": "x"})


def test_a_run_longer_than_two_leases_keeps_its_lease_by_renewal(
    fleet: Fleet, run_agent: Any
) -> None:
    """The heartbeat renews the lease: during a 13 s run (two 6 s leases and
    more) the entity stays locked, so another delivery contends instead of
    taking over, and the run succeeds on its first attempt."""
    import threading
    import time

    from fleetworks.timing import LEASE_TTL_MAX_S

    work_ms = int((2 * LEASE_TTL_MAX_S + 1) * 1000)
    result: list[RunResult] = []
    long_run = threading.Thread(
        target=lambda: result.append(run_agent(PROBE, {"id": "long", "work_ms": work_ms}))
    )
    long_run.start()
    time.sleep(2 * LEASE_TTL_MAX_S)  # the test is about time: two whole leases
    assert fleet.locks.holder("probe:long") is not None, "the lease was not renewed"
    rival = run_agent(PROBE, {"id": "long", "work_ms": work_ms})
    assert rival.event_kinds == ["lock_contended"] and rival.retry is not None
    long_run.join()
    (done,) = result
    assert done.status == "succeeded" and done.outcome["attempts"] == 1
    assert done.events == []
    assert effects(fleet, "long") == [done.outcome["fencing_token"]]


def race_claims(fleet: Fleet, key: str) -> list[Any]:
    """Two threads, two connections, one key, the same token, released at once."""
    import threading

    from fleetworks.ledger import RunId

    barrier = threading.Barrier(2)
    verdicts: list[Any] = []

    def claim(worker: str) -> None:
        barrier.wait()
        run = RunId(PROBE, key, f"t-{worker}", worker)
        got = fleet.ledger.claim(run, entity=key, token=7, payload={}, queue=None)
        verdicts.append(got.verdict)

    threads = [threading.Thread(target=claim, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(verdicts)


def test_two_connections_claiming_one_key_at_once_run_it_once(fleet: Fleet) -> None:
    """The claim is one atomic statement: two claims of one key with the same
    token, racing from two connections, give one RUN and one refusal."""
    from fleetworks.claims import ClaimVerdict

    for i in range(20):
        assert race_claims(fleet, f"race-{i}") == [ClaimVerdict.RUN, ClaimVerdict.STALE], i


def test_a_stale_run_writes_nothing_even_to_a_table_without_a_unique_key(
    fleet: Fleet, run_agent: Any
) -> None:
    """The fence, not a UNIQUE constraint, stops a stale writer: its rows roll back."""
    from pydantic import BaseModel
    from sqlalchemy import Column, Integer, MetaData, String, Table, func

    from fleetworks import AgentSpec, RunContext
    from fleetworks.db import get_engine

    notes = Table("test_notes", MetaData(), Column("id", Integer, primary_key=True),
                  Column("text", String(50)))  # fmt: skip
    notes.create(get_engine(fleet.settings.database))

    class Note(BaseModel):
        text: str

    def write_then_lose(ctx: RunContext, note: Note) -> None:
        ctx.db.execute(notes.insert().values(text=note.text))
        ctx.db.execute(notes.insert().values(text=note.text))
        ctx.lease.lost.set()  # the lease expired meanwhile; a newer holder may write

    spec = AgentSpec(name="test.notes", payload=Note, key=lambda n: f"note:{n.text}")
    fleet.agent(spec)(write_then_lose)
    done = run_agent("test.notes", {"text": "hello"})
    assert done.event_kinds == ["stale_write"]
    with transaction(fleet.settings.database) as conn:
        assert conn.execute(select(func.count()).select_from(notes)).scalar_one() == 0


def test_while_redis_is_away_the_run_waits_in_place_and_succeeds_once(
    tmp_path: Any,
) -> None:
    """Redis stops for 5 s as a run starts: the run waits in place (no retry
    message, no second claim) and succeeds once Redis is back."""
    import threading
    import time

    from fleetworks.app import create_app, fleet_of
    from fleetworks.embedded import EmbeddedRedis, free_port
    from fleetworks.migrate import upgrade
    from fleetworks.settings import Settings
    from fleetworks.testing import run_in_process

    server = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    try:
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
        settings = Settings(broker_url=server.url, redis_url=server.url, database_url=url)
        app = create_app(settings, name="away", modules=["fleetworks.proving.probe"])
        app.loader.import_default_modules()
        upgrade(url)
        fleet = fleet_of(app)
        server.stop()
        threading.Timer(5.0, server.start).start()
        started = time.monotonic()
        done = run_in_process(fleet, PROBE, {"id": "away"})
        waited = time.monotonic() - started
        assert done.status == "succeeded" and done.retry is None, done
        assert done.outcome["attempts"] == 1
        assert waited >= 4.5, "it waited for Redis to come back"
        assert effects(fleet, "away") == [done.outcome["fencing_token"]]
    finally:
        server.stop()


def test_a_run_waiting_out_the_database_is_one_delivery_and_not_reaped(
    fleet: Fleet, run_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses a first delivery's outcome twice: the run waits in
    place and leases again, counted as the same delivery (still a first one,
    one attempt), and while it waits the reaper leaves its record alone."""
    import time

    from sqlalchemy.exc import OperationalError

    from fleetworks import guard, ledger
    from fleetworks.reaper import reap_inflight

    real = ledger.Ledger.settle_unclaimed
    refused: list[int] = []

    def down_twice(*args: Any, **kwargs: Any) -> Any:
        if len(refused) < 2:
            refused.append(1)
            raise OperationalError("INSERT", {}, Exception("database is paused"))
        return real(*args, **kwargs)

    reaped: list[list[str]] = []
    pause = time.sleep

    def sleep(seconds: float) -> None:
        # As the reaper would see it a full lease after the last lease, just
        # before the next try is due: a wait longer than a lease.
        later = dataclasses.replace(fleet.timings, orphaned_after_s=0.05 - seconds)
        reaped.append(reap_inflight(fleet.app, fleet.ledger, fleet.locks, later))
        pause(0.01)

    monkeypatch.setattr(ledger.Ledger, "settle_unclaimed", staticmethod(down_twice))
    monkeypatch.setattr(guard.time, "sleep", sleep)
    done = run_agent(PROBE, {"id": "waits"})
    assert len(refused) == 2 and reaped == [[], []], (done, reaped)
    assert done.status == "succeeded" and done.outcome["attempts"] == 1
    assert effects(fleet, "waits") == [done.outcome["fencing_token"]]
    assert inflight.all_records(fleet.locks.client) == []


def hold_unacked(
    channel: Any, fleet: Fleet, payload: dict[str, Any], age_s: float, **options: Any
) -> str:
    """Publish a probe message and take it on ``channel`` without acknowledging
    it, as a worker that then died would; its delivery is dated ``age_s`` ago.
    Returns its delivery tag."""
    import time

    fleet.app.send_task(PROBE, kwargs={"payload": payload}, queue=fleet.settings.queue, **options)
    message = channel.basic_get(fleet.settings.queue, no_ack=False)
    assert message is not None
    channel.client.zadd(channel.unacked_index_key, {message.delivery_tag: time.time() - age_s})
    return str(message.delivery_tag)


def test_restore_stranded_gives_back_what_no_live_worker_holds(fleet: Fleet) -> None:
    """An unacked message goes back to its queue when no live worker's snapshot
    holds it, unless it is younger than the snapshots, a countdown still
    waiting, or its own delivery's lease is alive (its task runs); a lease of
    another delivery on the entity does not keep it."""
    import time
    from datetime import UTC, datetime, timedelta

    from fleetworks import holders, kombu_redis
    from fleetworks.reaper import restore_stranded

    def restore() -> list[str]:
        return sorted(
            restore_stranded(fleet.app, fleet.agents, fleet.ledger, fleet.locks, fleet.timings)
        )

    client = redis.Redis.from_url(fleet.settings.broker)
    locks = fleet.locks.client
    # The "lost worker" keeps its connection open: closing it would give its
    # messages back itself (kombu restores a channel's unacked on close).
    conn = fleet.app.connection_for_write()
    try:
        channel = conn.default_channel
        lists = kombu_redis.priority_lists(channel, fleet.settings.queue)
        tags = {
            name: hold_unacked(channel, fleet, {"id": name}, age_s=age)
            for name, age in (("young", 0.1), ("held", 10), ("running", 10), ("lost", 10),
                              ("contended", 10), ("stale-held", 10))
        }  # fmt: skip
        due = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
        tags["countdown"] = hold_unacked(channel, fleet, {"id": "countdown"}, 10, eta=due)
        # A live worker holds "held"; a worker silent for longer than the
        # staleness bound held "stale-held".
        holders.write(locks, "live@host", [tags["held"]])
        holders.write(locks, "gone@host", [tags["stale-held"]],
                      at=time.time() - holders.STALE_AFTER_S - 1)  # fmt: skip
        # "running" holds its own lease; another delivery holds "contended"'s entity.
        assert fleet.locks.acquire("probe:running", 6.0, owner=tags["running"]) is not None
        assert fleet.locks.acquire("probe:contended", 6.0, owner="another-tag") is not None
        assert sum(client.llen(name) for name in lists) == 0
        assert restore() == ["probe:contended", "probe:lost", "probe:stale-held"]
        assert sum(client.llen(name) for name in lists) == 3
        assert restore() == [], "restored once"
        # Once the running task's own lease is gone (its worker died), it comes back too.
        assert fleet.locks.release_owner("probe:running", tags["running"])
        assert restore() == ["probe:running"]
    finally:
        conn.release()
