"""Hostile input against a real worker: bad payloads, bad keys, bad broker messages.

Whatever arrives, the worker keeps serving, a payload that reaches an agent
task becomes exactly one ``rejected`` outcome row with a reason that names
the problem, nothing that Celery cannot parse is run or redelivered forever,
and pickle is never deserialized.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import func, select

from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES, PROBE_EFFECTS
from fleetworks.proving.probe import Probe
from tests.conftest import BROKER_URL, Worker, broker_idle, wait_for

AGENT = "probe.run"
FIELDS = ("id", "work_ms", "effect")
#: How long a worker gets to deal with a batch of hostile messages.
SETTLE_S = 30.0
#: How long a worker gets to show it is still serving after hostile input.
SERVING_S = 15.0


# --- reading the record --------------------------------------------------------


def rows_by_task(url: str, task_ids: Collection[str]) -> dict[str, list[Any]]:
    """Every outcome row written for each of ``task_ids``."""
    found: dict[str, list[Any]] = {t: [] for t in task_ids}
    with transaction(url) as conn:
        for row in conn.execute(select(OUTCOMES).where(OUTCOMES.c.task_id.in_(list(task_ids)))):
            found[row.task_id].append(row)
    return found


def outcome(url: str, key: str) -> Any:
    with transaction(url) as conn:
        return conn.execute(select(OUTCOMES).where(OUTCOMES.c.idempotency_key == key)).first()


def effect_keys(url: str) -> set[str]:
    with transaction(url) as conn:
        return set(conn.execute(select(PROBE_EFFECTS.c.effect_key)).scalars())


def event_count(url: str, task_ids: Collection[str]) -> int:
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count()).where(GUARD_EVENTS.c.task_id.in_(list(task_ids)))
            ).scalar_one()
        )


def worker_log(worker: Worker) -> str:
    return str(worker.child.log_tail(chars=100_000_000))


def crash_line(log: str, task_id: str) -> str | None:
    """The log line of ``task_id`` raising out of the guard, if it did."""
    marker = f"{AGENT}[{task_id}] raised unexpected"
    return next((line for line in log.splitlines() if marker in line), None)


def deliveries(log: str, task_id: str) -> int:
    """How often the worker received ``task_id`` (Celery logs each delivery)."""
    return log.count(f"[{task_id}] received")


def assert_delivered_once(worker: Worker, task_ids: Sequence[str]) -> None:
    """Each task was delivered once: acked, never retried or redelivered."""
    wait_for(lambda: broker_idle(worker.queue), what="the messages to be acked")
    log = worker_log(worker)
    again = {t: deliveries(log, t) for t in task_ids if deliveries(log, t) != 1}
    assert not again, f"delivered other than once: {again}"


def settle(worker: Worker, task_ids: Sequence[str]) -> dict[str, list[Any]]:
    """Wait until each task left a finished row or crashed; fail fast if the worker died."""

    def finished() -> dict[str, list[Any]] | None:
        if not worker.child.alive():
            raise AssertionError(f"the worker exited:\n{worker.child.log_tail()}")
        found = rows_by_task(worker.database_url, task_ids)
        log = worker_log(worker)
        for task_id in task_ids:
            done = any(r.status != "claimed" for r in found[task_id])
            if not done and crash_line(log, task_id) is None:
                return None
        return found

    result: dict[str, list[Any]] = wait_for(
        finished, timeout_s=SETTLE_S, what=f"{len(task_ids)} tasks to finish"
    )
    return result


def purge(queue: str) -> None:
    """Drop every message of ``queue``, waiting or unacked, so none outlives the test."""
    client = redis.Redis.from_url(BROKER_URL)
    client.delete(queue)
    for tag, raw in client.hgetall("unacked").items():
        if json.loads(raw)[2] == queue:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)


def answers_ping(worker: Worker) -> bool:
    from config import app

    node = f"{worker.name}@{socket.gethostname()}"
    replies = app.control.ping(destination=[node], timeout=1.0) or []
    return any(node in reply for reply in replies)


def assert_still_serving(worker: Worker) -> None:
    """The worker process is up, answers a ping and runs a valid probe to success."""
    assert worker.child.alive(), worker.child.log_tail()
    wait_for(lambda: answers_ping(worker), timeout_s=SERVING_S, what="the worker to answer a ping")
    probe_id = f"alive-{uuid.uuid4().hex}"
    worker.enqueue(AGENT, {"id": probe_id})
    row = wait_for(
        lambda: (
            (r := outcome(worker.database_url, f"probe:{probe_id}")) and r.status != "claimed" and r
        ),
        timeout_s=SERVING_S,
        what="a valid probe to finish",
    )
    assert row.status == "succeeded", row.error
    assert probe_id in effect_keys(worker.database_url)


def send(worker: Worker, kwargs: dict[str, Any]) -> str:
    """Send ``probe.run`` with exactly these keyword arguments; returns the task id."""
    from config import app

    return str(app.send_task(AGENT, kwargs=kwargs, queue=worker.queue).id)


# --- hostile payloads ----------------------------------------------------------

#: Characters for generated text: any code point except lone surrogates and NUL.
#: NUL in a field *name* is echoed into the error text, which PostgreSQL cannot
#: store: that known bug has its own test below (test_nul_characters_...).
TEXT = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
#: A name for an unexpected field: no whitespace, so `` name: `` is unambiguous in the error.
EXTRA_NAME = st.text(
    st.characters(exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=24
).filter(lambda name: name not in FIELDS)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(TEXT, max_size=8), inner),
    max_leaves=12,
)


def nest(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` alternating lists and objects."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


#: Nesting the worker survives; deeper ones kill it (test_payload_nested_600_deep_...).
DEEP = st.integers(min_value=1, max_value=200).map(nest)
LONG_TEXT = st.builds(lambda ch, n: ch * n, TEXT, st.integers(min_value=201, max_value=20_000))
HUGE_INTS = st.integers(min_value=600_001) | st.integers(max_value=-1)


def model_rejects(payload: Any) -> bool:
    """True when the probe's model refuses ``payload`` after a JSON round trip."""
    try:
        Probe.model_validate(json.loads(json.dumps(payload)))
    except ValidationError:
        return True
    return False


