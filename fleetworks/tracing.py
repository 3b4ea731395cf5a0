"""Tracing with OpenTelemetry: one trace per piece of work, across processes.

Off unless ``FLEET_OTEL_ENDPOINT`` (an OTLP/HTTP collector) or
``FLEET_OTEL_CONSOLE`` (spans printed as JSON on standard output) is set.
Off, :func:`setup_tracing` installs nothing: no ``TracerProvider`` (the API's
no-op one stays), the Celery instrumentation is not connected, no header is
added to any message, and every helper below returns a null context before
touching OpenTelemetry at all, so the overhead is a flag test per stage.
The standard ``OTEL_*`` variables still apply when it is on (the exporter's
``OTEL_EXPORTER_OTLP_HEADERS``, the sampler's ``OTEL_TRACES_SAMPLER``).

Where it is set up: every process fleetworks starts calls
:func:`setup_tracing` once. A worker's pool process does it on Celery's
``worker_process_init`` (after the fork, as the instrumentation requires for
the batch exporter's thread; the solo pool sends it too), a worker whose pool
sends no such signal (threads) on ``worker_init``; beat on ``beat_init``;
``fleetworks relay``, ``ingest``, ``enqueue`` and ``up`` in the command.

Whose spans:

* the instrumentation's (``opentelemetry-instrumentation-celery``):
  ``apply_async/<task>`` around every publish (Celery's
  ``before_task_publish``/``after_task_publish`` signals, which fire for
  every ``send_task``, pipelined ones in ``Producer.batch`` included), and
  ``run/<task>`` around every run (``task_prerun``/``task_postrun``), whose
  parent is the publish span, read from the ``traceparent`` header the
  publish wrote into the message headers;
* ours: the guard's stages ``fleetworks.lease``, ``fleetworks.claim``,
  ``fleetworks.behaviour`` and ``fleetworks.settle``, children of the run
  span, with ``fleetworks.agent``, ``fleetworks.idempotency_key``,
  ``fleetworks.entity`` and ``fleetworks.fencing_token`` (the run span gets
  the first three too); ``beat tick <entry>``, the root of each tick's trace;
  ``enqueue_many <agent>`` around a fan-out (on a Redis broker its
  messages, but the first, carry this span's context, not a publish span
  each: see :mod:`fleetworks.enqueue`); ``relay <topic>``
  around the sending of one event to its subscribers; ``ingest <topic>``
  around an event taken over HTTP (its parent is the request's own
  ``traceparent`` header, when the caller sends one).

How context crosses:

* a fan-out (``enqueue_many`` in a behaviour): the publishes run inside the
  behaviour span, so each ``run/pricing.reprice`` hangs under the
  ``run/pricing.poll`` that sent it, through the ``enqueue_many`` span (and,
  for the first message, or every one on a broker other than Redis, its
  ``apply_async`` span);
* a retry, the reaper's republish of an orphaned claim and a wait's
  continuation are publishes like any other: their parent is the run (the
  reaper's own, the relay's) that sent them; a stranded message the reaper
  restores keeps its original headers, so it stays in its original trace;
* an event: the relay sends it later, in another process. The emitter's
  trace context (``traceparent``, ``tracestate``) is stored with the event,
  inside its ``data`` JSON under the reserved key :data:`EVENT_TRACE_KEY`
  (no column is added; :func:`fleetworks.events.to_event` takes it out, so
  subscribers and readers never see it, and an event may not use the key).
  The relay's ``relay <topic>`` span is a child of that context (a parent,
  not a link), so the subscriber runs join the emitter's trace.

Exceptions that only steer the guard (a duplicate skipped, a retry asked
for) end a stage span with ``fleetworks.ended`` set, not as an error; any
other exception is recorded on the span with an error status.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init, worker_process_shutdown
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from fleetworks.settings import Settings, get_settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

#: Instrumentation scope of fleetworks' own spans.
TRACER_NAME: Final = "fleetworks"
#: Key of an event's ``data`` that carries its emitter's trace context.
EVENT_TRACE_KEY: Final = "fleetworks.trace"
#: Pools that send ``worker_process_init`` in the process that runs the tasks.
_POOLS_WITH_PROCESS_INIT: Final = ("prefork", "solo")

_lock = threading.Lock()
_provider: TracerProvider | None = None

Attributes = Mapping[str, str | int | float | bool]


def setup_tracing(
    settings: Settings, service_name: str, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Install tracing in this process if ``settings`` ask for it; idempotent.

    Returns the installed provider, or None when tracing stays off. With
    ``exporter`` (tests), spans also go to it, one by one as they end, and
    tracing is on whatever the settings say.
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        url = settings.otel_traces_url
        if url is None and not settings.otel_console and exporter is None:
            return None
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        resource = Resource.create(
            {"service.name": service_name, "service.instance.id": f"{os.uname()[1]}/{os.getpid()}"}
        )
        provider = TracerProvider(resource=resource)
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        if url is not None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        if settings.otel_console:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
        _provider = provider
        log.info("tracing on: %s to %s", service_name,
                 ", ".join(x for x in (url, "console" if settings.otel_console else None,
                                       "test exporter" if exporter else None) if x))  # fmt: skip
        return provider


def shutdown_tracing() -> None:
    """Export what is buffered, disconnect the Celery instrumentation and turn
    fleetworks' spans off in this process. The global provider stays (the
    OpenTelemetry API sets it once per process), ended."""
    global _provider
    with _lock:
        if _provider is None:
            return
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
        _provider.shutdown()
        _provider = None


def enabled() -> bool:
    """Whether this process traces."""
    return _provider is not None


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans still buffered (a process about to end)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def _tracer() -> trace.Tracer:
    assert _provider is not None
    return _provider.get_tracer(TRACER_NAME)


@contextmanager
def _span(
    name: str,
    attributes: Attributes,
    *,
    parent: otel_context.Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    quiet: tuple[type[BaseException], ...] = (),
) -> Iterator[Span]:
    with _tracer().start_as_current_span(
        name, context=parent, kind=kind, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        try:
            yield span
        except quiet as exc:
            span.set_attribute("fleetworks.ended", f"{type(exc).__name__}: {exc}")
            raise
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise


def _off() -> AbstractContextManager[Span]:
    return nullcontext(INVALID_SPAN)


def run_attributes(agent: str, key: str, entity: str) -> None:
    """Name the agent, key and entity on the current span (the Celery run span)."""
    if _provider is None:
        return
    span = trace.get_current_span()
    span.set_attribute("fleetworks.agent", agent)
    span.set_attribute("fleetworks.idempotency_key", key)
    span.set_attribute("fleetworks.entity", entity)


def stage(
    name: str,
    *,
    agent: str,
    key: str,
    entity: str,
    fencing_token: int | None = None,
    quiet: tuple[type[BaseException], ...] = (),
) -> AbstractContextManager[Span]:
    """The span of one guard stage (``lease``, ``claim``, ``behaviour``, ``settle``).

    Exceptions of the ``quiet`` types are the guard's control flow, not errors.
    """
    if _provider is None:
        return _off()
    attributes: dict[str, str | int] = {
        "fleetworks.agent": agent, "fleetworks.idempotency_key": key, "fleetworks.entity": entity,
    }  # fmt: skip
    if fencing_token is not None:
        attributes["fleetworks.fencing_token"] = fencing_token
    return _span(f"fleetworks.{name}", attributes, quiet=quiet)


def beat_tick(entry: str, tick_id: str) -> AbstractContextManager[Span]:
    """The root span of one beat tick: the poller's run and its fan-out join its trace."""
    if _provider is None:
        return _off()
    attributes = {"fleetworks.beat.entry": entry, "fleetworks.tick": tick_id}
    return _span(f"beat tick {entry}", attributes, parent=otel_context.Context(),
                 kind=SpanKind.PRODUCER)  # fmt: skip


