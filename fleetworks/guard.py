"""The guard: what runs around every agent behaviour.

A run passes through small hook objects, called from one place
(:meth:`Guard.run`), the way dramatiq's middleware is: each hook's ``before``
in order, then the behaviour, then each entered hook's ``after`` in reverse.
A hook stops a run by raising :class:`Veto`, the one known exception; the
guard records the veto (a ``rejected`` outcome row or a guard event) and,
when the veto asks for it, schedules a retry.

The hooks, in order:

1. :class:`ValidatePayload`: the agent's pydantic model parses the payload;
   invalid input is vetoed as ``rejected`` and never retried.
2. :class:`EntityLock`: a Redis lock on the entity with a fencing token; on
   contention, a key already done is a duplicate, otherwise the agent's
   policy decides (skip and record, or retry with back-off).
3. :class:`ClaimKey`: the claim row in the results database; a key that
   already succeeded is vetoed as ``skipped_duplicate``. Its ``after`` writes
   the outcome in the same transaction as the behaviour's effects, so an
   effect and its ``succeeded`` row commit together or not at all.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from fleetworks import claims
from fleetworks import constants as c
from fleetworks.db import get_engine, transaction
from fleetworks.locks import EntityLocks, Lease, lock_ttl_s
from fleetworks.models import EventKind, Status

REJECTED = "rejected"


@dataclass(frozen=True)
class AgentSpec:
    """How one agent behaviour runs under the guard."""

    name: str
    payload: type[BaseModel]
    #: Idempotency key of a payload: the effect happens once per key.
    key: Callable[[Any], str]
    #: Entity the lock is taken on; defaults to the idempotency key.
    entity: Callable[[Any], str] | None = None
    #: On lock contention: ``retry`` later with back-off, or ``skip`` and record.
    on_contention: str = "retry"
    time_limit_s: float = c.DEFAULT_TIME_LIMIT_S
    max_retries: int = c.DEFAULT_MAX_RETRIES

    def __post_init__(self) -> None:
        if self.on_contention not in ("retry", "skip"):
            raise ValueError(f"on_contention must be 'retry' or 'skip', not {self.on_contention!r}")

    @property
    def lock_ttl_s(self) -> float:
        return lock_ttl_s(self.time_limit_s)


class Veto(Exception):
    """Raised by a hook to stop a run. ``retry_after`` asks for a retry."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after


class RetryRequested(Exception):
    """The guard wants the task re-queued after ``countdown`` seconds."""

    def __init__(self, countdown: float, reason: str, exc: BaseException | None = None) -> None:
        super().__init__(reason)
        self.countdown = countdown
        self.exc = exc