def wrong_value(field: str) -> st.SearchStrategy[Any]:
    """A JSON value the model refuses for ``field``: wrong type, out of range, oversized."""
    candidates = JSON_VALUES | DEEP | LONG_TEXT | HUGE_INTS | st.just("")
    return candidates.filter(lambda v: model_rejects({"id": "x", field: v}))


@st.composite
def hostile_object(draw: st.DrawFn) -> tuple[Any, list[str]]:
    """A JSON object with 1-3 problems, and the fragments its error must contain."""
    payload: dict[str, Any] = {"id": "hostile", "work_ms": 0, "effect": True}
    problems = draw(
        st.lists(
            st.sampled_from(["id", "work_ms", "effect", "missing id", "extra"]),
            min_size=1,
            max_size=3,
            unique=True,
        ).filter(lambda p: not {"id", "missing id"} <= set(p))
    )
    expected: list[str] = []
    for problem in problems:
        if problem == "missing id":
            del payload["id"]
            expected.append(" id: Field required")
        elif problem == "extra":
            names = draw(st.lists(EXTRA_NAME, min_size=1, max_size=4, unique=True))
            for name in names:
                payload[name] = draw(JSON_VALUES | DEEP)
                expected.append(f" {name}: ")
        else:
            payload[problem] = draw(wrong_value(problem))
            expected.append(f" {problem}: ")
    return payload, expected


NON_OBJECT = (JSON_VALUES | DEEP | LONG_TEXT | st.lists(JSON_VALUES, max_size=5)).filter(
    lambda v: not isinstance(v, dict)
)
HOSTILE = hostile_object() | NON_OBJECT.map(lambda v: (v, ["JSON object"]))

