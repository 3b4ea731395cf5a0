"""Enqueueing agent work from application code.

``enqueue`` sends one task; ``enqueue_many`` publishes a batch over one
producer connection. Both send ``payload`` and the optional explicit
idempotency ``key`` as the agent task's keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery


def _options(queue: str | None) -> dict[str, Any]:
    return {"queue": queue} if queue else {}


def enqueue(
    app: Celery, agent: str, payload: Any, key: str | None = None, queue: str | None = None
) -> str:
    """Send one task to ``agent``; returns the task id."""
    kwargs: dict[str, Any] = {"payload": payload}
    if key is not None:
        kwargs["key"] = key
    return str(app.send_task(agent, kwargs=kwargs, **_options(queue)).id)


def enqueue_many(
    app: Celery, agent: str, payloads: Iterable[Any], queue: str | None = None
) -> list[str]:
    """Send one task per payload over one producer; returns the task ids in order."""
    ids: list[str] = []
    options = _options(queue)
    with app.producer_or_acquire() as producer:
        for payload in payloads:
            sent = app.send_task(agent, kwargs={"payload": payload}, producer=producer, **options)
            ids.append(str(sent.id))
    return ids
