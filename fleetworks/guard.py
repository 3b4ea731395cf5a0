"""The guard: what runs around every agent behaviour, in five explicit stages.

::

    parse ─▶ lease ─▶ claim ─▶ behaviour ─▶ settle

1. **parse**: the message's shape (:mod:`fleetworks.message`), text every
   database stores, the agent's pydantic model, the idempotency key. Bad
   input ends here as one ``rejected`` row naming the problem; never retried.
2. **lease**: a Redis lease on the entity with a fencing token, renewed by
   the process heartbeat while the run lasts; the same script writes the
   run's in-flight record and counts the key's deliveries
   (:mod:`fleetworks.inflight`). A key with a done mark (it succeeded lately)
   is a counted duplicate here, with no database round trip. On contention a
   key already done is a counted duplicate; otherwise the retry policy
   decides. A subscriber's event waits here behind an earlier event of its key.
3. **claim**, for any delivery but the key's first (an earlier one did not
   finish, or Celery retries it): the key's row in the results database, one
   statement. A key already done is skipped; a key delivered too often is
   ``dead``; a claim that finds a higher token than Redis handed out (Redis
   lost its data) raises the fence past it and re-queues. A first delivery
   claims nothing: its row is written once, at settle.
4. **behaviour**: the agent's code, with a :class:`~fleetworks.context.RunContext`.
5. **settle**: on success the ``succeeded`` row commits in the same
   transaction as the behaviour's effects, and only while the fencing token is
   current (a first delivery's row by one fenced upsert that writes nothing,
   and so rolls the effects back, when the key is already done or held with
   a token as high); on failure the policy says ``failed`` (retried) or
   ``dead``; a lost lease or superseded token is a ``stale_write`` event,
   never retried.

While Redis or the database is unreachable the whole run waits in place and
starts again (the policy bounds the wait, then re-queues). Every decision is
:class:`fleetworks.retry.RetryPolicy`'s; every write is the
:class:`fleetworks.ledger.Ledger`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import redis
from celery import Celery
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from fleetworks import claims, events, inflight, logs, message, outbox, timing, tracing
from fleetworks import constants as c
from fleetworks.claims import ClaimVerdict, StaleWriteError
from fleetworks.context import AgentSpec, Identity, RunContext
from fleetworks.ledger import Ledger, RunId
from fleetworks.locks import EntityLocks, Heartbeat, KeyDone, Lease, LeaseLostError
from fleetworks.models import Ended, EventKind, Status
from fleetworks.retry import Facts, GiveUp, Proceed, Retry, RetryPolicy, Situation, Wait

log = logging.getLogger(__name__)

#: Errors that mean a service is unreachable for now, not that the run is wrong.
UNREACHABLE = (
    OperationalError,
    InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
)

#: Errors that mean "this run no longer owns its key": never retried.
STALE = (StaleWriteError, LeaseLostError)

Behaviour = Callable[[RunContext, Any], Any]

#: How a ``stale_write`` event's detail starts: the run found its lease gone
#: before writing, or the fencing token refused its write (a newer holder).
LEASE_LOST = "lease lost"
FENCING_REFUSED = "fencing token refused"


class RetryRequested(Exception):
    """The guard wants the task re-queued after ``countdown`` seconds."""

    def __init__(self, countdown: float, reason: str, exc: BaseException | None = None) -> None:
        super().__init__(reason)
        self.countdown = countdown
        self.exc = exc


class _Refused(Exception):
    """A first run's outcome was not written (see :meth:`Guard._refused`)."""

    def __init__(self, claim: claims.Claim) -> None:
        super().__init__(str(claim.verdict))
        self.claim = claim


class _Ended(Exception):
    """A stage ended the run early; ``result`` is what the task returns."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.result = Ended(status=str(status), detail=detail)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the broker handed over: one message of one agent."""

    task_id: str
    worker: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: Times Celery re-queued this message (``request.retries``).
    retries: int = 0
    queue: str | None = None
    #: The broker's tag of this delivery: the owner prefix of the lease.
    delivery_tag: str = ""
    #: When the message was published (epoch seconds), if it says.
    sent_at: float | None = None
    #: Its trace context headers (empty while tracing is off); a batch run
    #: traces each of its messages in its own sender's trace.
    trace: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Progress:
    """How far one run has got with the results database."""

    delivery: Delivery
    parsed: Parsed
    started_at: datetime
    #: The key's first delivery: run without claiming it; the outcome row is
    #: written once, with the effects (:meth:`Guard.settle`).
    first: bool
    #: The key's row is final (this run's outcome committed, or it found the
    #: key done or dead): its in-flight record may go. Until then the record
    #: stays, so the key's next delivery claims first and counts deliveries.
    final: bool = False
    #: The key is known to have succeeded (by this run or an earlier one).
    succeeded: bool = False

    @property
    def key(self) -> str:
        return self.parsed.identity.key


