"""Enqueueing from application code, one task and a pipelined fan-out."""

from __future__ import annotations

import base64
import json
import uuid

import redis

from config import app
from fleetworks import constants as c
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
