"""Counters of rare fleet decisions, kept in Redis for ``/metrics``.

What the reaper restores, beat's and every group's changes of leader and the autoscaler's
decisions happen a few times a minute at most, in processes that write no
outcome row for them, so they cannot be counted from the results database
the way runs are (:mod:`fleetworks.ledger_metrics`). Each is one ``HINCRBY``
on the hash ``fleet:stats`` in the lock store's Redis, by whichever process
decides: every process and host adds to the same field, an exporter restart
loses nothing, and the guarded path never touches it. A count that cannot be
written (Redis unreachable) is logged and lost; the decision itself is not
affected.
"""

from __future__ import annotations

import logging
from typing import Final

import redis

from fleetworks import constants as c

log = logging.getLogger(__name__)

#: ``fleet:stats`` is a hash: counter name -> count. Never expires.
STATS_KEY: Final = c.KEY_PREFIX + "stats"

REAPER_RESTORED: Final = "reaper_restored"
BEAT_FAILOVERS: Final = "beat_failovers"
#: Messages the broker lost that the reaper published again from the outbox.
OUTBOX_REPUBLISHED: Final = "outbox_republished"
LEADER_FAILOVERS: Final = "leader_failovers"


def leader_failovers_field(group: str) -> str:
    """The counter of leaderships of ``group`` won after its first."""
    return f"{LEADER_FAILOVERS}:{group}"


def autoscale_field(queue: str, direction: str) -> str:
    """The counter of the autoscaler's ``up``/``down`` decisions for ``queue``."""
    return f"autoscale:{direction}:{queue}"


def count(client: redis.Redis, field: str, n: int = 1) -> None:
    """Add ``n`` to ``field``; never raises (a lost count is logged)."""
    if n <= 0:
        return
    try:
        client.hincrby(STATS_KEY, field, n)
    except redis.RedisError as exc:
        log.warning("stats: %s +%d not counted (%s)", field, n, exc)


def read(client: redis.Redis) -> dict[str, int]:
    """Every counter, by name."""
    raw = client.hgetall(STATS_KEY)
    return {_text(k): int(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
