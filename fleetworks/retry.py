"""The one place that decides whether a run is retried, waits, or gives up.

Four situations reach it, each with the facts that count for it:

- ``DELIVERED``: a key was claimed for the ``attempts``-th time; past the
  agent's ``max_deliveries`` it is ``dead`` (a message that kills its worker
  every time stops here);
- ``FAILED``: the behaviour raised; retried with exponential back-off and
  full jitter while ``attempts`` has not passed ``max_retries``, then
  ``dead``; a duplicate effect (a UNIQUE violation) is ``dead`` at once,
  since running it again cannot succeed;
- ``CONTENDED``: another run holds the entity's lease; an agent declared
  ``on_contention="skip"`` gives up at once (``skipped_locked``), otherwise
  the message re-queues itself with back-off (Celery's ``retries`` counts
  those) until ``MAX_CONTENTION_RETRIES``;
- ``UNREACHABLE``: Redis or the database did not answer; the run waits in
  place with a short back-off while its budget lasts (``UNREACHABLE_WAIT_S``,
  at most half the time limit), then re-queues itself.

Nothing else in fleetworks reads ``max_retries``, ``max_deliveries``, the
contention limit or a back-off constant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from sqlalchemy.exc import IntegrityError

from fleetworks import timing

if TYPE_CHECKING:
    from fleetworks.context import AgentSpec

#: Seconds: first back-off when the entity lock is held by another worker.
#: Doubles per attempt up to ``CONTENTION_BACKOFF_MAX_S``, with full jitter.
CONTENTION_BACKOFF_BASE_S: Final = 0.2

#: Seconds: ceiling of the contention back-off, so a waiting task re-checks
#: at least this often whether the holder finished (then it is a duplicate).
CONTENTION_BACKOFF_MAX_S: Final = 5.0

#: Count: how often a task may re-queue itself on lock contention before it
#: is recorded as ``skipped_locked``. 100 tries at <= 5 s outlast any lease.
MAX_CONTENTION_RETRIES: Final = 100

#: Seconds: first back-off while Redis or the database is unreachable.
UNREACHABLE_BACKOFF_BASE_S: Final = 0.2

#: Seconds: ceiling of the back-off while Redis or the database is
#: unreachable: short, so work resumes within seconds of the service.
UNREACHABLE_BACKOFF_MAX_S: Final = 3.0

#: Seconds a task waits in place, retrying, while Redis or the database is
#: unreachable, before it falls back to a Celery retry (capped at half its
#: time limit). Waiting in place keeps the message with a live claim instead
#: of parking it as a countdown retry, which a worker death would strand
#: until the visibility timeout.
UNREACHABLE_WAIT_S: Final = 20.0


#: Seconds: back-off of a subscriber run deferred behind an earlier event of
#: its key (first, and cap): short, the earlier run is usually just ahead.
ORDER_BACKOFF_BASE_S: Final = 0.1
ORDER_BACKOFF_MAX_S: Final = 2.0


def backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, backoff_bound(attempt, base_s, cap_s))


def backoff_bound(attempt: int, base_s: float, cap_s: float) -> float:
    """The largest wait :func:`backoff` may return for ``attempt``.

    The exponent stops at 64 (any cap is reached long before): an attempt
    count from a message is not trusted to be small, and ``2 ** 10**30``
    would never finish.
    """
    return float(min(cap_s, base_s * (2 ** min(max(0, attempt), 64))))


class Situation(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    CONTENDED = "contended"
    UNREACHABLE = "unreachable"
    #: A subscriber's event whose key has an earlier event it has not handled.
    OUT_OF_ORDER = "out_of_order"


@dataclass(frozen=True, slots=True)
class Facts:
    situation: Situation
    #: Claims of the key so far (this one included).
    attempts: int = 0
    #: Times Celery re-queued this message (``request.retries``).
    retries: int = 0
    #: Waits in place so far while a service was unreachable.
    tries: int = 0
    #: Seconds spent waiting in place so far.
    waited_s: float = 0.0
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Proceed:
    """Go on with the run."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait in place this long, then run again."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Retry:
    """Re-queue the message after ``countdown`` seconds."""

    countdown: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop for good: ``dead`` (a key that cannot succeed) or ``skipped_locked``."""

    dead: bool
    reason: str


Decision = Proceed | Wait | Retry | GiveUp


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_contention_retries: int = MAX_CONTENTION_RETRIES
    unreachable_wait_s: float = UNREACHABLE_WAIT_S

    def decide(self, spec: AgentSpec, facts: Facts) -> Decision:
        match facts.situation:
            case Situation.DELIVERED:
                return self._delivered(spec, facts)
            case Situation.FAILED:
                return self._failed(spec, facts)
            case Situation.CONTENDED:
                return self._contended(spec, facts)
            case Situation.UNREACHABLE:
                return self._unreachable(spec, facts)
            case Situation.OUT_OF_ORDER:
                # Never given up: the earlier event is on its way (or is
                # replayed); skipping this one would lose it.
                wait = backoff(facts.retries, ORDER_BACKOFF_BASE_S, ORDER_BACKOFF_MAX_S)
                return Retry(wait, "an earlier event of this key is not handled yet")

    @staticmethod
    def _delivered(spec: AgentSpec, facts: Facts) -> Decision:
        if facts.attempts > spec.max_deliveries:
            return GiveUp(
                dead=True,
                reason=f"delivered {facts.attempts} times (max_deliveries "
                f"{spec.max_deliveries}); see the last error of earlier attempts",
            )
        return Proceed()

    @staticmethod
    def _failed(spec: AgentSpec, facts: Facts) -> Decision:
        error = facts.error
        what = f"{type(error).__name__}: {error}"
        if isinstance(error, IntegrityError):
            return GiveUp(dead=True, reason=f"duplicate effect, never retried: {what}")
        if facts.attempts > spec.max_retries:
            return GiveUp(dead=True, reason=f"out of retries ({spec.max_retries}): {what}")
        wait = backoff(facts.attempts, timing.RETRY_BACKOFF_BASE_S, timing.RETRY_BACKOFF_MAX_S)
        return Retry(wait, what)

    def _contended(self, spec: AgentSpec, facts: Facts) -> Decision:
        if spec.on_contention == "skip":
            return GiveUp(dead=False, reason="entity is locked (on_contention=skip)")
        if facts.retries >= self.max_contention_retries:
            return GiveUp(dead=False, reason="lock contention retries exhausted")
        wait = backoff(facts.retries, CONTENTION_BACKOFF_BASE_S, CONTENTION_BACKOFF_MAX_S)
        return Retry(wait, "entity is locked")

    def _unreachable(self, spec: AgentSpec, facts: Facts) -> Decision:
        wait = backoff(facts.tries, UNREACHABLE_BACKOFF_BASE_S, UNREACHABLE_BACKOFF_MAX_S)
        budget = min(self.unreachable_wait_s, spec.time_limit_s / 2)
        if facts.waited_s + wait > budget:
            return Retry(wait, f"unreachable: {facts.error}")
        return Wait(wait)
