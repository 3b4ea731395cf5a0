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
import time
import uuid
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.app.task import Context
from celery.utils.time import maybe_iso8601
from celery.worker.request import Request

from fleetworks import message

log = logging.getLogger(__name__)


class GuardedRequest(Request):  # type: ignore[misc]
    def __init__(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        headers = kwargs.get("headers")
        if headers is None:
            headers = msg.headers
        problem: str | None = None
        if isinstance(headers, dict):
            problem = _fix_headers(headers, kwargs.get("task"))
        if problem is None:
            body = kwargs["body"] if kwargs.get("decoded") else msg.payload
            problem = message.body_problem(body) or message.too_deep(list(body)[:2])
            if problem is None and message.UNRUNNABLE in body[1]:
                # The consumer put it in place of a body of the wrong shape.
                kwargs["body"], kwargs["decoded"] = body, True
        if problem is not None:
            # The pool gets a small body instead, which the guard rejects.
            kwargs["body"], kwargs["decoded"] = ([], message.unrunnable(problem), {}), True
        super().__init__(msg, *args, **kwargs)
        self._delivery_info["delivery_tag"] = str(msg.delivery_tag or "")
        if problem is not None:
            log.error(
                "Task %s[%s] cannot run: %s; it will be rejected", self.name, self.id, problem
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


def _fix_headers(headers: dict[str, Any], task: Any) -> str | None:
    """What is wrong with ``headers``, made harmless in place: the request
    must still be built, logged and handed to the pool to be rejected."""
    if "id" not in headers:
        # Celery reads headers["id"] outside its invalid-message handling and
        # would restore and re-crash on this message forever.
        headers["id"] = f"missing-id-{uuid.uuid4()}"
        problem: str | None = "message has no 'id' header"
    else:
        horizon = task.eta_horizon_s() if isinstance(task, GuardedTask) else None
        problem = message.header_problem(
            headers, reserved=_RESERVED, parse_time=maybe_iso8601, eta_horizon_s=horizon,
            now=time.time(),
        )  # fmt: skip
    if problem is None:
        if isinstance(task, GuardedTask) and task.keeps_own_time_limits:
            _drop_time_limits(headers)
        return None
    task_id = headers["id"]
    if not isinstance(task_id, str) or not task_id:
        task_id = f"invalid-id-{uuid.uuid4()}"
    # Only what Celery needs to log the request and hand it to the pool.
    names = ("task", "lang", "argsrepr", "kwargsrepr")
    kept = {name: headers[name] for name in names if isinstance(headers.get(name), str)}
    headers.clear()
    headers.update(kept, id=task_id)
    return problem


def _drop_time_limits(headers: dict[str, Any]) -> None:
    """Run on the task's own time limits, whatever the message asks for."""
    asked = headers.get("timelimit")
    if asked not in (None, [None, None]):
        log.warning(
            "Task %s[%s]: its 'timelimit' header %r is not used: an agent's time limits are "
            "its own", headers.get("task"), headers["id"], asked,
        )  # fmt: skip
    headers["timelimit"] = None


#: What a header must not be called: the methods and properties of Celery's
#: task request, which Celery's ``update`` would overwrite with the header.
_RESERVED: frozenset[str] = frozenset(
    name for name, value in vars(Context).items() if callable(value) or isinstance(value, property)
)


class GuardedTask(Task):  # type: ignore[misc]
    """Base class of every task of a fleet: uses :class:`GuardedRequest` in the worker."""

    Request = GuardedRequest
    #: Whether a message's ``timelimit`` header is ignored for the task's own.
    keeps_own_time_limits: bool = False

    def eta_horizon_s(self) -> float | None:
        """How far ahead a message's ``eta`` may be (None: any)."""
        return None

    def free_orphaned_lease(self, kwargs: dict[str, Any], delivery_tag: str) -> bool:
        """In the worker's main process: delete the lease a lost child held.
        A task that takes no lease has nothing to free."""
        return False
