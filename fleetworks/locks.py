"""Entity locks in Redis, each acquisition with a fencing token.

Why not ``redis.lock.Lock``: redis-py's lock gives a random token and a safe
release, but no fencing token. A lock whose holder stalls past its TTL is
taken by someone else while the first still believes it holds it; the only
defence is a number that grows with every acquisition and that writers check
(Kleppmann's fencing token). Here acquisition is one Lua script that sets the
lock (NX, PX) and, only if that succeeded, INCRs the entity's fence counter:
one round trip, and a token is never handed out without the lock. The same
script drops the delivered message's outbox record (:mod:`fleetworks.outbox`)
and, for a guarded run, writes its in-flight record and counts the key's
deliveries, or finds the key's done mark and takes nothing
(:mod:`fleetworks.inflight`): from the lease on, that record and kombu's
``unacked`` entry cover the message, and the results database needs no row
until the run's outcome commits.

Release and renewal compare the random token first, so a holder whose lock
expired can never delete or extend its successor's lock, nor drop its
successor's in-flight record.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from fleetworks import constants as c
from fleetworks import timing
from fleetworks.timing import lock_ttl_s

_ACQUIRE = """
if ARGV[4] and redis.call('exists', KEYS[9]) == 1 then
  if ARGV[3] ~= '' then
    redis.call('hdel', KEYS[3], ARGV[3])
    redis.call('zrem', KEYS[4], ARGV[3])
  end
  return {-1, 0}
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '' then
    redis.call('hdel', KEYS[3], ARGV[3])
    redis.call('zrem', KEYS[4], ARGV[3])
  end
  local tries = 0
  if ARGV[4] then
    if ARGV[7] == '1' then
      tries = redis.call('hincrby', KEYS[8], ARGV[4], 1)
    else
      tries = tonumber(redis.call('hget', KEYS[8], ARGV[4]) or '0')
      if tries == 0 then tries = redis.call('hincrby', KEYS[8], ARGV[4], 1) end
    end
    redis.call('hset', KEYS[5], ARGV[4], ARGV[5])
    redis.call('hset', KEYS[6], ARGV[4], ARGV[1])
    redis.call('zadd', KEYS[7], ARGV[6], ARGV[4])
  end
  return {redis.call('incr', KEYS[2]), tries}
