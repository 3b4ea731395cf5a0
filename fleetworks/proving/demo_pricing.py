"""The pricing part of ``fleetworks demo``: full cycles over a catalogue, two
beats running and the leading one killed mid-run.

It starts a worker and two beat processes whose schedule reprices the whole
catalogue every ``interval_s``. Once the first cycle's fan-out has run, it
kills the leading beat with SIGKILL and measures how long until the other
leads. It also re-sends every tick once, as a second leader in a split
moment would, to show the duplicate suppressed. It waits for ``cycles``
cycles to settle and reports each from the durable record: products priced
(rows in ``price_changes`` for the tick), cycle wall time (from the tick's
slot to its last price), duplicates suppressed, state conflicts retried,
effects duplicated and tasks lost. It also checks every product's prices
chain from cycle to cycle (each cycle's old price is the previous cycle's
new one): a lost update would break the chain.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from sqlalchemy import func, select

from fleetworks import constants as c
from fleetworks import progress
from fleetworks.db import transaction
from fleetworks.models import EVENTS, GUARD_EVENTS, OUTCOMES, TERMINAL, EventKind
from fleetworks.procs import Child, wait_workers
from fleetworks.redisconn import get_redis
from fleetworks.services import FleetProcesses, echo
from fleetworks.settings import Settings

POLL, REPRICE, ENTRY = "pricing.poll", "pricing.reprice", "poll-prices"
_o, _e = OUTCOMES.c, GUARD_EVENTS.c


def _prices() -> Any:
    """The pricing agent's effect table: the reference deployment's (tasks/schema.py)."""
    from tasks.schema import PRICE_CHANGES

    return PRICE_CHANGES.c


@dataclass
class Cycle:
    tick: str
    products_priced: int
    tasks_settled: int
    tasks_lost: int
    cycle_wall_s: float
    fan_out_s: float
    duplicates_suppressed: int
    state_conflicts_retried: int
    effects_duplicated: int
    #: ``competitor.price_dropped`` events the cycle emitted, and the alerts
    #: ``pricing.alert`` recorded for them (one each, UNIQUE on the event).
    price_drops_emitted: int = 0
    alerts_recorded: int = 0


@dataclass
class PricingReport:
    products: int
    interval_s: float
    beats: int
    beat_killed: bool
    beat_failover_s: float | None
    duplicate_ticks_sent: int
    cycles: list[Cycle] = field(default_factory=list)
    price_chain_breaks: int = 0
    tasks_lost: int = 0
    effects_duplicated: int = 0
    wall_s: float = 0.0
    ok: bool = False


#: Reprices per second assumed when choosing a default interval: about what a
#: two-process worker sustains on a small machine, so cycles do not overlap.
_ASSUMED_RATE_PER_S = 150.0


def default_interval_s(products: int) -> float:
    """An interval about twice the time a cycle of ``products`` should take."""
    return float(max(10, round(2 * products / _ASSUMED_RATE_PER_S)))


def _slot(tick: str) -> datetime:
    return datetime.fromisoformat(tick.split("@", 1)[1].replace("Z", "+00:00"))


def poll_ticks(url: str) -> dict[str, tuple[str, datetime, datetime | None]]:
    """tick id -> (status, started, finished) of every pricing poll run."""
    with transaction(url) as conn:
        rows = conn.execute(
            select(_o.idempotency_key, _o.status, _o.started_at, _o.finished_at).where(
                _o.agent == POLL
            )
        ).all()
    return {str(r[0]): (str(r[1]), r[2], r[3]) for r in rows}


def _reprice_keys(tick: str) -> Any:
    return (_o.agent == REPRICE) & _o.idempotency_key.like(f"%|{tick}")


def settled_count(url: str, tick: str) -> int:
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count()).where(_reprice_keys(tick) & _o.status.in_(TERMINAL))
            ).scalar_one()
        )


def drops_and_alerts(url: str, tick: str) -> tuple[int, int]:
    """Price-drop events the cycle ``tick`` emitted, and alerts recorded for it."""
    from tasks.schema import PRICE_ALERTS

    with transaction(url) as conn:
        drops = conn.execute(
            select(func.count()).where(
                (EVENTS.c.topic == "competitor.price_dropped")
                & (EVENTS.c.data["tick"].as_string() == tick)
            )
        ).scalar_one()
        alerts = conn.execute(select(func.count()).where(PRICE_ALERTS.c.tick == tick)).scalar_one()
    return int(drops), int(alerts)


def wait_for_alerts(url: str, ticks: list[str], timeout_s: float = 30.0) -> None:
    """Until every price drop of ``ticks`` has its alert (the relay runs behind)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(d == a for d, a in (drops_and_alerts(url, t) for t in ticks)):
            return
        time.sleep(0.25)