#: Every kind of hostile payload at least once, whatever the generator draws.
NAMED: list[tuple[Any, list[str]]] = [
    ({"work_ms": 5}, [" id: Field required"]),
    ({}, [" id: Field required"]),
    ({"id": 42}, [" id: "]),
    ({"id": None}, [" id: "]),
    ({"id": ["a", "b"]}, [" id: "]),
    ({"id": True}, [" id: "]),
    ({"id": ""}, [" id: "]),
    ({"id": "x", "work_ms": "soon"}, [" work_ms: "]),
    ({"id": "x", "work_ms": 1.5}, [" work_ms: "]),
    ({"id": "x", "effect": "maybe"}, [" effect: "]),
    ({"id": "x", "effect": {"on": True}}, [" effect: "]),
    ({"id": "x", "surprise": 1, "ключ": [1]}, [" surprise: ", " ключ: "]),
    ({"id": "x" * 201}, [" id: "]),
    ({"id": "x" * 200_000}, [" id: "]),
    ({"id": "x", "blob": "y" * 200_000}, [" blob: "]),
    ({"id": "\x00" * 201}, [" id: "]),
    ({"id": "🦀" * 201}, [" id: "]),
    ({"id": "ok", "work_ms": "\x00"}, [" work_ms: "]),
    ({"id": nest(200)}, [" id: "]),
    ({"id": "x", "deep": nest(200)}, [" deep: "]),
    ({"id": "x", "work_ms": 10**30}, [" work_ms: "]),
    ({"id": "x", "work_ms": 2**63}, [" work_ms: "]),
    ({"id": "x", "work_ms": 600_001}, [" work_ms: "]),
    ({"id": "x", "work_ms": -1}, [" work_ms: "]),
    ({"id": "x", "work_ms": -(10**30)}, [" work_ms: "]),
    # kombu's decoder makes these bytes, Decimal and NaN, which the model took
    # and no JSON column stores: the run failed unrecorded.
    ({"id": {"__type__": "bytes", "__value__": "eA=="}}, [" id: bytes is not JSON data"]),
    ({"id": "x", "work_ms": {"__type__": "decimal", "__value__": "5"}}, [" work_ms: Decimal is"]),
    ({"id": "x", "work_ms": float("nan")}, [" work_ms: nan is not a JSON number"]),
    ([], ["JSON object"]),
    (["a", {"id": "x"}], ["JSON object"]),
    ([nest(200)], ["JSON object"]),
    ("payload", ["JSON object"]),
    ("\x00", ["JSON object"]),
    (3, ["JSON object"]),
    (-1.5, ["JSON object"]),
    (None, ["JSON object"]),
    (True, ["JSON object"]),
    (False, ["JSON object"]),
]


def hostile_payloads() -> list[tuple[Any, list[str]]]:
    """The named cases plus 25 drawn by hypothesis.

    Hypothesis only generates here: ``@given`` sits on a collector, and the
    test publishes the whole batch to one worker and checks it once. With
    ``@given`` on the test itself, every example would wait on the worker in
    turn, and a failure would be shrunk by publishing again and again to a
    worker already in an unknown state. ``derandomize`` draws the same
    examples on every run, so a failure reproduces (the assertion message
    shows the payload, ready to be pinned in ``NAMED``). The collector checks
    each draw against the model, so a generator bug fails here, shrunk,
    instead of being blamed on the worker.
    """
    drawn: list[tuple[Any, list[str]]] = []

    # too_slow: the model-checked filters can be slow on a loaded machine.
    # database=None: the collector only fails on a generator bug; nothing to replay.
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
        database=None,
    )
    @given(HOSTILE)
    def collect(case: tuple[Any, list[str]]) -> None:
        assert model_rejects(case[0]), f"generator produced a valid payload: {case[0]!r}"
        drawn.append(case)

    collect()
    for payload, _ in NAMED:
        assert model_rejects(payload), f"named case is valid: {payload!r}"
    return NAMED + drawn


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."


