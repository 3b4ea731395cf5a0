"""The probe agent: a task with a measurable effect and a controllable duration.

Benchmarks run it with no work to measure the guard's cost; fault tests and
the chaos run send it with work, to have something in flight when a worker
is killed. Its effect is a row in ``probe_effects`` with a UNIQUE key, so a
duplicate is caught; or, with ``unique=False``, a row in ``probe_effect_log``,
which has no UNIQUE key, so a key that ran twice shows as two rows (the
chaos run counts doubles there, where only the guard can prevent them).
It is declared with :func:`fleetworks.shared_agent`, so it joins whichever
fleet imports this module: the rigs add the module to the workers they start
(``FLEET_TASK_MODULES``), on any app.
``probe.batch`` is its batch-agent twin (:mod:`fleetworks.batch`),
``probe.together`` the same with a batch behaviour (``Batch(together=...)``), and
``probe.plain`` its plain-Celery twin, the peer benchmarks compare with.
``probe.emit`` emits events of ``probe.event`` and ``probe.on_a`` and
``probe.on_b`` subscribe to them, doing nothing else: the events benchmark.
A probe with ``emit`` announces its effect as ``probe.done``, which
``probe.done_a`` and ``probe.done_b`` record (the chaos run's subscribers).
``probe.tick`` is its scheduled form: beat sends it a tick, keyed by the tick
id, and it writes one ``probe_effect_log`` row per run, so the beat tests
count how often each slot really ran.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from celery import shared_task
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert

from fleetworks.agent import shared_agent
from fleetworks.claims import now
from fleetworks.context import AgentSpec, Batch, RunContext
from fleetworks.events import Event
from fleetworks.models import PROBE_EFFECT_LOG, PROBE_EFFECTS
from fleetworks.settings import Settings

#: The module the rigs add to the task modules of the workers they start.
MODULE = __name__


def task_modules(settings: Settings) -> str:
    """``FLEET_TASK_MODULES`` for a rig's worker: the settings' own plus this module."""
    return ",".join(dict.fromkeys([*settings.modules, MODULE]))


GUARDED = "probe.run"
PLAIN = "probe.plain"
TICK = "probe.tick"


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    #: Milliseconds of simulated work before the effect.
    work_ms: int = Field(default=0, ge=0, le=600_000)
    #: Count ``work_ms`` from the first start of any run of this probe (a time
    #: kept in Redis), not from this run's: a job bounded by a deadline, which a
    #: run taking over from a cut-off holder does not start afresh.
    shared_start: bool = False
    #: Write the ledger row (False: a no-op task, for benchmarks).
    effect: bool = True
    #: Write it to ``probe_effects`` (UNIQUE key) or, when False, to
    #: ``probe_effect_log`` (no UNIQUE key: a double shows as two rows).
    unique: bool = True
    #: Raise on attempts 1..N (a flaky dependency): exercises retries and dead letters.
    fail_attempts: int = Field(default=0, ge=0, le=100)
    #: Kill the process running it (a poison message): exercises max_deliveries.
    crash: bool = False
    #: Emit ``probe.done`` with its effect: ``probe.done_a`` and ``probe.done_b``
    #: handle it (the chaos run's emitting agent and subscribers).
    emit: bool = False


class ProbeFailure(RuntimeError):
    """The failure a probe with ``fail_attempts`` raises."""


class ProbeSink(Protocol):
    def record(self, effect_key: str, fencing_token: int, *, unique: bool = True) -> None: ...


def run(
    probe: Probe,
    sink: ProbeSink,
    fencing_token: int,
    *,
    attempt: int = 1,
    sleep: Callable[[float], None] = time.sleep,
    crash: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGKILL),
    until: float | None = None,
) -> dict[str, str]:
    if probe.crash:
        crash()
    if attempt <= probe.fail_attempts:
        raise ProbeFailure(f"probe {probe.id}: failing attempt {attempt} of {probe.fail_attempts}")
    if probe.work_ms:
        seconds = probe.work_ms / 1000
        if until is not None:
            seconds = max(0.0, min(seconds, until - time.time()))
        sleep(seconds)
    if probe.effect:
        sink.record(probe.id, fencing_token, unique=probe.unique)
    return {"id": probe.id}


class SqlProbeSink:
    """The probe ledger; the effect transaction opens only when a row is written."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def record(self, effect_key: str, fencing_token: int, *, unique: bool = True) -> None:
        self._ctx.db.execute(
            insert(PROBE_EFFECTS if unique else PROBE_EFFECT_LOG).values(
                effect_key=effect_key,
                fencing_token=fencing_token,
                worker=self._ctx.worker,
                created_at=now(),
            )
        )


SPEC = AgentSpec(
    name=GUARDED,
    payload=Probe,
    key=lambda p: f"probe:{p.id}",
    on_contention="retry",
    time_limit_s=30.0,
)


#: ``fleet:probe:start:<id>``: the first start of a probe with ``shared_start``.
START_KEY = "fleet:probe:start:"


def first_start(client: Any, probe_id: str, at: float | None = None) -> float:
    """When the first run of ``probe_id`` started (set now, or at ``at``, if none did)."""
    key = START_KEY + probe_id
    client.set(key, time.time() if at is None else at, nx=True, ex=3600)
    return float(client.get(key))


