"""Entity locks in Redis, each acquisition with a fencing token.

Why not ``redis.lock.Lock``: redis-py's lock gives a random token and a safe
release, but no fencing token. A lock whose holder stalls past its TTL is
taken by someone else while the first still believes it holds it; the only
defence is a number that grows with every acquisition and that writers check
(Kleppmann's fencing token). Here acquisition is one Lua script that sets the
lock (NX, PX) and, only if that succeeded, INCRs the entity's fence counter:
one round trip, and a token is never handed out without the lock.

Release and renewal compare the random token first, so a holder whose lock
expired can never delete or extend its successor's lock.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis

from fleetworks import constants as c

_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('incr', KEYS[2])
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
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


def lock_ttl_s(time_limit_s: float) -> float:
    """The lock TTL for a task with hard time limit ``time_limit_s``."""
    return time_limit_s + c.LOCK_TTL_SLACK_S


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lock: who holds it (``token``) and its fencing token."""

    entity: str
    token: str
    fencing_token: int
    ttl_ms: int


class EntityLocks:
    """Acquire, renew and release per-entity locks on one Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._raise_fence = client.register_script(_RAISE_FENCE)

    def acquire(self, entity: str, ttl_s: float) -> Lease | None:
        """A lease on ``entity``, or None when another holder has it."""
        token = secrets.token_hex(16)
        ttl_ms = max(1, int(ttl_s * 1000))
        fence = int(
            self._acquire(keys=[c.LOCK_KEY + entity, c.FENCE_KEY + entity], args=[token, ttl_ms])
        )
        if fence == 0:
            return None
        return Lease(entity=entity, token=token, fencing_token=fence, ttl_ms=ttl_ms)

    def release(self, lease: Lease) -> bool:
        """Delete the lock if ``lease`` still holds it; False if it had expired."""
        return bool(self._release(keys=[c.LOCK_KEY + lease.entity], args=[lease.token]))

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