end
return {0, 0}
"""

_ACQUIRE_MANY = """
local out = {}
for i = 1, #ARGV - 1, 2 do
  local n = (i + 1) / 2
  if redis.call('set', KEYS[2 * n + 1], ARGV[i], 'NX', 'PX', ARGV[#ARGV]) then
    if ARGV[i + 1] ~= '' then
      redis.call('hdel', KEYS[1], ARGV[i + 1])
      redis.call('zrem', KEYS[2], ARGV[i + 1])
    end
    out[n] = redis.call('incr', KEYS[2 * n + 2])
  else
    out[n] = 0
  end
end
return out
"""

_RELEASE_MANY = """
local freed = 0
for i = 1, #KEYS do
  if redis.call('get', KEYS[i]) == ARGV[i] then
    freed = freed + redis.call('del', KEYS[i])
  end
end
return freed
"""

_RELEASE = """
local freed = 0
if redis.call('get', KEYS[1]) == ARGV[1] then
  freed = redis.call('del', KEYS[1])
end
if ARGV[2] then
  if redis.call('hget', KEYS[3], ARGV[2]) == ARGV[1] then
    redis.call('hdel', KEYS[2], ARGV[2])
    redis.call('hdel', KEYS[3], ARGV[2])
    redis.call('zrem', KEYS[4], ARGV[2])
    redis.call('hdel', KEYS[5], ARGV[2])
  end
  if tonumber(ARGV[3]) > 0 then
    redis.call('set', KEYS[6], '1', 'PX', ARGV[3])
  end
end
return freed
"""

_RELEASE_OWNER = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ':' then
  return redis.call('del', KEYS[1])
end
return 0
"""

_RAISE_FENCE = """
local cur = tonumber(redis.call('get', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return cur
"""

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


log = logging.getLogger(__name__)


#: The keys of in-flight records, in the order the scripts take them.
_INFLIGHT_KEYS = (c.INFLIGHT_KEY, c.INFLIGHT_OWNER_KEY, c.INFLIGHT_AT_KEY, c.INFLIGHT_TRIES_KEY)


class KeyDone:
    """What :meth:`EntityLocks.acquire_run` returns when the key's done mark is
    there: the key succeeded recently; nothing was leased."""

    __slots__ = ()


class LeaseLostError(RuntimeError):
    """The lease ran out or was taken over while its holder was still running."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lock: who holds it (``token``) and its fencing token."""

    entity: str
    token: str
    fencing_token: int
    ttl_ms: int
    #: For a run's lease (:meth:`EntityLocks.acquire_run`): the key's
    #: deliveries since its in-flight record was last dropped, this one
    #: included. Above 1, an earlier delivery did not finish (it died,
    #: stalled, was cut off, or failed), so this run claims the key first.
    deliveries: int = 0
    #: Set by the heartbeat when a renewal finds the lock gone or too late.
    lost: threading.Event = field(default_factory=threading.Event, compare=False)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease is known to be lost."""
        if self.lost.is_set():
            raise LeaseLostError(
                f"lease on {self.entity!r} (fencing token {self.fencing_token}) was lost"
            )


class EntityLocks:
    """Acquire, renew and release per-entity locks on one Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        #: (pid, client): see :meth:`_hot`.
        self._dedicated: tuple[int, redis.Redis] | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._raise_fence = client.register_script(_RAISE_FENCE)
        self._release_owner = client.register_script(_RELEASE_OWNER)
        self._acquire_many = client.register_script(_ACQUIRE_MANY)
        self._release_many = client.register_script(_RELEASE_MANY)

    @property
    def client(self) -> redis.Redis:
        """The Redis client these locks live on."""
        return self._client

    def _hot(self) -> redis.Redis:
        """The client of the two scripts every guarded run sends (take a lease,
        release it): one connection of the same pool, kept by this process.
        Through the pool, each command also takes a connection out, looks
        whether it has unread data and puts it back: about 0.05 ms of the
        guard's 0.8 ms per run in process. Connected on first use, anew in a forked process;
        commands on it are serialized by redis-py, and a broken connection is
        reconnected as any other."""
        pid = os.getpid()
        if self._dedicated is None or self._dedicated[0] != pid:
            own = redis.Redis(connection_pool=self._client.connection_pool,
                              single_connection_client=True)  # fmt: skip
            self._dedicated = (pid, own)
        return self._dedicated[1]

    def acquire(
        self, entity: str, ttl_s: float, owner: str = "", task_id: str = ""
    ) -> Lease | None:
        """A lease on ``entity``, or None when another holder has it.

        ``owner`` (a delivery tag) prefixes the random token, so the process
        that supervised a dead holder can free exactly that holder's lease.
        With ``task_id``, a lease taken also drops that message's outbox record.
        """
        got = self._lease(entity, ttl_s, owner, task_id, None)
        return None if isinstance(got, KeyDone) else got

    def acquire_run(
        self,
        entity: str,
        ttl_s: float,
        owner: str,
        task_id: str,
        *,
        key: str,
        record: str,
        count: bool = True,
    ) -> Lease | KeyDone | None:
        """:meth:`acquire` for a guarded run of idempotency key ``key``: the
        lease also writes ``record`` as the key's in-flight record and counts
        the delivery (:attr:`Lease.deliveries`; with ``count`` False, as for
        the same delivery leasing again after waiting out an unreachable
        database, it is not counted again). :class:`KeyDone` (and no
        lease) when the key's done mark is there."""
        return self._lease(entity, ttl_s, owner, task_id, (key, record), count=count)

    def _lease(
        self,
        entity: str,
        ttl_s: float,
        owner: str,
        task_id: str,
        run: tuple[str, str] | None,
        *,
        count: bool = True,
    ) -> Lease | KeyDone | None:
        token = f"{owner}:{secrets.token_hex(16)}" if owner else secrets.token_hex(16)
        ttl_ms = max(1, int(ttl_s * 1000))
        keys = [c.LOCK_KEY + entity, c.FENCE_KEY + entity, c.OUTBOX_KEY, c.OUTBOX_AT_KEY]
        args: list[str | int | float] = [token, ttl_ms, task_id]
        if run is not None:
            keys += [*_INFLIGHT_KEYS, c.DONE_KEY + run[0]]
            args += [run[0], run[1], time.time(), "1" if count else "0"]
        fence, deliveries = self._acquire(keys=keys, args=args, client=self._hot())
        if int(fence) < 0:
            return KeyDone()
        if int(fence) == 0:
            return None
        return Lease(entity=entity, token=token, fencing_token=int(fence), ttl_ms=ttl_ms,
                     deliveries=int(deliveries))  # fmt: skip

    def acquire_many(self, wanted: list[tuple[str, str, str]], ttl_s: float) -> list[Lease | None]:
        """Leases on many entities in one round trip: ``wanted`` is ``(entity,
        owner, task_id)`` per item (as for :meth:`acquire`); None where another
        holder has the entity. Entities must be distinct."""
        if not wanted:
            return []
        ttl_ms = max(1, int(ttl_s * 1000))
        keys: list[str] = [c.OUTBOX_KEY, c.OUTBOX_AT_KEY]
        args: list[str | int] = []
        tokens: list[str] = []
        for entity, owner, task_id in wanted:
            token = f"{owner}:{secrets.token_hex(16)}" if owner else secrets.token_hex(16)
            tokens.append(token)
            keys += [c.LOCK_KEY + entity, c.FENCE_KEY + entity]
            args += [token, task_id]
        args.append(ttl_ms)
        fences = self._acquire_many(keys=keys, args=args)
        return [
            Lease(entity=entity, token=token, fencing_token=int(fence), ttl_ms=ttl_ms)
            if int(fence) else None
            for (entity, _, _), token, fence in zip(wanted, tokens, fences, strict=True)
        ]  # fmt: skip

    def release_many(self, leases: list[Lease]) -> int:
        """Delete the locks ``leases`` still hold, in one round trip; how many were."""
        if not leases:
            return 0
        keys = [c.LOCK_KEY + lease.entity for lease in leases]
        return int(self._release_many(keys=keys, args=[lease.token for lease in leases]))

    def release(self, lease: Lease, settled_key: str | None = None, done_mark_ms: int = 0) -> bool:
        """Delete the lock if ``lease`` still holds it; False if it had expired.

        With ``settled_key`` (the key's row is final), also drop that key's
        in-flight record if this lease wrote it, and with ``done_mark_ms`` (it
        succeeded) set the key's done mark for that long.
        """
        keys = [c.LOCK_KEY + lease.entity]
        args: list[str | int] = [lease.token]
        if settled_key is not None:
            keys += [*_INFLIGHT_KEYS, c.DONE_KEY + settled_key]
            args += [settled_key, done_mark_ms]
        return bool(self._release(keys=keys, args=args, client=self._hot()))

    def release_owner(self, entity: str, owner: str) -> bool:
        """Delete the lock on ``entity`` if ``owner`` (a delivery) holds it."""
        if not owner:
            return False
        return bool(self._release_owner(keys=[c.LOCK_KEY + entity], args=[owner]))

    def renew(self, lease: Lease) -> bool:
        """Extend the lock by its TTL if ``lease`` still holds it."""
        return bool(self._renew(keys=[c.LOCK_KEY + lease.entity], args=[lease.token, lease.ttl_ms]))

    def raise_fence(self, entity: str, at_least: int) -> int:
        """Move the fence counter to ``at_least`` if it is behind (after Redis lost data)."""
        return int(self._raise_fence(keys=[c.FENCE_KEY + entity], args=[at_least]))

    def holder(self, entity: str) -> str | None:
        value = self._client.get(c.LOCK_KEY + entity)
        return value.decode() if isinstance(value, bytes) else value

    def current_fence(self, entity: str) -> int:
        return int(self._client.get(c.FENCE_KEY + entity) or 0)


class Heartbeat:
    """Renews every lease held in this process, from one daemon thread.

    python-redis-lock's auto-renewal dies silently (its #85, #91): here a
    renewal that finds the lock gone, or that could not reach Redis before the
    lease ran out, sets ``lease.lost`` so the task learns it before its effect,
    and the fencing token makes its late writes fail anyway. The thread is
    started lazily and again after a fork (threads do not survive ``fork()``).
    """

    def __init__(
        self, locks: Callable[[], EntityLocks], interval_s: float = timing.LEASE_RENEW_INTERVAL_S
    ) -> None:
        self._locks = locks
        self._interval_s = interval_s
        self._leases: dict[str, tuple[Lease, float]] = {}
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0

    def watch(self, lease: Lease) -> None:
        with self._mutex:
            self._leases[lease.token] = (lease, time.monotonic())
        self._ensure_thread()

    def unwatch(self, lease: Lease) -> None:
        with self._mutex:
            self._leases.pop(lease.token, None)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="fleet-lease-heartbeat", daemon=True).start()

    def _run(self) -> None:
        while not self._wake.wait(self._interval_s):
            self.renew_all()

    def renew_all(self) -> None:
        with self._mutex:
            held = list(self._leases.values())
        for lease, renewed_at in held:
            self._renew(lease, renewed_at)

    def _renew(self, lease: Lease, renewed_at: float) -> None:
        try:
            ok = self._locks().renew(lease)
        except redis.RedisError as exc:
            if time.monotonic() - renewed_at > lease.ttl_ms / 1000:
                log.warning("lease on %s lost: Redis unreachable (%s)", lease.entity, exc)
                lease.lost.set()
            return
        if not ok:
            with self._mutex:
                if lease.token not in self._leases:
                    return  # released (and unwatched) while this renewal was on its way
            log.warning("lease on %s lost: the lock expired or was taken over", lease.entity)
            lease.lost.set()
            self.unwatch(lease)
            return
        with self._mutex:
            if lease.token in self._leases:
                self._leases[lease.token] = (lease, time.monotonic())


__all__ = ["EntityLocks", "Heartbeat", "KeyDone", "Lease", "LeaseLostError", "lock_ttl_s"]
