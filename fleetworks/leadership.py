"""A leader per group: elections as a runtime primitive, with a term that fences.

Any number of processes campaign for a *group* (a region, a shard, beat);
at most one holds its lease at a time and gets a **term**, a number that only
grows from one leadership of the group to the next: the fencing token of
everything that leader does. A lease alone is not safe (a leader paused by
GC, a stopped process, a partition can wake up and act after its lease
ended); the term, checked where the action lands (:class:`TermFence`), is
what refuses the late action.

Pieces:

- :class:`Backend`: campaign, renew, resign, observe, list the groups. Two
  implementations: :class:`RedisBackend` (the default: a lease in the lock
  store's Redis, the term the fence counter of :mod:`fleetworks.locks`) and
  :class:`~fleetworks.leadership_etcd.EtcdBackend` (a lease with keep-alive
  and a transaction on the key's create revision, the term etcd's own
  revision). :func:`backend_from_url` picks one from ``FLEET_LEADERSHIP_URL``.
- :class:`Election`: one process's claim to lead one group. ``hold()``
  renews while leading and campaigns otherwise; the leader keeps a *local*
  deadline, the time its last renewal was **sent** plus the TTL, on its own
  monotonic clock. The backend's lease cannot end before that moment, so
  ``still_leading()`` (True only before the deadline) never says yes once a
  successor may lead. A leader whose deadline passes without a renewal steps
  down on its own, logs it and calls ``on_deposed``.
- :class:`TermFence`: the receiving side. ``accept(group, term)`` refuses a
  term lower than the highest it has accepted for the group, in the results
  database (``leader_terms``), atomically; ``accept_in(conn, ...)`` does it
  inside the caller's own transaction, so the action and the term commit
  together.

Terms never go backwards: across leaders (each campaign takes the next
number), across backend restarts (Redis's fence key never expires and is in
its AOF; etcd's revision is in its write-ahead log), and across a Redis that
*lost* its data: **the resource's highest term seeds the next**. The resource
side knows the highest term it accepted (:meth:`TermFence.highest`); an
``Election(..., floor=fence.floor_for(group))`` passes it to every campaign,
and the Redis backend raises the group's counter to it in the same script
that takes the lease, so the next term is above anything the resource has
seen. (etcd's revision cannot be moved forward; its backend refuses to
campaign while its revision is below the floor, see its module.)

What each backend promises: the Redis backend is as safe as one Redis
server: without replication it is a lease, not consensus (a failover to a
replica that missed the last writes can hand the lease to two processes).
etcd's lease and transaction go through Raft, so a majority agrees who leads.
Neither makes a paused leader harmless by itself; the term at the resource
does.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import redis
from sqlalchemy import Connection, select

from fleetworks import constants as c
from fleetworks import stats
from fleetworks.db import reading, transaction, upsert
from fleetworks.locks import EntityLocks, Lease
from fleetworks.models import LEADER_TERMS
from fleetworks.redisconn import get_redis
from fleetworks.settings import Settings

log = logging.getLogger(__name__)

#: Entity prefix of a group's lease in Redis: ``fleet:lock:leader:<group>``
#: holds the leader, ``fleet:fence:leader:<group>`` the last term.
GROUP_ENTITY: Final = "leader:"
#: Hash of ``entity -> "<term> <since>"``: since when the term's leader leads.
SINCE_KEY: Final = c.KEY_PREFIX + "leader-since"


class LeadershipError(RuntimeError):
    """The backend could not be reached or refused the request."""


class TermFloorError(LeadershipError):
    """The backend cannot hand out a term above the floor the resource set."""


@dataclass(frozen=True, slots=True)
class Term:
    """One leadership of a group: who, which term (the fencing token), and
    the backend's proof of holding it (the Redis lock token, the etcd lease)."""

    group: str
    identity: str
    number: int
    handle: str
    ttl_s: float


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads ``group`` now, in which term, since when (UTC), on which backend."""

    group: str
    leader: str
    term: int
    since: datetime | None
    backend: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "leader": self.leader,
            "term": self.term,
            "since": self.since.isoformat() if self.since else None,
            "backend": self.backend,
        }


class Backend(Protocol):
    """Where leases and terms live. Every method raises :class:`LeadershipError`
    when the backend cannot be reached."""

    name: str

    def campaign(self, group: str, identity: str, ttl_s: float, floor: int = 0) -> Term | None:
        """Take the lead of ``group`` if nobody holds it; the term is above
        every earlier one and above ``floor``. None when someone leads."""
        ...

    def renew(self, term: Term) -> bool:
        """Extend the lease by its TTL; False if it ended or was taken."""
        ...

    def resign(self, term: Term) -> None:
        """Give the lead up now (no-op if it already ended)."""
        ...

    def observe(self, group: str) -> LeaderInfo | None:
        """Who leads ``group`` now; None when nobody does."""
        ...

    def list_groups(self, prefix: str = "") -> list[LeaderInfo]:
        """Every group led now whose name starts with ``prefix``, by name."""
        ...

    def raise_term_floor(self, group: str, at_least: int) -> int:
        """Make the next term of ``group`` greater than ``at_least``; returns
        the group's last term after the change."""
        ...