@shared_agent(SPEC)
def run_probe(ctx: RunContext, payload: Probe) -> dict[str, str]:
    until = None
    if payload.shared_start and payload.work_ms and ctx.app is not None:
        from fleetworks.app import fleet_of

        until = first_start(fleet_of(ctx.app).locks.client, payload.id) + payload.work_ms / 1000
    result = run(payload, SqlProbeSink(ctx), ctx.fencing_token, attempt=ctx.attempts, until=until)
    if payload.emit:
        ctx.emit(DONE_TOPIC, {"id": payload.id})
    return result


#: The batch agent twin of :data:`GUARDED`: the same behaviour, many keys per run.
BATCHED = "probe.batch"
#: Messages one run of :data:`BATCHED` takes at most.
BATCH_SIZE = 100

BATCH_SPEC = AgentSpec(
    name=BATCHED,
    payload=Probe,
    key=lambda p: f"probe:{p.id}",
    on_contention="retry",
    time_limit_s=30.0,
    batch=Batch(size=BATCH_SIZE),
)
shared_agent(BATCH_SPEC)(run_probe)


class _Rows:
    """A probe sink that keeps the rows, for one executemany per table."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.rows: dict[bool, list[dict[str, Any]]] = {True: [], False: []}

    def record(self, effect_key: str, fencing_token: int, *, unique: bool = True) -> None:
        self.rows[unique].append({"effect_key": effect_key, "fencing_token": fencing_token,
                                  "worker": self.worker, "created_at": now()})  # fmt: skip


def run_together(runs: Sequence[RunContext]) -> list[dict[str, Any]]:
    """The batch behaviour of :data:`TOGETHER`: every probe of the batch, then
    each table's rows in one executemany. A probe that fails this attempt
    raises, so the batch runs per item and that key fails alone. Its results
    say ``together``; the per-item behaviour's do not."""
    if not runs:
        return []
    sink = _Rows(runs[0].worker)
    results: list[dict[str, Any]] = []
    for ctx in runs:
        if ctx.payload.emit:
            ctx.emit(DONE_TOPIC, {"id": ctx.payload.id})
        done = run(ctx.payload, sink, ctx.fencing_token, attempt=ctx.attempts)
        results.append({**done, "together": True})
    for unique, rows in sink.rows.items():
        if rows:
            runs[0].db.execute(insert(PROBE_EFFECTS if unique else PROBE_EFFECT_LOG), rows)
    return results


#: The batch agent twin with a batch behaviour (``Batch(together=...)``).
TOGETHER = "probe.together"

TOGETHER_SPEC = AgentSpec(
    name=TOGETHER,
    payload=Probe,
    key=lambda p: f"probe:{p.id}",
    on_contention="retry",
    time_limit_s=30.0,
    batch=Batch(size=BATCH_SIZE, together=run_together),
)
shared_agent(TOGETHER_SPEC)(run_probe)


#: What a probe with ``emit`` announces, and who handles it.
DONE_TOPIC = "probe.done"
DONE_SUBSCRIBERS = ("probe.done_a", "probe.done_b")


def _handled(ctx: RunContext, event: Event) -> None:
    """One row per run in the ledger without a UNIQUE key: a double shows."""
    SqlProbeSink(ctx).record(f"{ctx.spec.name}|{event.data['id']}", ctx.fencing_token,
                             unique=False)  # fmt: skip


for _name in DONE_SUBSCRIBERS:
    shared_agent(AgentSpec(name=_name, payload=Event, on=(DONE_TOPIC,)))(_handled)


class Tick(BaseModel):
    """What beat sends a scheduled agent: its tick id, slot and entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tick: str = Field(min_length=1, max_length=300)
    slot: str
    entry: str
    #: Milliseconds of simulated work before the effect.
    work_ms: int = Field(default=0, ge=0, le=60_000)


TICK_SPEC = AgentSpec(name=TICK, payload=Tick, key=lambda t: t.tick, time_limit_s=30.0)


@shared_agent(TICK_SPEC)
def run_tick(ctx: RunContext, payload: Tick) -> dict[str, str]:
    if payload.work_ms:
        time.sleep(payload.work_ms / 1000)
    SqlProbeSink(ctx).record(payload.tick, ctx.fencing_token, unique=False)
    return {"tick": payload.tick}


EVENT_TOPIC = "probe.event"
EMIT = "probe.emit"
SUBSCRIBERS = ("probe.on_a", "probe.on_b")


class Emission(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    #: Events the run emits, in its one transaction.
    count: int = Field(default=1, ge=1, le=100_000)


@shared_agent(AgentSpec(name=EMIT, payload=Emission, key=lambda e: f"emit:{e.id}",
                        time_limit_s=60.0))  # fmt: skip
def emit_events(ctx: RunContext, emission: Emission) -> dict[str, int]:
    for i in range(emission.count):
        ctx.emit(EVENT_TOPIC, {"run": emission.id, "i": i})
    return {"emitted": emission.count}


def _nothing(ctx: RunContext, event: Event) -> None:
    return None


for _name in SUBSCRIBERS:
    shared_agent(AgentSpec(name=_name, payload=Event, on=(EVENT_TOPIC,)))(_nothing)


@shared_task(name=PLAIN, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
def plain(payload: dict[str, Any] | None = None, key: str | None = None) -> None:
    """A no-op with the same delivery settings as an agent task, and no guard."""
    return None
