"""Leader election among beat processes: one lease in Redis, with a term.

Any number of beats may run; the one holding the lease schedules, the others
try to take it at every loop. The lease is an entity lock of
:mod:`fleetworks.locks` (``SET NX PX`` and a fence counter in one script), so
each leadership gets a *term* that only grows, the fencing token of
everything the leader writes to the shared schedule state. The TTL is a few
seconds and the leader renews it every loop; a leader that dies is replaced
within the TTL plus one loop, one that stops cleanly releases at once.

A leader that cannot reach Redis does not know whether it still leads, so
:meth:`Leadership.hold` answers False and it stops scheduling until Redis
answers again; a paused leader that wakes up after its TTL finds the lease
gone (or taken) at its next ``hold`` and steps down. The short moment
between a stall and that check is why ticks are also deduplicated where
they run (:mod:`fleetworks.ticks`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from fleetworks import constants as c
from fleetworks import stats
from fleetworks.locks import EntityLocks, Lease

log = logging.getLogger(__name__)


class Leadership:
    """This process's claim to lead ``name``."""

    def __init__(
        self,
        locks: Callable[[], EntityLocks],
        name: str,
        identity: str,
        ttl_s: float = c.BEAT_LEASE_TTL_S,
    ) -> None:
        self._locks = locks
        self.entity = c.BEAT_LEADER_ENTITY + name
        self.identity = identity
        self.ttl_s = ttl_s
        self._lease: Lease | None = None
        self._renewed_at = 0.0

    @property
    def lease(self) -> Lease | None:
        """The lease while this process leads."""
        return self._lease

    def hold(self) -> bool:
        """Renew the lease if held, else try to take it; True while leading."""
        try:
            if self._lease is not None and self._locks().renew(self._lease):
                self._renewed_at = time.monotonic()
                return True
            if self._lease is not None:
                log.warning("beat %s: lost the lead (term %d)", self.identity, self.term)
                self._lease = None
            lease = self._locks().acquire(self.entity, self.ttl_s, owner=self.identity)
        except redis.RedisError as exc:
            return self._unreachable(exc)
        if lease is None:
            return False
        self._lease, self._renewed_at = lease, time.monotonic()
        log.warning("beat %s: leading (term %d)", self.identity, lease.fencing_token)
        if lease.fencing_token > 1:  # someone led before: a change of leader
            stats.count(self._locks().client, stats.BEAT_FAILOVERS)
        return True

    def _unreachable(self, exc: redis.RedisError) -> bool:
        if self._lease is not None and time.monotonic() - self._renewed_at > self.ttl_s:
            log.warning("beat %s: lost the lead, Redis unreachable (%s)", self.identity, exc)
            self._lease = None
        return False

    @property
    def term(self) -> int:
        return self._lease.fencing_token if self._lease is not None else 0

    def leader(self) -> str | None:
        """Who leads now (the holder's identity), as Redis says."""
        holder = self._locks().holder(self.entity)
        return holder.rsplit(":", 1)[0] if holder else None

    def release(self) -> None:
        """Step down (a clean stop): another beat takes over at its next loop."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self._locks().release(lease)
            except redis.RedisError:
                log.warning("beat %s: could not release the lead; it expires", self.identity)