def fan_out(agent: str) -> AbstractContextManager[Span]:
    """The span around one pipelined ``enqueue_many``: its publishes share a parent."""
    if _provider is None:
        return _off()
    return _span(f"enqueue_many {agent}", {"fleetworks.agent": agent}, kind=SpanKind.PRODUCER)


def current_carrier() -> dict[str, str]:
    """The current trace context as message headers (``traceparent``,
    ``tracestate``); empty when tracing is off."""
    carrier: dict[str, str] = {}
    if _provider is not None:
        propagate.inject(carrier)
    return carrier


def incoming(name: str, headers: Any, attributes: Attributes) -> AbstractContextManager[Span]:
    """A server span for a request from outside, continuing the caller's
    ``traceparent`` header when it sends one."""
    if _provider is None:
        return _off()
    parent = propagate.extract(headers)
    return _span(name, attributes, parent=parent, kind=SpanKind.SERVER)


def with_event_trace(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the current trace context under :data:`EVENT_TRACE_KEY`
    (``data`` itself when there is none)."""
    if _provider is None:
        return data
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return data
    return {**data, EVENT_TRACE_KEY: carrier}


def without_event_trace(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as the emitter gave it: without :data:`EVENT_TRACE_KEY`."""
    if EVENT_TRACE_KEY not in data:
        return data
    return {k: v for k, v in data.items() if k != EVENT_TRACE_KEY}


def relaying(data: Mapping[str, Any], topic: str, event_id: str) -> AbstractContextManager[Span]:
    """The relay's span for one stored event, a child of its emitter's context
    (stored in ``data``), else the root of a trace of its own."""
    if _provider is None:
        return _off()
    stored = data.get(EVENT_TRACE_KEY)
    carrier = stored if isinstance(stored, dict) else {}
    parent = propagate.extract(carrier) if carrier else otel_context.Context()
    attributes = {"fleetworks.event_id": event_id, "fleetworks.topic": topic}
    return _span(f"relay {topic}", attributes, parent=parent, kind=SpanKind.PRODUCER)


# -- the processes Celery starts ------------------------------------------------


def _settings_of(app: Celery | None) -> Settings:
    from fleetworks.agent import Fleet

    if app is not None:
        try:
            return Fleet.of(app).settings
        except LookupError:
            pass
    return get_settings()


def _pool_name(pool: Any) -> str:
    if isinstance(pool, str):
        return pool.rsplit(":", 1)[-1].lower()
    return str(getattr(pool, "__module__", "")).rsplit(".", 1)[-1].lower()


@worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _in_pool_process(**_: Any) -> None:
    """A prefork pool child (after the fork), or the solo pool's worker."""
    from celery import current_app

    setup_tracing(_settings_of(current_app._get_current_object()), "fleetworks-worker")


@worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _in_worker(sender: Any = None, **_: Any) -> None:
    """A worker whose pool runs tasks in this process without ``worker_process_init``."""
    if sender is None or _pool_name(getattr(sender, "pool_cls", "")) in _POOLS_WITH_PROCESS_INIT:
        return
    setup_tracing(_settings_of(getattr(sender, "app", None)), "fleetworks-worker")


@worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _pool_process_ends(**_: Any) -> None:
    flush()


@beat_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _in_beat(sender: Any = None, **_: Any) -> None:
    setup_tracing(_settings_of(getattr(sender, "app", None)), "fleetworks-beat")


__all__ = ["EVENT_TRACE_KEY", "enabled", "flush", "setup_tracing", "shutdown_tracing"]
