"""Every Redis key prefix and every default of fleetworks, in one place.

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

# --- Queues -----------------------------------------------------------------

#: Default queue for agent tasks. Named, not ``celery``, so a fleet can share a
#: broker with other Celery apps without eating their messages.
DEFAULT_QUEUE: Final = "fleet"

#: Count: messages per pipeline when publishing a fan-out. One round trip
#: per batch; 500 LPUSHes of ~1 KB each keep a pipeline under a megabyte.
PUBLISH_BATCH: Final = 500

# --- Guard ------------------------------------------------------------------

#: Seconds: default hard time limit of an agent task. The lock TTL and the
#: broker visibility timeout are derived from it, never set on their own.
DEFAULT_TIME_LIMIT_S: Final = 30.0

#: Seconds added to an agent's time limit to get its lock TTL: covers the
#: claim and outcome writes that run around the behaviour, and clock jitter.
LOCK_TTL_SLACK_S: Final = 5.0

#: Seconds: upper bound of a lease (the entity lock's TTL) while its holder
#: renews it. A holder that dies blocks its entity at most this long, however
#: long its time limit: the heartbeat, not the TTL, keeps a long task's lock.
LEASE_TTL_MAX_S: Final = 6.0

#: Seconds between lease renewals: a third of the longest lease, so two
#: renewals in a row can fail (a Redis blip) before the lease runs out.
LEASE_RENEW_INTERVAL_S: Final = LEASE_TTL_MAX_S / 3

#: Seconds: first back-off when the entity lock is held by another worker.
#: Doubles per attempt up to ``CONTENTION_BACKOFF_MAX_S``, with full jitter.
CONTENTION_BACKOFF_BASE_S: Final = 0.2

#: Seconds: ceiling of the contention back-off, so a waiting task re-checks
#: at least this often whether the holder finished (then it is a duplicate).
CONTENTION_BACKOFF_MAX_S: Final = 5.0

#: Count: how often a task may re-queue itself on lock contention before it
#: is recorded as ``failed``. 100 tries at <= 5 s outlast any lock TTL.
MAX_CONTENTION_RETRIES: Final = 100

#: Characters: longest idempotency key accepted. Keys are stored in an
#: indexed column and sent in every message; 500 leaves room for an entity
#: id and a tick id together.
MAX_KEY_CHARS: Final = 500

#: Count: default retries of a behaviour that raised, per agent.
DEFAULT_MAX_RETRIES: Final = 3

#: Seconds: first back-off after a failure; doubles per retry, with jitter.
RETRY_BACKOFF_BASE_S: Final = 1.0

#: Seconds: ceiling of the failure back-off. Also bounds how long a retry
#: waits in a worker's memory, which the visibility timeout must exceed.
RETRY_BACKOFF_MAX_S: Final = 30.0

#: Seconds: ceiling of the back-off while Redis or the database is
#: unreachable: short, so work resumes within seconds of the service.
UNREACHABLE_BACKOFF_MAX_S: Final = 3.0

#: Seconds a task waits in place, retrying, while Redis or the database is
#: unreachable, before it falls back to a Celery retry (capped at half its
#: time limit). Waiting in place keeps the message with a live claim instead
#: of parking it as a countdown retry, which a worker death would strand
#: until the visibility timeout.
UNREACHABLE_WAIT_S: Final = 20.0

#: Count: default claims of one key before it is declared ``dead``.
DEFAULT_MAX_DELIVERIES: Final = 5

#: Seconds: default of ``FLEET_MAX_TIME_LIMIT_S``, the longest time limit an
#: agent may declare. The broker's visibility timeout is derived from it, so
#: a long task is not handed to a second worker while it still runs
#: (celery#2599); raise it for agents that need longer.
MAX_TIME_LIMIT_S: Final = 60.0

#: Seconds added to the max time limit + ``RETRY_BACKOFF_MAX_S`` to get the
#: visibility timeout: the broker's backstop for messages no claim covers.
VISIBILITY_SLACK_S: Final = 30.0

#: Seconds between kombu's sweeps that restore messages past the visibility
#: timeout (kombu's default is about 100 s: interval 10 x throttle 10).
UNACKED_RESTORE_INTERVAL_S: Final = 5

#: Seconds between reaper runs (a beat entry): how often claims whose holder
#: is gone are looked for.
REAP_INTERVAL_S: Final = 2.0

#: Seconds a republished key is left alone before it may be republished
#: again: long enough for the new delivery to be claimed through a backlog.
REPUBLISH_AFTER_S: Final = 30.0

#: Seconds after its delivery that an unacked agent message with no claim, no
#: lease and no pending countdown is taken for stranded by a lost worker and
#: restored to its queue: past a lease, a reaper tick and a margin.
STRANDED_AFTER_S: Final = LEASE_TTL_MAX_S + REAP_INTERVAL_S + 4

#: Count: claims examined per reaper run.
REAP_BATCH: Final = 500

#: Levels of nesting allowed in a task's arguments. The prefork pool pickles
#: arguments recursively and overflows at about 470 levels, killing the
#: worker; deeper payloads are rejected before they reach it, with a margin.
MAX_PAYLOAD_DEPTH: Final = 256

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

#: TCP port of the Prometheus ``/metrics`` endpoint ``up`` serves (and
#: ``fleetworks metrics``). 9808: free in Prometheus' port allocation list.
METRICS_PORT: Final = 9808

# --- Results database -------------------------------------------------------

#: Milliseconds SQLite waits for a competing writer before failing. Workers
#: of one machine share one file; writes are short, so 30 s is never reached
#: unless something is wrong.
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000

# --- Embedded services ------------------------------------------------------

#: Directory (relative to the working directory) for the embedded Redis data,
#: the SQLite database, the beat schedule and logs.
DEFAULT_HOME: Final = ".fleet"

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

#: Default address and port of Flower. Loopback only unless basic auth is set.
FLOWER_ADDRESS: Final = "127.0.0.1"
FLOWER_PORT: Final = 5555
