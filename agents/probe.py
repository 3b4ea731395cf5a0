"""The probe agent: a task with a measurable effect and a controllable duration.

Benchmarks run it with no work to measure the guard's cost; fault tests run
it with work to have something in flight when a worker is killed. Its one
effect is a row in a ledger with a UNIQUE key, so a duplicate is caught.
"""

from __future__ import annotations

import os
import signal
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
    #: Raise on attempts 1..N (a flaky dependency): exercises retries and dead letters.
    fail_attempts: int = Field(default=0, ge=0, le=100)
    #: Kill the process running it (a poison message): exercises max_deliveries.
    crash: bool = False


class ProbeFailure(RuntimeError):
    """The failure a probe with ``fail_attempts`` raises."""


class ProbeSink(Protocol):
    def record(self, effect_key: str, fencing_token: int) -> None: ...


def run(
    probe: Probe,
    sink: ProbeSink,
    fencing_token: int,
    *,
    attempt: int = 1,
    sleep: Callable[[float], None] = time.sleep,
    crash: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGKILL),
) -> dict[str, str]:
    if probe.crash:
        crash()
    if attempt <= probe.fail_attempts:
        raise ProbeFailure(f"probe {probe.id}: failing attempt {attempt} of {probe.fail_attempts}")
    if probe.work_ms:
        sleep(probe.work_ms / 1000)
    if probe.effect:
        sink.record(probe.id, fencing_token)
    return {"id": probe.id}
