"""What the fleet did, on /metrics: counted from the results database."""

from __future__ import annotations

import urllib.request
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fleetworks import events, inflight
from fleetworks.agent import Fleet
from fleetworks.locks import Lease
from fleetworks.metrics import serve


def scrape(fleet: Fleet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    server = serve(fleet.app, fleet.settings, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_first_delivery_running_counts_as_in_progress(fleet: Fleet, run_agent: Any) -> None:
    """A first delivery has no row until its outcome: its in-flight record
    counts it among the runs in progress, beside the ``claimed`` rows."""
    record = inflight.encode(agent="probe.run", entity="probe:r", task_id="t-r", worker="w",
                             queue=None, payload={"id": "r"})  # fmt: skip
    lease = fleet.locks.acquire_run("probe:r", 6.0, "", "t-r", key="probe:r", record=record)
    assert isinstance(lease, Lease)
    run_agent("probe.run", {"id": "f", "fail_attempts": 1})  # a failed row, its record kept
    key = ("fleetworks_runs_in_progress", (("agent", "probe.run"), ("status", "claimed")))
    got = scrape(fleet)
    assert got[key] == 1
    assert got[("fleetworks_runs_in_progress", (("agent", "probe.run"), ("status", "failed")))] == 1
    fleet.locks.release(lease)
    assert run_agent("probe.run", {"id": "r"}).status == "succeeded"
    assert scrape(fleet).get(key, 0) == 0


def test_outcomes_guard_events_dead_letters_and_events_are_counted(
    fleet: Fleet, run_agent: Any
) -> None:
    # Given runs that succeeded, one run twice, a rejected payload, a dead key
    # and an event nobody relayed yet
    for i in range(3):
        run_agent("probe.run", {"id": f"m-{i}"})
    run_agent("probe.run", {"id": "m-0"})
    run_agent("probe.run", {"id": 7})
    run_agent("probe.run", {"id": "m-dead", "fail_attempts": 99})
    for _ in range(3):
        run_agent("probe.run", {"id": "m-dead", "fail_attempts": 99})
    events.publish("order.placed", {"n": 1}, app=fleet.app)
    # When /metrics is scraped
    got = scrape(fleet)
    probe = (("agent", "probe.run"),)

    def value(name: str, **labels: str) -> float | None:
        return got.get((name, tuple(sorted({**dict(probe), **labels}.items()))))

    # Then every run is counted from the results database
    assert got[("fleetworks_ledger_up", ())] == 1
    assert value("fleetworks_outcomes_total", status="succeeded") == 3
    assert value("fleetworks_outcomes_total", status="skipped_duplicate") == 1
    assert value("fleetworks_outcomes_total", status="rejected") == 1
    assert value("fleetworks_outcomes_total", status="dead") == 1
    assert value("fleetworks_dead_letters") == 1
    assert value("fleetworks_guard_events_total", kind="skipped_duplicate") == 1
    assert got[("fleetworks_events_stored_total", (("topic", "order.placed"),))] == 1
    assert got[("fleetworks_events_pending", ())] == 1


def test_an_unreachable_database_is_a_gauge_not_a_failed_scrape(fleet: Fleet) -> None:
    fleet.settings = fleet.settings.model_copy(
        update={"database_url": "sqlite:////nonexistent/folder/fleet.db"}
    )
    got = scrape(fleet)
    assert got[("fleetworks_ledger_up", ())] == 0
    assert not any(name.startswith("fleetworks_outcomes") for name, _ in got)


def _sample(got: dict[Any, float], name: str, **labels: str) -> float | None:
    return got.get((name, tuple(sorted(labels.items()))))


def test_run_durations_and_queue_waits_are_histograms_per_agent(
    fleet: Fleet, run_agent: Any
) -> None:
    # Given a run of 60 ms whose message waited 5 s, and one with no publish time
    import time

    run_agent("probe.run", {"id": "slow", "work_ms": 60}, sent_at=time.time() - 5)
    run_agent("probe.run", {"id": "unstamped"})
    got = scrape(fleet)
    agent = "probe.run"
    run = "fleetworks_run_duration_seconds_bucket"
    wait = "fleetworks_queue_wait_seconds_bucket"
    # Then both runs have a duration; the 60 ms one is above 50 ms
    assert _sample(got, "fleetworks_run_duration_seconds_count", agent=agent) == 2
    assert _sample(got, run, agent=agent, le="0.05") == 1
    assert _sample(got, run, agent=agent, le="+Inf") == 2
    assert (_sample(got, "fleetworks_run_duration_seconds_sum", agent=agent) or 0) >= 0.06
    # And only the stamped one has a queue wait, in the bucket above 1 s
    assert _sample(got, "fleetworks_queue_wait_seconds_count", agent=agent) == 1
    assert _sample(got, wait, agent=agent, le="1.0") == 0
    assert _sample(got, wait, agent=agent, le="10.0") == 1
    assert 5 <= (_sample(got, "fleetworks_queue_wait_seconds_sum", agent=agent) or 0) < 10


def test_leases_lost_and_fencing_refusals_are_told_apart(
    fleet: Fleet, run_agent: Any, monkeypatch: Any
) -> None:
    import redis

    from fleetworks.proving import probe

    # Given a run whose lease is lost while it runs
    real = probe.SqlProbeSink.record

    def record_then_lose(self: Any, effect_key: str, token: int, *, unique: bool = True) -> None:
        real(self, effect_key, token, unique=unique)
        self._ctx.lease.lost.set()

    monkeypatch.setattr(probe.SqlProbeSink, "record", record_then_lose)
    assert run_agent("probe.run", {"id": "lost"}).event_kinds == ["stale_write"]
    monkeypatch.undo()
    # And a claim refused because a higher token is stored (Redis lost its data)
    fleet.locks.raise_fence("probe:g", 50)
    run_agent("probe.run", {"id": "g", "fail_attempts": 1})
    redis.Redis.from_url(fleet.settings.redis).flushdb()
    assert run_agent("probe.run", {"id": "g"}).event_kinds == ["stale_write"]
    # Then /metrics counts one of each
    got = scrape(fleet)
    assert _sample(got, "fleetworks_leases_lost_total", agent="probe.run") == 1
    assert _sample(got, "fleetworks_fencing_refusals_total", agent="probe.run") == 1
    assert _sample(got, "fleetworks_outcomes_total", agent="probe.run", status="stale_write") == 2


def test_beat_leadership_and_its_failovers_are_read_from_redis(fleet: Fleet) -> None:
    from fleetworks import constants as c
    from fleetworks.leader import Leadership

    name = fleet.app.main or "fleet"
    first = Leadership(lambda: fleet.locks, name, "beat-a", ttl_s=5)
    second = Leadership(lambda: fleet.locks, name, "beat-b", ttl_s=5)
    # Given no beat: no leader, term 0
    got = scrape(fleet)
    assert got[("fleetworks_beat_leader", ())] == 0
    assert got[("fleetworks_beat_failovers_total", ())] == 0
    # When one beat leads, then dies (its lease gone) and the other takes over
    assert first.hold()
    assert got != scrape(fleet)
    fleet.locks.client.delete(c.LOCK_KEY + first.entity)
    assert second.hold()
    # Then a leader holds term 2, after one failover
    got = scrape(fleet)
    assert got[("fleetworks_beat_leader", ())] == 1
    assert got[("fleetworks_beat_leader_term", ())] == 2
    assert got[("fleetworks_beat_failovers_total", ())] == 1
    second.release()
    assert scrape(fleet)[("fleetworks_beat_leader", ())] == 0


def test_each_groups_leader_term_and_failovers_are_served(fleet: Fleet) -> None:
    from fleetworks import constants as c
    from fleetworks.leadership import GROUP_ENTITY, Election, backend_for

    backend = backend_for(fleet.settings)
    first = Election(backend, "eu-west", "ctl-a", 5)
    second = Election(backend, "eu-west", "ctl-b", 5)
    other = Election(backend, "us-east", "ctl-a", 5)
    # Given two groups: eu-west led by a, which dies and b takes over; us-east led by a
    assert first.hold() and other.hold()
    fleet.locks.client.delete(c.LOCK_KEY + GROUP_ENTITY + "eu-west")
    assert second.hold()
    # Then each group's term is served, and eu-west's one failover
    got = scrape(fleet)
    assert _sample(got, "fleetworks_leader_term", group="eu-west") == 2
    assert _sample(got, "fleetworks_leader_term", group="us-east") == 1
    assert _sample(got, "fleetworks_leader_failovers_total", group="eu-west") == 1
    assert ("fleetworks_leader_failovers_total", (("group", "us-east"),)) not in got
    # and a group nobody leads has no term
    second.resign()
    other.resign()
    assert ("fleetworks_leader_term", (("group", "eu-west"),)) not in scrape(fleet)


def test_relay_lag_is_the_age_of_the_oldest_unrelayed_event(fleet: Fleet) -> None:
    from sqlalchemy import update

    from fleetworks.claims import now
    from fleetworks.db import transaction
    from fleetworks.models import EVENTS

    assert scrape(fleet)[("fleetworks_events_relay_lag_seconds", ())] == 0
    events.publish("order.placed", {"n": 1}, app=fleet.app)
    with transaction(fleet.settings.database) as conn:
        conn.execute(update(EVENTS).values(created_at=now() - timedelta(seconds=90)))
    lag = scrape(fleet)[("fleetworks_events_relay_lag_seconds", ())]
    assert 90 <= lag < 120


def test_the_pricing_agents_business_figures(fleet: Fleet, run_agent: Any) -> None:
    from pathlib import Path

    from sqlalchemy import update

    from fleetworks.claims import now
    from fleetworks.db import transaction
    from fleetworks.migrate import upgrade
    from fleetworks.ticks import slot_text
    from tasks.schema import PRICE_CHANGES

    upgrade(
        fleet.settings.database,
        str(Path(__file__).resolve().parent.parent / "config" / "migrations"),
    )
    import config  # noqa: F401  (its app registers the pricing figures on /metrics)

    # Given a tick whose slot was 4 s ago, repricing 5 products
    slot = now() - timedelta(seconds=4)
    tick = f"poll-prices@{slot_text(slot)}"
    for i in range(5):
        payload = {"product_id": f"sku-{i:05d}", "tick": tick, "window": 1}
        assert run_agent("pricing.reprice", payload).status == "succeeded"
    # And one product priced long ago (no longer actively managed)
    old_tick = f"poll-prices@{slot_text(slot - timedelta(days=1))}"
    run_agent("pricing.reprice", {"product_id": "sku-09999", "tick": old_tick, "window": 0})
    with transaction(fleet.settings.database) as conn:
        from fleetworks.models import AGENT_STATE

        long_ago = now() - timedelta(days=1)
        conn.execute(
            update(AGENT_STATE)
            .where(AGENT_STATE.c.entity_key == "sku-09999")
            .values(updated_at=long_ago)
        )
        conn.execute(
            update(PRICE_CHANGES)
            .where(PRICE_CHANGES.c.tick == old_tick)
            .values(created_at=long_ago)
        )
    got = scrape(fleet)
    # Then the dashboard's figures: 5 products managed, about 4 s from slot
    # to price, 5 changes in the latest cycle, 6 changes in all
    assert got[("fleetworks_pricing_products_active", ())] == 5
    assert 4 <= got[("fleetworks_pricing_adjustment_seconds", ())] < 30
    assert got[("fleetworks_pricing_cycle_price_changes", ())] == 5
    assert got[("fleetworks_pricing_price_changes_total", ())] == 6


def test_a_worker_records_when_each_claimed_message_was_published(worker: Any) -> None:
    from sqlalchemy import select

    from fleetworks.db import transaction
    from fleetworks.models import OUTCOMES
    from tests.conftest import wait_for

    worker.enqueue("probe.run", {"id": "stamped"})

    def row() -> Any:
        with transaction(worker.database_url) as conn:
            return conn.execute(
                select(OUTCOMES.c.status, OUTCOMES.c.queued_at, OUTCOMES.c.started_at).where(
                    OUTCOMES.c.idempotency_key == "probe:stamped"
                )
            ).first()

    done = wait_for(lambda: (r := row()) is not None and r.status == "succeeded" and r, 30)
    assert done.queued_at is not None and done.queued_at <= done.started_at
