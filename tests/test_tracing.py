"""Tracing: one trace from a beat tick through the poller's fan-out, and from
an HTTP ingest through the relay to a subscriber; nothing at all when off.

The worker runs in this process (Celery's testing worker, solo pool) against
the test Redis and a real database, with the SDK's in-memory exporter
installed by :func:`fleetworks.tracing.setup_tracing`; the beat tick is sent
by :class:`fleetworks.beat.FleetScheduler` itself, the event arrives through
the real ingest server and is relayed by :class:`fleetworks.events.Relay`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery.beat import ScheduleEntry
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from fleetworks import tracing
from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.models import OUTCOMES, Status
from fleetworks.settings import Settings
from tests.conftest import BROKER_URL, LOCKS_URL, wait_for

PRODUCTS = 4
STAGES = ("fleetworks.lease", "fleetworks.claim", "fleetworks.behaviour", "fleetworks.settle")
#: A caller's own W3C trace context, sent to the ingest endpoint.
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_PARENT = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"


@pytest.fixture
def traced(database_url: str, redis_client: redis.Redis) -> Iterator[tuple[Fleet, Any]]:
    """A fleet of the pricing agents, tracing into memory, with a worker in this process."""
    from celery.contrib.testing.worker import start_worker

    from fleetworks.app import create_app, fleet_of

    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing(Settings(), "fleetworks-test", exporter=exporter) is not None
    settings = Settings(
        broker_url=BROKER_URL, redis_url=LOCKS_URL, database_url=database_url,
        queue=f"otel-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    app = create_app(settings, name=f"otel-{uuid.uuid4().hex[:6]}", modules=["tasks.pricing"])
    app.loader.import_default_modules()
    app.set_current()
    try:
        with start_worker(
            app, pool="solo", concurrency=1, perform_ping_check=False, loglevel="WARNING"
        ):
            yield fleet_of(app), exporter
    finally:
        tracing.shutdown_tracing()


def succeeded(url: str, agent: str) -> list[Any]:
    with transaction(url) as conn:
        return conn.execute(
            select(OUTCOMES).where(
                (OUTCOMES.c.agent == agent) & (OUTCOMES.c.status == Status.SUCCEEDED)
            )
        ).all()


def runs(spans: list[ReadableSpan], task: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == f"run/{task}"]


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """The names of ``span``'s parents, nearest first, as far as they were exported."""
    names: list[str] = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def test_a_beat_tick_and_the_reprices_it_fans_out_share_one_trace(
    traced: tuple[Fleet, Any],
) -> None:
    from fleetworks.beat import FleetScheduler

    fleet, exporter = traced
    url = fleet.settings.database
    scheduler = FleetScheduler(fleet.app)
    entry = ScheduleEntry(
        name="poll-prices", task="pricing.poll", schedule=timedelta(seconds=30),
        kwargs={"payload": {"products": PRODUCTS}}, app=fleet.app,
    )  # fmt: skip
    # When beat sends one tick of the pricing poller
    tick = scheduler.send_tick(entry, datetime(2027, 3, 1, 12, 0, 30, tzinfo=UTC))
    wait_for(lambda: len(succeeded(url, "pricing.reprice")) == PRODUCTS, 60, "the fan-out")
    wait_for(lambda: len(runs(exporter.get_finished_spans(), "pricing.reprice")) == PRODUCTS,
             10, "the reprice run spans")  # fmt: skip
    spans = list(exporter.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}
    # Then the tick is the root of one trace that holds the poll and every reprice
    (root,) = [s for s in spans if s.name == "beat tick poll-prices"]
    assert root.parent is None and root.attributes is not None
    assert root.attributes["fleetworks.tick"] == tick
    trace_id = root.context.trace_id
    (poll,) = runs(spans, "pricing.poll")
    assert poll.context.trace_id == trace_id
    assert ancestors(poll, by_id) == ["apply_async/pricing.poll", "beat tick poll-prices"]
    reprices = runs(spans, "pricing.reprice")
    assert {s.context.trace_id for s in reprices} == {trace_id}
    # (the fan-out's first message is published through send_task, with its
    # own publish span; the rest are built from it, their parent the fan-out)
    published = [run for run in reprices if ancestors(run, by_id)[0].startswith("apply_async/")]
    assert len(published) == 1
    for run in reprices:
        chain = ancestors(run, by_id)
        if run in published:
            chain = chain[1:]
        assert chain[:2] == ["enqueue_many pricing.reprice", "fleetworks.behaviour"], chain
        assert chain[2:] == [
            "run/pricing.poll",
            "apply_async/pricing.poll",
            "beat tick poll-prices",
        ]
    # and each run's guard stages are its children, naming the agent, key,
    # entity and the fencing token its outcome row holds
    rows = {r.idempotency_key: r for r in [*succeeded(url, "pricing.poll"),
                                           *succeeded(url, "pricing.reprice")]}  # fmt: skip
    assert len(rows) == PRODUCTS + 1
    for run in [poll, *reprices]:
        assert run.attributes is not None
        key = str(run.attributes["fleetworks.idempotency_key"])
        children = sorted(
            (s for s in spans if s.parent is not None and s.parent.span_id == run.context.span_id),
            key=lambda s: s.start_time or 0,
        )
        assert [s.name for s in children] == list(STAGES), [s.name for s in children]
        for child in children:
            assert child.attributes is not None
            assert child.attributes["fleetworks.agent"] == run.attributes["fleetworks.agent"]
            assert child.attributes["fleetworks.idempotency_key"] == key
            assert child.attributes["fleetworks.entity"] == rows[key].entity_key
            assert child.attributes["fleetworks.fencing_token"] == rows[key].fencing_token
    assert {str(r.attributes["fleetworks.entity"]) for r in reprices if r.attributes} == {
        rows[k].entity_key for k in rows if k != tick
    }
    scheduler.close()