def test_hostile_payloads_are_rejected_and_the_worker_keeps_serving(worker: Worker) -> None:
    """Every hostile payload is one `rejected` row naming the problem; nothing runs."""
    # Given ~60 payloads that must never run (named cases + hypothesis draws)
    cases = hostile_payloads()
    # When they are all published to one worker
    sent = [(worker.enqueue(AGENT, payload), payload, expected) for payload, expected in cases]
    found = settle(worker, [task_id for task_id, _, _ in sent])
    # Then each produced exactly one row: `rejected:<task_id>`, with a reason
    log = worker_log(worker)
    for task_id, payload, expected in sent:
        rows = found[task_id]
        context = f"payload {short(payload)}: rows {rows}, crash {crash_line(log, task_id)}"
        assert len(rows) == 1, context
        row = rows[0]
        assert row.idempotency_key == f"rejected:{task_id}", context
        assert (row.status, row.attempts) == ("rejected", 1), context
        assert row.error, context
        for fragment in expected:
            assert fragment in row.error, f"{fragment!r} not in {row.error!r}; {context}"
    # ... no effect, no guard event, and the messages are acked, not redelivered
    assert effect_keys(worker.database_url) == set()
    assert event_count(worker.database_url, [t for t, _, _ in sent]) == 0
    assert_delivered_once(worker, [t for t, _, _ in sent])
    # ... and the worker still runs valid work
    assert_still_serving(worker)


# --- explicit keys -------------------------------------------------------------


def test_non_string_or_empty_key_is_rejected(worker: Worker) -> None:
    """``key`` of the wrong type, or empty, is rejected with a clear reason; nothing runs."""
    cases: list[tuple[Any, str]] = [
        (7, "key must be a string, got int"),
        (["k"], "key must be a string, got list"),
        ({"k": 1}, "key must be a string, got dict"),
        (True, "key must be a string, got bool"),
        (2**70, "key must be a string, got int"),
        ("", "idempotency key must be a non-empty string"),
    ]
    # Given valid payloads, so only the key is wrong
    # When each is sent with its bad key
    sent = [
        (send(worker, {"payload": {"id": f"key-{i}"}, "key": key}), key, reason)
        for i, (key, reason) in enumerate(cases)
    ]
    found = settle(worker, [task_id for task_id, _, _ in sent])
    # Then each is one rejected row giving the reason, and nothing ran
    for task_id, key, reason in sent:
        rows = found[task_id]
        assert [(r.idempotency_key, r.status) for r in rows] == [
            (f"rejected:{task_id}", "rejected")
        ], f"key {key!r}: {rows}"
        assert reason in rows[0].error, f"key {key!r}: {rows[0].error!r}"
    assert_delivered_once(worker, [task_id for task_id, _, _ in sent])
    assert effect_keys(worker.database_url) == set()
    assert_still_serving(worker)


def test_overlong_key_is_rejected(worker: Worker) -> None:
    """A 501-character key is rejected with a clear reason; nothing runs."""
    task_id = send(worker, {"payload": {"id": "long-key"}, "key": "k" * 501})
    rows = settle(worker, [task_id])[task_id]
    context = f"rows {rows}, crash {crash_line(worker_log(worker), task_id)}"
    assert [(r.idempotency_key, r.status) for r in rows] == [(f"rejected:{task_id}", "rejected")], (
        context
    )
    assert "<= 500 chars" in rows[0].error
    assert effect_keys(worker.database_url) == set()
    assert_still_serving(worker)


# --- characters a database cannot store ----------------------------------------


def assert_rejected_each(worker: Worker, cases: dict[str, tuple[str, str]]) -> None:
    """Each task in ``cases`` (label -> (task id, reason)) left one ``rejected``
    row whose error names ``reason``, and the worker still serves."""
    found = settle(worker, [task_id for task_id, _ in cases.values()])
    wrong = {
        label: [(r.status, r.error) for r in found[task_id]]
        for label, (task_id, reason) in cases.items()
        if [r.status for r in found[task_id]] != ["rejected"]
        or reason not in found[task_id][0].error
    }
    assert not wrong, wrong
    assert_delivered_once(worker, [task_id for task_id, _ in cases.values()])
    assert_still_serving(worker)