def measure_cycle(url: str, tick: str, products: int, poll: tuple[Any, ...]) -> Cycle:
    p = _prices()
    with transaction(url) as conn:
        priced, last = conn.execute(
            select(func.count(), func.max(p.created_at)).where(p.tick == tick)
        ).one()
        settled = conn.execute(
            select(func.count()).where(_reprice_keys(tick) & _o.status.in_(TERMINAL))
        ).scalar_one()
        results = conn.execute(select(_o.result).where(_reprice_keys(tick))).scalars().all()
        keys = (_e.agent.in_([POLL, REPRICE])) & (
            _e.idempotency_key.like(f"%|{tick}") | (_e.idempotency_key == tick)
        )
        events: dict[str, int] = dict(
            conn.execute(select(_e.kind, func.count()).where(keys).group_by(_e.kind)).all()
        )
    conflicts = sum(int((r or {}).get("conflicts", 0)) for r in results)
    _, started, finished = poll
    wall = (_as_utc(last) - _slot(tick)).total_seconds() if last is not None else 0.0
    fan_out = (_as_utc(finished) - _as_utc(started)).total_seconds() if finished else 0.0
    # price_changes is UNIQUE on (product, tick): a second price for a product
    # in one cycle cannot commit; a run that tries is a duplicate_effect event.
    duplicated = int(events.get(EventKind.DUPLICATE_EFFECT, 0))
    return Cycle(
        tick=tick,
        products_priced=int(priced),
        tasks_settled=int(settled),
        tasks_lost=products - int(settled),
        cycle_wall_s=round(wall, 2),
        fan_out_s=round(fan_out, 2),
        duplicates_suppressed=int(events.get(EventKind.SKIPPED_DUPLICATE, 0))
        + int(events.get(EventKind.SKIPPED_LOCKED, 0)),
        state_conflicts_retried=conflicts,
        effects_duplicated=duplicated,
        price_drops_emitted=drops_and_alerts(url, tick)[0],
        alerts_recorded=drops_and_alerts(url, tick)[1],
    )


def _as_utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def chain_breaks(url: str, ticks: list[str]) -> int:
    """Products whose old price in a cycle is not their new price of the cycle before."""
    with transaction(url) as conn:
        rows = conn.execute(
            select(
                _prices().product_id, _prices().tick, _prices().old_cents, _prices().new_cents
            ).where(_prices().tick.in_(ticks))
        ).all()
    order = {t: i for i, t in enumerate(sorted(ticks, key=_slot))}
    by_product: dict[str, list[tuple[int, int, int]]] = {}
    for pid, tick, old, new in rows:
        by_product.setdefault(pid, []).append((order[tick], old, new))
    breaks = 0
    for changes in by_product.values():
        changes.sort()
        breaks += sum(1 for a, b in itertools.pairwise(changes) if b[1] != a[2])
    return breaks


def leader_pid(client: redis.Redis, app_name: str) -> int | None:
    holder = client.get(c.LOCK_KEY + c.BEAT_LEADER_ENTITY + app_name)
    if not holder:
        return None
    text = holder.decode() if isinstance(holder, bytes) else str(holder)
    ident = text.rsplit(":", 1)[0]
    return int(ident.rsplit("/", 1)[1]) if "/" in ident else None


class Run:
    """One pricing demo run: its processes and what it has seen so far."""

    def __init__(self, app: Celery, settings: Settings, products: int, interval_s: float) -> None:
        self.app = app
        self.settings = settings
        env = {
            "FLEET_PRICING_PRODUCTS": str(products),
            "FLEET_PRICING_INTERVAL_S": str(interval_s),
            "FLEET_MENTIONS_PER_POLL": "0",
        }
        self.fleet = FleetProcesses(settings, env=env)
        self.report = PricingReport(products, interval_s, 2, False, None, 0)
        self.resent: set[str] = set()

    def start(self) -> list[Child]:
        self.fleet.worker("pricing-worker")
        self.fleet.relay("pricing-relay")
        beats = [self.fleet.beat("pricing-beat-a"), self.fleet.beat("pricing-beat-b")]
        wait_workers(self.app, [f"pricing-worker@{self.fleet.hostname}"], timeout_s=60)
        return beats

    def kill_leader(self, beats: list[Child]) -> None:
        client = get_redis(self.settings.redis, **self.settings.redis_tls(self.settings.redis))
        pid = leader_pid(client, self.app.main or "fleet")
        leader = next((b for b in beats if b.pid == pid), None)
        if leader is None:
            return
        other = next(b for b in beats if b is not leader)
        leader.signal(signal.SIGKILL)
        killed = time.monotonic()
        echo(f"pricing demo: SIGKILL leading beat {leader.name} (pid {pid})")
        deadline = killed + 60
        while time.monotonic() < deadline:
            if leader_pid(client, self.app.main or "fleet") == other.pid:
                self.report.beat_failover_s = round(time.monotonic() - killed, 2)
                echo(f"pricing demo: {other.name} leads after {self.report.beat_failover_s}s")
                break
            time.sleep(0.05)
        self.report.beat_killed = True

    def resend(self, tick: str) -> None:
        """Send ``tick`` again, as a second leader would; it must not run twice."""
        payload = {"tick": tick, "slot": tick.split("@", 1)[1], "entry": ENTRY,
                   "products": self.report.products}  # fmt: skip
        self.app.send_task(POLL, kwargs={"payload": payload, "key": tick}, task_id=tick)
        self.resent.add(tick)
        self.report.duplicate_ticks_sent += 1


