"""The worker-side request of a fleet task: frees a dead child's lease at once.

When a prefork child dies mid-task (SIGKILL, OOM, the hard time limit),
Celery's main process requeues the message (``task_reject_on_worker_lost``)
but sends no signal, and the child's entity lock would block every later
delivery until its lease ran out (celery-singleton#40, celery-once#110).
This ``Request`` subclass, which lives in the main process, adds the
delivery tag to what the child sees (the child prefixes its lease token with
it) and, on a lost child or a hard time limit, asks the task to delete the
lease that delivery held, and only that one. The fencing token still guards
the data: freeing a lease early can never let a stale writer through.

It also keeps two kinds of message from ever reaching the pool: one without
an ``id`` header (Celery would restore and re-crash on it forever) and one
nested too deep to pickle (it would kill the worker); the pool gets a small
body instead, which the guard records as ``rejected``, naming the problem.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.worker.request import Request

from fleetworks import kombu_redis, message

log = logging.getLogger(__name__)


class GuardedRequest(Request):  # type: ignore[misc]
    def __init__(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        headers = msg.headers
        problem: str | None = None
        if isinstance(headers, dict) and "id" not in headers:
            # Celery reads headers["id"] outside its invalid-message handling and
            # would restore and re-crash on this message forever.
            headers["id"] = f"missing-id-{uuid.uuid4()}"
            problem = "message has no 'id' header"
        super().__init__(msg, *args, **kwargs)
        self._delivery_info["delivery_tag"] = str(msg.delivery_tag or "")
        if problem is None:
            problem = message.too_deep([self._args, self._kwargs])
        if problem is not None:
            log.error(
                "Task %s[%s] cannot run: %s; it will be rejected", self.name, self.id, problem
            )
            kombu_redis.replace_request_body(
                self, [], message.unrunnable(problem), decoded=self._decoded
            )

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, (WorkerLostError, TimeLimitExceeded)):
            self._free_lease()
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def _free_lease(self) -> None:
        task = self.task
        if not isinstance(task, GuardedTask):
            return
        try:
            task.free_orphaned_lease(self.kwargs, self._delivery_info["delivery_tag"])
        except Exception:
            log.exception("could not free the lease of lost task %s", self.id)


class GuardedTask(Task):  # type: ignore[misc]
    """Base class of every task of a fleet: uses :class:`GuardedRequest` in the worker."""

    Request = GuardedRequest

    def free_orphaned_lease(self, kwargs: dict[str, Any], delivery_tag: str) -> bool:
        """In the worker's main process: delete the lease a lost child held.
        A task that takes no lease has nothing to free."""
        return False