NUL_TEXT = "text must be valid Unicode without NUL characters"
BAD_KEY = "idempotency key must be valid Unicode without NUL characters"


def test_nul_characters_are_rejected_naming_the_problem(worker: Worker) -> None:
    """NUL in a field name, an id or a key: one ``rejected`` row per task, with the reason."""
    cases = {
        "NUL in an unknown field's name": (
            worker.enqueue(AGENT, {"id": "n1", "a\x00b": 1}),
            "(a field name): " + NUL_TEXT,
        ),
        "NUL in a valid id": (worker.enqueue(AGENT, {"id": "nul\x00id"}), "id: " + NUL_TEXT),
        "NUL in the key, valid payload": (
            worker.enqueue(AGENT, {"id": "n2"}, key="k\x00"),
            BAD_KEY,
        ),
        "NUL in the key, invalid payload": (
            worker.enqueue(AGENT, {"id": 5}, key="k\x00"),
            "id: Input should be a valid string",
        ),
    }
    assert_rejected_each(worker, cases)


def test_a_lone_surrogate_in_the_key_is_rejected_naming_the_problem(worker: Worker) -> None:
    """A key that is not valid Unicode text is rejected with the reason, not lost."""
    cases = {
        "valid payload": (worker.enqueue(AGENT, {"id": "s1"}, key="k\ud800"), BAD_KEY),
        "invalid payload": (
            worker.enqueue(AGENT, {"id": 5}, key="k\ud800"),
            "id: Input should be a valid string",
        ),
    }
    assert_rejected_each(worker, cases)


def test_payload_nested_600_deep_is_rejected_and_the_worker_survives(worker: Worker) -> None:
    """Nesting deeper than the worker can hand to its pool is rejected, not fatal."""
    task_id = worker.enqueue(AGENT, {"id": "deep", "deep": nest(600)})
    try:
        rows = settle(worker, [task_id])[task_id]
        assert [(r.idempotency_key, r.status) for r in rows] == [
            (f"rejected:{task_id}", "rejected")
        ]
        assert_still_serving(worker)
    finally:
        # The message would kill every later worker on this queue: drop it.
        worker.child.stop(5)
        purge(worker.queue)


# --- raw broker messages -------------------------------------------------------


class Tripwire:
    """Unpickling this creates a directory: proof that pickle was deserialized."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.path),)


@dataclass
class RawMessage:
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]


def publish(worker: Worker, message: RawMessage) -> None:
    """Publish ``message`` as it is straight to the worker's queue."""
    from config import app

    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            routing_key=worker.queue,
            exchange=worker.queue,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=message.headers,
            **message.properties,
        )


def probe_message(task_id: str, probe_id: str, **kwargs: Any) -> RawMessage:
    """The protocol-v2 message Celery itself would send for a valid probe."""
    from config import app

    msg = app.amqp.as_task_v2(task_id, AGENT, kwargs={"payload": {"id": probe_id}, **kwargs})
    body = json.dumps(msg.body).encode()
    return RawMessage(body, "application/json", "utf-8", dict(msg.headers), dict(msg.properties))


def raw_message(case: str, task_id: str, probe_id: str, tripwire: Path) -> RawMessage:
    """A protocol-v2 message for a valid probe, then broken the way ``case`` says."""
    msg = probe_message(task_id, probe_id)
    headers, body = msg.headers, msg.body
    content_type, encoding = msg.content_type, msg.content_encoding
    if case == "not json":
        body = b'[[], {"payload": {"id": "' + probe_id.encode() + b'"'
    elif case == "unknown task":
        headers["task"] = "no.such.agent"
    elif case == "no task, no id":
        del headers["task"], headers["id"]
    elif case == "no task":
        del headers["task"]
    elif case == "no id":
        del headers["id"]
    elif case == "task not a string":
        headers["task"] = [AGENT]
    elif case == "pickle":
        args, kwargs, embed = json.loads(msg.body)
        kwargs = {**kwargs, "key": Tripwire(tripwire)}
        body = pickle.dumps((args, kwargs, embed))
        content_type, encoding = "application/x-python-serialize", "binary"
    return RawMessage(body, content_type, encoding, headers, msg.properties)