def settle_in_order(
    ticks: list[str],
    done: list[str],
    settled: Callable[[str], int],
    products: int,
    cycles: int,
) -> list[str]:
    """Append to ``done`` the ticks that settled since, in slot order; return them.

    The cycles measured are the first ``cycles`` ticks, consecutive: a tick
    not settled yet stops the walk (a later tick settled first waits for it,
    so the price chain is checked across neighbours), and ticks past
    ``cycles`` are left out however many settled while the demo looked away
    (a beat's failover, a slow machine).
    """
    added: list[str] = []
    for tick in ticks:
        if len(done) >= cycles:
            break
        if tick in done:
            continue
        priced = settled(tick)
        progress.update(f"pricing: cycle {len(done) + 1}", priced, products)
        if priced < products:
            break
        done.append(tick)
        added.append(tick)
    return added


def run_pricing(
    app: Celery,
    settings: Settings,
    *,
    products: int,
    interval_s: float,
    cycles: int,
    timeout_s: float,
) -> PricingReport:
    run = Run(app, settings, products, interval_s)
    url = settings.database
    started = time.monotonic()
    # Ticks polled before this run (an earlier demo on the same database) are not its cycles.
    since = datetime.now(UTC)
    done: list[str] = []
    try:
        beats = run.start()
        echo(f"pricing demo: {products} products every {interval_s:g}s, two beats")
        while len(done) < cycles and time.monotonic() - started < timeout_s:
            ticks = sorted(
                (
                    t
                    for t, (status, at, _) in poll_ticks(url).items()
                    if status == "succeeded" and _as_utc(at) >= since
                ),
                key=_slot,
            )
            for tick in ticks:
                if tick not in run.resent:
                    run.resend(tick)
                if not run.report.beat_killed:
                    run.kill_leader(beats)
            for tick in settle_in_order(
                ticks, done, lambda t: settled_count(url, t), products, cycles
            ):
                echo(f"pricing demo: cycle {done.index(tick) + 1} ({tick}) settled")
            progress.update("pricing: cycles", len(done), cycles)
            time.sleep(0.5)
        time.sleep(1.0)  # duplicates re-sent late are still being skipped
        wait_for_alerts(url, done)
        polls = poll_ticks(url)
        run.report.cycles = [measure_cycle(url, t, products, polls[t]) for t in done]
    finally:
        run.fleet.stop()
    return summarize(run.report, url, done, cycles, time.monotonic() - started)


def summarize(
    report: PricingReport, url: str, done: list[str], cycles: int, wall_s: float
) -> PricingReport:
    report.price_chain_breaks = chain_breaks(url, done)
    report.tasks_lost = sum(cy.tasks_lost for cy in report.cycles)
    report.effects_duplicated = sum(cy.effects_duplicated for cy in report.cycles)
    report.wall_s = round(wall_s, 1)
    every_product = all(cy.products_priced == report.products for cy in report.cycles)
    every_alert = all(cy.alerts_recorded == cy.price_drops_emitted for cy in report.cycles)
    report.ok = (
        len(done) >= cycles
        and every_product
        and every_alert
        and report.tasks_lost == 0
        and report.effects_duplicated == 0
        and report.price_chain_breaks == 0
        and report.beat_failover_s is not None
        and report.beat_failover_s < c.BEAT_LEASE_TTL_S + 2 * c.BEAT_LOOP_S + 5
    )
    return report


def render(report: PricingReport) -> str:
    verdict = "OK" if report.ok else "NOT OK"
    lines = [
        f"pricing: {verdict}  {report.products} products every {report.interval_s:g}s, "
        f"{report.beats} beats, leader killed: {report.beat_killed}, "
        f"failover {report.beat_failover_s} s",
    ]
    for i, cy in enumerate(report.cycles, 1):
        lines.append(
            f"  cycle {i}  priced {cy.products_priced}  in {cy.cycle_wall_s} s "
            f"(fan-out {cy.fan_out_s} s)  lost {cy.tasks_lost}  duplicated "
            f"{cy.effects_duplicated}  duplicates suppressed {cy.duplicates_suppressed}  "
            f"price drops {cy.price_drops_emitted} alerted {cy.alerts_recorded}  "
            f"state conflicts retried {cy.state_conflicts_retried}"
        )
    lines.append(f"  price chain breaks {report.price_chain_breaks}")
    return "\n".join(lines)


def as_dict(report: PricingReport) -> dict[str, Any]:
    return asdict(report)
