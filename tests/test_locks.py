"""Entity locks with fencing tokens, against a real Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from fleetworks import constants as c
from fleetworks import context, timing
from fleetworks.locks import EntityLocks, Lease, lock_ttl_s

#: TTL of locks that must expire during a test: short, but long enough to act on first.
SHORT_TTL_S = 0.2
#: TTL of locks that must not expire during a test.
LONG_TTL_S = 30.0


@pytest.fixture
def locks(redis_client: redis.Redis) -> EntityLocks:
    """Entity locks on the flushed test Redis."""
    return EntityLocks(redis_client)


def wait_until_expired(client: redis.Redis, entity: str, timeout_s: float = 5.0) -> None:
    """Poll until the lock key of ``entity`` is gone; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while client.exists(c.LOCK_KEY + entity):
        if time.monotonic() > deadline:
            raise AssertionError(f"lock on {entity!r} still present after {timeout_s}s")
        time.sleep(0.01)


def test_first_acquire_gets_fencing_token_one(locks: EntityLocks) -> None:
    """A fresh entity's first lease carries fencing token 1 and holds the lock."""
    lease = locks.acquire("order:1", LONG_TTL_S)

    assert lease is not None
    assert lease.entity == "order:1"
    assert lease.fencing_token == 1
    assert lease.ttl_ms == int(LONG_TTL_S * 1000)
    assert locks.holder("order:1") == lease.token
    assert locks.current_fence("order:1") == 1


def test_fencing_token_increases_with_each_acquisition(locks: EntityLocks) -> None:
    """Every later acquisition of the same entity gets a strictly larger token."""
    tokens = []
    for _ in range(5):
        lease = locks.acquire("order:1", LONG_TTL_S)
        assert lease is not None
        tokens.append(lease.fencing_token)
        assert locks.release(lease)

    assert tokens == [1, 2, 3, 4, 5]


def test_fence_counters_are_per_entity(locks: EntityLocks) -> None:
    """Two entities are locked independently, each with its own counter."""
    a = locks.acquire("order:a", LONG_TTL_S)
    b = locks.acquire("order:b", LONG_TTL_S)

    assert a is not None
    assert b is not None
    assert (a.fencing_token, b.fencing_token) == (1, 1)
    assert a.token != b.token


def test_acquire_while_held_returns_none_without_bumping_the_fence(locks: EntityLocks) -> None:
    """Contention hands out no lease and no token; the holder keeps the lock."""
    first = locks.acquire("order:1", LONG_TTL_S)
    assert first is not None

    assert locks.acquire("order:1", LONG_TTL_S) is None
    assert locks.acquire("order:1", LONG_TTL_S) is None

    assert locks.current_fence("order:1") == 1
    assert locks.holder("order:1") == first.token
    # After the holder releases, the next lease gets the very next token.
    assert locks.release(first)
    after = locks.acquire("order:1", LONG_TTL_S)
    assert after is not None
    assert after.fencing_token == 2


def test_release_with_the_holding_lease_frees_the_lock(locks: EntityLocks) -> None:
    """Release by the holder deletes the lock; a second release finds nothing."""
    lease = locks.acquire("order:1", LONG_TTL_S)
    assert lease is not None

    assert locks.release(lease) is True
    assert locks.holder("order:1") is None
    assert locks.release(lease) is False
    # The fence counter survives the release: tokens never go back.
    assert locks.current_fence("order:1") == 1


def test_release_of_an_expired_lease_keeps_the_new_holders_lock(
    locks: EntityLocks, redis_client: redis.Redis
) -> None:
    """A holder that outlived its TTL cannot delete its successor's lock."""
    # Given a lease that expired and a second holder that took the lock since
    stale = locks.acquire("order:1", SHORT_TTL_S)
    assert stale is not None
    wait_until_expired(redis_client, "order:1")
    current = locks.acquire("order:1", LONG_TTL_S)
    assert current is not None
    assert current.fencing_token == stale.fencing_token + 1

    # When the first holder releases
    released = locks.release(stale)

    # Then nothing is released and the second holder still holds the lock
    assert released is False
    assert locks.holder("order:1") == current.token
    assert redis_client.pttl(c.LOCK_KEY + "order:1") > 0


def test_renew_extends_the_ttl_of_the_current_holder(
    locks: EntityLocks, redis_client: redis.Redis
) -> None:
    """Renewal resets the remaining time to the lease's full TTL."""
    # Given a held lock with little time left
    lease = locks.acquire("order:1", LONG_TTL_S)
    assert lease is not None
    redis_client.pexpire(c.LOCK_KEY + "order:1", 1000)

    # When the holder renews
    renewed = locks.renew(lease)

    # Then the lock has (almost) its full TTL again
    assert renewed is True
    assert redis_client.pttl(c.LOCK_KEY + "order:1") > lease.ttl_ms - 5000
    assert locks.holder("order:1") == lease.token


def test_renew_by_a_former_holder_changes_nothing(
    locks: EntityLocks, redis_client: redis.Redis
) -> None:
    """A lease whose lock expired and was re-taken cannot extend the new holder's lock."""
    # Given an expired lease and a new holder with a short remaining time
    stale = locks.acquire("order:1", SHORT_TTL_S)
    assert stale is not None
    wait_until_expired(redis_client, "order:1")
    current = locks.acquire("order:1", LONG_TTL_S)
    assert current is not None
    redis_client.pexpire(c.LOCK_KEY + "order:1", 2000)

    # When the former holder renews
    renewed = locks.renew(stale)

    # Then it is refused and the new holder's TTL is untouched
    assert renewed is False
    assert 0 < redis_client.pttl(c.LOCK_KEY + "order:1") <= 2000
    assert locks.holder("order:1") == current.token


