"""Controllers: a loop per group that runs only in that group's leader.

``@fleet.controller(groups=["region:eu", "region:us"], every_s=1.0)`` (or
:func:`shared_controller` in a task module) declares ``loop(ctx)``; the
command ``fleetworks controllers`` runs every declared loop of the app, one
thread per group, each group with its own :class:`~fleetworks.leadership.Election`
(``FLEET_LEADERSHIP_URL``'s backend, lease ``FLEET_CONTROLLER_LEASE_S``,
default 3 s, renewed every third of it). Any number of such processes
(*replicas*) may run: a group's loop runs in its leader only, every
``every_s`` while :meth:`ControllerContext.still_leading` holds.

The loop gets a :class:`ControllerContext`: ``ctx.group``, ``ctx.term`` (the
fencing token of the cycle: send it with every action), ``ctx.still_leading()``,
``ctx.settings`` and ``ctx.db_url``. A cycle should take well under a third
of the lease: the group's thread renews between cycles.

**Fencing where the action lands.** A lease alone is not safe (a stopped
leader wakes up and acts after its lease ended). The receiving side refuses
a term lower than the highest it has seen for the group:
``accept_in(conn, group, term)`` (:mod:`fleetworks.leadership`) in the same
transaction as the action's own write, which then lands only if the term is
current; :meth:`ControllerContext.fence_in` is that call for the cycle's term
when the action lands in the fleet's results database. The term floor of
every campaign is the highest term the results database accepted for the
group (``leader_terms``), so a backend that lost its data still hands out
terms above every one the resource has seen.

**How replicas spread the groups.** Every replica writes a heartbeat into
the lock store's Redis (a sorted set per app, the score Redis's own clock)
every renewal; a replica counts as alive while its heartbeat is younger
than the lease. With ``G`` groups and ``N`` replicas alive the fair share is
``ceil(G / N)``:

- a replica looks at a group it does not lead every half renewal interval,
  and campaigns for it only while it leads fewer than its fair share, or when
  it has seen the group without a leader twice in a row (so no group stays
  leaderless for counting's sake, and a group just handed over goes to a
  replica below its share first);
- a replica leading more than its fair share resigns one group (its last by
  name) per renewal interval, and the replicas below their share take it.

So once the heartbeats are in, no replica leads all groups while another
leads none (with ``G >= N`` each leads ``floor(G/N)`` or ``ceil(G/N)``).
A replica that dies or stalls keeps its groups until their leases end (at
most a lease after its last renewal); within one renewal interval after that
another replica has seen each group leaderless twice, or the dead one's
heartbeat has ended and the others' share has grown, and takes it: within
the lease plus one renewal interval.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import redis
from sqlalchemy import Connection

from fleetworks import constants as c
from fleetworks.leadership import (
    Backend,
    Election,
    LeadershipError,
    TermFence,
    accept_in,
    backend_for,
    check_group,
)
from fleetworks.redisconn import get_redis
from fleetworks.settings import Settings

if TYPE_CHECKING:
    from fleetworks.agent import Fleet

log = logging.getLogger(__name__)

#: Sorted set of the replicas of an app: member identity, score its last
#: heartbeat on Redis's clock.
REPLICAS_KEY: Final = c.KEY_PREFIX + "controllers:"


@dataclass(frozen=True, slots=True)
class ControllerSpec:
    """A declared controller: its name, its groups and its rhythm."""

    name: str
    groups: tuple[str, ...]
    every_s: float
    loop: Callable[[ControllerContext], Any]


def make_spec(
    loop: Callable[[ControllerContext], Any],
    groups: Sequence[str],
    every_s: float,
    name: str | None = None,
) -> ControllerSpec:
    """A checked :class:`ControllerSpec` (bad groups or rhythm named in the error)."""
    if isinstance(groups, str) or not groups:
        raise ValueError(f"controller groups must be a non-empty list of names, not {groups!r}")
    for group in groups:
        check_group(group)
    if len(set(groups)) != len(groups):
        raise ValueError(f"controller groups must be distinct: {list(groups)!r}")
    if not every_s > 0:
        raise ValueError(f"controller every_s must be positive, not {every_s!r}")
    label = name or f"{loop.__module__}.{loop.__qualname__}"
    return ControllerSpec(label, tuple(groups), float(every_s), loop)


#: Controllers declared with :func:`shared_controller`: bound to every fleet.
_SHARED: list[ControllerSpec] = []
_BOUND: weakref.WeakSet[Fleet] = weakref.WeakSet()


def shared_controller(
    *, groups: Sequence[str], every_s: float, name: str | None = None
) -> Callable[[Callable[[ControllerContext], Any]], Callable[[ControllerContext], Any]]:
    """Declare a controller without importing an app, as ``shared_agent`` does."""

    def declare(loop: Callable[[ControllerContext], Any]) -> Callable[[ControllerContext], Any]:
        spec = make_spec(loop, groups, every_s, name)
        _SHARED.append(spec)
        for fleet in list(_BOUND):
            fleet.controllers[spec.name] = spec
        return loop

    return declare


def bind_shared(fleet: Fleet) -> None:
    """Give ``fleet`` every shared controller, now and later."""
    _BOUND.add(fleet)
    for spec in _SHARED:
        fleet.controllers[spec.name] = spec


@dataclass
class ControllerContext:
    """What a controller's cycle gets: its group, its term, the fleet's settings."""

    group: str
    term: int
    settings: Settings
    replica: str
    election: Election = field(repr=False)

    @property
    def db_url(self) -> str:
        return self.settings.database

    def still_leading(self) -> bool:
        """True only while this replica leads the group in ``term`` and its lease holds."""
        return self.election.term == self.term and self.election.still_leading()

    def fence_in(self, conn: Connection) -> bool:
        """Accept this cycle's term for the group inside ``conn``'s transaction
        (:func:`fleetworks.leadership.accept_in`): False if a higher term landed,
        and the caller's write must not count."""
        return accept_in(conn, self.group, self.term)