#: What Celery logs when it drops each kind of message (celery/worker/consumer/consumer.py).
UNKNOWN_MESSAGE = "Received and deleted unknown message.  Wrong destination?!?"
DISCARD_LINES: dict[str, str | None] = {
    "not json": "Can't decode message body: DecodeError(",
    "unknown task": "Received unregistered task of type 'no.such.agent'.",
    "no task, no id": UNKNOWN_MESSAGE,
    "no task": UNKNOWN_MESSAGE,
    "no id": "cannot run: message has no 'id' header; it will be rejected",
    # Celery's own handler raises on it and the whole worker exits (fleetworks drops it).
    "task not a string": "Dropped an invalid task message: its 'task' header must be a string, "
    "got list",
    "pickle": "Received invalid task message: Refusing to deserialize untrusted content "
    "of type pickle (application/x-python-serialize)",
}


@pytest.mark.parametrize(
    "case",
    [
        "not json",
        "unknown task",
        "no task, no id",
        "no task",
        "no id",
        "task not a string",
        "pickle",
    ],
)
def test_raw_broker_message_is_dropped_and_the_worker_keeps_serving(
    worker: Worker, case: str, tmp_path: Path
) -> None:
    """A message Celery cannot run is dropped once, logged, never run; the worker serves on."""
    task_id, probe_id = str(uuid.uuid4()), f"raw-{uuid.uuid4().hex}"
    tripwire = tmp_path / "unpickled"
    message = raw_message(case, task_id, probe_id, tripwire)
    try:
        # When the message is published straight to the worker's queue
        publish(worker, message)
        # Then Celery logs that it dropped it, and it leaves the broker for good
        line = DISCARD_LINES[case]
        if line is not None:
            wait_for(lambda: line in worker_log(worker), timeout_s=SERVING_S, what=repr(line))
        wait_for(
            lambda: broker_idle(worker.queue),
            timeout_s=SERVING_S,
            what="the message to leave the broker",
        )
        assert_still_serving(worker)
        log = worker_log(worker)
        if line is not None:
            assert log.count(line) == 1, "the message was delivered more than once"
        assert "Connection to broker lost" not in log
        # (the probe's row commits just before its late acknowledgement)
        wait_for(lambda: broker_idle(worker.queue), what="the probe to be acked")
        # ... and whatever it carried never ran
        assert rows_by_task(worker.database_url, [task_id])[task_id] == []
        assert outcome(worker.database_url, f"probe:{probe_id}") is None
        assert probe_id not in effect_keys(worker.database_url)
        assert not tripwire.exists(), "the pickle body was deserialized"
        if case == "no id":
            # A message without an id is recorded as one rejected row (under the
            # id the worker gave it), naming the problem.
            with transaction(worker.database_url) as conn:
                rejected = conn.execute(
                    select(OUTCOMES.c.status, OUTCOMES.c.error).where(
                        OUTCOMES.c.idempotency_key.like("rejected:missing-id-%")
                    )
                ).all()
            assert [(r.status, "message has no 'id' header" in r.error) for r in rejected] == [
                ("rejected", True)
            ]
    finally:
        # A message the worker cannot get rid of must not outlive this test.
        worker.child.stop(5)
        purge(worker.queue)


# --- envelopes Celery cannot use -----------------------------------------------


def pool_of(worker: Worker) -> set[int]:
    return set(worker.pool_pids())


def rejected_rows(url: str, key_like: str) -> list[Any]:
    with transaction(url) as conn:
        return list(conn.execute(select(OUTCOMES).where(OUTCOMES.c.idempotency_key.like(key_like))))


