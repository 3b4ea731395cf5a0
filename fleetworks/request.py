"""The worker-side request of an agent task: frees a dead child's lease at once.

When a prefork child dies mid-task (SIGKILL, OOM, the hard time limit),
Celery's main process requeues the message (``task_reject_on_worker_lost``)
but sends no signal, and the child's entity lock would block every later
delivery until its lease ran out (celery-singleton#40, celery-once#110).
This ``Request`` subclass, which lives in the main process, adds the
delivery tag to what the child sees (the child prefixes its lease token with
it) and, on a lost child or a hard time limit, deletes the lease that
delivery held, and only that one. The fencing token still guards the data:
freeing a lease early can never let a stale writer through.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.worker.request import Request

log = logging.getLogger(__name__)


class GuardedRequest(Request):  # type: ignore[misc]
    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self._delivery_info["delivery_tag"] = str(message.delivery_tag or "")

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
        free = getattr(self.task, "free_orphaned_lease", None)
        if free is None:
            return
        try:
            free(self.kwargs, self._delivery_info["delivery_tag"])
        except Exception:
            log.exception("could not free the lease of lost task %s", self.id)


class GuardedTask(Task):  # type: ignore[misc]
    """Base class of agent tasks: uses :class:`GuardedRequest` in the worker."""

    Request = GuardedRequest