class Replicas:
    """This replica's heartbeat and the count of replicas alive (see module docstring)."""

    def __init__(
        self, client: Callable[[], redis.Redis], app: str, identity: str, ttl_s: float
    ) -> None:
        self._client = client
        self.key = REPLICAS_KEY + app
        self.identity = identity
        self.ttl_s = ttl_s
        self.alive = 1

    def beat(self) -> int:
        """Record this replica alive now; return how many are (at least 1)."""
        try:
            client = self._client()
            secs, micros = client.time()
            now = float(secs) + float(micros) / 1e6
            pipe = client.pipeline(transaction=True)
            pipe.zadd(self.key, {self.identity: now})
            pipe.zremrangebyscore(self.key, "-inf", now - self.ttl_s)
            pipe.zcard(self.key)
            self.alive = max(1, int(pipe.execute()[-1]))
        except redis.RedisError as exc:
            log.warning("controllers %s: heartbeat failed (%s)", self.identity, exc)
        return self.alive

    def leave(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._client().zrem(self.key, self.identity)


class _Share:
    """Which groups this replica leads, shared by its group threads."""

    def __init__(self, groups: int, replicas: Replicas) -> None:
        self.groups = groups
        self.replicas = replicas
        self.led: set[str] = set()
        self.lock = threading.Lock()

    def fair(self) -> int:
        return math.ceil(self.groups / max(1, self.replicas.alive))

    def may_campaign(self) -> bool:
        with self.lock:
            return len(self.led) < self.fair()

    def should_shed(self, group: str) -> bool:
        with self.lock:
            return len(self.led) > self.fair() and group == max(self.led)

    def set(self, group: str, leading: bool) -> None:
        with self.lock:
            (self.led.add if leading else self.led.discard)(group)


class GroupLoop:
    """One group's thread: campaign or renew every third of the lease, run the
    controller's cycle every ``every_s`` while leading."""

    def __init__(
        self,
        spec: ControllerSpec,
        group: str,
        *,
        backend: Backend,
        settings: Settings,
        identity: str,
        ttl_s: float,
        share: _Share,
    ) -> None:
        self.spec = spec
        self.group = group
        self.settings = settings
        self.identity = identity
        self.ttl_s = ttl_s
        self.share = share
        fence = self.fence = TermFence(settings.database)
        self.election = Election(
            backend,
            group,
            identity,
            ttl_s,
            on_elected=lambda _t: share.set(group, True),
            on_deposed=lambda _t: share.set(group, False),
            floor=fence.floor_for(group),
        )
        self.leaderless_since: float | None = None
        self.cycles = 0
        self._next_hold = 0.0
        self._next_cycle = 0.0

    def _wants(self, now: float) -> bool:
        """Campaign below the fair share, or for a group seen leaderless twice
        in a row (half a renewal apart)."""
        if self.share.may_campaign():
            return True
        try:
            leader = self.election.leader()
        except LeadershipError:
            return False
        if leader is not None:
            self.leaderless_since = None
            return False
        if self.leaderless_since is None:
            self.leaderless_since = now
            return False
        return True

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: a leader renews every third of the lease and runs its
        cycles in between; a replica that does not lead looks twice as often.
        A round that fails (the backend or the database unreachable) is logged
        and the next one comes: the group's thread never ends before ``stop``."""
        renew_s = self.ttl_s / 3
        self._next_hold = time.monotonic() + random.uniform(0, renew_s / 4)
        self._next_cycle = 0.0
        while not stop.is_set():
            try:
                self._round(renew_s)
            except Exception:
                log.exception(
                    "controller %s: %s, round for %s failed; next in %.1f s",
                    self.spec.name, self.identity, self.group, renew_s / 2,
                )  # fmt: skip
                self._next_hold = time.monotonic() + renew_s / 2
            wake = min(
                self._next_hold,
                self._next_cycle if self.election.lease is not None else self._next_hold,
            )
            stop.wait(max(0.01, min(wake - time.monotonic(), renew_s)))
        self.election.resign()

    def _round(self, renew_s: float) -> None:
        """Hold or campaign when due, then run the cycle when due and leading."""
        now = time.monotonic()
        if now >= self._next_hold:
            if self.election.lease is not None:
                self._next_hold = now + renew_s * random.uniform(0.9, 1.0)
                if self.share.should_shed(self.group):
                    log.warning(
                        "controller %s: %s leads more than its share, hands %s over",
                        self.spec.name, self.identity, self.group,
                    )  # fmt: skip
                    self.election.resign()
                else:
                    self.election.hold()
            else:
                self._next_hold = now + renew_s / 2 * random.uniform(0.8, 1.0)
                if self._wants(now) and self.election.hold():
                    self.leaderless_since = None
                    self._next_hold = now + renew_s * random.uniform(0.9, 1.0)
                    self._next_cycle = 0.0
                    self._announce()
        if self.election.still_leading() and time.monotonic() >= self._next_cycle:
            self._next_cycle = time.monotonic() + self.spec.every_s
            self._cycle()

    def _announce(self) -> None:
        """A new leader records its term where its actions land before it acts:
        from then on the resource refuses every older term, whether or not this
        leader has sent anything yet (a deposed leader that wakes late cannot
        slip a command in before the first of the new one's). A higher term
        already there means this election is stale: resign."""
        if not self.fence.accept(self.group, self.election.term):
            log.warning(
                "controller %s: %s elected for %s with term %d, below the resource's; resigns",
                self.spec.name, self.identity, self.group, self.election.term,
            )  # fmt: skip
            self.election.resign()

    def _cycle(self) -> None:
        ctx = ControllerContext(
            self.group, self.election.term, self.settings, self.identity, self.election
        )
        try:
            self.spec.loop(ctx)
            self.cycles += 1
        except Exception:
            log.exception(
                "controller %s (%s, term %d) failed", self.spec.name, self.group, ctx.term
            )


def replica_identity() -> str:
    """``host/pid``: who leads, as listings show it."""
    return f"{socket.gethostname()}/{os.getpid()}"


class ControllerRunner:
    """Every declared controller of a fleet, one thread per group."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        ttl_s: float | None = None,
        identity: str | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.settings = fleet.settings
        self.ttl_s = ttl_s if ttl_s is not None else fleet.settings.controller_lease_s
        self.identity = identity or replica_identity()
        self.backend_name = (backend or backend_for(self.settings)).name
        s = self.settings
        self.replicas = Replicas(
            lambda: get_redis(s.redis, **s.redis_tls(s.redis)),
            fleet.app.main or "fleet",
            self.identity,
            self.ttl_s,
        )
        specs = list(fleet.controllers.values())
        groups = [g for spec in specs for g in spec.groups]
        if len(set(groups)) != len(groups):
            raise ValueError(f"a group is declared by two controllers: {sorted(groups)!r}")
        self.share = _Share(len(groups), self.replicas)
        self.loops = [
            GroupLoop(
                spec,
                g,
                # A backend per group: each thread talks to it on its own.
                backend=backend or backend_for(s),
                settings=s,
                identity=self.identity,
                ttl_s=self.ttl_s,
                share=self.share,
            )
            for spec in specs
            for g in spec.groups
        ]

    def run(self, stop: threading.Event) -> None:
        """Heartbeat and group threads until ``stop`` is set; resign every group then."""
        self.replicas.beat()
        threads = [
            threading.Thread(target=loop.run, args=(stop,), name=f"controller-{loop.group}")
            for loop in self.loops
        ]
        for t in threads:
            t.daemon = True
            t.start()
        try:
            while not stop.wait(self.ttl_s / 3):
                self.replicas.beat()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=self.ttl_s)
            self.replicas.leave()

    def leading(self) -> list[str]:
        return sorted(self.share.led)


__all__ = [
    "ControllerContext",
    "ControllerRunner",
    "ControllerSpec",
    "Replicas",
    "bind_shared",
    "make_spec",
    "replica_identity",
    "shared_controller",
]
