"""What fleetworks reads of Celery's and kombu's private internals still exists.

Every such use lives in :mod:`fleetworks.kombu_redis`; these tests exercise
each one against the installed Celery and kombu, so an upgrade that moves
them fails here, by name, instead of in production.
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import redis
from celery.worker.request import Request

from fleetworks import constants as c
from fleetworks import kombu_redis
from fleetworks.app import create_app
from fleetworks.settings import Settings
from tests.conftest import BROKER_URL, LOCKS_URL


def test_the_installed_versions_have_everything_the_adapter_uses() -> None:
    app = create_app(Settings(broker_url=BROKER_URL, redis_url=LOCKS_URL), name="contract")
    with app.connection_for_write() as conn:
        assert kombu_redis.contract_problems(conn.default_channel, Request) == []


def test_priority_lists_name_the_lists_kombu_pushes_to() -> None:
    app = create_app(Settings(broker_url=BROKER_URL, redis_url=LOCKS_URL), name="contract")
    queue = f"contract-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(BROKER_URL)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        lists = kombu_redis.priority_lists(channel, queue)
        for priority in (0, 9):
            app.send_task("x", kwargs={}, queue=queue, priority=priority)
        assert sum(client.llen(name) for name in lists) == 2
    for name in lists:
        client.delete(name)


def test_an_unacked_message_is_seen_decoded_and_restored(sqlite_url: str) -> None:
    """A delivered, unacknowledged message sits in kombu's unacked hash; the
    adapter sees it, decodes its body and gives it back to its queue."""
    app = create_app(Settings(broker_url=BROKER_URL, redis_url=LOCKS_URL), name="contract")
    queue = f"contract-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(BROKER_URL)
    app.send_task("probe.run", kwargs={"payload": {"id": "u"}, "key": "k"}, queue=queue)
    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get(queue, no_ack=False)
        assert message is not None  # delivered, not acknowledged
        held = [
            m for m in kombu_redis.stranded_messages(app, time.time() + 1, 1000) if m.queue == queue
        ]
        assert len(held) == 1 and held[0].headers["task"] == "probe.run"
        assert kombu_redis.decode_body(held[0].body) == ([], {"payload": {"id": "u"}, "key": "k"})
        kombu_redis.restore(app, held[0].tag)
        assert (
            sum(client.llen(n) for n in kombu_redis.priority_lists(conn.default_channel, queue))
            == 1
        )
        assert client.hget(kombu_redis.unacked_key(conn.default_channel), held[0].tag) is None
    for name in kombu_redis.priority_lists(conn.default_channel, queue):
        client.delete(name)


def test_a_fleet_worker_reaps_dead_pool_children_with_the_pools_own_method() -> None:
    from celery.concurrency.asynpool import AsynPool
    from celery.worker import components

    app = create_app(Settings(broker_url=BROKER_URL, redis_url=LOCKS_URL), name="contract")
    assert kombu_redis.PromptReap in app.steps["worker"]
    assert callable(AsynPool.maintain_pool)
    # (a worker started in this process resolves the name into the step itself)
    (needs,) = kombu_redis.PromptReap.requires
    assert needs in (f"{components.__name__}:Pool", components.Pool)
    assert hasattr(components, "Pool")


def test_enqueue_many_builds_the_message_kombu_would_push() -> None:
    """``enqueue_many`` sends its first message through ``send_task`` and builds
    the rest itself (7. in the adapter): the same JSON, key for key, in the
    same order, but for what differs per message."""
    from config import app as fleet_app
    from fleetworks.batch import batch_queue
    from fleetworks.enqueue import enqueue_many

    base = f"contract-{uuid.uuid4().hex[:6]}"
    queue = batch_queue(base, "pricing.reprice")  # (a batch agent's own queue)
    client = redis.Redis.from_url(BROKER_URL)
    payloads = [{"product_id": f"p-{i}", "tick": "t", "window": i} for i in range(2)]
    try:
        ids = enqueue_many(
            fleet_app, "pricing.reprice", payloads, queue=base, key=lambda p: p["product_id"]
        )
        by_send_task, built = (json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1)))
    finally:
        client.delete(queue)
    assert [by_send_task["headers"]["id"], built["headers"]["id"]] == ids
    assert list(built) == list(by_send_task)
    assert list(built["headers"]) == list(by_send_task["headers"])
    assert list(built["properties"]) == list(by_send_task["properties"])
    per_message = {"id", "root_id", "kwargsrepr", c.SENT_AT_HEADER}
    assert {k: v for k, v in built["headers"].items() if k not in per_message} == {
        k: v for k, v in by_send_task["headers"].items() if k not in per_message
    }
    own = {"correlation_id", "delivery_tag"}
    assert {k: v for k, v in built["properties"].items() if k not in own} == {
        k: v for k, v in by_send_task["properties"].items() if k not in own
    }
    assert built["properties"]["correlation_id"] == built["headers"]["id"]
    assert built["headers"]["root_id"] == built["headers"]["id"]
    assert built["properties"]["delivery_tag"] != by_send_task["properties"]["delivery_tag"]
    for message, payload in zip((by_send_task, built), payloads, strict=True):
        kwargs = {"payload": payload, "key": payload["product_id"]}
        assert message["headers"]["kwargsrepr"] == repr(kwargs)
        assert kombu_redis.decode_body(message["body"]) == ([], kwargs)
    embeds = [json.loads(base64.b64decode(m["body"]))[2] for m in (by_send_task, built)]
    assert embeds[0] == embeds[1]