#: Headers Celery cannot use, each on an otherwise valid probe, and what the row names.
BAD_HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    # Celery added the time limits up in the worker's main process: it exited.
    "time limit a string": ({"timelimit": "ab"}, "'timelimit' header must be list or null"),
    "time limit of one value": ({"timelimit": [1]}, "'timelimit' header must be [hard, soft]"),
    "time limit negative": ({"timelimit": [None, -1]}, "-1 is not a positive number"),
    # Celery dropped these with a log line and no record.
    "eta not a time": ({"eta": "soon"}, "'eta' header 'soon' is not an ISO 8601 time"),
    "expires a number": ({"expires": -1}, "'expires' header must be str or null, got int"),
    # The broker would hand it out again every visibility timeout until then.
    "eta centuries ahead": ({"eta": "2999-01-01T00:00:00+00:00"}, "beyond the broker's visibility"),
    # The retry policy's back-off grows with it.
    "retries past any count": ({"retries": 10**30}, "'retries' header must be 0 to"),
    "retries a string": ({"retries": "x"}, "'retries' header must be int or null, got str"),
    # Celery copies every header onto the request: these replace its methods.
    "a header named update": ({"update": 1}, "header 'update' is reserved"),
    "a header named __dict__": ({"__dict__": 1}, "header '__dict__' is reserved"),
    "shadow a list": ({"shadow": ["x"]}, "'shadow' header must be str or null, got list"),
    # Celery hashed each name in the worker's main process: it exited.
    "a stamped header not a name": (
        {"stamped_headers": [["x"]], "stamps": {}},
        "'stamped_headers' header must list names, got list",
    ),
    # A failed link left the message unacknowledged, redelivered forever.
    "an errback": ({"errbacks": [{"a": 1}]}, "'errbacks': an agent's message carries no"),
    "a chain": ({"chain": [{"task": AGENT}]}, "'chain': an agent's message carries no"),
}

#: Task ids Celery cannot use: a list or a dict made its handler raise, ending the worker.
BAD_IDS: list[Any] = [["x"], {"a": 1}, 7, None, ""]


def test_headers_celery_cannot_use_are_one_rejected_row_naming_them(worker: Worker) -> None:
    """Each bad header of an agent's message is one ``rejected`` row naming it;
    the worker and its pool processes live on."""
    pool = pool_of(worker)
    sent: dict[str, tuple[str, str]] = {}
    for label, (patch, reason) in BAD_HEADERS.items():
        task_id = str(uuid.uuid4())
        message = probe_message(task_id, f"h-{task_id}")
        message.headers.update(patch)
        publish(worker, message)
        sent[label] = (task_id, reason)
    for bad_id in BAD_IDS:
        message = probe_message("replaced", f"i-{uuid.uuid4().hex}")
        message.headers["id"] = bad_id
        publish(worker, message)

    def all_bad_ids() -> list[str] | None:
        rows = rejected_rows(worker.database_url, "rejected:invalid-id-%")
        return [r.error for r in rows] if len(rows) == len(BAD_IDS) else None

    got = wait_for(all_bad_ids, what="a row for each bad id")
    kinds = sorted(type(i).__name__ for i in BAD_IDS)
    assert sorted(e.rsplit("got ", 1)[1] for e in got) == kinds, got
    assert all("message 'id' header must be a non-empty string" in e for e in got)
    assert_rejected_each(worker, sent)
    assert not {k for k in effect_keys(worker.database_url) if k.startswith(("h-", "i-"))}
    assert pool_of(worker) == pool, "a pool process was lost"


#: Bodies of the wrong shape for an agent's message, and what the row names.
BAD_BODIES: dict[str, tuple[Any, str]] = {
    # Celery's strategy raised on it (`'args' in 5`): the worker exited.
    "a number": (5, "message body must be [args, kwargs, embed], got int"),
    "null": (None, "message body must be [args, kwargs, embed], got NoneType"),
    # The rest raised in the pool, unrecorded.
    "an object": ({"args": [], "kwargs": {}}, "got dict"),
    "two elements": ([[], {"payload": {"id": "b2"}}], "got list of 2"),
    "args a string": (["abc", {"payload": {"id": "b3"}}, {}], "args must be a list, got str"),
    "kwargs a list": ([[], [1], {}], "kwargs must be an object, got list"),
    "embed a list": ([[], {"payload": {"id": "b4"}}, [1]], "embed must be an object or null"),
    "an errback in embed": (
        [[], {"payload": {"id": "b5"}}, {"errbacks": [{"a": 1}]}],
        "embed 'errbacks': an agent's message carries no Celery canvas links",
    ),
    "something else in embed": ([[], {"payload": {"id": "b6"}}, {"x": 1}], "may not hold 'x'"),
}


