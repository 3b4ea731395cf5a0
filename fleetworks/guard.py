"""The guard: what runs around every agent behaviour.

A run passes through small hook objects (:mod:`fleetworks.hooks`), called
from one place, :meth:`Guard.run`, the way dramatiq's middleware is: each
hook's ``before`` in order, then the behaviour, then each entered hook's
``after`` in reverse. A hook stops a run by raising :class:`Veto`, the one
known exception; the guard records the veto (a ``rejected`` outcome row or a
guard event) and, when the veto asks for it, requests a retry.

How a run can end:

- succeeded: effects and outcome committed together;
- vetoed: rejected, duplicate, dead, or locked (recorded; maybe retried);
- stale: the lease was lost or the fencing token superseded; nothing it
  wrote through ``ctx.db`` commits, a ``stale_write`` event is recorded, and
  it is not retried (the newer holder owns the key);
- failed: the behaviour raised; retried with back-off until ``max_retries``,
  then ``dead``;
- infrastructure unreachable (Redis or the database): retried with back-off,
  not counted against the agent's retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from fleetworks import claims
from fleetworks import constants as c
from fleetworks.context import (
    REJECTED,
    AgentSpec,
    RetryRequested,
    RunContext,
    Veto,
    backoff,
)
from fleetworks.hooks import STALE, Hook
from fleetworks.models import EventKind

__all__ = ["AgentSpec", "Guard", "RetryRequested", "RunContext", "Veto"]

log = logging.getLogger(__name__)

#: Errors that mean a service is unreachable for now, not that the run is wrong.
UNREACHABLE = (
    OperationalError,
    InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
)


class Guard:
    """Runs a behaviour through the hooks and records what happened."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def run(self, ctx: RunContext, behaviour: Callable[[RunContext, Any], Any]) -> Any:
        """Run once; while a service is unreachable, wait in place and run again."""
        budget = min(c.UNREACHABLE_WAIT_S, ctx.spec.time_limit_s / 2)
        deadline = time.monotonic() + budget
        tries = 0
        while True:
            try:
                return self._run(ctx, behaviour)
            except UNREACHABLE as exc:
                wait = backoff(tries, c.CONTENTION_BACKOFF_BASE_S, c.UNREACHABLE_BACKOFF_MAX_S)
                tries += 1
                log.warning("%s %s: service unreachable (%s); retrying in %.1fs",
                            ctx.spec.name, ctx.task_id, exc, wait)  # fmt: skip
                if time.monotonic() + wait > deadline:
                    raise RetryRequested(wait, f"unreachable: {exc}") from exc
                time.sleep(wait)
                ctx.attempts = 0

    def _run(self, ctx: RunContext, behaviour: Callable[[RunContext, Any], Any]) -> Any:
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
        result: Any = None
        error: BaseException | None = None
        try:
            result = behaviour(ctx, ctx.payload)
        except BaseException as exc:
            error = exc
        try:
            self._unwind(ctx, entered, result, error)
        except STALE as stale:
            error = stale
        if error is None:
            return result
        if isinstance(error, STALE):
            return self._stale(ctx, error)
        if isinstance(error, UNREACHABLE):
            raise error
        raise self._failed(ctx, error) from error

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
    def _record(ctx: RunContext, kind: EventKind, detail: str) -> None:
        from fleetworks.db import transaction

        with transaction(ctx.database_url) as conn:
            claims.record_event(
                conn,
                kind,
                agent=ctx.spec.name,
                idempotency_key=ctx.idempotency_key,
                task_id=ctx.task_id,
                worker=ctx.worker,
                detail=detail,
            )

    def _vetoed(self, ctx: RunContext, veto: Veto) -> dict[str, Any]:
        if veto.kind == REJECTED:
            from fleetworks.db import transaction

            with transaction(ctx.database_url) as conn:
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
            self._record(ctx, EventKind(veto.kind), veto.detail)
        if veto.retry_after is not None:
            raise RetryRequested(veto.retry_after, veto.detail)
        return {"status": veto.kind, "detail": veto.detail}

    def _stale(self, ctx: RunContext, error: BaseException) -> dict[str, Any]:
        log.warning("%s %s: write refused, %s", ctx.spec.name, ctx.task_id, error)
        self._record(ctx, EventKind.STALE_WRITE, str(error))
        return {"status": EventKind.STALE_WRITE, "detail": str(error)}

    @staticmethod
    def _failed(ctx: RunContext, exc: BaseException) -> BaseException:
        """A retry request while the agent has retries left, else the error itself."""
        if isinstance(exc, IntegrityError) or ctx.attempts > ctx.spec.max_retries:
            return exc
        wait = backoff(ctx.attempts, c.RETRY_BACKOFF_BASE_S, c.RETRY_BACKOFF_MAX_S)
        return RetryRequested(wait, f"{type(exc).__name__}: {exc}", exc)
