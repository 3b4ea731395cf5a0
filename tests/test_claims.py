"""The claim ledger's state machine, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import String, func, insert, select

from fleetworks import claims, db
from fleetworks import constants as c
from fleetworks.claims import Claim, ClaimVerdict, StaleWriteError
from fleetworks.models import EventKind, GuardEvent, Outcome, Status

KEY = "mentions:m-1"
ENTITY = "mention:m-1"
AGENT = "mentions"

_outcomes = Outcome.__table__
_events = GuardEvent.__table__


def claim(url: str, token: int, *, task_id: str = "t-1", worker: str = "w-1") -> Claim:
    """Claim ``KEY`` with ``token`` in its own transaction."""
    with db.transaction(url) as conn:
        return claims.claim(
            conn,
            agent=AGENT,
            entity_key=ENTITY,
            idempotency_key=KEY,
            fencing_token=token,
            task_id=task_id,
            worker=worker,
        )


def finish(url: str, token: int, status: Status, **kwargs: Any) -> None:
    """Finish ``KEY`` with ``token`` in its own transaction."""
    with db.transaction(url) as conn:
        claims.finish(conn, idempotency_key=KEY, fencing_token=token, status=status, **kwargs)


def reject(url: str, task_id: str, error: str = "invalid payload") -> None:
    """Reject the payload of ``task_id`` in its own transaction."""
    with db.transaction(url) as conn:
        claims.reject(
            conn,
            agent=AGENT,
            entity_key=ENTITY,
            task_id=task_id,
            worker="w-1",
            error=error,
            payload={"mention_id": 42},
        )


def rows(url: str) -> list[dict[str, Any]]:
    """Every outcome row, as plain dicts, in insertion order."""
    with db.transaction(url) as conn:
        result = conn.execute(select(_outcomes).order_by(_outcomes.c.id))
        return [dict(row._mapping) for row in result]


def row(url: str, key: str = KEY) -> dict[str, Any]:
    """The one outcome row of ``key``."""
    with db.transaction(url) as conn:
        found = conn.execute(select(_outcomes).where(_outcomes.c.idempotency_key == key)).one()
        return dict(found._mapping)


def terminal(url: str, key: str = KEY) -> str | None:
    """``claims.terminal_status`` of ``key`` in its own transaction."""
    with db.transaction(url) as conn:
        return claims.terminal_status(conn, key)


def test_first_claim_runs_and_inserts_a_claimed_row(database_url: str) -> None:
    """An unknown key is claimed: RUN, first attempt, row in ``claimed`` with the token."""
    got = claim(database_url, 1)

    assert got == Claim(ClaimVerdict.RUN, attempts=1)
    stored = row(database_url)
    assert stored["status"] == Status.CLAIMED
    assert stored["attempts"] == 1
    assert stored["fencing_token"] == 1
    assert (stored["agent"], stored["entity_key"]) == (AGENT, ENTITY)
    assert (stored["task_id"], stored["worker"]) == ("t-1", "w-1")
    assert stored["started_at"] is not None
    assert stored["finished_at"] is None
    assert stored["error"] is None


def test_finish_succeeded_records_result_and_finish_time(database_url: str) -> None:
    """The current holder moves its claim to ``succeeded`` with its result."""
    claim(database_url, 1)

    finish(database_url, 1, Status.SUCCEEDED, result={"action": "respond"})

    stored = row(database_url)
    assert stored["status"] == Status.SUCCEEDED
    assert stored["result"] == {"action": "respond"}
    assert stored["finished_at"] is not None
    assert stored["error"] is None


def test_reclaim_after_success_is_a_duplicate_and_changes_nothing(database_url: str) -> None:
    """A key that succeeded is never run again, whatever token the newcomer holds."""
    # Given a key that succeeded under token 1
    claim(database_url, 1)
    finish(database_url, 1, Status.SUCCEEDED, result={"n": 1})
    before = row(database_url)

    # When a redelivery claims it with a higher token
    got = claim(database_url, 5, task_id="t-2", worker="w-2")

    # Then it is a duplicate and the row is exactly as it was
    assert got == Claim(ClaimVerdict.DUPLICATE, status="succeeded", stored_token=1)
    assert row(database_url) == before


def test_claim_while_claimed_with_higher_token_takes_over(database_url: str) -> None:
    """A newer lock holder takes over a claim whose holder lost the lock."""
    # Given a claim under token 1 whose holder stalled past its lock TTL
    claim(database_url, 1)

    # When the holder of token 2 claims the same key
    got = claim(database_url, 2, task_id="t-2", worker="w-2")

    # Then it runs as attempt 2 and owns the row
    assert got == Claim(ClaimVerdict.RUN, attempts=2)
    stored = row(database_url)
    assert (stored["status"], stored["fencing_token"]) == (Status.CLAIMED, 2)
    assert (stored["task_id"], stored["worker"]) == ("t-2", "w-2")


def test_finish_with_a_superseded_token_raises_and_leaves_the_row(database_url: str) -> None:
    """The stalled holder wakes up and tries to write its outcome: refused."""
    # Given a claim taken over by token 2
    claim(database_url, 1)
    claim(database_url, 2)
    before = row(database_url)

    # When the holder of token 1 finishes
    with pytest.raises(StaleWriteError, match="fencing token 1"):
        finish(database_url, 1, Status.SUCCEEDED, result={"from": "stale"})

    # Then the row still belongs to token 2, which can finish it
    assert row(database_url) == before
    finish(database_url, 2, Status.SUCCEEDED)
    assert row(database_url)["status"] == Status.SUCCEEDED


def test_finish_twice_raises_the_second_time(database_url: str) -> None:
    """A finished key is no longer ``claimed``: a second finish is refused."""
    claim(database_url, 1)
    finish(database_url, 1, Status.SUCCEEDED, result={"n": 1})

    with pytest.raises(StaleWriteError):
        finish(database_url, 1, Status.FAILED, error="late")

    stored = row(database_url)
    assert (stored["status"], stored["result"], stored["error"]) == (
        Status.SUCCEEDED,
        {"n": 1},
        None,
    )


def test_finish_of_an_unclaimed_key_raises(database_url: str) -> None:
    """Finishing a key nobody claimed writes nothing."""
    with pytest.raises(StaleWriteError):
        finish(database_url, 1, Status.SUCCEEDED)
    assert rows(database_url) == []


@pytest.mark.parametrize("token", [3, 2, 1])
def test_claim_with_token_not_above_stored_is_stale(database_url: str, token: int) -> None:
    """A claim whose token is not newer than the stored one is STALE and changes nothing."""
    claim(database_url, 3)
    before = row(database_url)

    got = claim(database_url, token, task_id="t-old")

    assert got == Claim(ClaimVerdict.STALE, stored_token=3)
    assert row(database_url) == before


def test_claim_of_failed_key_with_older_token_is_stale(database_url: str) -> None:
    """A retry must hold a newer token than the failed run."""
    claim(database_url, 4)
    finish(database_url, 4, Status.FAILED, error="boom")

    assert claim(database_url, 4) == Claim(ClaimVerdict.STALE, stored_token=4)
    assert row(database_url)["status"] == Status.FAILED


def test_reclaim_after_failure_runs_again_keeping_last_error(database_url: str) -> None:
    """A failed key is retried: attempts grow, finish time is cleared, and the last
    error stays visible while the retry runs (success clears it)."""
    # Given a key that failed once
    claim(database_url, 1)
    finish(database_url, 1, Status.FAILED, error="upstream timeout")
    failed = row(database_url)
    assert failed["error"] == "upstream timeout"
    assert failed["finished_at"] is not None

    # When the retry claims it with a newer token
    got = claim(database_url, 2, task_id="t-1", worker="w-2")

    # Then it runs as attempt 2, the previous attempt's error still on record
    assert got == Claim(ClaimVerdict.RUN, attempts=2)
    stored = row(database_url)
    assert stored["status"] == Status.CLAIMED
    assert stored["attempts"] == 2
    assert stored["fencing_token"] == 2
    assert stored["error"] == "upstream timeout"
    assert stored["finished_at"] is None
    assert stored["worker"] == "w-2"
    assert len(rows(database_url)) == 1


def test_attempts_count_every_run(database_url: str) -> None:
    """Fail, retry, fail, retry, succeed: three attempts on one row."""
    for token in (1, 2):
        assert claim(database_url, token).attempts == token
        finish(database_url, token, Status.FAILED, error=f"try {token}")
    assert claim(database_url, 3) == Claim(ClaimVerdict.RUN, attempts=3)
    finish(database_url, 3, Status.SUCCEEDED)

    stored = row(database_url)
    assert (stored["attempts"], stored["status"], stored["error"]) == (3, Status.SUCCEEDED, None)


def test_reject_twice_for_the_same_task_keeps_one_row(database_url: str) -> None:
    """A redelivered invalid payload is recorded once, keyed by its task id."""
    reject(database_url, "t-bad", error="mention_id: not a string")
    reject(database_url, "t-bad", error="a second delivery")

    all_rows = rows(database_url)
    assert len(all_rows) == 1
    stored = all_rows[0]
    assert stored["idempotency_key"] == "rejected:t-bad"
    assert stored["status"] == Status.REJECTED
    assert stored["error"] == "mention_id: not a string"
    assert stored["task_id"] == "t-bad"
    assert stored["attempts"] == 1
    assert stored["fencing_token"] is None
    assert stored["finished_at"] is not None
    assert stored["result"] == {"payload": repr({"mention_id": 42})}


def test_rejects_of_different_tasks_are_separate_rows(database_url: str) -> None:
    """Each rejected task id gets its own row."""
    reject(database_url, "t-a")
    reject(database_url, "t-b")

    assert [r["idempotency_key"] for r in rows(database_url)] == ["rejected:t-a", "rejected:t-b"]


def test_claim_of_a_rejected_key_is_a_duplicate(database_url: str) -> None:
    """``rejected`` is terminal: claiming its key never runs."""
    reject(database_url, "t-bad")

    with db.transaction(database_url) as conn:
        got = claims.claim(
            conn,
            agent=AGENT,
            entity_key=ENTITY,
            idempotency_key="rejected:t-bad",
            fencing_token=1,
            task_id="t-bad",
            worker="w-1",
        )

    assert got == Claim(ClaimVerdict.DUPLICATE, status="rejected")


def test_terminal_status(database_url: str) -> None:
    """Only ``succeeded`` and ``rejected`` are terminal; unknown, claimed and failed are not."""
    assert terminal(database_url) is None

    claim(database_url, 1)
    assert terminal(database_url) is None

    finish(database_url, 1, Status.FAILED, error="boom")
    assert terminal(database_url) is None

    claim(database_url, 2)
    finish(database_url, 2, Status.SUCCEEDED)
    assert terminal(database_url) == "succeeded"

    reject(database_url, "t-bad")
    assert terminal(database_url, "rejected:t-bad") == "rejected"


def test_record_event_inserts_a_guard_event(database_url: str) -> None:
    """A guard event row carries its kind, key, task, worker, detail and a time."""
    with db.transaction(database_url) as conn:
        claims.record_event(
            conn,
            EventKind.SKIPPED_DUPLICATE,
            agent=AGENT,
            idempotency_key=KEY,
            task_id="t-9",
            worker="w-3",
            detail="already succeeded",
        )
        claims.record_event(
            conn,
            EventKind.LOCK_CONTENDED,
            agent=AGENT,
            idempotency_key=KEY,
            task_id=None,
            worker=None,
        )

    with db.transaction(database_url) as conn:
        events = [dict(r._mapping) for r in conn.execute(select(_events).order_by(_events.c.id))]
    assert len(events) == 2
    first, second = events
    assert first["kind"] == EventKind.SKIPPED_DUPLICATE
    assert (first["agent"], first["idempotency_key"]) == (AGENT, KEY)
    assert (first["task_id"], first["worker"]) == ("t-9", "w-3")
    assert first["detail"] == "already succeeded"
    assert first["at"] is not None
    assert second["kind"] == EventKind.LOCK_CONTENDED
    assert (second["task_id"], second["worker"], second["detail"]) == (None, None, None)
    # Events are a log beside the ledger: no outcome row is written.
    assert rows(database_url) == []


def test_long_error_text_is_clipped(database_url: str) -> None:
    """Errors longer than the limit are cut to exactly the limit, marked as truncated."""
    claim(database_url, 1)
    finish(database_url, 1, Status.FAILED, error="x" * (c.MAX_ERROR_CHARS * 3))

    stored = row(database_url)["error"]
    assert len(stored) == c.MAX_ERROR_CHARS
    assert stored.endswith("... [truncated]")
    assert stored.startswith("x" * (c.MAX_ERROR_CHARS - len("... [truncated]")))


def test_error_at_the_limit_is_kept_whole(database_url: str) -> None:
    """An error of exactly the limit is stored unchanged."""
    error = "y" * c.MAX_ERROR_CHARS
    claim(database_url, 1)
    finish(database_url, 1, Status.FAILED, error=error)

    assert row(database_url)["error"] == error


def test_long_reject_error_and_event_detail_are_clipped(database_url: str) -> None:
    """Rejections and guard events clip their text the same way."""
    long_text = "z" * (c.MAX_ERROR_CHARS + 1)
    reject(database_url, "t-bad", error=long_text)
    with db.transaction(database_url) as conn:
        claims.record_event(
            conn,
            EventKind.STALE_WRITE,
            agent=AGENT,
            idempotency_key=KEY,
            task_id="t-1",
            worker="w-1",
            detail=long_text,
        )
        detail = conn.execute(select(_events.c.detail)).scalar_one()

    assert len(row(database_url, "rejected:t-bad")["error"]) == c.MAX_ERROR_CHARS
    assert len(detail) == c.MAX_ERROR_CHARS
    assert detail.endswith("... [truncated]")


def test_rejected_payload_preview_is_bounded(database_url: str) -> None:
    """A huge rejected payload is kept as a short text preview, not stored whole."""
    with db.transaction(database_url) as conn:
        claims.reject(
            conn,
            agent=AGENT,
            entity_key=ENTITY,
            task_id="t-huge",
            worker=None,
            error="too big",
            payload=["a" * 100] * 100,
        )
        count = conn.execute(select(func.count()).select_from(_outcomes)).scalar_one()

    preview = row(database_url, "rejected:t-huge")["result"]["payload"]
    assert count == 1
    assert len(preview) == 1000
    assert preview.endswith("... [truncated]")


def test_rows_sent_as_driver_sql_are_stored_as_sqlalchemy_stores_them(database_url: str) -> None:
    """Claims and outcomes are sent as compiled driver SQL, their values
    converted here: times and JSON must be stored in the very form SQLAlchemy
    stores them (on SQLite, its own text form for times, with no offset)."""
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    run = {"agent": AGENT, "fencing_token": 1, "task_id": "t-1", "worker": "w-1"}
    with db.transaction(database_url) as conn:
        conn.execute(
            insert(_outcomes).values(
                idempotency_key="by-sqlalchemy", entity_key="e-0", status=Status.SUCCEEDED,
                attempts=1, started_at=at, queued_at=at, finished_at=at, payload={"n": 1},
                result=None, **run,
            )
        )  # fmt: skip
        claims.claim(conn, idempotency_key="claimed", entity_key="e-1", payload={"n": 1},
                     queued_at=at, **run)  # fmt: skip
        claims.claim_many(conn, [claims.ClaimRequest(
            idempotency_key=f"claimed-{i}", entity_key=f"e-2{i}", payload={"n": 1},
            queued_at=at, **run) for i in range(2)])  # fmt: skip
        claims.settle(conn, idempotency_key="settled", entity_key="e-3", payload={"n": 1},
                      queued_at=at, started_at=at, result=None, **run)  # fmt: skip
    text = func.cast
    with db.transaction(database_url) as conn:
        found = conn.execute(
            select(
                _outcomes.c.idempotency_key,
                text(_outcomes.c.queued_at, String),
                text(_outcomes.c.started_at, String),
                text(_outcomes.c.payload, String),
                text(_outcomes.c.result, String),
            ).order_by(_outcomes.c.id)
        ).all()
    reference = found[0]
    assert reference[0] == "by-sqlalchemy"
    for key, queued_at, started_at, payload, result in found[1:]:
        assert queued_at == reference[1], key
        assert _shape(started_at) == _shape(reference[2]), key
        assert payload == reference[3], key
        if key == "settled":
            assert result == reference[4], "a None result is stored as SQLAlchemy stores it"


def _shape(stored: str) -> str:
    """A stored time's form: its digits and fraction left out."""
    return re.sub(r"\d", "9", re.sub(r"\.\d+", "", stored))
