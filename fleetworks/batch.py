"""Batch agents: many messages of one agent per run, each key still once.

An agent declared with ``AgentSpec(batch=Batch(size=N, wait_s=W))`` has a
queue of its own (:func:`batch_queue`, beside the queue it would use; every
fleet worker of that queue consumes it too, :class:`BatchQueues`). When
Celery delivers one of its messages, the run takes up to ``N - 1`` more from
that queue and handles them together:

1. **take**: one Lua script pops them and records each in kombu's
   ``unacked`` hash and index, as kombu's own delivery does (with no window
   between the pop and the record: the script is atomic), waiting up to
   ``W`` seconds for the batch to fill;
2. **lease**: one script leases every entity with its own fencing token (the
   owner of each lease is its message's delivery tag, as for single runs);
3. **claim**: one multi-row upsert claims every key (:func:`fleetworks.claims.claim_many`),
   committed before any behaviour runs (as for single runs: a message that
   kills its worker counts its deliveries, and the reaper sees the claims of a
   holder that died);
4. **behaviour**: the agent's behaviour runs per item, its effects in a
   savepoint of the batch's transaction: an item that raises rolls back
   alone and is recorded ``failed`` (retried alone) or ``dead``. An agent
   with a batch behaviour (``Batch(together=...)``) has it called once for
   every running item instead, all its effects and outcomes in one
   savepoint; if it raises, or a lease or token turns out lost, that
   savepoint rolls back and each item runs per item as above;
5. **settle**: every outcome, the contention and skip events included,
   commits in that one transaction; only then are the taken messages
   acknowledged (late acks kept), retries published for the items that need
   one, and the leases released.

An item whose entity is held elsewhere, or twice in the batch, is deferred
alone (re-queued with the contention back-off); a payload the agent refuses
is one ``rejected`` row, as for single runs. A subscriber's item whose event
key has an earlier event it has not handled (stored before it, not yet
settled, perhaps earlier in the same batch) is deferred alone, as a single
subscriber run is (:func:`fleetworks.events.earlier_unhandled_many`: two
statements for the batch, inside the claims' transaction).

So a batch costs two transactions, whatever its size: the claims, then the
settlement.

**What a crash costs.** Killed before the settlement commits: none of the
batch's effects or outcomes is written; the delivered message comes back
through Celery (late ack), the taken ones through the reaper once their
leases end (they sit in kombu's ``unacked`` hash, which
:func:`fleetworks.reaper.restore_stranded` restores when no live worker holds
them and no lease of theirs is alive: within a lease,
:data:`fleetworks.timing.LEASE_TTL_MAX_S`), and their claimed rows are
republished by the reaper too; each key runs once. Killed after the commit
and before the acknowledgements: the same messages come back and find their
keys done (counted duplicates). A retry published before the crash and its
original both come back: the claim lets one of them run. So exactly once per
key holds as for single runs; ``tests/test_batch.py`` kills a worker
mid-batch to show it.

**Why not celery-batches.** It buffers requests in the worker's main process
and needs the prefetch multiplier raised for every task of the worker (to 0,
unbounded, or above the batch size), where a fleet keeps one message per
pool process (fair dispatch, and a killed worker strands at most one
message per process); it hands the batch one result, with no way to retry
or reject one request of it alone. Here the messages are taken inside the
run, on the agent's own queue, so other agents keep prefetch 1 and each
item is settled alone.

Redis brokers only: on RabbitMQ a batch agent runs one message per run,
with the same guarantees.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import redis
from celery import Celery, bootsteps
from sqlalchemy import Connection

from fleetworks import claims, events, kombu_redis, logs, outbox, tracing
from fleetworks.claims import ClaimRequest, ClaimVerdict, StaleWriteError
from fleetworks.constants import BATCH_INFIX, SENT_AT_HEADER
from fleetworks.context import AgentSpec, BatchBehaviour, RunContext
from fleetworks.db import get_engine
from fleetworks.guard import (
    FENCING_REFUSED,
    LEASE_LOST,
    STALE,
    UNREACHABLE,
    Behaviour,
    Delivery,
    Guard,
    Parsed,
    RetryRequested,
    _Ended,
    _published_at,
)
from fleetworks.ledger import RunId
from fleetworks.locks import Lease, LeaseLostError
from fleetworks.models import Ended, EventKind, Status
from fleetworks.retry import Facts, GiveUp, Proceed, Retry, Situation, Wait

if TYPE_CHECKING:
    from fleetworks.agent import Fleet

log = logging.getLogger(__name__)

#: Seconds between looks at the queue while a batch waits to fill.
FILL_POLL_S: Final = 0.01

#: The savepoint of a batch behaviour's effects (:attr:`Batch.together`).
_TOGETHER: Final = "fleet_batch"

_TAKE = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local m = redis.call('rpop', KEYS[1])
  if not m then break end
  local ok, msg = pcall(cjson.decode, m)
  local tag = ''
  if ok and type(msg) == 'table' and type(msg['properties']) == 'table'
      and msg['properties']['delivery_tag'] then
    local info = msg['properties']['delivery_info']
    if type(info) ~= 'table' then info = {} end
    tag = tostring(msg['properties']['delivery_tag'])
    redis.call('hset', KEYS[2], tag, '[' .. m .. ',' .. cjson.encode(info['exchange'] or '')
      .. ',' .. cjson.encode(info['routing_key'] or KEYS[1]) .. ']')
    redis.call('zadd', KEYS[3], ARGV[2], tag)
  end
  out[#out + 1] = tag
  out[#out + 1] = m
end
return out
"""


