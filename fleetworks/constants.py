"""The contracts between fleetworks' processes, and the defaults several modules share.

Each value carries a ``#:`` comment with its unit and the reason for it, so a
reader never has to guess why a number is what it is.
"""

from __future__ import annotations

from typing import Final

# --- Redis keys -------------------------------------------------------------

#: Prefix of every key fleetworks itself writes to Redis (not kombu's keys).
#: One prefix lets tests and operators find or flush our state with one SCAN.
KEY_PREFIX: Final = "fleet:"

#: ``fleet:lock:<entity>`` holds ``<random token>`` while a worker acts on the
#: entity. Expires after the lock TTL so a dead holder cannot block forever.
LOCK_KEY: Final = KEY_PREFIX + "lock:"

#: ``fleet:fence:<entity>`` is an INCR counter: the fencing token handed out
#: with each acquisition. Never expires: tokens must only ever grow.
FENCE_KEY: Final = KEY_PREFIX + "fence:"

#: ``fleet:beat:<app>:slots`` is a hash: schedule entry -> the time (epoch
#: ms) up to which its slots are handled. Shared by every beat, so the one
#: that takes over continues where the last leader stopped.
BEAT_SLOTS_KEY: Final = KEY_PREFIX + "beat:"

#: Entity name of the beat leader lease (``fleet:lock:beat-leader:<app>``);
#: its fence counter is the leader's term.
BEAT_LEADER_ENTITY: Final = "beat-leader:"

#: ``fleet:outbox`` is a hash: task id -> an agent message recorded before it
#: was published, until a run leases its entity; ``fleet:outbox:at`` a sorted
#: set of their publish times (:mod:`fleetworks.outbox`).
OUTBOX_KEY: Final = KEY_PREFIX + "outbox"
OUTBOX_AT_KEY: Final = KEY_PREFIX + "outbox:at"

#: A run's in-flight record, written with its lease (:mod:`fleetworks.locks`):
#: ``fleet:inflight`` is a hash, idempotency key -> the run (JSON: agent,
#: entity, task id, worker, queue, payload); ``fleet:inflight:owner`` the
#: lease token of the run that wrote it; ``fleet:inflight:at`` a sorted set of
#: when it was written (the reaper's scan, :mod:`fleetworks.reaper`);
#: ``fleet:inflight:tries`` the deliveries leased since the record was last
#: dropped. ``fleet:done:<key>``: the key succeeded lately (a done mark).
INFLIGHT_KEY: Final = KEY_PREFIX + "inflight"
INFLIGHT_OWNER_KEY: Final = KEY_PREFIX + "inflight:owner"
INFLIGHT_AT_KEY: Final = KEY_PREFIX + "inflight:at"
INFLIGHT_TRIES_KEY: Final = KEY_PREFIX + "inflight:tries"
DONE_KEY: Final = KEY_PREFIX + "done:"

# --- Queues -----------------------------------------------------------------

#: Count: messages per pipeline when publishing a fan-out. One round trip
#: per batch; 500 LPUSHes of ~1 KB each keep a pipeline under a megabyte.
PUBLISH_BATCH: Final = 500

# --- Guard ------------------------------------------------------------------

#: Characters: longest idempotency key accepted. Keys are stored in an
#: indexed column and sent in every message; 500 leaves room for an entity
#: id and a tick id together.
MAX_KEY_CHARS: Final = 500

#: Characters of a task id kept in ``outcomes`` and ``guard_events`` (the
#: columns' width). Celery's ids are 36; a beat tick id is its entry's name
#: and a 24-character slot. A longer id is stored clipped.
MAX_TASK_ID_CHARS: Final = 64

#: Characters of an error message kept in an outcome row. Enough for a
#: pydantic report on a large payload, small enough to keep rows cheap.
MAX_ERROR_CHARS: Final = 4000

# --- Beat (highly available scheduler) ---------------------------------------

#: Seconds: TTL of the beat leader's lease. A leader that dies is replaced
#: at most this long plus one ``BEAT_LOOP_S`` later. Short, because beat has
#: nothing to finish: RedBeat's default (25 min, redbeat#230) is the warning.
BEAT_LEASE_TTL_S: Final = 3.0

#: Seconds: longest sleep of a beat's loop. The leader renews its lease and a
#: follower tries to take it this often; a third of the TTL, so two renewals
#: in a row may fail before the lease is lost.
BEAT_LOOP_S: Final = BEAT_LEASE_TTL_S / 3

#: Seconds: a slot due for at most this long (or half its period, if less)
#: is on time, and an entry with misfire ``skip`` still runs it. Covers one
#: failover (lease TTL plus a loop), so a change of leader is not a misfire.
MISFIRE_GRACE_S: Final = BEAT_LEASE_TTL_S + 2 * BEAT_LOOP_S

#: Count: most missed slots of one entry that misfire ``catch_up`` runs at
#: once; older ones are dropped and logged. Bounds the burst after a long
#: outage of every beat.
CATCH_UP_MAX_SLOTS: Final = 1000

# --- Autoscaling ------------------------------------------------------------

#: Seconds between an autoscaled worker's looks at its queues' depth: the
#: reaction time to a burst is at most this plus a fork.
AUTOSCALE_INTERVAL_S: Final = 1.0

#: ``fleet:autoscale:<worker>`` is a hash an autoscaled worker writes at
#: every look (desired, actual, backlog, running): what ``/metrics`` reports.
AUTOSCALE_KEY: Final = KEY_PREFIX + "autoscale:"

#: Seconds such a hash lives unless rewritten: a stopped worker drops out.
AUTOSCALE_REPORT_TTL_S: Final = 10

#: Header stamped on every message our app publishes (epoch seconds), from
#: which the depth probe tells the age of the oldest waiting message.
SENT_AT_HEADER: Final = "fleet_sent_at"

# --- Results database -------------------------------------------------------

#: Milliseconds SQLite waits for a competing writer before failing. Workers
#: of one machine share one file; writes are short, so 30 s is never reached
#: unless something is wrong.
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
#: Seconds between looks at SQLite's write lock while a writer waits for it:
#: the first pause, doubled up to the last (see ``fleetworks.db``).
SQLITE_LOCK_POLL_MIN_S: Final = 0.0002
SQLITE_LOCK_POLL_MAX_S: Final = 0.002
#: A pooled PostgreSQL connection idle at least this many seconds is tested
#: (``SELECT 1``) before use; a busy one is not (see ``fleetworks.db``).
DB_PING_IDLE_S: Final = 5.0

# --- Embedded services ------------------------------------------------------

#: TCP port of the embedded Redis on 127.0.0.1. Fixed (not random) so that
#: ``celery -A config worker`` finds the broker ``fleetworks up`` started;
#: not 6379, so it never collides with a system Redis.
EMBEDDED_REDIS_PORT: Final = 6399

#: Seconds to wait for the embedded Redis to answer PING after start.
EMBEDDED_START_TIMEOUT_S: Final = 10.0

# --- Processes --------------------------------------------------------------

#: Seconds a child gets after SIGTERM (Celery's warm shutdown) before SIGKILL.
#: A worker finishes its running tasks in this window.
STOP_GRACE_S: Final = 30.0

#: What names a batch agent's queue: ``<queue>.batch.<agent>`` (:mod:`fleetworks.batch`).
BATCH_INFIX: Final = ".batch."
