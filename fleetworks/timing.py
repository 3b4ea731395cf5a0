"""The timing rules between processes, derived in one place and checked.

A guarded run is covered by three clocks that must agree: the entity lease
in Redis (renewed by a heartbeat while the run lives), the claim row in the
results database (which the reaper reads to find a run whose holder died),
and the broker's visibility timeout (after which Redis hands an unacked
message to another worker). :class:`Timings` derives every one of them from
the settings and the tunables below, and :meth:`Timings.check` refuses a
combination whose relations do not hold, when the app is created rather than
in production:

- renewals: three fit in one lease, so two renewals in a row can fail (a
  Redis blip) before the lease runs out;
- the reaper republishes a claim only after a full lease without a holder,
  and a stranded (unclaimed) message only after a lease, a reaper tick and a
  margin;
- a message recorded in the outbox and found nowhere is taken for lost
  sooner than a stranded one (both are found by the reaper);
- the visibility timeout outlasts the longest time limit plus the longest
  retry wait, so the broker never redelivers a message a live worker still
  holds (celery#2599).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from fleetworks.settings import Settings

#: Seconds: upper bound of a lease (the entity lock's TTL) while its holder
#: renews it. A holder that dies blocks its entity at most this long, however
#: long its time limit: the heartbeat, not the TTL, keeps a long task's lock.
LEASE_TTL_MAX_S: Final = 4.0

#: Seconds between lease renewals: a third of the longest lease, so two
#: renewals in a row can fail (a Redis blip) before the lease runs out.
LEASE_RENEW_INTERVAL_S: Final = LEASE_TTL_MAX_S / 3

#: Seconds added to an agent's time limit to get its lock TTL: covers the
#: claim and outcome writes that run around the behaviour, and clock jitter.
LOCK_TTL_SLACK_S: Final = 5.0

#: Seconds: first back-off after a failure; doubles per retry, with jitter.
RETRY_BACKOFF_BASE_S: Final = 1.0

#: Seconds: ceiling of the failure back-off. Also bounds how long a retry
#: waits in a worker's memory, which the visibility timeout must exceed.
RETRY_BACKOFF_MAX_S: Final = 30.0

#: Seconds added to the max time limit + ``RETRY_BACKOFF_MAX_S`` to get the
#: visibility timeout: the broker's backstop for messages no claim covers.
VISIBILITY_SLACK_S: Final = 30.0

#: Seconds between kombu's sweeps that restore messages past the visibility
#: timeout (kombu's default is about 100 s: interval 10 x throttle 10).
UNACKED_RESTORE_INTERVAL_S: Final = 5

#: Seconds between reaper runs (a beat entry): how often claims whose holder
#: is gone are looked for. With the lease, it bounds how long a dead
#: holder's key waits: a lease and one tick.
REAP_INTERVAL_S: Final = 1.0

#: Seconds a republished key is left alone before it may be republished
#: again: the new delivery goes to the control queue, which no backlog
#: delays, so it is claimed within a tick or two unless every process of
#: every worker is busy; republished again too soon, it is a counted skip.
REPUBLISH_AFTER_S: Final = 10.0

#: Seconds of margin, past a lease and a reaper tick, before an unacked
#: message with no claim and no lease is taken for stranded.
STRANDED_MARGIN_S: Final = 4.0


#: Seconds after its publish before a message still in the outbox (no run
#: leased its entity) may be taken for lost (:mod:`fleetworks.outbox`). It
#: covers the time from recording to the broker's LPUSH (one pipeline) and
#: clock skew between publisher and reaper; too short costs a duplicate
#: message (run once), never a duplicate effect.
OUTBOX_AFTER_S: Final = 3.0


#: Seconds a key that succeeded keeps its done mark in Redis at least
#: (:mod:`fleetworks.inflight`): a delivery of it meanwhile is skipped before
#: its behaviour with no database round trip. Every redelivery the fleet
#: itself makes (contention retries, the reaper, restored and recovered
#: messages, kombu's visibility timeout) comes within it.
DONE_MARK_MIN_S: Final = 900.0


def lock_ttl_s(time_limit_s: float) -> float:
    """The lease TTL of a task with ``time_limit_s``: its limit plus slack,
    capped at ``LEASE_TTL_MAX_S`` (a longer task keeps its lease by renewal)."""
    return min(time_limit_s + LOCK_TTL_SLACK_S, LEASE_TTL_MAX_S)


@dataclass(frozen=True, slots=True)
class Timings:
    """Every derived duration of one fleet, in seconds."""

    lease_ttl_s: float
    renew_interval_s: float
    max_time_limit_s: float
    retry_backoff_max_s: float
    visibility_timeout_s: float
    reap_interval_s: float
    #: A claim still ``claimed`` this long with no lease held has lost its holder.
    orphaned_after_s: float
    #: A ``failed`` claim whose retry is this overdue lost its retry message.
    retry_overdue_after_s: float
    republish_after_s: float
    stranded_after_s: float
    #: A recorded message this old, in no queue, unacked entry or claim, was lost.
    outbox_after_s: float
    #: How long a key that succeeded keeps its done mark: past the visibility
    #: timeout, so even kombu's own late redelivery is skipped by it.
    done_mark_s: float = DONE_MARK_MIN_S

    @classmethod
    def from_settings(cls, settings: Settings) -> Timings:
        return cls.derive(settings.max_time_limit_s)

    @classmethod
    def derive(cls, max_time_limit_s: float) -> Timings:
        return cls(
            lease_ttl_s=LEASE_TTL_MAX_S,
            renew_interval_s=LEASE_RENEW_INTERVAL_S,
            max_time_limit_s=max_time_limit_s,
            retry_backoff_max_s=RETRY_BACKOFF_MAX_S,
            visibility_timeout_s=max_time_limit_s + RETRY_BACKOFF_MAX_S + VISIBILITY_SLACK_S,
            reap_interval_s=REAP_INTERVAL_S,
            orphaned_after_s=LEASE_TTL_MAX_S,
            retry_overdue_after_s=RETRY_BACKOFF_MAX_S + VISIBILITY_SLACK_S,
            republish_after_s=REPUBLISH_AFTER_S,
            stranded_after_s=LEASE_TTL_MAX_S + REAP_INTERVAL_S + STRANDED_MARGIN_S,
            outbox_after_s=OUTBOX_AFTER_S,
            done_mark_s=max(
                DONE_MARK_MIN_S,
                max_time_limit_s + RETRY_BACKOFF_MAX_S + 2 * VISIBILITY_SLACK_S,
            ),
        )

    def problems(self) -> list[str]:
        """Each relation between the durations that does not hold, as a sentence."""
        rules = [
            (
                self.renew_interval_s * 3 <= self.lease_ttl_s,
                "three lease renewals must fit in one lease",
            ),
            (
                self.visibility_timeout_s > self.max_time_limit_s + self.retry_backoff_max_s,
                "the visibility timeout must outlast the longest time limit plus the longest "
                "retry wait",
            ),
            (
                self.orphaned_after_s >= self.lease_ttl_s,
                "a claim may be taken for orphaned only after a full lease",
            ),
            (
                self.stranded_after_s > self.lease_ttl_s + self.reap_interval_s,
                "a message may be taken for stranded only after a lease and a reaper tick",
            ),
            (
                0 < self.outbox_after_s < self.stranded_after_s,
                "a lost message must be republished sooner than a stranded one is restored",
            ),
            (
                self.republish_after_s > self.reap_interval_s,
                "a republished key must be left alone for longer than a reaper tick",
            ),
        ]
        return [why for holds, why in rules if not holds]

    def check(self) -> None:
        """Raise ValueError naming every relation that does not hold."""
        broken = self.problems()
        if broken:
            raise ValueError(f"inconsistent timings {self}: " + "; ".join(broken))