def batch_queue(base: str, agent: str) -> str:
    """The queue of batch agent ``agent`` beside queue ``base``."""
    return f"{base}{BATCH_INFIX}{agent}"


@dataclass(slots=True)
class Item:
    """One message of a batch and what became of it."""

    delivery: Delivery
    #: Its delivery tag when the run took it (None: the message Celery delivered).
    taken: str | None = None
    parsed: Parsed | None = None
    lease: Lease | None = None
    attempts: int = 0
    #: What the task returns for it: a behaviour's result, or an :class:`Ended`.
    result: Any = None
    #: Set when it must run again later: the countdown and why.
    retry: RetryRequested | None = None
    emitted: bool = False


@dataclass
class _Batch:
    spec: AgentSpec
    items: list[Item]
    spans: tracing.BatchSpans
    events: list[tuple[Item, EventKind, str]] = field(default_factory=list)

    def run_id(self, item: Item) -> RunId:
        key = item.parsed.identity.key if item.parsed else ""
        return RunId(self.spec.name, key, item.delivery.task_id, item.delivery.worker)

    def end(self, item: Item, kind: EventKind, detail: str) -> None:
        self.events.append((item, kind, detail))
        item.result = Ended(status=str(kind), detail=detail)

    def defer(self, item: Item, kind: EventKind, detail: str, decision: Retry) -> None:
        self.events.append((item, kind, detail))
        item.retry = RetryRequested(decision.countdown, decision.reason)