@dataclass
class RunContext:
    """Everything one run knows; handed to the behaviour binding as ``ctx``."""

    spec: AgentSpec
    task_id: str
    worker: str
    raw_payload: Any
    explicit_key: str | None
    retries: int
    database_url: str
    #: Set when the task's arguments do not have the agent-task shape.
    shape_error: str | None = None
    payload: Any = None
    idempotency_key: str = ""
    entity_key: str = ""
    lease: Lease | None = None
    attempts: int = 0
    _conn: Connection | None = field(default=None, repr=False)

    @property
    def fencing_token(self) -> int:
        if self.lease is None:
            raise RuntimeError("no lease: fencing token asked for before the lock was taken")
        return self.lease.fencing_token

    @property
    def db(self) -> Connection:
        """The effect transaction, begun on first use, committed with the outcome.

        Open it as late as possible (write effects last): on SQLite it holds
        the database's write lock until the run ends.
        """
        if self._conn is None:
            self._conn = get_engine(self.database_url).connect()
            self._conn.begin()
        return self._conn

    def close_db(self, *, commit: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if commit:
                conn.commit()
            else:
                conn.rollback()
        finally:
            conn.close()


class Hook(Protocol):
    def before(self, ctx: RunContext) -> None: ...

    def after(self, ctx: RunContext, result: Any, error: BaseException | None) -> None: ...


def backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential back-off with full jitter (AWS architecture blog's variant)."""
    return random.uniform(0, min(cap_s, base_s * (2 ** max(0, attempt))))


def describe(exc: ValidationError) -> str:
    """One line per problem, ``field: message``, without pydantic's doc links."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        problems.append(f"{where}: {err['msg']}")
    return f"{len(problems)} problem(s): " + "; ".join(problems)


class ValidatePayload:
    def before(self, ctx: RunContext) -> None:
        if ctx.shape_error is not None:
            raise Veto(REJECTED, ctx.shape_error)
        if not isinstance(ctx.raw_payload, dict):
            raise Veto(
                REJECTED,
                f"payload must be a JSON object, got {type(ctx.raw_payload).__name__}",
            )
        try:
            ctx.payload = ctx.spec.payload.model_validate(ctx.raw_payload)
        except ValidationError as exc:
            raise Veto(REJECTED, f"invalid payload for {ctx.spec.name}: {describe(exc)}") from None
        key = ctx.explicit_key or ctx.spec.key(ctx.payload)
        if not isinstance(key, str) or not key or len(key) > 500:
            raise Veto(REJECTED, "idempotency key must be a non-empty string of <= 500 chars")
        ctx.idempotency_key = key
        ctx.entity_key = ctx.spec.entity(ctx.payload) if ctx.spec.entity else key

    def after(self, ctx: RunContext, result: Any, error: BaseException | None) -> None:
        return None


class EntityLock:
    def __init__(self, client_factory: Callable[[], redis.Redis]) -> None:
        self._client_factory = client_factory
        self._locks: EntityLocks | None = None
        self._client_id = 0

    @property
    def locks(self) -> EntityLocks:
        client = self._client_factory()
        if self._locks is None or self._client_id != id(client):
            self._locks = EntityLocks(client)
            self._client_id = id(client)
        return self._locks

    def before(self, ctx: RunContext) -> None:
        ctx.lease = self.locks.acquire(ctx.entity_key, ctx.spec.lock_ttl_s)
        if ctx.lease is not None:
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
        if ctx.lease is not None:
            self.locks.release(ctx.lease)


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
            )
        if got.verdict is claims.ClaimVerdict.DUPLICATE:
            raise Veto(EventKind.SKIPPED_DUPLICATE, f"key already {got.status}")
        if got.verdict is claims.ClaimVerdict.STALE:
            # The fence counter is behind the ledger (Redis lost its data):
            # move it past the stored token and try again with a fresh lease.
            self._lock.locks.raise_fence(ctx.entity_key, got.stored_token or 0)
            raise Veto(EventKind.STALE_WRITE, "fence counter behind the ledger; re-acquiring", 0.0)
        ctx.attempts = got.attempts

    def after(self, ctx: RunContext, result: Any, error: BaseException | None) -> None:
        if error is None:
            try:
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
                status=Status.FAILED,
                error=f"{type(error).__name__}: {error}",
            )


class Guard:
    """Runs a behaviour through the hooks and records what happened."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def run(self, ctx: RunContext, behaviour: Callable[[RunContext, Any], Any]) -> Any:
        entered: list[Hook] = []
        try:
            for hook in self.hooks:
                hook.before(ctx)
                entered.append(hook)
        except Veto as veto:
            self._unwind(ctx, entered, None, veto)
            return self._vetoed(ctx, veto)
        except BaseException as exc:
            self._unwind(ctx, entered, None, exc)
            raise
        try:
            result = behaviour(ctx, ctx.payload)
        except BaseException as exc:
            self._unwind(ctx, entered, None, exc)
            raise self._failed(ctx, exc) from exc
        self._unwind(ctx, entered, result, None)
        return result

    @staticmethod
    def _unwind(
        ctx: RunContext, entered: list[Hook], result: Any, error: BaseException | None
    ) -> None:
        first: BaseException | None = None
        for hook in reversed(entered):
            try:
                hook.after(ctx, result, error)
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    @staticmethod
    def _vetoed(ctx: RunContext, veto: Veto) -> dict[str, Any]:
        with transaction(ctx.database_url) as conn:
            if veto.kind == REJECTED:
                claims.reject(
                    conn,
                    agent=ctx.spec.name,
                    entity_key=ctx.explicit_key or "",
                    task_id=ctx.task_id,
                    worker=ctx.worker,
                    error=veto.detail,
                    payload=ctx.raw_payload,
                )
            else:
                claims.record_event(
                    conn,
                    EventKind(veto.kind),
                    agent=ctx.spec.name,
                    idempotency_key=ctx.idempotency_key,
                    task_id=ctx.task_id,
                    worker=ctx.worker,
                    detail=veto.detail,
                )
        if veto.retry_after is not None:
            raise RetryRequested(veto.retry_after, veto.detail)
        return {"status": veto.kind, "detail": veto.detail}

    @staticmethod
    def _failed(ctx: RunContext, exc: BaseException) -> BaseException:
        """A retry request while the agent has retries left, else the error itself."""
        if isinstance(exc, IntegrityError) or ctx.attempts > ctx.spec.max_retries:
            return exc
        wait = backoff(ctx.attempts, c.RETRY_BACKOFF_BASE_S, 60.0)
        return RetryRequested(wait, f"{type(exc).__name__}: {exc}", exc)
