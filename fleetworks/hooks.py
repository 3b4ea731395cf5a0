"""The guard's hooks, each one concern, run in this order:

1. :class:`ValidatePayload`: the agent's pydantic model parses the payload;
   invalid input is vetoed as ``rejected`` and never retried.
2. :class:`EntityLock`: a Redis lease on the entity with a fencing token,
   renewed by the process heartbeat while the run lasts; on contention, a key
   already done is a duplicate, otherwise the agent's policy decides.
3. :class:`ClaimKey`: the claim row in the results database; a key already
   done is vetoed, a key claimed too often is declared ``dead``. Its
   ``after`` writes the outcome in the same transaction as the behaviour's
   effects, so an effect and its ``succeeded`` row commit together or not at
   all, and only while this run's fencing token is still the current one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from fleetworks import claims
from fleetworks import constants as c
from fleetworks.context import REJECTED, RunContext, Veto, backoff
from fleetworks.db import transaction
from fleetworks.locks import EntityLocks, Heartbeat, LeaseLostError
from fleetworks.models import EventKind, Status

log = logging.getLogger(__name__)

#: Errors that mean "this run no longer owns its key": never retried.
STALE = (claims.StaleWriteError, LeaseLostError)


class Hook(Protocol):
    def before(self, ctx: RunContext) -> None: ...

    def after(self, ctx: RunContext, result: Any, error: BaseException | None) -> None: ...


def describe(exc: ValidationError) -> str:
    """One line per problem, ``field: message``, without pydantic's doc links."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        problems.append(f"{where}: {err['msg']}")
    return f"{len(problems)} problem(s): " + "; ".join(problems)