class BatchGuard:
    """The guard's five stages over a batch (see the module docstring)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @property
    def guard(self) -> Guard:
        return self.fleet.guard

    def run(self, spec: AgentSpec, behaviour: Behaviour, first: Delivery) -> Any:
        """Run ``first`` and the messages taken with it; returns (or raises) what
        the guard returns for ``first``, once the batch is settled."""
        assert spec.batch is not None
        items = [Item(first), *self._take(spec, first)]
        started, tries = time.monotonic(), 0
        while True:
            try:
                self._once(spec, behaviour, items)
                break
            except UNREACHABLE as exc:
                facts = Facts(Situation.UNREACHABLE, tries=tries,
                              waited_s=time.monotonic() - started, error=exc)  # fmt: skip
                decision = self.guard.policy.decide(spec, facts)
                if isinstance(decision, Retry):
                    # The taken messages stay unacknowledged, without a lease:
                    # the reaper gives them back (restore_stranded).
                    raise RetryRequested(decision.countdown, decision.reason) from exc
                assert isinstance(decision, Wait)
                log.warning("%s batch of %d: service unreachable (%s); trying again in %.1fs",
                            spec.name, len(items), exc, decision.seconds)  # fmt: skip
                time.sleep(decision.seconds)
                tries += 1
        self._after(spec, items)
        head = items[0]
        if head.retry is not None:
            raise head.retry
        if isinstance(head.result, BaseException):
            raise head.result  # a dead letter, recorded
        return head.result

    # -- take ------------------------------------------------------------------

    def _take(self, spec: AgentSpec, first: Delivery) -> list[Item]:
        batch = spec.batch
        assert batch is not None
        queue = first.queue
        if batch.size <= 1 or not queue or BATCH_INFIX not in queue:
            return []  # delivered from elsewhere (the control queue, a replay): alone
        app = self.fleet.app
        taken: list[Item] = []
        deadline = time.monotonic() + batch.wait_s
        with app.pool.acquire(block=True) as conn:
            channel = conn.default_channel
            script = channel.client.register_script(_TAKE)
            keys = [queue, kombu_redis.unacked_key(channel), str(channel.unacked_index_key)]
            while True:
                want = batch.size - 1 - len(taken)
                raw = script(keys=keys, args=[want, time.time()])
                for tag, body in zip(raw[::2], raw[1::2], strict=True):
                    item = self._item(spec, first, _text(tag), body)
                    if item is not None:
                        taken.append(item)
                if len(taken) >= batch.size - 1 or time.monotonic() >= deadline:
                    return taken
                time.sleep(min(FILL_POLL_S, max(0.0, deadline - time.monotonic())))

    def _item(self, spec: AgentSpec, first: Delivery, tag: str, body: Any) -> Item | None:
        """The :class:`Item` of one taken message; a message that is not a task
        of this agent goes back to its queue (or, not even a message, is logged)."""
        try:
            message = json.loads(body)
            headers = message["headers"]
            args, kwargs = kombu_redis.decode_body(message["body"])
        except (ValueError, KeyError, TypeError) as exc:
            if tag:
                kombu_redis.restore(self.fleet.app, tag)  # Celery's consumer reports it
            else:
                log.error("dropped a message of %s's queue that is not one: %s (%r)",
                          spec.name, exc, _short(body))  # fmt: skip
            return None
        if not isinstance(headers, dict) or headers.get("task") != spec.name or not tag:
            kombu_redis.restore(self.fleet.app, tag)
            return None
        sent = headers.get(SENT_AT_HEADER)
        retries = headers.get("retries")
        delivery = Delivery(
            task_id=str(headers.get("id") or ""),
            worker=first.worker,
            args=tuple(args),
            kwargs=kwargs,
            retries=retries if isinstance(retries, int) and retries >= 0 else 0,
            queue=first.queue,
            delivery_tag=tag,
            sent_at=float(sent) if isinstance(sent, int | float) else None,
            trace=tracing.message_carrier(headers),
        )
        return Item(delivery, taken=tag)

    # -- parse, lease, claim, behaviour, settle ----------------------------------

    def _once(self, spec: AgentSpec, behaviour: Behaviour, items: list[Item]) -> None:
        for item in items:
            item.result, item.retry, item.lease, item.emitted = None, None, None, False
        batch = _Batch(spec, items, tracing.BatchSpans(spec.name, len(items)))
        live = self._parse(batch)
        spans, started = batch.spans, batch.spans.mark("")
        live = self._lease(batch, live)
        started = spans.mark("lease", started)
        try:
            engine = get_engine(self.guard.ledger.database_url)
            with engine.begin() as conn:
                # The claims commit before any behaviour runs, as for single
                # runs: a message that kills its worker counts its deliveries
                # (max_deliveries), and a holder that dies leaves claimed rows
                # the reaper sees.
                ordered = self._in_order(conn, batch, live)
                for item, kind, detail in batch.events:
                    self._event(conn, batch, item, kind, detail)
                batch.events.clear()
                running = self._claim(conn, batch, ordered)
            spans.mark("claim", started)
            if running or batch.events:
                with engine.connect() as conn, conn.begin():
                    quiet: list[tuple[Item, str, int, Any]] = []
                    if spec.batch is not None and spec.batch.together is not None and running:
                        running = self._together(conn, batch, spec.batch.together, running)
                    for item in running:
                        self._behave(conn, batch, behaviour, item, quiet)
                    started = spans.mark("")
                    self._settle_quiet(conn, batch, quiet)
                    for item, kind, detail in batch.events:
                        self._event(conn, batch, item, kind, detail)
                spans.mark("settle", started)
            self._trace_ends(batch)
        except BaseException as exc:
            spans.abort(exc)
            raise
        finally:
            held = [item.lease for item in live if item.lease is not None]
            for lease in held:
                self.guard.heartbeat.unwatch(lease)
            self._release(held)

    def _parse(self, batch: _Batch) -> list[Item]:
        live: list[Item] = []
        seen: set[str] = set()
        for item in batch.items:
            try:
                item.parsed = self.guard.parse(batch.spec, item.delivery)
            except _Ended as ended:
                item.result = ended.result  # rejected, recorded
                continue
            identity = item.parsed.identity
            if identity.entity in seen or identity.key in seen:
                decision = self._contended(batch.spec, item)
                why = f"entity {identity.entity!r} is in this batch twice"
                if isinstance(decision, Retry):
                    batch.defer(item, EventKind.LOCK_CONTENDED, why, decision)
                else:
                    batch.end(item, EventKind.SKIPPED_LOCKED, f"{why}: {decision.reason}")
                continue
            seen.update((identity.entity, identity.key))
            live.append(item)
        return live

    @staticmethod
    def _trace_ends(batch: _Batch) -> None:
        """Close the run span of every key read (see :class:`tracing.BatchSpans`)."""
        if not batch.spans.on:
            return
        for item in batch.items:
            if item.parsed is None:
                continue  # rejected before it had a key: its message's run says so
            ended: str | None = None
            if item.retry is not None:
                ended = f"retry in {item.retry.countdown:.1f}s: {item.retry}"
            elif isinstance(item.result, Ended):
                ended = f"{item.result.get('status')}: {item.result.get('detail')}"
            elif isinstance(item.result, BaseException):
                ended = f"dead: {item.result}"
            identity = item.parsed.identity
            token = item.lease.fencing_token if item.lease is not None else None
            batch.spans.end(id(item), item.delivery.trace, identity.key, identity.entity,
                            token=token, ended=ended)  # fmt: skip

    def _contended(self, spec: AgentSpec, item: Item) -> Retry | GiveUp:
        decision = self.guard.policy.decide(
            spec, Facts(Situation.CONTENDED, retries=item.delivery.retries)
        )
        assert isinstance(decision, Retry | GiveUp)
        return decision

    def _lease(self, batch: _Batch, live: list[Item]) -> list[Item]:
        spec, locks = batch.spec, self.guard.locks()
        wanted = [
            (item.parsed.identity.entity, item.delivery.delivery_tag, item.delivery.task_id)
            for item in live if item.parsed is not None
        ]  # fmt: skip
        leases = locks.acquire_many(wanted, spec.lock_ttl_s)
        busy: list[Item] = []
        for item, lease in zip(live, leases, strict=True):
            item.lease = lease
            if lease is None:
                busy.append(item)
            else:
                self.guard.heartbeat.watch(lease)
        if busy:
            with self._reading() as conn:
                done = claims.terminal_statuses(conn, [self._key(i) for i in busy])
            for item in busy:
                entity = item.parsed.identity.entity if item.parsed else "?"
                if self._key(item) in done:
                    outbox.forget(locks.client, item.delivery.task_id)
                    batch.end(item, EventKind.SKIPPED_DUPLICATE,
                              f"already {done[self._key(item)]}; lock busy")  # fmt: skip
                    continue
                decision = self._contended(spec, item)
                if isinstance(decision, GiveUp):
                    outbox.forget(locks.client, item.delivery.task_id)
                    why = f"entity {entity!r}: {decision.reason}"
                    batch.end(item, EventKind.SKIPPED_LOCKED, why)
                else:
                    batch.defer(item, EventKind.LOCK_CONTENDED,
                                f"entity {entity!r} is locked", decision)  # fmt: skip
        return [item for item in live if item.lease is not None]

    def _in_order(self, conn: Connection, batch: _Batch, live: list[Item]) -> list[Item]:
        """A subscriber runs one key's events in the order they were stored:
        an item whose key has an earlier event not yet handled (in the
        database, or earlier in this batch) is deferred, as a single run is."""
        spec = batch.spec
        fresh = [i for i in live if i.parsed is not None and i.parsed.resumed is None]
        if not spec.on or not fresh:
            return live
        waits = events.earlier_unhandled_many(
            conn, spec, [i.parsed.payload for i in fresh if i.parsed is not None]
        )
        if not waits:
            return live
        ordered: list[Item] = []
        checked = {id(i) for i in fresh}
        for item in live:
            earlier = None
            if id(item) in checked and item.parsed is not None:
                earlier = waits.get(item.parsed.payload.id)
            if earlier is None:
                ordered.append(item)
                continue
            facts = Facts(Situation.OUT_OF_ORDER, retries=item.delivery.retries)
            decision = self.guard.policy.decide(spec, facts)
            assert isinstance(decision, Retry)
            batch.defer(item, EventKind.DEFERRED, f"after event {earlier} of its key", decision)
        return ordered

    def _claim(self, conn: Connection, batch: _Batch, live: list[Item]) -> list[Item]:
        spec = batch.spec
        wanted = []
        for item in live:
            assert item.parsed is not None and item.lease is not None
            wanted.append(ClaimRequest(
                agent=spec.name, entity_key=item.parsed.identity.entity,
                idempotency_key=item.parsed.identity.key,
                fencing_token=item.lease.fencing_token, task_id=item.delivery.task_id,
                worker=item.delivery.worker, payload=item.parsed.raw, queue=item.delivery.queue,
                queued_at=_published_at(item.delivery.sent_at),
            ))  # fmt: skip
        got = claims.claim_many(conn, wanted)
        running: list[Item] = []
        for item in live:
            assert item.parsed is not None and item.lease is not None
            found = got[item.parsed.identity.key]
            if found.verdict is ClaimVerdict.DUPLICATE:
                kind = (EventKind.SKIPPED_DEAD if found.status == Status.DEAD
                        else EventKind.SKIPPED_DUPLICATE)  # fmt: skip
                batch.end(item, kind, f"key already {found.status}")
                continue
            if found.verdict is ClaimVerdict.STALE:
                self.guard.locks().raise_fence(item.parsed.identity.entity, found.stored_token or 0)
                detail = "fence counter behind the ledger; re-acquiring"
                batch.defer(item, EventKind.STALE_WRITE, detail, Retry(0.0, detail))
                continue
            decision = self.guard.policy.decide(
                spec, Facts(Situation.DELIVERED, attempts=found.attempts)
            )
            if isinstance(decision, GiveUp):
                claims.finish(conn, idempotency_key=item.parsed.identity.key,
                              fencing_token=item.lease.fencing_token, status=Status.DEAD,
                              error=decision.reason)  # fmt: skip
                batch.end(item, EventKind.SKIPPED_DEAD,
                          f"declared dead after {found.attempts} deliveries")  # fmt: skip
                continue
            assert isinstance(decision, Proceed)
            item.attempts = found.attempts
            running.append(item)
        return running

    def _context(self, conn: Connection, batch: _Batch, item: Item, *, joined: bool) -> RunContext:
        parsed, lease = item.parsed, item.lease
        assert parsed is not None and lease is not None
        return RunContext(
            spec=batch.spec, task_id=item.delivery.task_id, worker=item.delivery.worker,
            payload=parsed.payload, idempotency_key=parsed.identity.key,
            entity_key=parsed.identity.entity, lease=lease, attempts=item.attempts,
            database_url=self.guard.ledger.database_url, queue=item.delivery.queue,
            app=self.fleet.app, resumed=parsed.resumed, shared=conn, joined=joined,
        )  # fmt: skip

    def _together(
        self, conn: Connection, batch: _Batch, together: BatchBehaviour, running: list[Item]
    ) -> list[Item]:
        """The batch behaviour over every running item, in one savepoint; returns
        the items still to run alone: none, or all of them when it failed."""
        spec = batch.spec
        ctxs = [self._context(conn, batch, item, joined=True) for item in running]
        conn.exec_driver_sql(f"SAVEPOINT {_TOGETHER}")
        started = batch.spans.mark("")
        try:
            with logs.bind_run(agent=spec.name, task_id=running[0].delivery.task_id,
                               worker=running[0].delivery.worker):  # fmt: skip
                results = [
                    r.as_result() if isinstance(r, events.Waiting) else r for r in together(ctxs)
                ]
            if len(results) != len(ctxs):
                raise TypeError(f"{spec.name}: its batch behaviour returned {len(results)} "
                                f"results for {len(ctxs)} runs")  # fmt: skip
            for ctx in ctxs:
                ctx.check_lease()
            done = [
                (ctx.idempotency_key, ctx.fencing_token, result)
                for ctx, result in zip(ctxs, results, strict=True)
            ]
            refused = claims.finish_many(conn, done)
            if refused:
                raise StaleWriteError(f"outcomes refused for {sorted(refused)[:3]}")
        except Exception as exc:
            if isinstance(exc, UNREACHABLE):
                raise  # the whole batch waits in place
            conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_TOGETHER}")
            conn.exec_driver_sql(f"RELEASE SAVEPOINT {_TOGETHER}")
            log.warning("%s: its batch behaviour failed for %d keys (%s: %s); each runs alone",
                        spec.name, len(running), type(exc).__name__, exc)  # fmt: skip
            return running
        conn.exec_driver_sql(f"RELEASE SAVEPOINT {_TOGETHER}")
        batch.spans.mark("behaviour", started)
        for item, ctx, result in zip(running, ctxs, results, strict=True):
            item.result, item.emitted = result, bool(ctx.emitted)
        return []

    def _behave(
        self,
        conn: Connection,
        batch: _Batch,
        behaviour: Behaviour,
        item: Item,
        quiet: list[tuple[Item, str, int, Any]],
    ) -> None:
        spec = batch.spec
        parsed, lease = item.parsed, item.lease
        assert parsed is not None and lease is not None
        run = batch.run_id(item)
        ctx = self._context(conn, batch, item, joined=False)
        with logs.bind_run(agent=spec.name, task_id=run.task_id, worker=run.worker):
            logs.bind(idempotency_key=run.key, entity=parsed.identity.entity,
                      fencing_token=lease.fencing_token, attempt=item.attempts)  # fmt: skip
            try:
                traced = (item.delivery.trace, run.key, parsed.identity.entity)
                with batch.spans.behaviour(id(item), *traced, lease.fencing_token):
                    result = behaviour(ctx, parsed.payload)
                if isinstance(result, events.Waiting):
                    result = result.as_result()
                ctx.check_lease()
                if not ctx.db_opened:
                    # It wrote nothing: its outcome is one fenced UPDATE, which
                    # either applies or changes nothing, sent with the others'.
                    quiet.append((item, run.key, lease.fencing_token, result))
                    return
                self.guard.ledger.settle(ctx.db, run, lease.fencing_token, result)
                ctx.close_db(commit=True)
            except BaseException as exc:
                ctx.close_db(commit=False)
                if isinstance(exc, UNREACHABLE) or not isinstance(exc, Exception):
                    raise  # the whole batch waits in place (or the signal propagates)
                self._failed(conn, batch, item, ctx, exc)
                return
        item.result, item.emitted = result, bool(ctx.emitted)

    def _settle_quiet(
        self, conn: Connection, batch: _Batch, quiet: list[tuple[Item, str, int, Any]]
    ) -> None:
        """The outcomes of the items that wrote no effect, in one executemany."""
        refused = claims.finish_many(
            conn, [(key, token, result) for _, key, token, result in quiet]
        )
        for item, key, token, result in quiet:
            if key in refused:
                why = f"outcome for {key!r} refused: fencing token {token} is no longer current"
                batch.end(item, EventKind.STALE_WRITE, f"{FENCING_REFUSED}: {why}")
            else:
                item.result = result

    def _failed(
        self, conn: Connection, batch: _Batch, item: Item, ctx: RunContext, exc: Exception
    ) -> None:
        run = batch.run_id(item)
        if isinstance(exc, STALE):
            cause = LEASE_LOST if isinstance(exc, LeaseLostError) else FENCING_REFUSED
            batch.end(item, EventKind.STALE_WRITE, f"{cause}: {exc}")
            return
        decision = self.guard.policy.decide(
            batch.spec, Facts(Situation.FAILED, attempts=ctx.attempts, error=exc)
        )
        dead = isinstance(decision, GiveUp)
        savepoint = conn.begin_nested()
        try:
            self.guard.ledger.fail_in(conn, run, ctx.fencing_token, exc, dead=dead)
        except StaleWriteError as refused:
            savepoint.rollback()
            batch.end(item, EventKind.STALE_WRITE, f"{FENCING_REFUSED}: {refused}")
            return
        savepoint.commit()
        if isinstance(decision, Retry):
            log.warning("%s attempt %d failed (%s: %s); retry in %.1fs", run.key, ctx.attempts,
                        type(exc).__name__, exc, decision.countdown)  # fmt: skip
            item.retry = RetryRequested(decision.countdown, decision.reason, exc)
        else:
            item.result = exc  # a dead letter: the task raises it for the delivered message

    def _event(
        self, conn: Connection, batch: _Batch, item: Item, kind: EventKind, detail: str
    ) -> None:
        self.guard.ledger.event_in(conn, batch.run_id(item), kind, detail)

    # -- after the commit ----------------------------------------------------------

    def _after(self, spec: AgentSpec, items: list[Item]) -> None:
        """Publish the taken items' retries, then acknowledge them all."""
        app = self.fleet.app
        for item in items[1:]:
            if item.retry is not None:
                _publish_retry(app, spec, item.delivery, item.retry.countdown)
            elif isinstance(item.result, Exception):
                log.error("%s[%s] is dead: %s", spec.name, item.delivery.task_id, item.result)
        tags = [item.taken for item in items if item.taken]
        if tags:
            _ack(app, tags)
        if any(item.emitted for item in items):
            events.wake(self.guard.locks().client)

    def _release(self, leases: list[Lease]) -> None:
        try:
            self.guard.locks().release_many(leases)
        except redis.RedisError as exc:
            log.warning("could not release %d leases (%s); they expire by themselves",
                        len(leases), exc)  # fmt: skip

    def _reading(self) -> Any:
        from fleetworks.db import reading

        return reading(self.guard.ledger.database_url)

    @staticmethod
    def _key(item: Item) -> str:
        return item.parsed.identity.key if item.parsed else ""


