"""The dynamic-pricing agent: reprice each product of a catalogue every tick.

A simulated catalogue stands in for a shop and its market: every product has
a cost, a list price, guard rails and a strategy; competitor prices and a
demand signal move from tick to tick. All of it is a pure function of the
seed, the product and the tick's window, so any worker (or a test) computes
the same market for the same tick.

The behaviour is :func:`decide`: from the product's current price (its
state, kept outside the worker) and the market, a new price that follows the
strategy but never leaves the rails. Prices are integer cents.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

#: Competitors quoted for every product.
COMPETITORS = 3


class Strategy(StrEnum):
    #: The competitors' median.
    MATCH = "match"
    #: Just under the cheapest competitor.
    UNDERCUT = "undercut"
    #: Above the median, for a product that sells on more than price.
    PREMIUM = "premium"


@dataclass(frozen=True, slots=True)
class Rails:
    """Guard rails: a price stays within [floor, ceiling] and moves at most
    ``max_step`` (a fraction of the current price, at least one cent) per tick."""

    floor_cents: int
    ceiling_cents: int
    max_step: float

    def __post_init__(self) -> None:
        if not 0 < self.floor_cents <= self.ceiling_cents:
            raise ValueError(f"rails need 0 < floor <= ceiling, got {self}")
        if not 0 < self.max_step <= 1:
            raise ValueError(f"max_step must be in (0, 1], got {self.max_step}")

    def step_cents(self, current: int) -> int:
        return max(1, math.floor(current * self.max_step))


@dataclass(frozen=True, slots=True)
class Product:
    product_id: str
    cost_cents: int
    list_cents: int
    rails: Rails
    strategy: Strategy


@dataclass(frozen=True, slots=True)
class Market:
    competitor_cents: tuple[int, ...]
    #: 1.0 is normal demand; above it the agent leans up, below it down.
    demand: float


@dataclass(frozen=True, slots=True)
class Decision:
    price_cents: int
    target_cents: int
    #: What held the price back from the target, if anything.
    limited_by: str | None


class Reprice(BaseModel):
    """The payload of one product's repricing in one tick."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    product_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    tick: str = Field(min_length=1, max_length=300)
    #: The tick's window: which market the catalogue shows.
    window: int = Field(ge=0)


def target(product: Product, market: Market) -> int:
    """Where the strategy would put the price, before the rails."""
    quotes = market.competitor_cents
    if product.strategy is Strategy.UNDERCUT:
        base = min(quotes) * 0.99
    elif product.strategy is Strategy.PREMIUM:
        base = statistics.median(quotes) * 1.05
    else:
        base = statistics.median(quotes)
    # Half of the demand signal's deviation moves the price with it.
    return max(1, round(base * (1 + (market.demand - 1) / 2)))


def decide(current_cents: int, product: Product, market: Market) -> Decision:
    """The next price: toward the target, one bounded step, inside the rails.

    From a current price inside the rails the result moves at most one step;
    from one outside them (rails tightened since), it goes to the nearest rail.
    """
    rails = product.rails
    goal = target(product, market)
    step = rails.step_cents(current_cents)
    price, limited = goal, None
    if abs(goal - current_cents) > step:
        price = current_cents + (step if goal > current_cents else -step)
        limited = "max_step"
    if price < rails.floor_cents:
        price, limited = rails.floor_cents, "floor"
    elif price > rails.ceiling_cents:
        price, limited = rails.ceiling_cents, "ceiling"
    return Decision(price, goal, limited)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


class Catalogue:
    """``size`` products and their market, all derived from ``seed``."""

    def __init__(self, seed: int, size: int, max_step: float = 0.05) -> None:
        if size < 0:
            raise ValueError(f"catalogue size must be >= 0, not {size}")
        self.seed, self.size, self.max_step = seed, size, max_step

    def ids(self) -> Iterator[str]:
        return (f"sku-{i:06d}" for i in range(self.size))

    def product(self, product_id: str) -> Product:
        rng = _rng(self.seed, product_id)
        cost = rng.randint(200, 20_000)
        list_price = round(cost * rng.uniform(1.3, 1.8))
        rails = Rails(round(cost * 1.1), round(cost * 2.5), self.max_step)
        strategy = rng.choice(list(Strategy))
        return Product(product_id, cost, list_price, rails, strategy)

    def market(self, product: Product, window: int) -> Market:
        """The competitors' quotes and the demand in ``window``: slow waves plus noise."""
        rng = _rng(self.seed, product.product_id, window)
        phase = _rng(self.seed, product.product_id).uniform(0, 2 * math.pi)
        quotes = tuple(
            max(1, round(product.list_cents * (1 + 0.2 * math.sin(window / 5 + phase + k))
                         * rng.uniform(0.95, 1.05)))
            for k in range(COMPETITORS)
        )  # fmt: skip
        demand = 1 + 0.3 * math.sin(window / 7 + phase) + rng.uniform(-0.1, 0.1)
        return Market(quotes, demand)


def price_drop(before: Market, now: Market, threshold: float) -> tuple[int, int] | None:
    """``(lowest quote before, lowest now)`` when the cheapest competitor fell by
    more than ``threshold`` (a fraction) from one window to the next, else None."""
    low_before, low_now = min(before.competitor_cents), min(now.competitor_cents)
    if low_now < low_before * (1 - threshold):
        return low_before, low_now
    return None
