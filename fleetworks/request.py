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

import json
import logging
import uuid
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.worker.request import Request

from fleetworks import constants as c

log = logging.getLogger(__name__)

#: Keyword argument a :class:`GuardedRequest` puts in place of a body that
#: cannot be handed to the pool; its value says why.
UNRUNNABLE = "unrunnable"


class GuardedRequest(Request):  # type: ignore[misc]
    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        headers = message.headers
        problem: str | None = None
        if isinstance(headers, dict) and "id" not in headers:
            # Celery reads headers["id"] outside its invalid-message handling and
            # would restore and re-crash on this message forever.
            headers["id"] = f"missing-id-{uuid.uuid4()}"
            problem = "message has no 'id' header"
        super().__init__(message, *args, **kwargs)
        self._delivery_info["delivery_tag"] = str(message.delivery_tag or "")
        if problem is None:
            problem = too_deep([self._args, self._kwargs])
        if problem is not None:
            log.error(
                "Task %s[%s] cannot run: %s; it will be rejected", self.name, self.id, problem
            )
            self._replace_body(problem)

    def _replace_body(self, problem: str) -> None:
        """Hand the pool a small body that the guard rejects, naming ``problem``,
        instead of one it cannot take (see :func:`fleetworks.agent.unpack`)."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {"payload": None, UNRUNNABLE: problem}
        decoded: tuple[list[Any], dict[str, Any], dict[str, Any]] = (args, kwargs, {})
        body: Any = decoded
        if not self._decoded:
            body = json.dumps(decoded).encode()
            self._content_type, self._content_encoding = "application/json", "utf-8"
        self._body = body
        self._Request__payload = decoded
        # The decoded arguments also travel to the child inside the request dict.
        self._request_dict["args"] = self._args = args
        self._request_dict["kwargs"] = self._kwargs = kwargs

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


def too_deep(value: Any, limit: int = c.MAX_PAYLOAD_DEPTH) -> str | None:
    """Why ``value`` cannot be handed to a pool child (nesting past ``limit``), or None.

    The prefork pool pickles task arguments recursively: a payload nested a
    few hundred levels deep, valid JSON, overflows the pickler and kills the
    worker's main process, then every worker that receives it after.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return f"payload nested deeper than {limit} levels"
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
    return None


class GuardedTask(Task):  # type: ignore[misc]
    """Base class of every task of a fleet: uses :class:`GuardedRequest` in the worker."""

    Request = GuardedRequest
