"""Leader election among beat processes: an :class:`~fleetworks.leadership.Election`
on the Redis backend, with a term.

Any number of beats may run; the one holding the lease schedules, the others
try to take it at every loop. The lease is an entity lock of
:mod:`fleetworks.locks` (``SET NX PX`` and a fence counter in one script), so
each leadership gets a *term* that only grows, the fencing token of
everything the leader writes to the shared schedule state. The TTL is a few
seconds and the leader renews it every loop; a leader that dies is replaced
within the TTL plus one loop, one that stops cleanly releases at once.

A leader that cannot reach Redis does not know whether it still leads, so
:meth:`Leadership.hold` answers False and it stops scheduling until Redis
answers again; a paused leader that wakes up after its TTL steps down on its
own clock at its next ``hold`` (and finds the lease gone or taken). The short
moment between a stall and that check is why ticks are also deduplicated
where they run (:mod:`fleetworks.ticks`).

Beat keeps its own key (``fleet:lock:beat-leader:<app>``) and its own
failover counter (``beat_failovers``), so ``fleetworks_beat_*`` metrics and
running beats of earlier releases agree on who leads.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetworks import constants as c
from fleetworks import stats
from fleetworks.leadership import Election, RedisBackend, Term
from fleetworks.locks import EntityLocks


class Leadership:
    """This process's claim to lead beat ``name``."""

    def __init__(
        self,
        locks: Callable[[], EntityLocks],
        name: str,
        identity: str,
        ttl_s: float = c.BEAT_LEASE_TTL_S,
    ) -> None:
        backend = RedisBackend(
            locks, prefix=c.BEAT_LEADER_ENTITY, failovers_field=lambda _name: stats.BEAT_FAILOVERS
        )
        self.election = Election(backend, name, identity, ttl_s)
        self.entity = backend.entity(name)
        self.ttl_s = ttl_s

    @property
    def identity(self) -> str:
        return self.election.identity

    @identity.setter
    def identity(self, value: str) -> None:
        self.election.identity = value

    @property
    def lease(self) -> Term | None:
        """The leadership while this process leads (``handle`` is the lock token)."""
        return self.election.lease

    def hold(self) -> bool:
        """Renew the lease if held, else try to take it; True while leading."""
        return self.election.hold()

    @property
    def term(self) -> int:
        return self.election.term

    def leader(self) -> str | None:
        """Who leads now (the holder's identity), as Redis says."""
        info = self.election.leader()
        return info.leader if info else None

    def release(self) -> None:
        """Step down (a clean stop): another beat takes over at its next loop."""
        self.election.resign()
