"""Task messages fuzzed against a real worker: whatever arrives on an agent's
queue, the worker and its pool processes live on, nothing is delivered twice
or left in the broker, and every message is accounted for: one outcome row
(``succeeded``, or ``rejected`` with a reason) for each message that names
the agent and an id, a log line naming why for each one Celery cannot take.

Each message starts as the protocol-2 message Celery itself sends for a valid
probe, then takes 1 to 4 mutations: a header set to any JSON value (Celery's
own headers and unknown ones), a header removed, the body replaced (JSON of
any shape, or bytes that are not JSON), the payload replaced with one the
probe's model refuses, or the content type and encoding changed (pickle, YAML,
text, made-up ones). Hypothesis draws them; the whole batch is published to
one worker and checked once (see ``hostile_payloads`` in
``tests/test_hostile_input.py`` for why not one example at a time).

Left out on purpose: a valid ``eta`` a few minutes ahead (the message waits
for it, as it should), a ``task`` header naming another registered task, and
payloads asking the probe to crash, fail or sleep (each tested on its own).
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import strategies as st
from sqlalchemy import select

from fleetworks.db import transaction
from fleetworks.models import OUTCOMES
from tests.conftest import Worker, broker_idle, wait_for
from tests.fuzzing import SHORT, SLOW, report, run
from tests.test_hostile_input import (
    AGENT,
    JSON_VALUES,
    NON_OBJECT,
    RawMessage,
    assert_still_serving,
    effect_keys,
    hostile_object,
    pool_of,
    probe_message,
    publish,
    purge,
    worker_log,
)

#: Celery's protocol-2 headers, and fleetworks' own.
CELERY_HEADERS = (
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
    "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps", "errbacks",
    "chain", "chord", "callbacks", "fleet_sent_at", "traceparent",
)  # fmt: skip
HEADER_NAMES = st.sampled_from(CELERY_HEADERS) | st.text(min_size=1, max_size=12)
#: Values a header is set to: any JSON, and the ones Celery reads with care.
ODD_VALUES = st.sampled_from([
    "", "soon", "no.such.agent", "2999-01-01T00:00:00+00:00", "1970-01-01T00:00:00",
    "2000-01-01T00:00:00+00:00", "NaN", -1, 0, 10**30, [None, -1], [1], [0.001, 0.001],
    [1e9, 1e9], ["a", "b"], {"a": 1}, [{"task": AGENT}], True, None,
])  # fmt: skip
HEADER_VALUES = JSON_VALUES | ODD_VALUES
CONTENT = st.sampled_from([
    ("application/json", "utf-8"),
    ("application/json", "binary"),
    ("application/json", "latin-1"),
    ("application/x-python-serialize", "binary"),
    ("application/x-yaml", "utf-8"),
    ("application/x-msgpack", "binary"),
    ("text/plain", "utf-8"),
    ("", ""),
]) | st.tuples(st.text(max_size=20), st.text(max_size=10))  # fmt: skip
BYTES = st.binary(max_size=200) | st.just(b'[[], {"payload": {"id": "x"')


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """1 to 4 changes to make to a valid probe message."""
    one = st.one_of(
        st.tuples(st.just("set"), HEADER_NAMES, HEADER_VALUES),
        st.tuples(st.just("drop"), st.sampled_from(CELERY_HEADERS)),
        st.tuples(st.just("body"), JSON_VALUES | NON_OBJECT),
        st.tuples(st.just("bytes"), BYTES),
        st.tuples(st.just("payload"), hostile_object().map(lambda case: case[0]) | NON_OBJECT),
        st.tuples(st.just("content"), CONTENT),
    )
    changes: list[tuple[Any, ...]] = draw(st.lists(one, min_size=1, max_size=4))
    return changes


def is_near_eta(value: Any) -> bool:
    """A valid ``eta`` that a worker would wait for (left out: see the docstring)."""
    from datetime import UTC, datetime, timedelta

    if not isinstance(value, str):
        return False
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return False
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return datetime.now(UTC) < at < datetime.now(UTC) + timedelta(days=400)


def usable(changes: list[tuple[Any, ...]]) -> bool:
    from config import app

    for change in changes:
        if change[0] == "set" and change[1] == "eta" and is_near_eta(change[2]):
            return False
        # Another registered task would run for real: only names no worker has.
        task = change[2] if change[0] == "set" and change[1] == "task" else AGENT
        if task != AGENT and isinstance(task, str) and task in app.tasks:
            return False
    return True


@dataclass
class Sent:
    """One fuzzed message as published, and what it was."""

    task_id: str
    probe_id: str
    changes: list[tuple[Any, ...]]
    message: RawMessage

    @property
    def names_the_agent_and_an_id(self) -> bool:
        """Its headers name the agent and carry the id it was built with."""
        headers = self.message.headers
        return headers.get("task") == AGENT and headers.get("id") == self.task_id


def build(changes: list[tuple[Any, ...]], n: int) -> Sent:
    task_id, probe_id = str(uuid.uuid4()), f"fz{n}-{uuid.uuid4().hex[:8]}"
    message = probe_message(task_id, probe_id)
    for change in changes:
        kind = change[0]
        if kind == "set":
            message.headers[change[1]] = change[2]
        elif kind == "drop":
            message.headers.pop(change[1], None)
        elif kind == "body":
            message.body = json.dumps(change[1]).encode()
        elif kind == "bytes":
            message.body = change[1]
        elif kind == "payload":
            message.body = json.dumps([[], {"payload": change[1]}, {}]).encode()
        else:
            message.content_type, message.content_encoding = change[1]
    return Sent(task_id, probe_id, changes, message)


#: How Celery and fleetworks say they dropped a message without running it.
DROPPED = re.compile(
    r"Received and deleted unknown message|Can't decode message body|Received unregistered "
    r"task|Received invalid task message|Dropped an invalid task message|cannot run: message "
    r"has no 'id' header|Discarding revoked task|Discarding expired task"
)


def rows_for(url: str, task_ids: list[str]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {t: [] for t in task_ids}
    with transaction(url) as conn:
        for start in range(0, len(task_ids), 500):
            chunk = task_ids[start : start + 500]
            for row in conn.execute(select(OUTCOMES).where(OUTCOMES.c.task_id.in_(chunk))):
                found[row.task_id].append(row)
    return found


def fuzz_worker(worker: Worker, examples: int, *, slow: bool) -> None:
    drawn: list[list[tuple[Any, ...]]] = []
    chosen = run(mutations().filter(usable), examples, drawn.append, slow=slow)
    pool = pool_of(worker)
    sent = [build(changes, n) for n, changes in enumerate(drawn)]
    try:
        for one in sent:
            publish(worker, one.message)
        # Then the broker drains: nothing redelivered, nothing left behind
        wait_for(
            lambda: broker_idle(worker.queue) or not worker.child.alive(),
            timeout_s=60 + examples / 20,
            what=f"{len(sent)} fuzzed messages to leave the broker",
        )
        assert worker.child.alive(), worker.child.log_tail()
        assert broker_idle(worker.queue)
        accounted = account(worker, sent)
        assert pool_of(worker) == pool, "a pool process was lost"
        assert_still_serving(worker)
        report("task messages", accounted, chosen)
    finally:
        worker.child.stop(5)
        purge(worker.queue)


def account(worker: Worker, sent: list[Sent]) -> Counter[str]:
    """Every message: one finished row under its id, or (Celery could not take
    it) a rejected row under an id the worker gave it or a log line saying why
    it was dropped. Read once the broker is idle: a row commits before its
    message is acknowledged."""
    counts: Counter[str] = Counter(messages=len(sent))
    found = rows_for(worker.database_url, [s.task_id for s in sent])
    log = worker_log(worker)
    crashes = [line for line in log.splitlines() if "raised unexpected" in line]
    assert not crashes, crashes[:5]
    effects = effect_keys(worker.database_url)
    wrong: list[tuple[Any, ...]] = []
    without_row: list[Sent] = []
    for one in sent:
        rows = found[one.task_id]
        if not rows:
            without_row.append(one)
            continue
        statuses = [r.status for r in rows]
        if len(rows) != 1 or statuses[0] not in ("succeeded", "rejected"):
            wrong.append((one.changes, statuses))
            continue
        row = rows[0]
        counts[row.status] += 1
        if row.status == "rejected" and not row.error:
            wrong.append((one.changes, "rejected without a reason"))
        if row.status == "succeeded" and one.probe_id not in effects:
            wrong.append((one.changes, "succeeded without its effect"))
        if row.status == "rejected" and one.probe_id in effects:
            wrong.append((one.changes, "rejected, yet its effect was written"))
        if log.count(f"[{one.task_id}] received") > 1:
            wrong.append((one.changes, "delivered twice"))
    assert not wrong, wrong[:10]
    named = [s for s in without_row if s.names_the_agent_and_an_id]
    with transaction(worker.database_url) as conn:
        invented = conn.execute(
            select(OUTCOMES.c.error).where(
                OUTCOMES.c.idempotency_key.like("rejected:invalid-id-%")
                | OUTCOMES.c.idempotency_key.like("rejected:missing-id-%")
            )
        ).all()
    dropped = len(DROPPED.findall(log))
    counts["rejected under an id of the worker's"] = len(invented)
    counts["dropped with a log line"] = dropped
    assert all(r.error for r in invented)
    assert len(invented) + dropped >= len(without_row), (
        f"{len(without_row)} messages without a row of their own, {len(invented)} rows "
        f"and {dropped} log lines for them; some that named the agent and their id: "
        f"{[(s.changes, s.message.content_type) for s in named[:5]]}"
    )
    return counts


def test_fuzzed_task_messages_never_end_the_worker(worker: Worker) -> None:
    """300 fuzzed messages (the same on every run) against one real worker."""
    fuzz_worker(worker, SHORT, slow=False)


@pytest.mark.slow
def test_fuzzed_task_messages_never_end_the_worker_10000(worker: Worker) -> None:
    """10,000 fuzzed messages, drawn anew each run, against one real worker."""
    fuzz_worker(worker, SLOW, slow=True)