@dataclass(frozen=True, slots=True)
class Parsed:
    payload: Any
    raw: dict[str, Any]
    identity: Identity
    #: Set on a continuation run: what its wait resolved with.
    resumed: events.Resumed | None = None


class Guard:
    def __init__(
        self,
        ledger: Ledger,
        locks: Callable[[], EntityLocks],
        heartbeat: Heartbeat,
        policy: RetryPolicy | None = None,
        *,
        app: Celery | None = None,
        done_mark_s: float = timing.DONE_MARK_MIN_S,
    ) -> None:
        self.app = app
        self.done_mark_ms = int(done_mark_s * 1000)
        self.ledger = ledger
        self.locks = locks
        self.heartbeat = heartbeat
        self.policy = policy or RetryPolicy()

    def run(self, spec: AgentSpec, behaviour: Behaviour, delivery: Delivery) -> Any:
        """Run once; while a service is unreachable, wait in place and run again."""
        started, tries = time.monotonic(), 0
        held: dict[str, str] = {}
        while True:
            try:
                return self._once(spec, behaviour, delivery, again=tries > 0, held=held)
            except _Ended as ended:
                return ended.result
            except UNREACHABLE as exc:
                facts = Facts(
                    Situation.UNREACHABLE, tries=tries, waited_s=time.monotonic() - started,
                    error=exc,
                )  # fmt: skip
                decision = self.policy.decide(spec, facts)
                if isinstance(decision, Retry):
                    self._waiting(held, decision.countdown)
                    raise RetryRequested(decision.countdown, decision.reason) from exc
                assert isinstance(decision, Wait)
                log.warning("%s %s: service unreachable (%s); trying again in %.1fs",
                            spec.name, delivery.task_id, exc, decision.seconds)  # fmt: skip
                self._waiting(held, decision.seconds)
                time.sleep(decision.seconds)
                tries += 1

    def _waiting(self, held: dict[str, str], seconds: float) -> None:
        """Date the in-flight record of a run that waits ``seconds`` before its
        next try, so the reaper does not take it for a dead holder's."""
        if not held:
            return
        # (if Redis is what is unreachable, the reaper cannot run either)
        with contextlib.suppress(redis.RedisError):
            inflight.touch(self.locks().client, held["key"], held["owner"], time.time() + seconds)

    def _once(
        self,
        spec: AgentSpec,
        behaviour: Behaviour,
        delivery: Delivery,
        *,
        again: bool = False,
        held: dict[str, str] | None = None,
    ) -> Any:
        parsed = self.parse(spec, delivery)
        run = RunId(spec.name, parsed.identity.key, delivery.task_id, delivery.worker)
        entity = parsed.identity.entity
        tracing.run_attributes(spec.name, run.key, entity)
        started_at = claims.now()
        with _stage("lease", run, entity) as span:
            lease = self.lease(spec, delivery, parsed, run, again=again)
            span.set_attribute("fleetworks.fencing_token", lease.fencing_token)
        if held is not None:
            held.update(key=run.key, owner=lease.token)
        first = lease.deliveries == 1 and delivery.retries == 0
        progress = _Progress(delivery, parsed, started_at, first=first)
        try:
            attempts = 1
            with _stage("claim", run, entity, lease.fencing_token):
                self._in_order(spec, delivery, parsed, run)
                if not first:
                    attempts = self.claim(spec, delivery, parsed, run, lease, progress=progress)
            ctx = RunContext(
                spec=spec, task_id=delivery.task_id, worker=delivery.worker,
                payload=parsed.payload, idempotency_key=run.key,
                entity_key=parsed.identity.entity, lease=lease, attempts=attempts,
                database_url=self.ledger.database_url, queue=delivery.queue, app=self.app,
                resumed=parsed.resumed,
            )  # fmt: skip
            return self.settle(spec, ctx, run, behaviour, progress)
        finally:
            self._release(lease, progress)

    # -- 1. parse --------------------------------------------------------------

    def parse(self, spec: AgentSpec, delivery: Delivery) -> Parsed:
        unpacked = message.unpack(delivery.args, delivery.kwargs)
        if isinstance(unpacked, message.Problem):
            raw = {"args": list(delivery.args), "kwargs": delivery.kwargs}
            self._reject(spec, delivery, None, unpacked.reason, raw)
        explicit, raw = unpacked.key, unpacked.payload
        problem = _payload_problem(spec, raw)
        if problem is not None:
            self._reject(spec, delivery, explicit, problem, raw)
        try:
            payload = spec.payload.model_validate(raw)
        except ValidationError as exc:
            why = f"invalid payload for {spec.name}: {message.describe(exc)}"
            self._reject(spec, delivery, explicit, why, raw)
        identity = spec.identify(payload, explicit)
        problem = _key_problem(identity.key)
        if problem is not None:
            self._reject(spec, delivery, explicit, problem, raw)
        try:
            resumed = events.resumed_from(unpacked.resume)
        except (ValueError, ValidationError) as exc:
            self._reject(spec, delivery, explicit, f"invalid resume: {exc}", raw)
        if resumed is None and explicit is not None:
            # A continuation re-sent without it (the reaper, a replay).
            resumed = events.resumed_for_key(self.ledger.database_url, explicit)
        logs.bind(idempotency_key=identity.key, entity=identity.entity)
        return Parsed(payload, raw, identity, resumed)

    def _reject(
        self, spec: AgentSpec, delivery: Delivery, key: str | None, why: str, raw: Any
    ) -> NoReturn:
        self.ledger.reject(RunId(spec.name, key or "", delivery.task_id, delivery.worker), why, raw)
        outbox.forget(self.locks().client, delivery.task_id)
        raise _Ended(Status.REJECTED, why)

    # -- 2. lease --------------------------------------------------------------

    def lease(
        self,
        spec: AgentSpec,
        delivery: Delivery,
        parsed: Parsed,
        run: RunId,
        *,
        again: bool = False,
    ) -> Lease:
        entity = parsed.identity.entity
        locks = self.locks()
        record = inflight.encode(
            agent=spec.name, entity=entity, task_id=delivery.task_id, worker=delivery.worker,
            queue=delivery.queue, payload=parsed.raw,
        )  # fmt: skip
        lease = locks.acquire_run(entity, spec.lock_ttl_s, delivery.delivery_tag,
                                  delivery.task_id, key=run.key, record=record,
                                  count=not again)  # fmt: skip
        if isinstance(lease, KeyDone):
            self._end(run, EventKind.SKIPPED_DUPLICATE, f"key already {Status.SUCCEEDED}")
        if lease is not None:
            self.heartbeat.watch(lease)
            logs.bind(fencing_token=lease.fencing_token)
            return lease
        done = self.ledger.terminal_status(run.key)
        if done is not None:
            outbox.forget(locks.client, delivery.task_id)
            self._end(run, EventKind.SKIPPED_DUPLICATE, f"already {done}; lock busy")
        decision = self.policy.decide(spec, Facts(Situation.CONTENDED, retries=delivery.retries))
        if isinstance(decision, GiveUp):
            outbox.forget(locks.client, delivery.task_id)
            self._end(run, EventKind.SKIPPED_LOCKED, f"entity {entity!r}: {decision.reason}")
        assert isinstance(decision, Retry)
        self.ledger.event(run, EventKind.LOCK_CONTENDED, f"entity {entity!r} is locked")
        raise RetryRequested(decision.countdown, decision.reason)

    def _in_order(self, spec: AgentSpec, delivery: Delivery, parsed: Parsed, run: RunId) -> None:
        """A subscriber runs one key's events in the order they were stored."""
        if not spec.on or parsed.resumed is not None:
            return
        earlier = events.earlier_unhandled(self.ledger.database_url, spec, parsed.payload)
        if earlier is None:
            return
        facts = Facts(Situation.OUT_OF_ORDER, retries=delivery.retries)
        decision = self.policy.decide(spec, facts)
        assert isinstance(decision, Retry)
        self.ledger.event(run, EventKind.DEFERRED, f"after event {earlier} of its key")
        raise RetryRequested(decision.countdown, decision.reason)

    def _release(self, lease: Lease, progress: _Progress) -> None:
        self.heartbeat.unwatch(lease)
        settled_key = progress.key if progress.final else None
        mark_ms = self.done_mark_ms if progress.succeeded else 0
        try:
            self.locks().release(lease, settled_key, mark_ms)
        except redis.RedisError as exc:
            # The outcome is already written; the lease expires by itself.
            log.warning("could not release lease on %s (%s); it expires in %d ms",
                        lease.entity, exc, lease.ttl_ms)  # fmt: skip

    # -- 3. claim --------------------------------------------------------------

    def claim(
        self,
        spec: AgentSpec,
        delivery: Delivery,
        parsed: Parsed,
        run: RunId,
        lease: Lease,
        *,
        progress: _Progress,
    ) -> int:
        """Claim the key before the behaviour runs: for a delivery that is not
        the key's first (an earlier one did not finish, or Celery retries it),
        where the deliveries must be counted."""
        got = self.ledger.claim(
            run, entity=parsed.identity.entity, token=lease.fencing_token, payload=parsed.raw,
            queue=delivery.queue, queued_at=_published_at(delivery.sent_at),
            deliveries=lease.deliveries,
        )  # fmt: skip
        if got.verdict is ClaimVerdict.DUPLICATE:
            progress.final = True
            progress.succeeded = got.status == Status.SUCCEEDED
            if progress.first and (got.stored_token or 0) > lease.fencing_token:
                # A first run's failure, recorded after a newer holder finished
                # the key (this run stalled past its lease): a late write.
                detail = f"token {lease.fencing_token}, key {got.status} with {got.stored_token}"
                self._end(run, EventKind.STALE_WRITE, f"{FENCING_REFUSED}: {detail}")
            kind = (
                EventKind.SKIPPED_DEAD if got.status == Status.DEAD else EventKind.SKIPPED_DUPLICATE
            )
            self._end(run, kind, f"key already {got.status}")
        if got.verdict is ClaimVerdict.STALE:
            # The fence counter is behind the ledger (Redis lost its data):
            # move it past the stored token and run again with a fresh lease.
            self.locks().raise_fence(parsed.identity.entity, got.stored_token or 0)
            detail = "fence counter behind the ledger; re-acquiring"
            self.ledger.event(run, EventKind.STALE_WRITE, detail)
            raise RetryRequested(0.0, detail)
        decision = self.policy.decide(spec, Facts(Situation.DELIVERED, attempts=got.attempts))
        if isinstance(decision, GiveUp):
            self.ledger.declare_dead(run, lease.fencing_token, decision.reason)
            progress.final = True
            self._end(run, EventKind.SKIPPED_DEAD, f"declared dead after {got.attempts} deliveries")
        assert isinstance(decision, Proceed)
        logs.bind(attempt=got.attempts)
        return got.attempts

    # -- 4 and 5. behaviour, settle ---------------------------------------------

    def settle(
        self,
        spec: AgentSpec,
        ctx: RunContext,
        run: RunId,
        behaviour: Behaviour,
        progress: _Progress,
    ) -> Any:
        token = ctx.fencing_token
        with ExitStack() as settling:
            try:
                with _stage("behaviour", run, ctx.entity_key, token):
                    result = behaviour(ctx, ctx.payload)
                if isinstance(result, events.Waiting):
                    result = result.as_result()
                settling.enter_context(_stage("settle", run, ctx.entity_key, token))
                ctx.check_lease()
                if not progress.first:
                    self.ledger.settle(ctx.db, run, token, result)
                else:
                    got = self.ledger.settle_unclaimed(
                        ctx.db, run, entity=ctx.entity_key, token=token, result=result,
                        payload=progress.parsed.raw, queue=progress.delivery.queue,
                        queued_at=_published_at(progress.delivery.sent_at),
                        started_at=progress.started_at,
                    )  # fmt: skip
                    if got.verdict is not ClaimVerdict.RUN:
                        raise _Refused(got)
                    ctx.attempts = got.attempts
            except BaseException as exc:
                ctx.close_db(commit=False)
                if isinstance(exc, _Refused):
                    self._refused(ctx, run, exc.claim, progress)
                self._settle_error(spec, ctx, run, exc, progress)
                raise
            try:
                ctx.close_db(commit=True)
            except STALE as exc:
                self._stale(run, exc)
            progress.final = progress.succeeded = True
        if ctx.emitted:
            events.wake(self.locks().client)
        return result

    def _refused(
        self, ctx: RunContext, run: RunId, got: claims.Claim, progress: _Progress
    ) -> NoReturn:
        """A first run's outcome found the key final, or held with a token as
        high as its own; its effects are rolled back. A key finished under a
        higher token than this run's was taken over while this run stalled:
        its write is a stale one, as a claimed run's would be."""
        if got.verdict is ClaimVerdict.DUPLICATE and (got.stored_token or 0) > ctx.fencing_token:
            progress.final = True
            progress.succeeded = got.status == Status.SUCCEEDED
            detail = f"token {ctx.fencing_token}, key {got.status} with {got.stored_token}"
            self._end(run, EventKind.STALE_WRITE, f"{FENCING_REFUSED}: {detail}")
        if got.verdict is ClaimVerdict.DUPLICATE:
            progress.final = True
            progress.succeeded = got.status == Status.SUCCEEDED
            kind = (
                EventKind.SKIPPED_DEAD if got.status == Status.DEAD else EventKind.SKIPPED_DUPLICATE
            )
            self._end(run, kind, f"key already {got.status}; effects rolled back")
        # A newer holder has the key, or the fence counter is behind the
        # ledger (Redis lost its data): move it past the stored token and
        # deliver again; the next run claims first and finds out which.
        self.locks().raise_fence(ctx.entity_key, got.stored_token or 0)
        detail = f"{FENCING_REFUSED}: token {ctx.fencing_token}, key held with {got.stored_token}"
        self.ledger.event(run, EventKind.STALE_WRITE, detail)
        raise RetryRequested(0.0, detail)

    def _settle_error(
        self,
        spec: AgentSpec,
        ctx: RunContext,
        run: RunId,
        exc: BaseException,
        progress: _Progress,
    ) -> None:
        """Record what a failed behaviour or settle means; raises what the task should raise."""
        if isinstance(exc, STALE):
            self._stale(run, exc)
        if isinstance(exc, UNREACHABLE) or not isinstance(exc, Exception):
            return  # waited out by run(), or a signal/exit that must propagate
        if progress.first:
            # A first run records its failure the way a claimed one does:
            # claim the key now (its deliveries counted), then fail it.
            ctx.attempts = self.claim(spec, progress.delivery, progress.parsed, run, ctx.lease,
                                      progress=progress)  # fmt: skip
        facts = Facts(Situation.FAILED, attempts=ctx.attempts, error=exc)
        decision = self.policy.decide(spec, facts)
        dead = isinstance(decision, GiveUp)
        try:
            self.ledger.fail(run, ctx.fencing_token, exc, dead=dead)
            progress.final = dead
        except StaleWriteError as refused:
            # A newer holder owns the key: this run's failure is only a late write.
            self._stale(run, refused)
        if isinstance(decision, Retry):
            log.warning("%s attempt %d failed (%s: %s); retry in %.1fs",
                        run.key, ctx.attempts, type(exc).__name__, exc,
                        decision.countdown)  # fmt: skip
            raise RetryRequested(decision.countdown, decision.reason, exc) from exc

    def _stale(self, run: RunId, exc: BaseException) -> NoReturn:
        log.warning("%s %s: write refused, %s", run.agent, run.task_id, exc)
        cause = LEASE_LOST if isinstance(exc, LeaseLostError) else FENCING_REFUSED
        self._end(run, EventKind.STALE_WRITE, f"{cause}: {exc}")

    def _end(self, run: RunId, kind: EventKind, detail: str) -> NoReturn:
        self.ledger.event(run, kind, detail)
        raise _Ended(kind, detail)


