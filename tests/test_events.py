"""Events between agents: the outbox, publishing, the relay and subscribers.

In process, through the plugin's ``fleet`` (real Redis, SQLite): emits go
through the same guard a worker runs, the relay sends real Celery messages
and a real worker of the fleet's app (``fleet_worker``) runs the
subscribers. Effects land in a table without a UNIQUE key, so a double
shows as two rows.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, update

from fleetworks import AgentSpec, RunContext, events
from fleetworks.agent import Fleet
from fleetworks.db import get_engine, transaction
from fleetworks.events import Event, EventError, Relay
from fleetworks.models import EVENTS, GUARD_EVENTS, OUTCOMES, WAITS, EventKind
from tests.conftest import wait_for

EFFECTS = Table(
    "test_event_effects",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("subscriber", String(100)),
    Column("event_id", String(200)),
    Column("event_key", String(200)),
)


class Ticket(BaseModel):
    id: str
    sentiment: float
    fail: bool = False
    lose_lease: bool = False


@pytest.fixture
def agents(fleet: Fleet) -> Iterator[Fleet]:
    """A triage agent that emits, and two subscribers that write effects."""
    EFFECTS.create(get_engine(fleet.settings.database))

    def triage(ctx: RunContext, ticket: Ticket) -> dict[str, Any]:
        if ticket.sentiment < -0.5:
            ctx.emit("ticket.escalated", {"ticket": ticket.id}, key=ticket.id)
        ctx.emit("ticket.triaged", {"ticket": ticket.id}, key=ticket.id)
        if ticket.fail:
            raise RuntimeError("triage failed after emitting")
        if ticket.lose_lease:
            ctx.lease.lost.set()
        return {"ticket": ticket.id}

    def record(ctx: RunContext, event: Event) -> None:
        ctx.db.execute(
            EFFECTS.insert().values(
                subscriber=ctx.spec.name, event_id=event.id, event_key=event.key
            )
        )

    fleet.agent(AgentSpec(name="test.triage", payload=Ticket, key=lambda t: f"ticket:{t.id}",
                          max_retries=0))(triage)  # fmt: skip
    fleet.agent(AgentSpec(name="test.escalation", payload=Event, on=("ticket.escalated",)))(record)
    fleet.agent(
        AgentSpec(
            name="test.audit",
            payload=Event,
            on=("ticket.escalated", "ticket.triaged"),
            where=lambda e: not e.data.get("quiet"),
        )
    )(record)
    yield fleet


def stored_events(fleet: Fleet) -> list[Any]:
    with transaction(fleet.settings.database) as conn:
        return list(conn.execute(select(EVENTS).order_by(EVENTS.c.position)))


def effects(fleet: Fleet) -> list[tuple[str, str]]:
    with transaction(fleet.settings.database) as conn:
        rows = conn.execute(select(EFFECTS.c.subscriber, EFFECTS.c.event_id)).all()
    return sorted((str(s), str(e)) for s, e in rows)


def skipped_duplicates(fleet: Fleet) -> int:
    e = GUARD_EVENTS.c
    with transaction(fleet.settings.database) as conn:
        return int(
            conn.execute(
                select(func.count()).where(e.kind == EventKind.SKIPPED_DUPLICATE)
            ).scalar_one()
        )


# --- the outbox ----------------------------------------------------------------


def test_an_emit_commits_with_the_runs_success(agents: Fleet, run_agent: Any) -> None:
    done = run_agent("test.triage", {"id": "t1", "sentiment": -0.9})
    assert done.status == "succeeded"
    rows = stored_events(agents)
    assert [(r.topic, r.key, r.data) for r in rows] == [
        ("ticket.escalated", "t1", {"ticket": "t1"}),
        ("ticket.triaged", "t1", {"ticket": "t1"}),
    ]
    assert {(r.source_agent, r.source_key) for r in rows} == {("test.triage", "ticket:t1")}
    assert [r.event_id for r in rows] == [
        events.emitted_id("test.triage", "ticket:t1", i) for i in (0, 1)
    ]


def test_a_run_that_fails_after_emitting_emits_nothing(agents: Fleet, run_agent: Any) -> None:
    done = run_agent("test.triage", {"id": "t2", "sentiment": -0.9, "fail": True})
    assert done.status == "dead"
    assert stored_events(agents) == []


def test_a_stale_run_emits_nothing(agents: Fleet, run_agent: Any) -> None:
    done = run_agent("test.triage", {"id": "t3", "sentiment": -0.9, "lose_lease": True})
    assert done.event_kinds == ["stale_write"]
    assert stored_events(agents) == []


def test_a_bad_event_is_refused_naming_the_field(fleet: Fleet) -> None:
    cases: list[tuple[Any, Any, Any, str]] = [
        ("", {}, None, "topic: must be a non-empty string"),
        ("ticket escalated", {}, None, "topic: 'ticket escalated' must be dotted words"),
        ("t", ["a"], None, "data: must be a JSON object, got list"),
        ("t", {"a": "x\x00"}, None, "data: a: text must be valid Unicode"),
        ("t", {"a": float("nan")}, None, "data: not JSON"),
        ("t", {"a": object()}, None, "data: not JSON"),
        ("t", {}, "", "key: must be a non-empty string"),
        ("t", {}, 5, "key: must be a non-empty string"),
    ]
    for topic, data, key, reason in cases:
        with pytest.raises(EventError) as refused:
            events.publish(topic, data, key=key, app=fleet.app)
        assert reason in str(refused.value), (topic, data, key, str(refused.value))
    assert stored_events(fleet) == []


def test_a_publish_with_a_stored_id_is_a_no_op_that_says_so(fleet: Fleet) -> None:
    first = events.publish("order.placed", {"order": 1}, event_id="order-1", app=fleet.app)
    again = events.publish("order.placed", {"order": 2}, event_id="order-1", app=fleet.app)
    assert (first.stored, again.stored) == (True, False)
    assert [r.data for r in stored_events(fleet)] == [{"order": 1}]


def test_a_resend_is_a_no_op_that_says_so_on_each_database(database_url: str) -> None:
    engine = get_engine(database_url)
    outcomes = []
    for n in (1, 2):
        with engine.begin() as conn:
            outcomes.append(
                events.publish("order.placed", {"n": n}, event_id="order-9", connection=conn)
            )
    assert [p.stored for p in outcomes] == [True, False]
    with transaction(database_url) as conn:
        assert conn.execute(select(EVENTS.c.data)).scalars().all() == [{"n": 1}]


def test_a_publish_commits_or_rolls_back_with_the_applications_transaction(
    fleet: Fleet,
) -> None:
    engine = get_engine(fleet.settings.database)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        events.publish("order.placed", {"order": 1}, connection=conn)
        raise RuntimeError("the order could not be saved")
    assert stored_events(fleet) == []
    with engine.begin() as conn:
        published = events.publish("order.placed", {"order": 2}, connection=conn)
    assert [r.event_id for r in stored_events(fleet)] == [published.event_id]


def test_a_subscriber_spec_is_checked() -> None:
    with pytest.raises(ValueError, match=r"payload must be fleetworks\.events\.Event"):
        AgentSpec(name="x", payload=Ticket, on=("a.b",))
    with pytest.raises(ValueError, match="key= is required"):
        AgentSpec(name="x", payload=Ticket)
    with pytest.raises(ValueError, match="give on=\\[topics\\] too"):
        AgentSpec(name="x", payload=Ticket, key=str, where=lambda e: True)
    with pytest.raises(EventError, match="topic"):
        AgentSpec(name="x", payload=Event, on=("not a topic",))


# --- the relay and subscribers ------------------------------------------------


def test_every_subscriber_gets_each_matching_event_once_even_when_relayed_twice(
    agents: Fleet, run_agent: Any, fleet_worker: Any
) -> None:
    # Given two tickets triaged: one escalated (2 events), one not (1 event),
    # and an event the audit's filter declines
    run_agent("test.triage", {"id": "a", "sentiment": -0.9})
    run_agent("test.triage", {"id": "b", "sentiment": 0.4})
    quiet = events.publish("ticket.triaged", {"ticket": "c", "quiet": True}, app=agents.app)
    relay = Relay(agents)
    # When the relay sends them
    assert relay.relay_once() == 4
    ids = {(r.topic, r.key): r.event_id for r in stored_events(agents)}
    expected = sorted(
        [
            ("test.escalation", ids[("ticket.escalated", "a")]),
            ("test.audit", ids[("ticket.escalated", "a")]),
            ("test.audit", ids[("ticket.triaged", "a")]),
            ("test.audit", ids[("ticket.triaged", "b")]),
        ]
    )
    # Then each subscriber runs each event it matches once
    wait_for(lambda: effects(agents) == expected, 30, "the subscribers to run")
    assert quiet.event_id not in {e for _, e in effects(agents)}
    assert relay.relay_once() == 0, "relayed events are not sent again"
    # And when a relay is killed after sending, before marking them relayed,
    # the next pass sends them all again: each is a counted duplicate
    with transaction(agents.settings.database) as conn:
        conn.execute(update(EVENTS).values(relayed_at=None))
    assert relay.relay_once() == 4
    wait_for(lambda: skipped_duplicates(agents) == 4, 30, "the re-sent events to be skipped")
    assert effects(agents) == expected
    with transaction(agents.settings.database) as conn:
        statuses = conn.execute(
            select(OUTCOMES.c.status, func.count())
            .where(OUTCOMES.c.agent.in_(["test.escalation", "test.audit"]))
            .group_by(OUTCOMES.c.status)
        ).all()
    assert dict(statuses) == {"succeeded": 4}


def test_replay_sends_a_subscriber_its_events_again_and_nothing_doubles(
    agents: Fleet, run_agent: Any, fleet_worker: Any
) -> None:
    run_agent("test.triage", {"id": "r", "sentiment": -0.9})
    Relay(agents).relay_once()
    wait_for(lambda: len(effects(agents)) == 3, 30, "the subscribers to run")
    assert events.replay(agents, "test.audit") == 2
    wait_for(lambda: skipped_duplicates(agents) == 2, 30, "the replayed events to be skipped")
    assert len(effects(agents)) == 3
    with pytest.raises(
        KeyError,
        match=r"no subscriber named 'test\.triage'; subscribers: .*test\.audit, test\.escalation",
    ):
        events.replay(agents, "test.triage")


def test_a_subscriber_handles_one_keys_events_in_the_order_they_were_stored(
    agents: Fleet, run_agent: Any
) -> None:
    """The third event of a key, delivered first, is put back until the first
    two are handled; events of another key are not held up."""
    for n in range(3):
        events.publish("ticket.escalated", {"n": n}, key="K", app=agents.app)
    other = events.publish("ticket.escalated", {"n": 9}, key="L", app=agents.app)
    stored_ = {e.data["n"]: e for e in events.stored(agents.settings.database)}

    def deliver(n: int) -> Any:
        event = stored_[n]
        return run_agent("test.escalation", event.model_dump(),
                         key=f"test.escalation|{event.id}")  # fmt: skip

    # The third first: deferred (a Celery retry), nothing claimed, nothing done
    third = deliver(2)
    assert third.retry is not None and third.event_kinds == ["deferred"]
    assert third.outcome is None or third.outcome["status"] != "succeeded"
    # Another key is not held up
    assert deliver(9).status == "succeeded" and other.stored
    # The first, then the second, then the third again
    assert deliver(0).status == "succeeded"
    assert deliver(2).retry is not None, "still behind the second"
    assert deliver(1).status == "succeeded"
    assert deliver(2).status == "succeeded"
    with transaction(agents.settings.database) as conn:
        order = conn.execute(
            select(EFFECTS.c.event_id)
            .where(EFFECTS.c.subscriber == "test.escalation")
            .order_by(EFFECTS.c.id)
        ).scalars()
        assert list(order) == [stored_[n].id for n in (9, 0, 1, 2)]


# --- a real worker and a real relay, the relay killed -----------------------------


def test_a_relay_killed_while_relaying_loses_and_doubles_nothing(
    sqlite_url: str, redis_client: Any, tmp_path: Any
) -> None:
    """300 events published while a relay process runs; it is SIGKILLed once
    with events pending and started again. Every subscriber handles each
    event it matches once (counted in a ledger without a UNIQUE key)."""
    import os
    import signal
    import sys

    from fleetworks.models import PROBE_EFFECT_LOG
    from fleetworks.procs import Child
    from tests.conftest import start_worker, truncate

    truncate(sqlite_url)
    worker = start_worker(sqlite_url, tmp_path, f"evw{os.getpid()}", app_ref="tests.events_app")
    env = dict(os.environ, FLEET_DATABASE_URL=sqlite_url, FLEET_QUEUE=worker.queue)
    argv = [sys.executable, "-m", "fleetworks", "-A", "tests.events_app", "relay"]

    def start_relay(n: int) -> Child:
        return Child(f"relay{n}", argv, env, log_path=tmp_path / f"relay{n}.log").start()

    def pending() -> int:
        with transaction(sqlite_url) as conn:
            return int(
                conn.execute(select(func.count()).where(EVENTS.c.relayed_at.is_(None))).scalar_one()
            )

    def runs() -> Counter[str]:
        log = PROBE_EFFECT_LOG.c
        with transaction(sqlite_url) as conn:
            rows = conn.execute(select(log.effect_key, func.count()).group_by(log.effect_key))
            return Counter({str(k): int(n) for k, n in rows})

    relay = start_relay(1)
    try:
        engine = get_engine(sqlite_url)
        ids: list[str] = []
        for n in range(300):
            if n == 150:
                # When the relay is frozen while 100 events are stored at once,
                # then thawed and killed 20 ms later, in the middle of its batch
                relay.signal(signal.SIGSTOP)
                with engine.begin() as conn:
                    ids += [
                        events.publish("test.happened", {"n": n + i}, connection=conn).event_id
                        for i in range(100)
                    ]
                assert pending() >= 100
                relay.signal(signal.SIGCONT)
                time.sleep(0.02)  # the test is about the moment: inside the batch
                relay.signal(signal.SIGKILL)
                relay.stop(5)
                relay = start_relay(2)
            if 150 <= n < 250:
                continue
            with engine.begin() as conn:
                ids.append(events.publish("test.happened", {"n": n}, connection=conn).event_id)
        # Then every subscriber handles each event it matches once
        expected = {f"events.audit|{i}" for i in ids} | {
            f"events.even|{i}" for n, i in enumerate(ids) if n % 2 == 0
        }
        wait_for(lambda: set(runs()) == expected, 60, "every event handled")
        wait_for(lambda: pending() == 0, 10, "every event marked relayed")
        assert set(runs().values()) == {1}
    finally:
        relay.stop(5)
        worker.child.stop(15)


# --- waiting for an event ----------------------------------------------------------


class Assignment(BaseModel):
    ticket: str
    timeout_s: float = 30.0


@pytest.fixture
def escalation(agents: Fleet) -> Fleet:
    """An agent that assigns a ticket, then waits for its acknowledgement."""

    def escalate(ctx: RunContext, job: Assignment) -> Any:
        if ctx.resumed is None:
            ctx.db.execute(EFFECTS.insert().values(subscriber="assigned", event_id=job.ticket))
            return ctx.wait_for(
                "ticket.acknowledged", {"ticket": job.ticket}, timeout_s=job.timeout_s
            )
        how = "acknowledged" if ctx.resumed.event is not None else "timed out"
        ctx.db.execute(EFFECTS.insert().values(subscriber=how, event_id=job.ticket))
        return {"ticket": job.ticket, "resumed": how}

    agents.agent(AgentSpec(name="test.escalate", payload=Assignment, key=lambda j: j.ticket))(
        escalate
    )
    return agents


def wait_rows(fleet: Fleet) -> list[tuple[str, str | None]]:
    with transaction(fleet.settings.database) as conn:
        rows = conn.execute(select(WAITS.c.state, WAITS.c.event_id).order_by(WAITS.c.id)).all()
    return [(str(s), e) for s, e in rows]


def test_a_wait_holds_no_worker_and_is_resolved_once_by_the_matching_event(
    escalation: Fleet, run_agent: Any, fleet_worker: Any
) -> None:
    # Given a run that assigned ticket T-1 and ended waiting for its acknowledgement
    done = run_agent("test.escalate", {"ticket": "T-1"})
    assert done.status == "succeeded" and done.outcome["result"]["waiting"]["wait"] == 1
    assert wait_rows(escalation) == [("waiting", None)]
    # When another ticket's acknowledgement arrives, then T-1's (twice)
    relay = Relay(escalation)
    events.publish("ticket.acknowledged", {"ticket": "T-9"}, app=escalation.app)
    ack = events.publish("ticket.acknowledged", {"ticket": "T-1"}, app=escalation.app)
    events.publish("ticket.acknowledged", {"ticket": "T-1", "again": True}, app=escalation.app)
    relay.relay_once()
    # Then the wait is resolved by the first matching one, and the agent resumes once
    assert wait_rows(escalation) == [("resolved", ack.event_id)]
    wait_for(lambda: ("acknowledged", "T-1") in effects(escalation), 30, "the continuation")
    assert relay.resolved == 1 and relay.fire_timers() == 0
    assert effects(escalation) == [("acknowledged", "T-1"), ("assigned", "T-1")]
    with transaction(escalation.settings.database) as conn:
        keys = conn.execute(
            select(OUTCOMES.c.idempotency_key, OUTCOMES.c.status, OUTCOMES.c.result)
            .where(OUTCOMES.c.agent == "test.escalate")
            .order_by(OUTCOMES.c.id)
        ).all()
    assert [(k, s) for k, s, _ in keys] == [("T-1", "succeeded"), ("T-1|wait:1", "succeeded")]
    assert keys[1].result == {"ticket": "T-1", "resumed": "acknowledged"}


def test_a_wait_times_out_from_the_database_even_after_every_process_restarted(
    escalation: Fleet, run_agent: Any, fleet_worker: Any
) -> None:
    run_agent("test.escalate", {"ticket": "T-2", "timeout_s": 0.5})
    # A relay that did not exist when the wait was stored fires its timer
    fresh = Relay(escalation)
    wait_for(lambda: fresh.fire_timers() == 1, 10, "the deadline to pass")
    assert wait_rows(escalation) == [("timed_out", None)]
    wait_for(lambda: ("timed out", "T-2") in effects(escalation), 30, "the continuation")
    # An acknowledgement after the timeout resumes nothing
    events.publish("ticket.acknowledged", {"ticket": "T-2"}, app=escalation.app)
    fresh.relay_once()
    assert fresh.resolved == 0 and fresh.fire_timers() == 0
    assert effects(escalation) == [("assigned", "T-2"), ("timed out", "T-2")]


def test_an_event_that_arrives_as_the_timer_fires_resumes_once(
    escalation: Fleet, run_agent: Any, fleet_worker: Any
) -> None:
    """The matching event is stored just as the deadline passes; a relay pass
    and a timer pass race on two threads: one resolves it, one continuation."""
    import threading

    for i in range(5):
        ticket = f"R-{i}"
        run_agent("test.escalate", {"ticket": ticket, "timeout_s": 0.2})
        assert wait_rows(escalation)[-1] == ("waiting", None)
        events.publish("ticket.acknowledged", {"ticket": ticket}, app=escalation.app)
        time.sleep(0.25)  # the test is about the moment: past the deadline
        a, b = Relay(escalation), Relay(escalation)
        start = threading.Barrier(2)

        def race(step: Any, start: threading.Barrier = start) -> None:
            start.wait()
            step()

        threads = [threading.Thread(target=race, args=(f,)) for f in (a.relay_once, b.fire_timers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.resolved + b.timed_out == 1, (a.resolved, b.timed_out)
        wait_for(
            lambda t=ticket: any(e == t and s != "assigned" for s, e in effects(escalation)),
            30,
            "the continuation",
        )
    runs = Counter(e for s, e in effects(escalation) if s != "assigned")
    assert runs == Counter({f"R-{i}": 1 for i in range(5)})


def test_a_wait_both_resolvers_read_as_waiting_is_resolved_by_one(
    escalation: Fleet, run_agent: Any, fleet_worker: Any
) -> None:
    """The interleaving the race above may or may not reach, forced: a relay
    and a timer pass have both read the wait as waiting; each then resolves it."""
    run_agent("test.escalate", {"ticket": "B-1", "timeout_s": 30})
    with transaction(escalation.settings.database) as conn:
        seen_by_both = conn.execute(select(WAITS)).one()
    ack = events.publish("ticket.acknowledged", {"ticket": "B-1"}, app=escalation.app)
    event = events.stored(escalation.settings.database, topics=["ticket.acknowledged"])[0]
    assert event.id == ack.event_id
    with transaction(escalation.settings.database) as conn:
        by_event = events._resolve(conn, escalation.app, seen_by_both, event)
    with transaction(escalation.settings.database) as conn:
        by_timer = events._resolve(conn, escalation.app, seen_by_both, None)
    assert (by_event, by_timer) == (True, False)
    assert wait_rows(escalation) == [("resolved", ack.event_id)]
    wait_for(lambda: ("acknowledged", "B-1") in effects(escalation), 30, "the continuation")


def test_a_wait_asks_for_a_valid_topic_and_timeout(escalation: Fleet, run_agent: Any) -> None:
    def bad(ctx: RunContext, job: Assignment) -> Any:
        return ctx.wait_for("ticket.acknowledged", {"ticket": job.ticket}, timeout_s=job.timeout_s)

    escalation.agent(AgentSpec(name="test.badwait", payload=Assignment, key=lambda j: j.ticket,
                               max_retries=0))(bad)  # fmt: skip
    done = run_agent("test.badwait", {"ticket": "X", "timeout_s": 0})
    assert done.status == "dead" and "timeout_s: must be above 0" in done.outcome["error"]
    assert wait_rows(escalation) == []


# --- waking the relay ---------------------------------------------------------------


def test_a_committed_event_wakes_the_relay_long_before_it_would_look(database_url: str) -> None:
    """With a 60 s poll, only a wake-up relays an event within seconds: on
    PostgreSQL the NOTIFY of the application's own transaction, on SQLite the
    Redis message a fleet's publish sends after its commit."""
    import threading
    import uuid

    from fleetworks.app import create_app, fleet_of
    from fleetworks.settings import Settings
    from tests.conftest import BROKER_URL, LOCKS_URL

    settings = Settings(broker_url=BROKER_URL, redis_url=LOCKS_URL, database_url=database_url,
                        queue=f"wake-{uuid.uuid4().hex[:6]}")  # fmt: skip
    fleet = fleet_of(create_app(settings, name=f"wake-{uuid.uuid4().hex[:6]}"))
    relay, stop = Relay(fleet, poll_s=60.0), threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    postgres = database_url.startswith("postgresql")
    try:
        (relay.listening_postgres if postgres else relay.listening).wait(10)
        time.sleep(0.2)  # the first pass (nothing pending) is over; the relay waits
        if postgres:
            with get_engine(database_url).begin() as conn:
                published = events.publish("order.placed", {"n": 1}, connection=conn)
        else:
            published = events.publish("order.placed", {"n": 1}, app=fleet.app)

        def relayed() -> bool:
            with transaction(database_url) as conn:
                return (
                    conn.execute(
                        select(EVENTS.c.relayed_at).where(EVENTS.c.event_id == published.event_id)
                    ).scalar_one()
                    is not None
                )

        started = time.monotonic()
        wait_for(relayed, 10, "the relay to wake")
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(5)
