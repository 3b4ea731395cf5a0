"""The highly available beat scheduler: ``beat_scheduler`` of every fleet app.

Why our own and not celery-redbeat: RedBeat gives one leader through a Redis
lock, but no deterministic tick ids, no per-entry misfire policy (it runs a
missed entry once, nothing else) and it sends whatever is due the moment it
becomes leader, so a stalled leader and its successor can both send a slot.
We need each slot of each entry to run once, whichever beat sends it and
however often, which takes three pieces RedBeat does not have together:

1. a lease with a term (:mod:`fleetworks.leader`), a few seconds long and
   renewed every loop, so failover takes seconds, not RedBeat's default
   25 minutes (redbeat#230);
2. slots and tick ids computed from the schedule alone
   (:mod:`fleetworks.ticks`), and the time up to which each entry's slots
   are handled kept in Redis, advanced only by the current leader (checked
   in the same script that writes it), so a new leader continues where the
   old one stopped and applies the entry's misfire policy to the gap;
3. the tick id sent as the task id and, for an agent, as its idempotency
   key, so the claim in the results database turns a tick sent twice (a
   leader that stalled between sending and recording) into one run.

A tick is sent before its slot is recorded as handled: a leader that dies
between the two leaves the slot to its successor, which sends it again and
the duplicate is skipped. The opposite order would lose the tick.

Plain Celery tasks on the schedule (not agents) get the tick id as their
task id but no deduplication: at-least-once per slot.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from celery.beat import ScheduleEntry, Scheduler

from fleetworks import constants as c
from fleetworks import message, ticks, tracing
from fleetworks.agent import AgentTask
from fleetworks.app import settings_of
from fleetworks.leader import Leadership
from fleetworks.locks import EntityLocks
from fleetworks.redisconn import get_redis

log = logging.getLogger(__name__)

#: Option of a beat entry naming its misfire policy; removed before sending.
MISFIRE_OPTION = "misfire"

#: Sets each named entry's handled-to time, only while KEYS[1] (the leader
#: lease) holds ARGV[1], and never backwards. ARGV[2..]: entry, epoch ms pairs.
_ADVANCE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  local cur = tonumber(redis.call('hget', KEYS[2], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > cur then
    redis.call('hset', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""


def slots_key(app_name: str) -> str:
    """The Redis hash of each entry's handled-to time, for the app named ``app_name``."""
    return f"{c.BEAT_SLOTS_KEY}{app_name}:slots"


def _ms(at: datetime) -> int:
    return round(at.timestamp() * 1000)


def _at(ms: bytes | str | int) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, UTC)


class FleetScheduler(Scheduler):  # type: ignore[misc]
    """One leader among any number of beats; every slot of every entry once."""

    def __init__(self, app: Celery, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("schedule_filename", None)
        kwargs["max_interval"] = c.BEAT_LOOP_S
        settings = settings_of(app)
        self._url, self._tls = settings.redis, settings.redis_tls(settings.redis)
        self._locks: EntityLocks | None = None
        self._advance: Callable[..., Any] | None = None
        identity = f"beat@{socket.gethostname()}/{os.getpid()}"
        self.leadership = Leadership(self._entity_locks, app.main or "fleet", identity)
        self._slots_key = slots_key(app.main or "fleet")
        self._policies: dict[str, ticks.Misfire] = {}
        super().__init__(app, *args, **kwargs)

    def _redis(self) -> redis.Redis:
        return get_redis(self._url, **self._tls)

    def _entity_locks(self) -> EntityLocks:
        if self._locks is None:
            self._locks = EntityLocks(self._redis())
        return self._locks

    def setup_schedule(self) -> None:
        self.app.loader.import_default_modules()
        super().setup_schedule()
        for name, entry in self.schedule.items():
            ticks.check(name, entry.schedule)
            self._policies[name] = ticks.misfire_of(name, entry.options.get(MISFIRE_OPTION))

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One loop: hold the lead, send what is due, say how long to sleep."""
        if not self.leadership.hold():
            return c.BEAT_LOOP_S
        now = datetime.now(UTC)
        try:
            handled = self._redis().hgetall(self._slots_key)
            plans = {
                name: ticks.plan(
                    entry.schedule, self._policies[name], self._handled(handled, name), now
                )
                for name, entry in self.schedule.items()
            }
            self._send(plans)
        except redis.RedisError as exc:
            log.warning("beat: Redis unreachable (%s); retrying", exc)
            return c.BEAT_LOOP_S
        soonest = min((p.next_slot for p in plans.values()), default=None)
        if soonest is None:
            return c.BEAT_LOOP_S
        return max(0.01, min(c.BEAT_LOOP_S, (soonest - datetime.now(UTC)).total_seconds()))

    @staticmethod
    def _handled(handled: dict[Any, Any], name: str) -> datetime | None:
        raw = handled.get(name.encode())
        return _at(raw) if raw is not None else None

    def _send(self, plans: dict[str, ticks.Plan]) -> None:
        """Send every planned tick, then record the entries' handled-to times."""
        advance: list[str | int] = []
        for name, p in plans.items():
            sent = self._send_entry(self.schedule[name], p.run)
            if sent is not p.run:
                # The broker refused a tick: record what went out, send the
                # rest at the next loop.
                if sent:
                    advance += [name, _ms(sent[-1])]
                break
            if p.dropped:
                log.warning(
                    "beat: %s: %d missed slot(s) not run (misfire %s)",
                    name,
                    p.dropped,
                    self._policies[name].value,
                )
            advance += [name, _ms(p.handled_to)]
        lease = self.leadership.lease
        if lease is None or not advance:
            return
        if self._advance is None:
            self._advance = self._redis().register_script(_ADVANCE)
        keys = [c.LOCK_KEY + self.leadership.entity, self._slots_key]
        if not self._advance(keys=keys, args=[lease.handle, *advance]):
            log.warning("beat: lead lost while sending; the next leader resends (deduplicated)")

    def _send_entry(self, entry: ScheduleEntry, slots: list[datetime]) -> list[datetime]:
        """Send ``slots`` in order; returns ``slots`` itself if all went out,
        else the ones that did before the broker failed."""
        for i, slot in enumerate(slots):
            try:
                self.send_tick(entry, slot)
            except Exception as exc:
                tick = ticks.tick_id(entry.name, slot)
                log.error("beat: could not send %s (%s); sending it again next loop", tick, exc)
                return slots[:i]
        return slots

    def send_tick(self, entry: ScheduleEntry, slot: datetime) -> str:
        """Send ``entry``'s tick at ``slot``; returns the tick id."""
        tick_id = ticks.tick_id(entry.name, slot)
        options = {k: v for k, v in entry.options.items() if k != MISFIRE_OPTION}
        kwargs = dict(entry.kwargs)
        task = self.app.tasks.get(entry.task)
        if isinstance(task, AgentTask):
            payload = dict(kwargs.get("payload") or {})
            payload |= {"tick": tick_id, "slot": ticks.slot_text(slot), "entry": entry.name}
            kwargs = message.pack(payload, tick_id)
        log.info("beat: sending %s (%s)", tick_id, entry.task)
        with tracing.beat_tick(entry.name, tick_id):
            self.app.send_task(
                entry.task,
                args=list(entry.args),
                kwargs=kwargs,
                task_id=tick_id,
                producer=self.producer,
                **options,
            )
        return tick_id

    def close(self) -> None:
        self.leadership.release()
        super().close()

    @property
    def info(self) -> str:
        return (
            f"highly available: lease {c.BEAT_LEASE_TTL_S:g}s on {self.leadership.entity}, "
            f"slots in {self._slots_key}"
        )
