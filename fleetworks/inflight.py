"""In-flight records: what a running guarded task leaves in Redis, not in the database.

A single guarded run writes its key's row in the results database once, when
its outcome commits, in the same transaction as its effects (see
:func:`fleetworks.claims.settle`). Until then the run exists only in Redis:
the lease script (:mod:`fleetworks.locks`) writes, next to the lock and the
fencing token, the run's in-flight record (agent, entity, task id, worker,
queue and payload) under its idempotency key. The release drops it once the
outcome is committed, and only if this run wrote it.

A record that outlives its run says what a ``claimed`` row used to say:

- **its holder is gone**: the record is older than a full lease and no lease
  on its entity is held. The reaper (:func:`fleetworks.reaper.reap_inflight`)
  publishes its payload again, with the same task id, unless the database
  says the key is done (the holder committed, then died before its release)
  or holds a ``claimed`` row for it (the database reaper owns that one);
- **a delivery of the key did not finish**: the next lease of the key finds
  the record there (:attr:`fleetworks.locks.Lease.unfinished`) and that run
  claims the key in the database before its behaviour, counting deliveries
  as before, so a message that kills its worker every time still ends
  ``dead``.

A run that finds its lease lost or its write refused leaves the record in
place: the key's next delivery, or the reaper, takes it from there. The
record is as durable as the Redis that holds it, like kombu's ``unacked``
entry for the same message (the embedded Redis keeps an append-only file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from fleetworks import constants as c

_FORGET = """
if redis.call('hget', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('hdel', KEYS[1], ARGV[1])
  redis.call('hdel', KEYS[2], ARGV[1])
  redis.call('zrem', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

_TOUCH = """
if redis.call('hget', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('zadd', KEYS[1], 'XX', ARGV[3], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Record:
    """One run in flight, as its lease wrote it."""

    key: str
    agent: str
    entity: str
    task_id: str
    worker: str
    queue: str | None
    payload: Any
    #: The lease token of the run that wrote it.
    owner: str
    #: When it was written (epoch seconds), or moved on by the reaper.
    at: float


def encode(
    *, agent: str, entity: str, task_id: str, worker: str, queue: str | None, payload: Any
) -> str:
    """The record a lease writes for one run."""
    return json.dumps(
        {"agent": agent, "entity": entity, "task_id": task_id, "worker": worker,
         "queue": queue, "payload": payload},
        separators=(",", ":"),
    )  # fmt: skip


def _decode(key: str, raw: bytes | str, owner: bytes | str | None, at: float) -> Record:
    data = json.loads(raw)
    text = owner.decode() if isinstance(owner, bytes) else (owner or "")
    return Record(
        key=key, agent=str(data["agent"]), entity=str(data["entity"]),
        task_id=str(data["task_id"]), worker=str(data["worker"]), queue=data.get("queue"),
        payload=data.get("payload"), owner=text, at=at,
    )  # fmt: skip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def older_than(client: redis.Redis, at: float, limit: int) -> list[Record]:
    """Records written before ``at``, oldest first, at most ``limit``."""
    found: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
        c.INFLIGHT_AT_KEY, "-inf", at, start=0, num=limit, withscores=True
    )
    return list(_records(client, [(_text(k), float(s)) for k, s in found]))


def all_records(client: redis.Redis) -> list[Record]:
    """Every record (the runs in flight now, and any the reaper has yet to take)."""
    found: list[tuple[bytes, float]] = client.zrange(  # type: ignore[assignment]
        c.INFLIGHT_AT_KEY, 0, -1, withscores=True
    )
    return list(_records(client, [(_text(k), float(s)) for k, s in found]))


def _records(client: redis.Redis, scored: list[tuple[str, float]]) -> Iterator[Record]:
    if not scored:
        return
    keys = [k for k, _ in scored]
    with client.pipeline(transaction=False) as pipe:
        pipe.hmget(c.INFLIGHT_KEY, keys)
        pipe.hmget(c.INFLIGHT_OWNER_KEY, keys)
        raws, owners = pipe.execute()
    for (key, at), raw, owner in zip(scored, raws, owners, strict=True):
        if raw is not None:
            yield _decode(key, raw, owner, at)


def count(client: redis.Redis) -> int:
    """How many records there are."""
    return int(client.zcard(c.INFLIGHT_AT_KEY))


def forget(client: redis.Redis, record: Record) -> bool:
    """Drop ``record`` if it is still the one its key holds (no later run rewrote it)."""
    keys = [c.INFLIGHT_KEY, c.INFLIGHT_OWNER_KEY, c.INFLIGHT_AT_KEY]
    return bool(client.eval(_FORGET, len(keys), *keys, record.key, record.owner))


def touch(client: redis.Redis, key: str, owner: str, at: float) -> bool:
    """Date ``key``'s record ``at`` (the reaper republished it; its run waits
    in place until then), if the run with lease token ``owner`` wrote it."""
    keys = [c.INFLIGHT_AT_KEY, c.INFLIGHT_OWNER_KEY]
    return bool(client.eval(_TOUCH, len(keys), *keys, key, owner, at))


__all__ = ["Record", "all_records", "count", "encode", "forget", "older_than", "touch"]
