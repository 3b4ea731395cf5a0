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
  the first three too); for a batch agent (:mod:`fleetworks.batch`), whose
  run carries many messages, a ``run/<agent>`` span per key of our own (see
  :class:`BatchSpans`); ``beat tick <entry>``, the root of each tick's trace;
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
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init, worker_process_shutdown
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode

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


def request_carrier(request: Any) -> dict[str, str]:
    """The trace context a delivered message carries (its ``traceparent`` and
    ``tracestate`` headers, which Celery sets on the task request); empty
    when tracing is off."""
    if _provider is None:
        return {}
    found = {name: getattr(request, name, None) for name in ("traceparent", "tracestate")}
    return {name: value for name, value in found.items() if isinstance(value, str)}


def message_carrier(headers: Mapping[str, Any]) -> dict[str, str]:
    """The trace context in a raw message's headers; empty when tracing is off."""
    if _provider is None:
        return {}
    found = {name: headers.get(name) for name in ("traceparent", "tracestate")}
    return {name: value for name, value in found.items() if isinstance(value, str)}


class BatchSpans:
    """The spans of one batch run: each key traced as if it ran alone.

    A batch run is one Celery run (the delivered message's ``run/<agent>``
    span, renamed ``batch/<agent>`` and given ``fleetworks.batch_size``) that
    settles many messages. Each message whose key was read gets a
    ``run/<agent>`` span of its own, whose parent is that message's publish
    context (so it sits in its sender's trace, as a single run would) and
    which links to the batch span; under it the guard stages in their order.
    ``lease``, ``claim`` and ``settle`` are shared by the batch (one script,
    one statement, one transaction): their spans carry the shared start and
    end and ``fleetworks.batch_size``; ``behaviour`` is the key's own, current
    while it runs so what it does (a fan-out, an event) is its child, except
    under a batch behaviour (``Batch(together=...)``), which is one call for
    every key and so a shared stage too. A key
    the guard ended or deferred has ``fleetworks.ended`` on its span. Every
    method returns at once while tracing is off.
    """

    def __init__(self, agent: str, size: int) -> None:
        self.on = _provider is not None
        self.agent, self.size = agent, size
        self._marks: dict[str, tuple[int, int]] = {}
        self._open: dict[int, Span] = {}
        self._batch: Span = INVALID_SPAN
        if self.on:
            self._batch = trace.get_current_span()
            self._batch.update_name(f"batch/{agent}")
            self._batch.set_attribute("fleetworks.agent", agent)
            self._batch.set_attribute("fleetworks.batch_size", size)

    def mark(self, stage: str, start: int | None = None) -> int:
        """Record the shared ``stage`` as running from ``start`` (an earlier
        return of this method) to now; returns now, in nanoseconds."""
        now = time.time_ns()
        if self.on and start is not None:
            self._marks[stage] = (start, now)
        return now

    def _attributes(self, key: str, entity: str, token: int | None) -> dict[str, str | int]:
        attributes: dict[str, str | int] = {
            "fleetworks.agent": self.agent, "fleetworks.idempotency_key": key,
            "fleetworks.entity": entity,
        }  # fmt: skip
        if token is not None:
            attributes["fleetworks.fencing_token"] = token
        return attributes

    def _item(
        self, ref: int, carrier: Mapping[str, str], key: str, entity: str, token: int | None
    ) -> Span:
        span = self._open.get(ref)
        if span is not None:
            return span
        tracer = _tracer()
        parent = propagate.extract(carrier) if carrier else otel_context.Context()
        attributes = self._attributes(key, entity, token)
        first = min((start for start, _ in self._marks.values()), default=time.time_ns())
        span = tracer.start_span(
            f"run/{self.agent}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes,
            links=[Link(self._batch.get_span_context())], start_time=first,
        )  # fmt: skip
        self._open[ref] = span
        inside = trace.set_span_in_context(span)
        shared = {**attributes, "fleetworks.batch_size": self.size}
        for stage in ("lease", "claim"):
            if stage == "claim" and token is None:
                break  # no lease: it never reached the claim
            if stage in self._marks:
                start, end = self._marks[stage]
                tracer.start_span(
                    f"fleetworks.{stage}", context=inside, attributes=shared, start_time=start
                ).end(end_time=end)
        return span

    @contextmanager
    def behaviour(
        self, ref: int, carrier: Mapping[str, str], key: str, entity: str, token: int
    ) -> Iterator[None]:
        """Around one key's behaviour: its run span (opened here) and its stage span."""
        if not self.on:
            yield
            return
        span = self._item(ref, carrier, key, entity, token)
        with (
            trace.use_span(span, end_on_exit=False),
            _span("fleetworks.behaviour", self._attributes(key, entity, token)),
        ):
            yield

    def end(
        self,
        ref: int,
        carrier: Mapping[str, str],
        key: str,
        entity: str,
        *,
        token: int | None,
        ended: str | None,
    ) -> None:
        """Close one key's run span (opening it if its key never ran), with the
        shared settle stage when it was settled, or ``fleetworks.ended``."""
        if not self.on:
            return
        ran_alone = ref in self._open
        span = self._item(ref, carrier, key, entity, token)
        if ended is not None:
            span.set_attribute("fleetworks.ended", ended)
        else:
            shared = {**self._attributes(key, entity, token), "fleetworks.batch_size": self.size}
            # A key settled by the batch behaviour (Batch.together) shares its stage.
            stages = ("settle",) if ran_alone else ("behaviour", "settle")
            for stage in stages:
                if stage in self._marks:
                    start, end = self._marks[stage]
                    _tracer().start_span(
                        f"fleetworks.{stage}", context=trace.set_span_in_context(span),
                        attributes=shared, start_time=start,
                    ).end(end_time=end)  # fmt: skip
        span.end()
        del self._open[ref]

    def abort(self, exc: BaseException) -> None:
        """End every span still open with ``exc`` (the batch did not settle)."""
        for span in self._open.values():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
        self._open.clear()


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


__all__ = ["EVENT_TRACE_KEY", "BatchSpans", "enabled", "flush", "setup_tracing", "shutdown_tracing"]
