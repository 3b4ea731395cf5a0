"""Structured logs: JSON lines with the run's fields, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fleetworks import logs
from tests.conftest import start_worker, wait_for


def _render(fmt: str, emit: Any) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(fmt))  # type: ignore[arg-type]
    logger = logging.getLogger("fleetworks.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().splitlines()


def test_a_json_line_has_time_level_logger_message_and_the_runs_fields() -> None:
    def emit(logger: logging.Logger) -> None:
        with logs.bind_run(agent="probe.run", task_id="t-1", worker="w/1"):
            logs.bind(idempotency_key="probe:a", entity="probe:a", fencing_token=7, attempt=2)
            logger.warning("inside %s", "the run")
        logger.info("outside")

    inside, outside = (json.loads(line) for line in _render("json", emit))
    assert inside["message"] == "inside the run"
    assert inside["level"] == "warning" and inside["logger"] == "fleetworks.test.logs"
    assert inside["time"].endswith("Z") and "T" in inside["time"]
    assert {k: inside[k] for k in logs.RUN_FIELDS} == {
        "agent": "probe.run", "task_id": "t-1", "idempotency_key": "probe:a",
        "entity": "probe:a", "fencing_token": 7, "attempt": 2, "worker": "w/1",
    }  # fmt: skip
    assert not set(logs.RUN_FIELDS) & set(outside), "a run's fields end with the run"


def test_secrets_are_redacted_in_messages_and_fields() -> None:
    def emit(logger: logging.Logger) -> None:
        logger.warning(
            "broker redis://:hunter2@redis:6379/0 down",
            extra={"password": "hunter2", "fencing_token": 9},
        )

    (line,) = _render("json", emit)
    assert "hunter2" not in line
    got = json.loads(line)
    assert got["message"] == "broker redis://:***@redis:6379/0 down"
    assert got["password"] == "***" and got["fencing_token"] == 9


def test_an_exception_is_a_field_with_its_traceback() -> None:
    def emit(logger: logging.Logger) -> None:
        try:
            raise ValueError("bad value")
        except ValueError:
            logger.exception("failed")

    (line,) = _render("json", emit)
    assert "ValueError: bad value" in json.loads(line)["exception"]


def test_the_current_spans_trace_id_is_on_the_line() -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    context = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))

    def emit(logger: logging.Logger) -> None:
        with trace.use_span(NonRecordingSpan(context)):
            logger.info("traced")

    (line,) = _render("json", emit)
    got = json.loads(line)
    assert got["trace_id"] == format(0xABC, "032x") and got["span_id"] == format(0xDEF, "016x")


def test_auto_is_text_on_a_terminal_and_json_elsewhere(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.chosen("auto", Terminal()) == "text"
    assert logs.chosen("auto", io.StringIO()) == "json"
    assert logs.chosen("text", io.StringIO()) == "text"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_writes_one_json_object_per_line_with_the_runs_fields(
    database_url: str, tmp_path: Path
) -> None:
    # Given a worker logging JSON, and a key whose first attempt fails
    w = start_worker(database_url, tmp_path, "jsonlogs", FLEET_LOG_FORMAT="json")
    try:
        w.enqueue("probe.run", {"id": "logged", "fail_attempts": 1})
        log_file = tmp_path / "jsonlogs.log"

        def retried() -> list[dict[str, Any]]:
            lines = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
            return [x for x in lines if "attempt 1 failed" in x.get("message", "")]

        (failed,) = wait_for(retried, 30, "the failed attempt logged")
        wait_for(lambda: "succeeded" in log_file.read_text(), 30, "the retry succeeded")
        # Then every line the running worker wrote is one JSON object
        lines = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
    finally:
        w.child.stop(15)
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    # And the line written inside the run names the run
    assert failed["agent"] == "probe.run" and failed["idempotency_key"] == "probe:logged"
    assert failed["entity"] == "probe:logged" and failed["attempt"] == 1
    assert failed["fencing_token"] >= 1 and failed["task_id"] and failed["worker"]