def parse_since(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return None


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


#: EntityLocks' acquire plus the floor and the since record, in one script:
#: take the lock (NX, PX); only then raise the fence counter to the floor if
#: it is behind, take the next term, and record since when it leads.
#: KEYS: lock, fence, since hash. ARGV: token, ttl ms, floor, entity, since.
_CAMPAIGN = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local cur = tonumber(redis.call('get', KEYS[2]) or '0')
  if cur < tonumber(ARGV[3]) then
    redis.call('set', KEYS[2], ARGV[3])
  end
  local term = redis.call('incr', KEYS[2])
  redis.call('hset', KEYS[3], ARGV[4], term .. ' ' .. ARGV[5])
  return term
end
return 0
"""


class RedisBackend:
    """Leases in Redis: the lock and fence keys of :mod:`fleetworks.locks`.

    The fence counter never expires, so terms survive a restart of a Redis
    that persists (AOF); after a Redis that lost its data, the floor passed
    to :meth:`campaign` (the resource's highest term) puts it back ahead.
    """

    name = "redis"

    def __init__(
        self,
        locks: Callable[[], EntityLocks],
        *,
        prefix: str = GROUP_ENTITY,
        failovers_field: Callable[[str], str] | None = None,
    ) -> None:
        self._locks = locks
        self.prefix = prefix
        self._failovers_field = failovers_field or stats.leader_failovers_field
        self._script: tuple[redis.Redis, Any] | None = None

    def entity(self, group: str) -> str:
        return self.prefix + group

    def _campaign_script(self, client: redis.Redis) -> Any:
        if self._script is None or self._script[0] is not client:
            self._script = (client, client.register_script(_CAMPAIGN))
        return self._script[1]

    def campaign(self, group: str, identity: str, ttl_s: float, floor: int = 0) -> Term | None:
        check_group(group)
        entity = self.entity(group)
        token = f"{identity}:{secrets.token_hex(16)}"
        ttl_ms = max(1, int(ttl_s * 1000))
        since = datetime.now(UTC).isoformat()
        try:
            client = self._locks().client
            keys = [c.LOCK_KEY + entity, c.FENCE_KEY + entity, SINCE_KEY]
            number = int(
                self._campaign_script(client)(
                    keys=keys, args=[token, ttl_ms, max(0, floor), entity, since]
                )
            )
        except redis.RedisError as exc:
            raise LeadershipError(f"Redis unreachable: {exc}") from exc
        if number == 0:
            return None
        if number > 1:  # someone led this group before: a change of leader
            stats.count(client, self._failovers_field(group))
        return Term(group, identity, number, token, ttl_s)

    def _lease(self, term: Term) -> Lease:
        ttl_ms = max(1, int(term.ttl_s * 1000))
        return Lease(self.entity(term.group), term.handle, term.number, ttl_ms)

    def renew(self, term: Term) -> bool:
        try:
            return self._locks().renew(self._lease(term))
        except redis.RedisError as exc:
            raise LeadershipError(f"Redis unreachable: {exc}") from exc

    def resign(self, term: Term) -> None:
        try:
            self._locks().release(self._lease(term))
        except redis.RedisError as exc:
            raise LeadershipError(f"Redis unreachable: {exc}") from exc

    def observe(self, group: str) -> LeaderInfo | None:
        entity = self.entity(group)
        try:
            pipe = self._locks().client.pipeline(transaction=True)
            pipe.get(c.LOCK_KEY + entity)
            pipe.get(c.FENCE_KEY + entity)
            pipe.hget(SINCE_KEY, entity)
            holder, fence, since = pipe.execute()
        except redis.RedisError as exc:
            raise LeadershipError(f"Redis unreachable: {exc}") from exc
        holder = _text(holder)
        if holder is None:
            return None
        term = int(fence or 0)
        recorded, _, at = (_text(since) or "").partition(" ")
        when = parse_since(at) if recorded == str(term) else None
        return LeaderInfo(group, holder.rsplit(":", 1)[0], term, when, self.name)

    def list_groups(self, prefix: str = "") -> list[LeaderInfo]:
        pattern = c.LOCK_KEY + self.entity(_glob_escape(prefix)) + "*"
        start = len(c.LOCK_KEY + self.prefix)
        try:
            keys = self._locks().client.scan_iter(match=pattern, count=200)
            groups = sorted({(_text(k) or "")[start:] for k in keys})
        except redis.RedisError as exc:
            raise LeadershipError(f"Redis unreachable: {exc}") from exc
        found = (self.observe(g) for g in groups)
        return [info for info in found if info is not None]

    def raise_term_floor(self, group: str, at_least: int) -> int:
        try:
            return self._locks().raise_fence(self.entity(group), at_least)
        except redis.RedisError as exc:
            raise LeadershipError(f"Redis unreachable: {exc}") from exc

    def last_term(self, group: str) -> int:
        """The group's last term handed out (0 if none), led now or not."""
        try:
            return self._locks().current_fence(self.entity(group))
        except redis.RedisError as exc:
            raise LeadershipError(f"Redis unreachable: {exc}") from exc


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def check_group(group: str) -> None:
    """A group name is 1 to 200 printable characters without whitespace."""
    bad = not group.isprintable() or any(ch.isspace() for ch in group)
    if not group or len(group) > 200 or bad:
        raise ValueError(
            f"leader group {group!r}: use 1 to 200 printable characters without whitespace"
        )


def backend_from_url(url: str | None, redis_factory: Callable[[], redis.Redis]) -> Backend:
    """The backend ``FLEET_LEADERSHIP_URL`` names.

    Unset or empty: Redis, the lock store's (``redis_factory``); ``redis://``
    or ``rediss://``: that Redis; ``etcd://host:port[,host:port...]``: etcd
    through its v3 HTTP gateway (:mod:`fleetworks.leadership_etcd`).
    """
    if not url:
        return RedisBackend(_cached_locks(redis_factory))
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        return RedisBackend(_cached_locks(lambda: get_redis(url)))
    if scheme == "etcd":
        from fleetworks.leadership_etcd import EtcdBackend

        return EtcdBackend.from_url(url, stats_redis=redis_factory)
    raise ValueError(
        f"FLEET_LEADERSHIP_URL {url!r}: expected etcd://host:port[,host:port] or "
        "redis://host:port/db (or unset: the lock store's Redis)"
    )


def backend_for(settings: Settings) -> Backend:
    """The backend the settings name (``FLEET_LEADERSHIP_URL``)."""
    tls = settings.redis_tls(settings.redis)
    return backend_from_url(settings.leadership_url, lambda: get_redis(settings.redis, **tls))


#: How beat's own election (:mod:`fleetworks.leader`) is named in listings.
BEAT_GROUP: Final = "beat:"


def current_leaders(settings: Settings, app_name: str, prefix: str = "") -> list[LeaderInfo]:
    """Every group led now (``FLEET_LEADERSHIP_URL``'s backend), and beat's
    leader of ``app_name`` as group ``beat:<app>`` (always on Redis)."""
    found = backend_for(settings).list_groups(prefix)
    beat_group = BEAT_GROUP + app_name
    if beat_group.startswith(prefix):
        tls = settings.redis_tls(settings.redis)
        beat = RedisBackend(
            _cached_locks(lambda: get_redis(settings.redis, **tls)), prefix=c.BEAT_LEADER_ENTITY
        ).observe(app_name)
        if beat is not None:
            found.append(LeaderInfo(beat_group, beat.leader, beat.term, beat.since, beat.backend))
    return sorted(found, key=lambda info: info.group)


def _cached_locks(factory: Callable[[], redis.Redis]) -> Callable[[], EntityLocks]:
    """One EntityLocks per Redis client the factory returns (a new one after a fork)."""
    held: list[tuple[redis.Redis, EntityLocks]] = []

    def locks() -> EntityLocks:
        client = factory()
        if not held or held[0][0] is not client:
            held[:] = [(client, EntityLocks(client))]
        return held[0][1]

    return locks


class Election:
    """This process's claim to lead ``group`` on ``backend``.

    Call :meth:`hold` every loop (at least a few times per TTL: a third of it
    is the usual rhythm); act only while :meth:`still_leading` is True, and
    send :attr:`term` with every action so the resource can fence it.

    ``on_elected(term)`` and ``on_deposed(term)`` run in the thread that
    calls :meth:`hold` (``on_deposed`` also from :meth:`resign` or
    :meth:`still_leading`, whichever sees the end first), once per leadership. ``floor``
    returns the highest term the resource has accepted (the resource's
    highest term seeds the next, see the module docstring); it is asked
    before every campaign.
    """

    def __init__(
        self,
        backend: Backend,
        group: str,
        identity: str,
        ttl_s: float,
        *,
        on_elected: Callable[[Term], None] | None = None,
        on_deposed: Callable[[Term], None] | None = None,
        floor: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_group(group)
        if ttl_s <= 0:
            raise ValueError(f"election {group!r}: ttl_s must be positive, not {ttl_s!r}")
        self.backend = backend
        self.group = group
        self.identity = identity
        self.ttl_s = ttl_s
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.floor = floor
        self._clock = clock
        # (term, local deadline), replaced as a whole so readers need no lock.
        self._held: tuple[Term, float] | None = None
        self._mutex = threading.RLock()

    @property
    def lease(self) -> Term | None:
        """The current leadership, while this process leads."""
        held = self._held
        return held[0] if held is not None else None

    @property
    def term(self) -> int:
        """The term while leading (the fencing token of its actions), else 0."""
        held = self._held
        return held[0].number if held is not None else 0

    @property
    def deadline(self) -> float | None:
        """The local deadline (this process's monotonic clock) of the lease."""
        held = self._held
        return held[1] if held is not None else None

    def still_leading(self) -> bool:
        """True only while leading and before the local deadline; a leader
        past its deadline steps down here (or at the next :meth:`hold`)."""
        held = self._held
        if held is None:
            return False
        if self._clock() < held[1]:
            return True
        if self._mutex.acquire(blocking=False):
            try:
                self._expire()
            finally:
                self._mutex.release()
        return False

    def hold(self) -> bool:
        """Renew the lease if leading, else campaign; True while leading.

        A backend that cannot be reached answers False (the caller does not
        know whether it leads, so it should not act) while the lease is kept
        until its local deadline, when this process steps down on its own.
        """
        with self._mutex:
            self._expire()
            held = self._held
            if held is not None:
                sent = self._clock()
                try:
                    renewed = self.backend.renew(held[0])
                except LeadershipError as exc:
                    log.warning(
                        "leader %s of %s: cannot renew term %d (%s)",
                        self.identity, self.group, held[0].number, exc,
                    )  # fmt: skip
                    return False
                if renewed:
                    self._held = (held[0], sent + self.ttl_s)
                    return True
                self._step_down(held[0], "its lease ended or was taken")
            return self._campaign()

    def _campaign(self) -> bool:
        try:
            floor = self.floor() if self.floor is not None else 0
        except Exception as exc:  # the resource is unreachable: no term without its floor
            log.warning(
                "election %s: %s cannot read the term floor, does not campaign (%s: %s)",
                self.group, self.identity, type(exc).__name__, exc,
            )  # fmt: skip
            return False
        try:
            sent = self._clock()
            term = self.backend.campaign(self.group, self.identity, self.ttl_s, floor=floor)
        except LeadershipError as exc:
            log.warning("election %s: %s cannot campaign (%s)", self.group, self.identity, exc)
            return False
        if term is None:
            return False
        self._held = (term, sent + self.ttl_s)
        log.warning("leader %s of %s: elected, term %d", self.identity, self.group, term.number)
        if self.on_elected is not None:
            self.on_elected(term)
        return True

    def _expire(self) -> None:
        held = self._held
        if held is not None and self._clock() >= held[1]:
            self._step_down(held[0], "its lease ran out before a renewal got through")

    def _step_down(self, term: Term, why: str) -> None:
        self._held = None
        log.warning(
            "leader %s of %s: stepped down from term %d: %s",
            self.identity, self.group, term.number, why,
        )  # fmt: skip
        if self.on_deposed is not None:
            self.on_deposed(term)

    def resign(self) -> None:
        """Step down now (a clean stop): another candidate leads at its next campaign."""
        with self._mutex:
            held = self._held
            if held is None:
                return
            self._held = None
            try:
                self.backend.resign(held[0])
            except LeadershipError as exc:
                log.warning(
                    "leader %s of %s: resign failed (%s); the lease expires",
                    self.identity, self.group, exc,
                )  # fmt: skip
            log.warning(
                "leader %s of %s: resigned term %d", self.identity, self.group, held[0].number
            )
            if self.on_deposed is not None:
                self.on_deposed(held[0])

    def leader(self) -> LeaderInfo | None:
        """Who leads the group now, as the backend says."""
        return self.backend.observe(self.group)


class TermFence:
    """The receiving side's check: an action carrying ``term`` for ``group``
    lands only if no higher term has landed for that group.

    Backed by ``leader_terms`` in the results database: one conditional
    UPSERT (update only where the stored term is not above the new one), so
    concurrent accepts serialize on the row (PostgreSQL) or the write lock
    (SQLite) and the highest term wins. An equal term is accepted (the same
    leader's next action).
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def accept(self, group: str, term: int) -> bool:
        """Record ``term`` for ``group`` unless a higher one was; True if accepted."""
        with transaction(self.database_url) as conn:
            return accept_in(conn, group, term)

    def highest(self, group: str) -> int:
        """The highest term accepted for ``group`` (0 if none). A read: on SQLite
        it never waits for a writer, so a campaign is not held up by a deposed
        leader stopped mid-transaction."""
        with reading(self.database_url) as conn:
            return highest_in(conn, group)

    def floor_for(self, group: str) -> Callable[[], int]:
        """``Election(..., floor=fence.floor_for(group))``: the resource's highest
        term seeds the next campaign."""
        return lambda: self.highest(group)


def accept_in(conn: Connection, group: str, term: int) -> bool:
    """:meth:`TermFence.accept` inside the caller's transaction: the row stays
    locked until it commits, so the action and its term land together (or
    neither does). Returns False for a stale term; the caller decides whether
    that rolls its transaction back."""
    check_group(group)
    if term < 1:
        raise ValueError(f"term for {group!r} must be a positive integer, not {term!r}")
    t = LEADER_TERMS.c
    insert = upsert(conn, LEADER_TERMS).values(
        group=group, highest_term=term, updated_at=datetime.now(UTC)
    )
    stmt = insert.on_conflict_do_update(
        index_elements=[t.group],
        set_={
            "highest_term": insert.excluded.highest_term,
            "updated_at": insert.excluded.updated_at,
        },
        where=t.highest_term <= term,
    ).returning(t.highest_term)
    # RETURNING, not rowcount: drivers disagree on rowcount for upserts.
    return conn.execute(stmt).first() is not None


def highest_in(conn: Connection, group: str) -> int:
    t = LEADER_TERMS.c
    return int(conn.execute(select(t.highest_term).where(t.group == group)).scalar() or 0)


__all__ = [
    "GROUP_ENTITY",
    "Backend",
    "Election",
    "LeaderInfo",
    "LeadershipError",
    "RedisBackend",
    "Term",
    "TermFence",
    "TermFloorError",
    "accept_in",
    "backend_for",
    "backend_from_url",
    "current_leaders",
    "highest_in",
]