def test_a_body_of_the_wrong_shape_is_one_rejected_row_naming_it(worker: Worker) -> None:
    pool = pool_of(worker)
    sent: dict[str, tuple[str, str]] = {}
    for label, (body, reason) in BAD_BODIES.items():
        task_id = str(uuid.uuid4())
        message = probe_message(task_id, "unused")
        message.body = json.dumps(body).encode()
        publish(worker, message)
        sent[label] = (task_id, reason)
    assert_rejected_each(worker, sent)
    assert not {k for k in effect_keys(worker.database_url) if k.startswith("b")}
    assert pool_of(worker) == pool, "a pool process was lost"


def test_a_time_limit_in_the_message_neither_kills_the_pool_nor_outlives_the_agents(
    worker: Worker,
) -> None:
    """An agent runs on its own time limits: a message asking for 1 ms (which
    killed the pool process) or for more than the agent's runs on the agent's."""
    pool = pool_of(worker)
    sent = {}
    for limits in ([0.001, 0.001], [1e9, 1e9], [None, None]):
        task_id, probe_id = str(uuid.uuid4()), f"tl-{uuid.uuid4().hex}"
        message = probe_message(task_id, probe_id)
        message.body = json.dumps([[], {"payload": {"id": probe_id, "work_ms": 50}}, {}]).encode()
        message.headers["timelimit"] = limits
        publish(worker, message)
        sent[task_id] = probe_id
    found = settle(worker, list(sent))
    assert {t: [r.status for r in rows] for t, rows in found.items()} == {
        t: ["succeeded"] for t in sent
    }
    assert set(sent.values()) <= effect_keys(worker.database_url)
    assert pool_of(worker) == pool, "a pool process was killed by a message's time limit"
    assert "Hard time limit" not in worker_log(worker)


def test_a_task_id_longer_than_its_column_is_stored_clipped(worker: Worker) -> None:
    """A valid message whose id is longer than 64 characters (PostgreSQL
    refused the claim) runs once; its rows keep the id's first characters."""
    from fleetworks.claims import stored_task_id

    task_id = f"{uuid.uuid4()}-{'x' * 100}"
    probe_id = f"long-{uuid.uuid4().hex}"
    publish(worker, probe_message(task_id, probe_id))
    clipped = stored_task_id(task_id)
    assert clipped is not None and len(clipped) == 64
    rows = settle(worker, [clipped])[clipped]
    assert [(r.status, r.idempotency_key) for r in rows] == [("succeeded", f"probe:{probe_id}")]
    assert probe_id in effect_keys(worker.database_url)


def test_a_message_for_a_plain_task_celery_cannot_take_is_dropped(tmp_path: Path) -> None:
    """In a Celery app given a fleet by ``init_app`` (the shop), a message for
    one of its plain tasks with a list for its id made Celery's handler raise
    and the worker exit; it is dropped with a log line naming the error."""
    from tests.test_example_shop import shop_worker

    with shop_worker(tmp_path) as (child, queue):
        message = probe_message("x", "y")
        message.headers.update(task="celery.backend_cleanup", id=["not", "an", "id"])
        from config import app

        with app.producer_or_acquire() as producer:
            producer.publish(
                message.body, routing_key=queue, exchange=queue,
                content_type=message.content_type, content_encoding=message.content_encoding,
                headers=message.headers,
            )  # fmt: skip
        line = "Dropped an invalid task message: the worker could not take it (TypeError("
        wait_for(lambda: line in child.log_tail(1_000_000), timeout_s=SERVING_S, what=repr(line))
        wait_for(lambda: broker_idle(queue), timeout_s=SERVING_S, what="the message to be gone")
        assert child.alive(), child.log_tail()