def _publish_retry(app: Celery, spec: AgentSpec, delivery: Delivery, countdown: float) -> None:
    """What Celery's ``retry`` sends for a delivered message, for a taken one."""
    app.send_task(
        spec.name, args=list(delivery.args), kwargs=delivery.kwargs, task_id=delivery.task_id,
        retries=delivery.retries + 1, countdown=countdown, queue=delivery.queue,
    )  # fmt: skip


def _ack(app: Celery, tags: list[str]) -> None:
    """Acknowledge taken messages (kombu's ``basic_ack``: out of ``unacked``)."""
    with app.pool.acquire(block=True) as conn:
        channel = conn.default_channel
        pipe = channel.client.pipeline(transaction=True)
        pipe.hdel(kombu_redis.unacked_key(channel), *tags)
        pipe.zrem(channel.unacked_index_key, *tags)
        pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class BatchQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer step: for every agent queue the worker consumes, it consumes
    each batch agent's queue beside it too (see :func:`batch_queue`)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        from fleetworks.agent import Fleet
        from fleetworks.reaper import CONTROL_SUFFIX

        try:
            fleet = Fleet.of(consumer.app)
        except LookupError:
            return
        fleet.import_task_modules()
        consumed = set(consumer.app.amqp.queues.consume_from)
        bases = [q for q in consumed if BATCH_INFIX not in q and not q.endswith(CONTROL_SUFFIX)]
        for base in sorted(bases):
            for name in sorted(fleet.batch_queues):
                queue = batch_queue(base, name)
                if queue not in consumed:
                    consumer.add_task_queue(queue, routing_key=queue)
                    consumed.add(queue)


def router(fleet_of: Callable[[], Fleet | None]) -> Callable[..., dict[str, Any] | None]:
    """A Celery router sending a batch agent's messages to its queue."""

    def route(name: str, *_: Any, **__: Any) -> dict[str, Any] | None:
        fleet = fleet_of()
        queue = fleet.batch_queues.get(name) if fleet is not None else None
        return {"queue": queue} if queue else None

    return route


__all__ = ["BatchGuard", "BatchQueues", "batch_queue", "router"]