def test_renew_after_release_does_not_recreate_the_lock(locks: EntityLocks) -> None:
    """Renewing a released lease fails and leaves the entity unlocked."""
    lease = locks.acquire("order:1", LONG_TTL_S)
    assert lease is not None
    assert locks.release(lease)

    assert locks.renew(lease) is False
    assert locks.holder("order:1") is None


def test_lock_expires_after_its_ttl(locks: EntityLocks, redis_client: redis.Redis) -> None:
    """A holder that never releases blocks the entity only until the TTL passes."""
    lease = locks.acquire("order:1", SHORT_TTL_S)
    assert lease is not None
    assert lease.ttl_ms == 200
    assert 0 < redis_client.pttl(c.LOCK_KEY + "order:1") <= 200

    wait_until_expired(redis_client, "order:1")

    assert locks.holder("order:1") is None
    successor = locks.acquire("order:1", LONG_TTL_S)
    assert successor is not None
    assert successor.fencing_token == 2


def test_fence_counter_never_expires(locks: EntityLocks, redis_client: redis.Redis) -> None:
    """The lock key has a TTL; the fence counter has none."""
    assert locks.acquire("order:1", LONG_TTL_S) is not None
    assert redis_client.ttl(c.FENCE_KEY + "order:1") == -1


def test_tiny_ttl_is_at_least_one_millisecond(locks: EntityLocks) -> None:
    """A TTL below a millisecond is rounded up to 1 ms, never to 0 (which Redis rejects)."""
    lease = locks.acquire("order:1", 0.0001)
    assert lease is not None
    assert lease.ttl_ms == 1


def test_raise_fence_moves_a_missing_counter_forward(locks: EntityLocks) -> None:
    """After Redis lost the counter, raise_fence restores it and the next token follows it."""
    assert locks.raise_fence("order:1", 10) == 10
    assert locks.current_fence("order:1") == 10

    lease = locks.acquire("order:1", LONG_TTL_S)
    assert lease is not None
    assert lease.fencing_token == 11


def test_raise_fence_never_moves_backwards(locks: EntityLocks) -> None:
    """A target at or below the current counter leaves it as it is and returns it."""
    for _ in range(3):
        lease = locks.acquire("order:1", LONG_TTL_S)
        assert lease is not None
        locks.release(lease)

    assert locks.raise_fence("order:1", 2) == 3
    assert locks.raise_fence("order:1", 3) == 3
    assert locks.current_fence("order:1") == 3
    assert locks.raise_fence("order:1", 4) == 4
    assert locks.current_fence("order:1") == 4


def test_raise_fence_does_not_touch_the_lock(locks: EntityLocks) -> None:
    """Raising the fence neither takes nor frees the entity's lock."""
    lease = locks.acquire("order:1", LONG_TTL_S)
    assert lease is not None

    locks.raise_fence("order:1", 100)

    assert locks.holder("order:1") == lease.token
    assert locks.acquire("order:1", LONG_TTL_S) is None
    assert locks.current_fence("order:1") == 100


@pytest.mark.parametrize("time_limit_s", [0.0, 0.5, 1.0, context.DEFAULT_TIME_LIMIT_S, 3600.0])
def test_lock_ttl_is_time_limit_plus_slack_capped_at_the_lease(time_limit_s: float) -> None:
    """The lease covers a short task's time limit plus slack, and never exceeds the
    lease cap: renewal, not the TTL, keeps a long task's lock."""
    expected = min(time_limit_s + timing.LOCK_TTL_SLACK_S, timing.LEASE_TTL_MAX_S)
    assert lock_ttl_s(time_limit_s) == expected
    assert lock_ttl_s(time_limit_s) <= timing.LEASE_TTL_MAX_S


def test_concurrent_acquires_grant_exactly_one_lease(redis_client: redis.Redis) -> None:
    """Eight threads racing for one entity: one lease, one token handed out."""
    threads = 8
    start = threading.Barrier(threads)

    def contend(_: int) -> Lease | None:
        # redis-py's pool gives each thread its own connection; all wait for each other.
        locks = EntityLocks(redis_client)
        start.wait(timeout=10)
        return locks.acquire("order:hot", LONG_TTL_S)

    with ThreadPoolExecutor(max_workers=threads) as executor:
        results = list(executor.map(contend, range(threads)))

    winners = [lease for lease in results if lease is not None]
    assert len(winners) == 1
    assert winners[0].fencing_token == 1
    locks = EntityLocks(redis_client)
    assert locks.current_fence("order:hot") == 1
    assert locks.holder("order:hot") == winners[0].token


def test_a_lease_released_while_its_renewal_is_on_its_way_is_not_reported_lost(
    locks: EntityLocks,
) -> None:
    from fleetworks.locks import Heartbeat

    # Given a watched lease, and a renewal that finds it released meanwhile
    # (the run ended between the heartbeat's snapshot and its renewal)
    heartbeat = Heartbeat(lambda: locks, interval_s=3600)
    lease = locks.acquire("order:hb", 10.0)
    assert lease is not None
    heartbeat.watch(lease)
    ended = locks.acquire("order:hb2", 10.0)
    assert ended is not None
    heartbeat.watch(ended)
    heartbeat.unwatch(ended)
    locks.release(ended)
    # When a renewal of each runs
    heartbeat._renew(lease, time.monotonic())
    heartbeat._renew(ended, time.monotonic())
    # Then the released lease is not marked lost, the live one renewed
    assert not ended.lost.is_set()
    assert not lease.lost.is_set()
    # and a watched lease whose lock is really gone still is
    locks.release(lease)
    heartbeat._renew(lease, time.monotonic())
    assert lease.lost.is_set()