def unstorable_text(value: Any) -> str | None:
    """Where in ``value`` a string holds NUL or an unpaired surrogate (a dotted
    path, ``payload`` for the value itself), or None."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item or not claims.encodable(item):
                return path or "payload"
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str) and ("\x00" in k or not claims.encodable(k)):
                    return f"{path or 'payload'} (a field name)"
                stack.append((v, f"{path}.{k}" if path else str(k)))
        elif isinstance(item, list):
            stack.extend((v, f"{path or 'payload'}[{i}]") for i, v in enumerate(item))
    return None


class ValidatePayload:
    def before(self, ctx: RunContext) -> None:
        if ctx.shape_error is not None:
            raise Veto(REJECTED, ctx.shape_error)
        if not isinstance(ctx.raw_payload, dict):
            kind = type(ctx.raw_payload).__name__
            raise Veto(REJECTED, f"payload must be a JSON object, got {kind}")
        bad_text = unstorable_text(ctx.raw_payload)
        if bad_text is not None:
            raise Veto(
                REJECTED,
                f"invalid payload for {ctx.spec.name}: 1 problem(s): {bad_text}: "
                "text must be valid Unicode without NUL characters",
            )
        try:
            ctx.payload = ctx.spec.payload.model_validate(ctx.raw_payload)
        except ValidationError as exc:
            raise Veto(REJECTED, f"invalid payload for {ctx.spec.name}: {describe(exc)}") from None
        key = ctx.explicit_key if ctx.explicit_key is not None else ctx.spec.key(ctx.payload)
        if not isinstance(key, str) or not key or len(key) > c.MAX_KEY_CHARS:
            raise Veto(
                REJECTED,
                f"idempotency key must be a non-empty string of <= {c.MAX_KEY_CHARS} chars",
            )
        if unstorable_text(key) is not None:
            raise Veto(REJECTED, "idempotency key must be valid Unicode without NUL characters")
        ctx.idempotency_key = key
        ctx.entity_key = ctx.spec.entity(ctx.payload) if ctx.spec.entity else key

    def after(self, ctx: RunContext, result: Any, error: BaseException | None) -> None:
        return None


class EntityLock:
    def __init__(self, client_factory: Callable[[], redis.Redis]) -> None:
        self._client_factory = client_factory
        self._locks: EntityLocks | None = None
        self._client_id = 0
        self.heartbeat = Heartbeat(lambda: self.locks)

    @property
    def locks(self) -> EntityLocks:
        client = self._client_factory()
        if self._locks is None or self._client_id != id(client):
            self._locks = EntityLocks(client)
            self._client_id = id(client)
        return self._locks

    def before(self, ctx: RunContext) -> None:
        if ctx.lease is not None:
            # A lease left by an earlier try of this run (Redis was away when it
            # ended): free it so the run does not contend with itself.
            self.heartbeat.unwatch(ctx.lease)
            with contextlib.suppress(redis.RedisError):
                self.locks.release(ctx.lease)
        ctx.lease = self.locks.acquire(ctx.entity_key, ctx.spec.lock_ttl_s, ctx.delivery_tag)
        if ctx.lease is not None:
            self.heartbeat.watch(ctx.lease)
            return
        with transaction(ctx.database_url) as conn:
            done = claims.terminal_status(conn, ctx.idempotency_key)
        if done is not None:
            raise Veto(EventKind.SKIPPED_DUPLICATE, f"already {done}; lock busy")
        if ctx.spec.on_contention == "skip":
            raise Veto(EventKind.SKIPPED_LOCKED, f"entity {ctx.entity_key!r} is locked")
        if ctx.retries >= c.MAX_CONTENTION_RETRIES:
            raise Veto(EventKind.SKIPPED_LOCKED, "lock contention retries exhausted")
        wait = backoff(ctx.retries, c.CONTENTION_BACKOFF_BASE_S, c.CONTENTION_BACKOFF_MAX_S)
        raise Veto(EventKind.LOCK_CONTENDED, f"entity {ctx.entity_key!r} is locked", wait)

    def after(self, ctx: RunContext, result: Any, error: BaseException | None) -> None:
        if ctx.lease is None:
            return
        self.heartbeat.unwatch(ctx.lease)
        try:
            self.locks.release(ctx.lease)
        except redis.RedisError as exc:
            # The outcome is already written; the lease expires by itself.
            log.warning("could not release lease on %s (%s); it expires in %d ms",
                        ctx.entity_key, exc, ctx.lease.ttl_ms)  # fmt: skip


class ClaimKey:
    def __init__(self, lock: EntityLock) -> None:
        self._lock = lock

    def before(self, ctx: RunContext) -> None:
        with transaction(ctx.database_url) as conn:
            got = claims.claim(
                conn,
                agent=ctx.spec.name,
                entity_key=ctx.entity_key,
                idempotency_key=ctx.idempotency_key,
                fencing_token=ctx.fencing_token,
                task_id=ctx.task_id,
                worker=ctx.worker,
                payload=ctx.raw_payload,
                queue=ctx.queue,
            )
            too_many = got.verdict is claims.ClaimVerdict.RUN and (
                got.attempts > ctx.spec.max_deliveries
            )
            if too_many:
                claims.finish(
                    conn,
                    idempotency_key=ctx.idempotency_key,
                    fencing_token=ctx.fencing_token,
                    status=Status.DEAD,
                    error=f"delivered {got.attempts} times (max_deliveries "
                    f"{ctx.spec.max_deliveries}); see the last error of earlier attempts",
                )
        if too_many:  # vetoed after the commit: the dead row must stay
            raise Veto(EventKind.SKIPPED_DEAD, f"declared dead after {got.attempts} deliveries")
        if got.verdict is claims.ClaimVerdict.DUPLICATE:
            kind = (
                EventKind.SKIPPED_DEAD if got.status == Status.DEAD else EventKind.SKIPPED_DUPLICATE
            )
            raise Veto(kind, f"key already {got.status}")
        if got.verdict is claims.ClaimVerdict.STALE:
            # The fence counter is behind the ledger (Redis lost its data):
            # move it past the stored token and try again with a fresh lease.
            self._lock.locks.raise_fence(ctx.entity_key, got.stored_token or 0)
            raise Veto(EventKind.STALE_WRITE, "fence counter behind the ledger; re-acquiring", 0.0)
        ctx.attempts = got.attempts

    def after(self, ctx: RunContext, result: Any, error: BaseException | None) -> None:
        if error is None:
            try:
                ctx.check_lease()
                claims.finish(
                    ctx.db,
                    idempotency_key=ctx.idempotency_key,
                    fencing_token=ctx.fencing_token,
                    status=Status.SUCCEEDED,
                    result=result,
                )
            except BaseException:
                ctx.close_db(commit=False)
                raise
            ctx.close_db(commit=True)
            return
        ctx.close_db(commit=False)
        if isinstance(error, STALE):
            return  # the key belongs to a newer holder; the guard records the refusal
        out_of_retries = ctx.attempts > ctx.spec.max_retries or isinstance(error, IntegrityError)
        with transaction(ctx.database_url) as conn:
            if isinstance(error, IntegrityError):
                claims.record_event(
                    conn,
                    EventKind.DUPLICATE_EFFECT,
                    agent=ctx.spec.name,
                    idempotency_key=ctx.idempotency_key,
                    task_id=ctx.task_id,
                    worker=ctx.worker,
                    detail=str(error.orig),
                )
            claims.finish(
                conn,
                idempotency_key=ctx.idempotency_key,
                fencing_token=ctx.fencing_token,
                status=Status.DEAD if out_of_retries else Status.FAILED,
                error=f"{type(error).__name__}: {error}",
            )
