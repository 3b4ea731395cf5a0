"""The pricing agent's business figures on ``/metrics``: what the seed's dashboard shows.

- ``fleetworks_pricing_products_active``: products whose price state was
  written within the last ``CYCLES`` pricing cycles (``FLEET_PRICING_INTERVAL_S``
  each): the products the fleet actively manages;
- ``fleetworks_pricing_adjustment_seconds``: mean time from a tick's slot to
  the product's price written, over the price changes of the same window;
- ``fleetworks_pricing_cycle_price_changes``: price changes written for the
  latest tick;
- ``fleetworks_pricing_price_changes_total``: every price change recorded.

Counted from the results database at scrape time, like the runtime's own
figures (:mod:`fleetworks.ledger_metrics`), over an indexed window so a
scrape reads a few cycles' rows, never the whole history.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from config.settings import pricing as pricing_settings
from fleetworks.claims import now
from fleetworks.db import transaction
from fleetworks.ledger_metrics import epoch_seconds
from fleetworks.models import AGENT_STATE
from fleetworks.settings import Settings
from tasks.pricing import REPRICE
from tasks.schema import PRICE_CHANGES

log = logging.getLogger(__name__)

#: Cycles: how recent a write must be for its product to count as active.
CYCLES = 3


class PricingCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.database_url = settings.database
        self.interval_s = pricing_settings.interval_s

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._families()
        except SQLAlchemyError as exc:  # fleetworks_ledger_up says the rest
            log.warning("metrics: pricing figures unavailable: %s", exc)

    def _families(self) -> Iterator[Metric]:
        since = now() - timedelta(seconds=CYCLES * self.interval_s)
        s, p = AGENT_STATE.c, PRICE_CHANGES.c
        with transaction(self.database_url) as conn:
            active = conn.execute(
                select(func.count()).where((s.agent == REPRICE) & (s.updated_at >= since))
            ).scalar_one()
            ticks = conn.execute(
                select(p.tick, func.count(), func.avg(epoch_seconds(conn, p.created_at)))
                .where(p.created_at >= since)
                .group_by(p.tick)
            ).all()
            total = conn.execute(select(func.count()).select_from(PRICE_CHANGES)).scalar_one()
        changes, seconds, latest = 0, 0.0, ("", 0)
        for tick, n, mean_at in ticks:
            slot = _slot_epoch(tick)
            if slot is None or mean_at is None:
                continue
            changes += n
            seconds += n * (float(mean_at) - slot)
            latest = max(latest, (tick, int(n)))
        yield _gauge(
            "fleetworks_pricing_products_active",
            f"Products whose price was written within the last {CYCLES} cycles.",
            int(active),
        )
        yield _gauge(
            "fleetworks_pricing_adjustment_seconds",
            f"Mean tick slot to price written, over the last {CYCLES} cycles.",
            seconds / changes if changes else 0.0,
        )
        yield _gauge(
            "fleetworks_pricing_cycle_price_changes",
            "Price changes written for the latest tick.",
            latest[1],
        )
        counter = CounterMetricFamily("fleetworks_pricing_price_changes", "Price changes recorded.")
        counter.add_metric([], int(total))
        yield counter


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family


def _slot_epoch(tick: str) -> float | None:
    """The slot of a tick id ``<entry>@<slot>`` in epoch seconds, or None."""
    _, _, text = tick.rpartition("@")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
