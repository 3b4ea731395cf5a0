"""The one scaling policy, used by the worker autoscaler and the exporter.

``desired = clamp(ceil((backlog + running) / target_per_worker), min, max)``.
:class:`Scaler` adds the motion: up at once to what is desired, down one
step at a time and only after the load has stayed below the current size
for ``scale_down_after_s`` (each step restarts that window), so a burst
gets capacity within one look and a pause between bursts does not flap the
pool. Pure: time is passed in, nothing is read from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Policy:
    min_workers: int
    max_workers: int
    target_per_worker: int
    scale_down_after_s: float

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers, got {self}")
        if self.target_per_worker < 1:
            raise ValueError(f"target_per_worker must be >= 1, got {self.target_per_worker}")
        if self.scale_down_after_s < 0:
            raise ValueError(f"scale_down_after_s must be >= 0, got {self.scale_down_after_s}")

    def desired(self, backlog: int, running: int) -> int:
        load = max(0, backlog) + max(0, running)
        wanted = math.ceil(load / self.target_per_worker)
        return min(self.max_workers, max(self.min_workers, wanted))


@dataclass
class Scaler:
    """The size a pool should have now, given the load seen over time."""

    policy: Policy
    current: int
    #: Since when the load has wanted fewer workers than ``current``.
    low_since: float | None = None

    def step(self, now: float, backlog: int, running: int) -> int:
        want = self.policy.desired(backlog, running)
        if want > self.current:
            self.current, self.low_since = want, None
        elif want == self.current:
            self.low_since = None
        elif self.low_since is None:
            self.low_since = now
        elif now - self.low_since >= self.policy.scale_down_after_s:
            self.current, self.low_since = self.current - 1, now
        self.current = min(self.policy.max_workers, max(self.policy.min_workers, self.current))
        return self.current
