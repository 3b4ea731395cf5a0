"""The ledger: every write to ``outcomes`` and ``guard_events`` goes through here.

A :class:`Ledger` is bound to one results database; a :class:`RunId` says
which run is writing (agent, key, task, worker), so no caller spreads a run
into keyword arguments. The SQL itself, one cached statement per dialect,
is in :mod:`fleetworks.claims`; this is the layer the guard, the reaper and
the CLI talk to, the way procrastinate's ``JobManager`` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from fleetworks import claims
from fleetworks.db import transaction
from fleetworks.models import OUTCOMES, EventKind, Status
from fleetworks.timing import Timings

#: Count: claims examined per reaper run.
REAP_BATCH = 500


@dataclass(frozen=True, slots=True)
class RunId:
    """Who writes: one delivery of one agent's key."""

    agent: str
    key: str
    task_id: str
    worker: str


class Ledger:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def event(self, run: RunId, kind: EventKind, detail: str) -> None:
        with transaction(self.database_url) as conn:
            self._event(conn, run, kind, detail)

    @staticmethod
    def event_in(conn: Connection, run: RunId, kind: EventKind, detail: str) -> None:
        """A guard event inside the caller's transaction (a batch's)."""
        Ledger._event(conn, run, kind, detail)

    @staticmethod
    def _event(conn: Connection, run: RunId, kind: EventKind, detail: str) -> None:
        claims.record_event(
            conn, kind, agent=run.agent, idempotency_key=run.key, task_id=run.task_id,
            worker=run.worker, detail=detail,
        )  # fmt: skip

    def reject(self, run: RunId, error: str, payload: Any) -> None:
        """A message that will never run: one ``rejected`` row per task id."""
        with transaction(self.database_url) as conn:
            claims.reject(
                conn, agent=run.agent, entity_key=run.key, task_id=run.task_id,
                worker=run.worker, error=error, payload=payload,
            )  # fmt: skip

    def terminal_status(self, key: str) -> str | None:
        with transaction(self.database_url) as conn:
            return claims.terminal_status(conn, key)

    def status(self, key: str) -> str | None:
        with transaction(self.database_url) as conn:
            found = conn.execute(
                select(OUTCOMES.c.status).where(OUTCOMES.c.idempotency_key == key)
            ).scalar()
        return None if found is None else str(found)

    def claim(
        self,
        run: RunId,
        *,
        entity: str,
        token: int,
        payload: Any,
        queue: str | None,
        queued_at: datetime | None = None,
        deliveries: int = 1,
    ) -> claims.Claim:
        with transaction(self.database_url) as conn:
            return claims.claim(
                conn, agent=run.agent, entity_key=entity, idempotency_key=run.key,
                fencing_token=token, task_id=run.task_id, worker=run.worker,
                payload=payload, queue=queue, queued_at=queued_at, deliveries=deliveries,
            )  # fmt: skip

    def declare_dead(self, run: RunId, token: int, reason: str) -> None:
        with transaction(self.database_url) as conn:
            claims.finish(
                conn, idempotency_key=run.key, fencing_token=token, status=Status.DEAD,
                error=reason,
            )  # fmt: skip

    @staticmethod
    def settle(conn: Connection, run: RunId, token: int, result: Any) -> None:
        """``succeeded``, inside the run's own effect transaction (fenced)."""
        claims.finish(
            conn, idempotency_key=run.key, fencing_token=token, status=Status.SUCCEEDED,
            result=result,
        )  # fmt: skip

    @staticmethod
    def settle_unclaimed(
        conn: Connection,
        run: RunId,
        *,
        entity: str,
        token: int,
        result: Any,
        payload: Any,
        queue: str | None,
        queued_at: datetime | None,
        started_at: datetime,
    ) -> claims.Claim:
        """``succeeded`` for a run that did not claim first, inside its effect
        transaction, in one fenced statement (:func:`fleetworks.claims.settle`)."""
        return claims.settle(
            conn, agent=run.agent, entity_key=entity, idempotency_key=run.key,
            fencing_token=token, task_id=run.task_id, worker=run.worker,
            started_at=started_at, payload=payload, result=result, queue=queue,
            queued_at=queued_at,
        )  # fmt: skip

    def fail(self, run: RunId, token: int, error: BaseException, *, dead: bool) -> None:
        """``failed`` (a retry follows) or ``dead``; a UNIQUE violation is also a
        ``duplicate_effect`` event, in the same transaction."""
        with transaction(self.database_url) as conn:
            self.fail_in(conn, run, token, error, dead=dead)

    @staticmethod
    def fail_in(
        conn: Connection, run: RunId, token: int, error: BaseException, *, dead: bool
    ) -> None:
        """:meth:`fail` inside the caller's transaction (a batch's)."""
        from sqlalchemy.exc import IntegrityError

        if isinstance(error, IntegrityError):
            Ledger._event(conn, run, EventKind.DUPLICATE_EFFECT, str(error.orig))
        elif not dead:
            # The row keeps only the latest attempt: the event keeps each one.
            detail = f"token {token}: {type(error).__name__}: {error}"
            Ledger._event(conn, run, EventKind.ATTEMPT_FAILED, detail[:2000])
        claims.finish(
            conn, idempotency_key=run.key, fencing_token=token,
            status=Status.DEAD if dead else Status.FAILED,
            error=f"{type(error).__name__}: {error}",
        )  # fmt: skip

    def reapable(self, timings: Timings) -> list[Any]:
        """Claims whose holder may be gone (see :mod:`fleetworks.reaper`)."""
        at = claims.now()
        with transaction(self.database_url) as conn:
            return claims.reapable(
                conn,
                claimed_before=at - timedelta(seconds=timings.orphaned_after_s),
                failed_before=at - timedelta(seconds=timings.retry_overdue_after_s),
                reaped_before=at - timedelta(seconds=timings.republish_after_s),
                limit=REAP_BATCH,
            )

    def republished(self, row: Any) -> None:
        run = RunId(row.agent, row.idempotency_key, row.task_id or "", "reaper")
        with transaction(self.database_url) as conn:
            claims.mark_reaped(conn, row.id)
            detail = f"{row.status} since {row.started_at}; holder {row.worker} gone"
            self._event(conn, run, EventKind.REPUBLISHED, detail)

    def revive(self, outcome_id: int) -> Any:
        """A ``dead`` row made runnable again (a fresh delivery budget); the row as it died."""
        with transaction(self.database_url) as conn:
            row = claims.revive(conn, outcome_id)
            run = RunId(row.agent, row.idempotency_key, row.task_id or "", "replay")
            detail = f"replayed after {row.attempts} attempts; last error: {row.error}"
            self._event(conn, run, EventKind.REPLAYED, detail)
        return row