def _published_at(sent_at: float | None) -> datetime | None:
    """The publish time a message carries, or None if it carries none that is usable."""
    if sent_at is None or not math.isfinite(sent_at) or sent_at <= 0:
        return None
    try:
        return datetime.fromtimestamp(sent_at, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _stage(
    name: str, run: RunId, entity: str, token: int | None = None
) -> AbstractContextManager[Any]:
    """The trace span of one stage (a null context while tracing is off)."""
    return tracing.stage(name, agent=run.agent, key=run.key, entity=entity, fencing_token=token,
                         quiet=(_Ended, RetryRequested))  # fmt: skip


def _payload_problem(spec: AgentSpec, raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return f"payload must be a JSON object, got {type(raw).__name__}"
    bad_text = message.unstorable_text(raw)
    if bad_text is not None:
        return (
            f"invalid payload for {spec.name}: 1 problem(s): {bad_text}: "
            "text must be valid Unicode without NUL characters"
        )
    not_json = message.not_json_data(raw)
    if not_json is not None:
        return f"invalid payload for {spec.name}: 1 problem(s): {not_json}"
    return None


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str) or not key or len(key) > c.MAX_KEY_CHARS:
        return f"idempotency key must be a non-empty string of <= {c.MAX_KEY_CHARS} chars"
    if message.unstorable_text(key) is not None:
        return "idempotency key must be valid Unicode without NUL characters"
    return None


__all__ = ["Behaviour", "Delivery", "Guard", "RetryRequested"]
