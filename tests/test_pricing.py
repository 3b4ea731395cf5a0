"""The pricing agent: guard rails on any input, a seeded market, and the
guarded task against a real worker, Redis and database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from agents.pricing import (
    Catalogue,
    Market,
    Product,
    Rails,
    Strategy,
    decide,
    price_drop,
    target,
)
from fleetworks.db import transaction
from fleetworks.models import AGENT_STATE_HISTORY, OUTCOMES
from fleetworks.proving.demo_pricing import ENTRY, settle_in_order
from tasks.schema import PRICE_CHANGES
from tests.conftest import Worker, start_worker, truncate, wait_for

cents = st.integers(min_value=1, max_value=10_000_000)


@st.composite
def products(draw: st.DrawFn) -> Product:
    floor = draw(cents)
    ceiling = draw(st.integers(min_value=floor, max_value=floor * 20))
    rails = Rails(floor, ceiling, draw(st.floats(min_value=0.001, max_value=1.0)))
    strategy = draw(st.sampled_from(list(Strategy)))
    return Product("sku-1", max(1, floor // 2), floor, rails, strategy)


markets = st.builds(
    Market,
    competitor_cents=st.lists(cents, min_size=1, max_size=5).map(tuple),
    demand=st.floats(min_value=0.0, max_value=5.0),
)


@given(product=products(), market=markets, data=st.data())
def test_a_price_inside_the_rails_stays_inside_and_moves_one_step_at_most(
    product: Product, market: Market, data: st.DataObject
) -> None:
    rails = product.rails
    current = data.draw(st.integers(rails.floor_cents, rails.ceiling_cents), label="current")
    new = decide(current, product, market).price_cents
    assert rails.floor_cents <= new <= rails.ceiling_cents
    assert abs(new - current) <= rails.step_cents(current)


@given(product=products(), market=markets, current=cents)
def test_any_price_ends_inside_the_rails(product: Product, market: Market, current: int) -> None:
    # Given a current price that may be outside the rails (rails changed since)
    new = decide(current, product, market).price_cents
    assert product.rails.floor_cents <= new <= product.rails.ceiling_cents


@st.composite
def at_target(draw: st.DrawFn) -> tuple[Product, Market]:
    """A product whose rails hold its target in this market (built so, not filtered)."""
    market = draw(markets)
    strategy = draw(st.sampled_from(list(Strategy)))
    probe = Product("sku-1", 1, 1, Rails(1, 1, 0.5), strategy)
    goal = target(probe, market)
    floor = draw(st.integers(min_value=1, max_value=goal))
    ceiling = draw(st.integers(min_value=goal, max_value=goal * 20))
    rails = Rails(floor, ceiling, draw(st.floats(min_value=0.001, max_value=1.0)))
    return Product("sku-1", max(1, floor // 2), floor, rails, strategy), market


@given(case=at_target())
def test_a_price_at_its_target_stays_there(case: tuple[Product, Market]) -> None:
    product, market = case
    goal = target(product, market)
    assert product.rails.floor_cents <= goal <= product.rails.ceiling_cents
    decision = decide(goal, product, market)
    assert decision.price_cents == goal and decision.limited_by is None


@given(before=markets, now=markets, threshold=st.floats(min_value=0.01, max_value=0.5))
def test_a_price_drop_is_the_cheapest_quote_falling_past_the_threshold(
    before: Market, now: Market, threshold: float
) -> None:
    dropped = price_drop(before, now, threshold)
    low_before, low_now = min(before.competitor_cents), min(now.competitor_cents)
    if low_now < low_before * (1 - threshold):
        assert dropped == (low_before, low_now)
    else:
        assert dropped is None


def test_bad_rails_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="floor <= ceiling"):
        Rails(500, 400, 0.05)
    with pytest.raises(ValueError, match="max_step"):
        Rails(100, 400, 0.0)


def test_the_catalogue_and_its_market_are_a_function_of_the_seed() -> None:
    a, b, other = Catalogue(11, 50), Catalogue(11, 50), Catalogue(12, 50)
    assert list(a.ids()) == list(b.ids()) and len(list(a.ids())) == 50
    pid = "sku-000007"
    assert a.product(pid) == b.product(pid) != other.product(pid)
    assert a.market(a.product(pid), 3) == b.market(b.product(pid), 3)
    assert a.market(a.product(pid), 3) != a.market(a.product(pid), 4), "prices move"
    strategies = {a.product(p).strategy for p in a.ids()}
    assert strategies == set(Strategy)


@pytest.fixture
def pricing_worker(
    database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Worker]:
    w = start_worker(database_url, tmp_path, "pricingw")
    yield w
    w.child.stop(15)


def tick_payload(tick: str, products: int) -> dict[str, object]:
    return {"tick": tick, "slot": tick.split("@", 1)[1], "entry": "poll-prices",
            "products": products}  # fmt: skip


def test_a_tick_reprices_every_product_once_even_when_sent_twice(
    pricing_worker: Worker,
) -> None:
    url = pricing_worker.database_url
    ticks = ["poll-prices@2026-11-22T10:00:00.000Z", "poll-prices@2026-11-22T10:00:30.000Z"]
    for tick in ticks:
        # Given a tick sent twice (two leaders in a split moment)
        for _ in range(2):
            pricing_worker.enqueue("pricing.poll", tick_payload(tick, 40), key=tick)

        def priced(tick: str = tick) -> bool:
            with transaction(url) as conn:
                n = conn.execute(
                    select(func.count()).where(PRICE_CHANGES.c.tick == tick)
                ).scalar_one()
            return n == 40

        wait_for(priced, 60, f"40 products priced in {tick}")
    wait_for(lambda: _settled_reprices(url) == 80, 30, "every reprice settled")
    with transaction(url) as conn:
        changes = conn.execute(
            select(PRICE_CHANGES.c.product_id, PRICE_CHANGES.c.tick, PRICE_CHANGES.c.old_cents,
                   PRICE_CHANGES.c.new_cents, PRICE_CHANGES.c.version)
            .order_by(PRICE_CHANGES.c.product_id, PRICE_CHANGES.c.tick)
        ).all()  # fmt: skip
        history = conn.execute(select(func.count()).select_from(AGENT_STATE_HISTORY)).scalar_one()
        polls = conn.execute(
            select(OUTCOMES.c.status, OUTCOMES.c.attempts).where(OUTCOMES.c.agent == "pricing.poll")
        ).all()
    # Then each product was priced once per tick, the second tick starting
    # from the first one's price, with one state version per decision
    assert len(changes) == 80 and history == 80
    for first, second in zip(changes[::2], changes[1::2], strict=True):
        assert first.product_id == second.product_id
        assert second.old_cents == first.new_cents
        assert (first.version, second.version) == (1, 2)
    assert sorted(polls) == [("succeeded", 1), ("succeeded", 1)]


def _settled_reprices(url: str) -> int:
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    (OUTCOMES.c.agent == "pricing.reprice") & (OUTCOMES.c.status == "succeeded")
                )
            ).scalar_one()
        )


def _reprice_runs(url: str, conn: Any, jobs: list[dict[str, Any]], *, joined: bool) -> list[Any]:
    from config import app
    from fleetworks.app import fleet_of
    from fleetworks.context import RunContext
    from fleetworks.locks import Lease
    from tasks.pricing import REPRICE, reprice_key

    spec = fleet_of(app).require_agent(REPRICE)
    return [
        RunContext(
            spec=spec,
            task_id=f"t-{i}",
            worker="w-1",
            payload=spec.payload(**job),
            idempotency_key=reprice_key(job["product_id"], job["tick"]),
            entity_key=f"product:{job['product_id']}",
            lease=Lease("e", "o", 7 + i, 30_000),
            attempts=1,
            database_url=url,
            shared=conn,
            joined=joined,
        )
        for i, job in enumerate(jobs)
    ]


def _priced(url: str) -> tuple[list[Any], list[Any], list[Any]]:
    from fleetworks.models import AGENT_STATE, EVENTS

    with transaction(url) as conn:
        return (
            conn.execute(
                select(PRICE_CHANGES.c.product_id, PRICE_CHANGES.c.tick, PRICE_CHANGES.c.old_cents,
                       PRICE_CHANGES.c.new_cents, PRICE_CHANGES.c.version,
                       PRICE_CHANGES.c.fencing_token)
                .order_by(PRICE_CHANGES.c.product_id, PRICE_CHANGES.c.tick)
            ).all(),
            conn.execute(
                select(AGENT_STATE.c.entity_key, AGENT_STATE.c.state, AGENT_STATE.c.version)
                .order_by(AGENT_STATE.c.entity_key)
            ).all(),
            conn.execute(
                select(EVENTS.c.event_id, EVENTS.c.key, EVENTS.c.data).order_by(EVENTS.c.event_id)
            ).all(),
        )  # fmt: skip


def test_a_batch_of_reprices_writes_what_the_reprices_one_by_one_write(database_url: str) -> None:
    """The pricing agent's batch behaviour and its per-item behaviour agree:
    the same states, versions, price rows, events and results."""
    from tasks.pricing import reprice, reprice_together

    url = database_url
    ticks = [
        ("poll-prices@2026-11-22T10:00:00.000Z", 100),
        ("poll-prices@2026-11-22T11:00:00.000Z", 101),
    ]
    seen: list[Any] = []
    for way in ("one by one", "together"):
        truncate(url)
        results = []
        # Given 60 products priced in two ticks (the second from the first's state)
        for tick, window in ticks:
            jobs = [{"product_id": f"sku-{i:06d}", "tick": tick, "window": window}
                    for i in range(60)]  # fmt: skip
            with transaction(url) as conn:
                runs = _reprice_runs(url, conn, jobs, joined=way == "together")
                if way == "together":
                    results += reprice_together(runs)
                else:
                    for ctx in runs:
                        results.append(reprice(ctx, ctx.payload))
                        ctx.close_db(commit=True)
        seen.append((results, *_priced(url)))
    # Then both ways wrote the same and answered the same
    (one, changes, states, events), (together, *rest) = seen
    assert len(changes) == 120 and len(states) == 60 and events
    assert [r.version for r in states] == [2] * 60
    assert (changes, states, events) == tuple(rest)
    assert one == together


def test_the_demo_measures_the_first_cycles_in_slot_order_and_no_more() -> None:
    """Ticks that settled while the demo looked away (a beat's failover on a
    slow machine) are not extra cycles, and a later tick settled first waits
    for the one before it, so the chain is checked between neighbours."""

    ticks = [f"{ENTRY}@2026-01-01T00:00:{s:02d}Z" for s in (0, 4, 8)]
    settled = {ticks[0]: 200, ticks[1]: 120, ticks[2]: 200}
    done: list[str] = []
    assert settle_in_order(ticks, done, settled.__getitem__, 200, 2) == [ticks[0]]
    assert done == [ticks[0]]
    settled[ticks[1]] = 200
    assert settle_in_order(ticks, done, settled.__getitem__, 200, 2) == [ticks[1]]
    assert done == ticks[:2]
    assert settle_in_order(ticks, done, settled.__getitem__, 200, 2) == []
    assert done == ticks[:2]
