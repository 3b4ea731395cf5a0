"""Enqueueing from application code, one task and a pipelined fan-out."""

from __future__ import annotations

import base64
import json
import uuid

import redis
from celery.signals import before_task_publish

from config import app
from fleetworks import constants as c
from fleetworks.batch import batch_queue
from fleetworks.enqueue import enqueue, enqueue_many
from tests.conftest import BROKER_URL


def queued(client: redis.Redis, queue: str) -> list[dict[str, object]]:
    """The kwargs of every message waiting in ``queue``, oldest first."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append({"id": message["headers"]["id"], **body[1]})
    return out


def test_a_fan_out_larger_than_one_pipeline_arrives_whole_and_in_order() -> None:
    client = redis.Redis.from_url(BROKER_URL)
    queue = f"fanout-{uuid.uuid4().hex[:8]}"
    n = c.PUBLISH_BATCH * 2 + 7  # three pipelines, the last one partial
    payloads = [{"product_id": f"sku-{i}", "tick": "t@1", "window": 1} for i in range(n)]
    try:
        ids = enqueue_many(
            app, "pricing.reprice", payloads, queue=queue, key=lambda p: f"{p['product_id']}|t@1"
        )
        # (reprice is a batch agent: its messages go to its own queue beside ``queue``)
        queue = batch_queue(queue, "pricing.reprice")
        messages = queued(client, queue)
        assert [m["id"] for m in messages] == ids
        assert [m["payload"] for m in messages] == payloads
        assert messages[-1]["key"] == f"sku-{n - 1}|t@1"
        assert all(
            c.SENT_AT_HEADER in json.loads(raw)["headers"] for raw in client.lrange(queue, 0, 2)
        )
    finally:
        client.delete(queue)


def test_one_task_carries_its_explicit_key() -> None:
    client = redis.Redis.from_url(BROKER_URL)
    queue = f"one-{uuid.uuid4().hex[:8]}"
    try:
        task_id = enqueue(app, "probe.run", {"id": "job-7"}, key="job-7", queue=queue)
        assert queued(client, queue) == [
            {"id": task_id, "payload": {"id": "job-7"}, "key": "job-7"}
        ]
    finally:
        client.delete(queue)


def test_a_fan_out_goes_through_send_task_when_a_foreign_publish_receiver_listens() -> None:
    """A ``before_task_publish`` receiver of the application's own must see
    every message: then ``enqueue_many`` does not build messages itself."""
    client = redis.Redis.from_url(BROKER_URL)
    queue = f"fanout-{uuid.uuid4().hex[:8]}"
    seen: list[str] = []

    def stamp(headers: dict[str, object] | None = None, **_: object) -> None:
        if headers is not None:
            headers["x-tenant"] = "acme"
            seen.append(str(headers["id"]))

    before_task_publish.connect(stamp, weak=False)
    try:
        payloads = [{"product_id": f"sku-{i}", "tick": "t@2", "window": 2} for i in range(5)]
        ids = enqueue_many(app, "pricing.reprice", payloads, queue=queue)
        queue = batch_queue(queue, "pricing.reprice")
        assert seen == ids
        headers = [json.loads(raw)["headers"] for raw in client.lrange(queue, 0, -1)]
        assert [h["x-tenant"] for h in headers] == ["acme"] * 5
    finally:
        before_task_publish.disconnect(stamp)
        client.delete(queue)