def test_an_event_taken_over_http_reaches_its_subscriber_in_the_callers_trace(
    traced: tuple[Fleet, Any],
) -> None:
    from fleetworks.events import Relay
    from fleetworks.ingest import serve

    fleet, exporter = traced
    server = serve(fleet, "127.0.0.1", 0)
    try:
        host, port = server.server_address[:2]
        data = {"product": "p-7", "tick": "t-1", "from_cents": 1000, "to_cents": 900}
        request = urllib.request.Request(
            f"http://{host!s}:{port}/events/competitor.price_dropped", method="POST",
            data=json.dumps(data).encode(),
            headers={"Content-Type": "application/json", "traceparent": CALLER_PARENT},
        )  # fmt: skip
        # When a caller posts an event with its own trace context
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 202
    finally:
        server.shutdown()
    # and a relay sends it later, outside any span
    assert Relay(fleet).relay_once() == 1
    wait_for(lambda: succeeded(fleet.settings.database, "pricing.alert"), 30, "the alert")
    wait_for(lambda: runs(exporter.get_finished_spans(), "pricing.alert"), 10, "its run span")
    spans = list(exporter.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}
    # Then the subscriber's run is in the caller's trace, under the relay and the ingest
    (run,) = runs(spans, "pricing.alert")
    assert f"{run.context.trace_id:032x}" == CALLER_TRACE
    assert ancestors(run, by_id) == [
        "apply_async/pricing.alert", "relay competitor.price_dropped",
        "ingest competitor.price_dropped",
    ]  # fmt: skip
    # and the subscriber got the data as posted: the stored trace context is not in it
    (row,) = succeeded(fleet.settings.database, "pricing.alert")
    assert row.payload["data"] == data


def test_an_event_may_not_use_the_reserved_trace_key() -> None:
    from fleetworks.events import EventError, check

    with pytest.raises(EventError, match=r"fleetworks\.trace.*reserved"):
        check("a.b", {tracing.EVENT_TRACE_KEY: {"traceparent": CALLER_PARENT}})


OFF_PROBE = """
import json, sys
import redis
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from fleetworks import tracing
from fleetworks.app import create_app
from fleetworks.batch import batch_queue
from fleetworks.enqueue import enqueue, enqueue_many
from fleetworks.settings import Settings

queue = sys.argv[1]
assert tracing.setup_tracing(Settings(), "off-probe") is None
app = create_app(Settings(queue=queue), name="off-probe", modules=["tasks.pricing"])
app.set_current()
enqueue(app, "pricing.poll", {"tick": "t", "slot": "2027-03-01T12:00:00Z", "entry": "e",
                               "products": 1})
enqueue_many(app, "pricing.reprice", [{"product_id": "p-1", "tick": "t", "window": 1}])
client = redis.Redis.from_url(app.conf.broker_url)
queues = [queue, batch_queue(queue, "pricing.reprice")]  # reprice is a batch agent
headers = [json.loads(raw)["headers"] for q in queues for raw in client.lrange(q, 0, -1)]
client.delete(*queues)
print(json.dumps({
    "provider": type(trace.get_tracer_provider()).__name__,
    "instrumented": CeleryInstrumentor().is_instrumented_by_opentelemetry,
    "enabled": tracing.enabled(),
    "messages": len(headers),
    "traced": [h for h in headers if "traceparent" in h or "tracestate" in h],
}))
"""


def test_with_neither_setting_nothing_is_traced() -> None:
    """A fresh process with neither FLEET_OTEL_ENDPOINT nor FLEET_OTEL_CONSOLE:
    no provider is installed, Celery is not instrumented and no message
    carries a trace context."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_OTEL_", "OTEL_"))}
    env |= {"FLEET_BROKER_URL": BROKER_URL, "FLEET_REDIS_URL": LOCKS_URL}
    queue = f"otel-off-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", OFF_PROBE, queue], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "provider": "ProxyTracerProvider", "instrumented": False, "enabled": False,
        "messages": 2, "traced": [],
    }  # fmt: skip


SIGNAL_PROBE = """
import sys
from celery.signals import beat_init, worker_process_init
from opentelemetry import trace
from fleetworks import tracing
from fleetworks.app import create_app
from fleetworks.settings import Settings

app = create_app(Settings(), name="signal-probe")
app.set_current()
assert not tracing.enabled()
if sys.argv[1] == "worker":
    worker_process_init.send(sender=None)  # as a prefork pool child sends it, after the fork
else:
    beat_init.send(sender=type("Service", (), {"app": app})())
print(tracing.enabled(), type(trace.get_tracer_provider()).__name__)
"""


@pytest.mark.parametrize("process", ["worker", "beat"])
def test_a_pool_process_and_beat_set_tracing_up_from_celerys_signals(process: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_OTEL_", "OTEL_"))}
    env |= {"FLEET_OTEL_CONSOLE": "1", "FLEET_BROKER_URL": BROKER_URL, "FLEET_REDIS_URL": LOCKS_URL}
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_PROBE, process], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "raised" not in done.stderr, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True TracerProvider"


def test_a_bad_endpoint_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="FLEET_OTEL_ENDPOINT 'collector:4318' is not an http"):
        Settings(otel_endpoint="collector:4318")
    assert Settings(otel_endpoint="http://c:4318/").otel_traces_url == "http://c:4318/v1/traces"
    assert Settings(otel_endpoint="http://c/v1/traces").otel_traces_url == "http://c/v1/traces"
