"""Structured logs: one JSON object per line, or human text, from every fleet process.

``FLEET_LOG_FORMAT`` chooses: ``json`` (one object per line), ``text`` (the
usual Celery lines), or ``auto`` (the default: ``text`` when the process
writes to a terminal, ``json`` when it writes to a file or a pipe, as under
``fleetworks up``, compose and Kubernetes, where a log collector reads it).

Every JSON line has ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``message`` and ``process``; a line written inside a guarded run adds the
run's ``agent``, ``task_id``, ``idempotency_key``, ``entity``,
``fencing_token``, ``attempt`` and ``worker`` (bound by the guard with
:func:`bind_run`), and ``trace_id``/``span_id`` while an OpenTelemetry span
is current. Exceptions are a ``exception`` field with the traceback.

structlog formats the records (its ``ProcessorFormatter`` on the standard
``logging`` handlers): Celery, kombu and every library keep logging through
``logging`` and are rendered the same way. Celery workers and beat set up
their handlers themselves; :func:`celery_logger_ready` (connected to Celery's
``after_setup_logger`` and ``after_setup_task_logger``) swaps the formatter
on those handlers, so Celery keeps choosing where logs go (``--logfile``,
stderr). The CLI calls :func:`configure`.

One exception, Celery's: the notices its signal handlers print on a warm or
cold shutdown (``worker: Warm shutdown (MainProcess)``) are written with a
raw ``os.write``, since logging is not safe inside a signal handler.

Secrets never reach a line: any ``scheme://user:password@`` in a message or
a field becomes ``scheme://user:***@``, and fields named like a password,
secret or token (``fencing_token`` aside, a number) are replaced.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Literal

import structlog
from structlog.types import EventDict, Processor

LogFormat = Literal["auto", "json", "text"]

#: Fields a guarded run binds to every line it logs.
RUN_FIELDS = (
    "agent",
    "task_id",
    "idempotency_key",
    "entity",
    "fencing_token",
    "attempt",
    "worker",
)

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_SECRET_NAME = re.compile(r"password|secret|passwd|token|authorization", re.IGNORECASE)
_NOT_SECRET = frozenset({"fencing_token"})

_format: LogFormat = "auto"


def redact_text(text: str) -> str:
    """``text`` with every URL password replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def _redact(_: Any, __: str, event: EventDict) -> EventDict:
    for name, value in list(event.items()):
        if _SECRET_NAME.search(name) and name not in _NOT_SECRET and value is not None:
            event[name] = "***"
        elif isinstance(value, str):
            event[name] = redact_text(value)
    return event


def _trace_ids(_: Any, __: str, event: EventDict) -> EventDict:
    """``trace_id`` and ``span_id`` of the current OpenTelemetry span, if any."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def _process_name(_: Any, __: str, event: EventDict) -> EventDict:
    event.setdefault("process", os.getpid())
    return event


def _message_field(_: Any, __: str, event: EventDict) -> EventDict:
    event["message"] = event.pop("event", "")
    return event


def _pre_chain() -> list[Processor]:
    """What every record goes through, structlog's own and the standard library's."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        _process_name,
        _trace_ids,
    ]


def formatter(fmt: Literal["json", "text"]) -> logging.Formatter:
    """A ``logging`` formatter rendering records as ``fmt``."""
    if fmt == "json":
        renderer: list[Processor] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _message_field,
            _redact,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        renderer = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redact,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    return structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_pre_chain(), processors=renderer)


def chosen(fmt: LogFormat | None = None, stream: Any = None) -> Literal["json", "text"]:
    """What ``auto`` means for ``stream`` (default stderr): text on a terminal."""
    fmt = fmt or _format
    if fmt != "auto":
        return fmt
    stream = stream if stream is not None else sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def use(fmt: LogFormat) -> None:
    """The format this process renders (set from the fleet's settings).

    In JSON, a process with no log handler yet gets one on stderr at once, so
    what it says before Celery sets up its own (a warning at start-up) is a
    JSON line too; Celery then replaces it with its handlers, which
    :func:`celery_logger_ready` renders the same way.
    """
    global _format
    _format = fmt
    root = logging.getLogger()
    if not root.handlers and chosen(fmt) == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter("json"))
        root.addHandler(handler)
        logging.captureWarnings(True)


def configure(level: str = "INFO", fmt: LogFormat | None = None) -> None:
    """Set up the root logger of a fleet process that is not a Celery worker or beat."""
    if fmt is not None:
        use(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(chosen(stream=sys.stderr)))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    _configure_structlog()


def _configure_structlog() -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def celery_logger_ready(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery set up ``logger``'s handlers: render them in the chosen format.

    In ``text``, Celery's own format stays (``[time: LEVEL/process] message``).
    """
    if logger is None:
        return
    _configure_structlog()
    logging.captureWarnings(True)  # warnings are log lines too (py.warnings)
    for handler in logger.handlers:
        fmt = chosen(stream=getattr(handler, "stream", None))
        if fmt == "json":
            handler.setFormatter(formatter("json"))


def quiet_worker_banner(instance: Any = None, **_: Any) -> None:
    """In JSON, a worker prints no start-up banner (its facts are log lines)."""
    if instance is not None and chosen(stream=sys.__stdout__) == "json":
        instance.quiet = True


def celery_global_args() -> list[str]:
    """``celery`` options before the command: ``--quiet`` (no banner) in JSON."""
    return ["--quiet"] if chosen(stream=sys.__stdout__) == "json" else []


@contextmanager
def bind_run(**fields: Any) -> Iterator[None]:
    """Bind a run's fields to every line logged inside the block (this thread/task)."""
    structlog.contextvars.bind_contextvars(**fields)
    try:
        yield
    finally:
        structlog.contextvars.unbind_contextvars(*RUN_FIELDS, *fields)


def bind(**fields: Any) -> None:
    """Add fields to the current run's lines (known once a stage has run)."""
    structlog.contextvars.bind_contextvars(**fields)


def bound() -> MutableMapping[str, Any]:
    """The fields bound now (for tests and reports)."""
    return structlog.contextvars.get_contextvars()


__all__ = [
    "RUN_FIELDS",
    "LogFormat",
    "bind",
    "bind_run",
    "bound",
    "celery_logger_ready",
    "chosen",
    "configure",
    "formatter",
    "redact_text",
    "use",
]
