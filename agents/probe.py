"""The probe agent: a task with a measurable effect and a controllable duration.

Benchmarks run it with no work to measure the guard's cost; fault tests run
it with work to have something in flight when a worker is killed. Its one
effect is a row in a ledger with a UNIQUE key, so a duplicate is caught.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    #: Milliseconds of simulated work before the effect.
    work_ms: int = Field(default=0, ge=0, le=600_000)
    #: Write the ledger row (False: a no-op task, for benchmarks).
    effect: bool = True


class ProbeSink(Protocol):
    def record(self, effect_key: str, fencing_token: int) -> None: ...


def run(
    probe: Probe,
    sink: ProbeSink,
    fencing_token: int,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    if probe.work_ms:
        sleep(probe.work_ms / 1000)
    if probe.effect:
        sink.record(probe.id, fencing_token)
    return {"id": probe.id}
