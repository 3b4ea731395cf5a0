"""Leaders per group on both backends: one leader at a time under contention,
failover after SIGKILL, a stopped leader that steps down on waking and whose
late action is refused, terms that only grow (across leaders, restarts and a
Redis that lost its data), and the TermFence on both databases.

Redis: the test server's lock store. etcd: Debian's ``etcd`` binary, started
for the session on free loopback ports with a temporary data directory.
Candidates are real processes (:mod:`tests.leader_candidate`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis

from fleetworks.db import transaction
from fleetworks.embedded import EmbeddedRedis, free_port
from fleetworks.leadership import (
    Backend,
    Election,
    Term,
    TermFence,
    TermFloorError,
    accept_in,
    backend_from_url,
)
from tests.conftest import LOCKS_URL, EtcdServer, require, wait_for

REPO = Path(__file__).resolve().parent.parent
TTL_S = 2.0
#: How often a candidate renews or campaigns (tests/leader_candidate.py).
LOOP_S = TTL_S / 4
#: Scheduling slack of a shared two-core machine, on top of lease + one renewal.
SLACK_S = 1.0


@pytest.fixture(params=["redis", "etcd"])
def leader_url(request: pytest.FixtureRequest, redis_client: redis.Redis) -> str:
    """The backend's URL: the test Redis's lock store, or etcd under a prefix of its own."""
    if request.param == "redis":
        return LOCKS_URL
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return f"{server.url}/test-{uuid.uuid4().hex[:8]}"


def backend(url: str) -> Backend:
    return backend_from_url(url, lambda: redis.Redis.from_url(LOCKS_URL))


def new_group() -> str:
    return f"region-{uuid.uuid4().hex[:8]}"


class Candidates:
    """Candidate processes for one group, each with its report file."""

    def __init__(self, url: str, group: str, database_url: str, folder: Path) -> None:
        self.url, self.group, self.database_url, self.folder = url, group, database_url, folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, identity: str, *extra: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        argv = [
            sys.executable, "-m", "tests.leader_candidate", self.url, self.group, identity,
            str(TTL_S), self.database_url, str(self.folder / f"{identity}.jsonl"), *extra,
        ]  # fmt: skip
        log = (self.folder / f"{identity}.log").open("ab")
        self.procs[identity] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)

    def signal(self, identity: str, sig: int) -> None:
        self.procs[identity].send_signal(sig)

    def events(self, identity: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for name in [identity] if identity else list(self.procs):
            path = self.folder / f"{name}.jsonl"
            if path.exists():
                found += [json.loads(line) for line in path.read_text().splitlines() if line]
        return sorted(found, key=lambda e: e["mono"])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(10)


@pytest.fixture
def candidates(leader_url: str, sqlite_url: str, tmp_path: Path) -> Iterator[Candidates]:
    group = Candidates(leader_url, new_group(), sqlite_url, tmp_path)
    yield group
    group.stop()


def _leader(b: Backend, group: str) -> tuple[str, int] | None:
    info = b.observe(group)
    return (info.leader, info.term) if info else None


def test_one_leader_per_group_under_contention_from_5_processes(
    candidates: Candidates,
) -> None:
    b = backend(candidates.url)
    # Given 5 processes campaigning for one group, each leader resigning after
    # about a second so the lead changes hands again and again
    for i in range(5):
        candidates.start(f"c{i}", "--turnover")
    samples: list[tuple[float, tuple[str, int] | None]] = []
    wait_for(lambda: _leader(b, candidates.group), 60, "a first leader")
    end = time.monotonic() + 8
    while time.monotonic() < end:
        samples.append((time.monotonic(), _leader(b, candidates.group)))
        time.sleep(0.05)
    candidates.stop()
    events = candidates.events()
    elected = {e["term"]: e for e in events if e["event"] == "elected"}
    acts = [e for e in events if e["event"] == "act"]
    # Then the lead changed hands several times, one identity per term
    assert len(elected) >= 4, f"only {len(elected)} terms in 8 s"
    assert len({e["id"] for e in elected.values()}) >= 2
    for act in acts:
        assert elected[act["term"]]["id"] == act["id"], act
    # and the backend never showed a term going back, nor a leader other than
    # the one elected in that term
    seen = [s for _, s in samples if s is not None]
    assert [t for _, t in seen] == sorted(t for _, t in seen)
    for who, term in seen:
        assert term in elected and elected[term]["id"] == who, (who, term)
    # and at every moment at most one process believed it led: the last time
    # a leader checked still_leading() before acting is before its
    # successor's election
    terms = sorted(elected)
    last_check = {
        t: max((a["checked"] for a in acts if a["term"] == t), default=None) for t in terms
    }
    for earlier, later in pairwise(terms):
        if last_check[earlier] is not None:
            assert last_check[earlier] < elected[later]["mono"], (earlier, later)
    # and the fence accepted every action: no leader ever acted on a stale term
    assert acts and all(a["accepted"] for a in acts), [a for a in acts if not a["accepted"]]


def _acted(candidates: Candidates, who: str, term: int) -> bool:
    return any(
        e["event"] == "act" and e["term"] == term and e["accepted"] for e in candidates.events(who)
    )


def _other_leader(b: Backend, group: str, than: str) -> tuple[str, int] | None:
    now = _leader(b, group)
    return now if now and now[0] != than else None


def test_a_killed_leader_is_replaced_within_the_lease_and_one_renewal(
    candidates: Candidates, record_property: Any
) -> None:
    b = backend(candidates.url)
    for i in range(4):
        candidates.start(f"k{i}")
    took: list[float] = []
    for _ in range(3):
        # Given a leader (and candidates waiting)
        who, term = wait_for(lambda: _leader(b, candidates.group), 60, "a leader")
        wait_for(partial(_acted, candidates, who, term), 10, "its first action")
        # When it is killed with no chance to step down
        killed = time.monotonic()
        candidates.signal(who, signal.SIGKILL)
        # Then another process leads, in a higher term, within lease + one renewal
        successor = partial(_other_leader, b, candidates.group, who)
        _, new_term = wait_for(successor, TTL_S + LOOP_S + 10, "a new leader")
        took.append(time.monotonic() - killed)
        assert new_term > term
    record_property("failover_s", took)
    print(f"\nfailover after SIGKILL on {b.name}: {[round(t, 2) for t in took]} s")
    assert max(took) < TTL_S + LOOP_S + SLACK_S, took


def test_a_stopped_leader_steps_down_on_waking_and_its_late_action_is_refused(
    candidates: Candidates,
) -> None:
    b = backend(candidates.url)
    candidates.start("a")
    candidates.start("b")
    # Given a leader that has acted
    stalled, term = wait_for(lambda: _leader(b, candidates.group), 60, "a leader")
    other = "b" if stalled == "a" else "a"
    wait_for(lambda: any(e["event"] == "act" for e in candidates.events(stalled)), 10, "an action")
    # When it is stopped past its lease, the other leads and acts
    candidates.signal(stalled, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for(lambda: (_leader(b, candidates.group) or ("", 0))[0] == other, 30, "the other to lead")
    new_term = _leader(b, candidates.group)[1]  # type: ignore[index]
    wait_for(
        lambda: any(
            e["event"] == "act" and e["term"] == new_term and e["accepted"]
            for e in candidates.events(other)
        ),
        10,
        "the new leader to act",
    )
    assert time.monotonic() - stopped > TTL_S
    # and the stopped one is resumed
    candidates.signal(stalled, signal.SIGCONT)
    woke = wait_for(
        lambda: (
            [e for e in candidates.events(stalled) if e["event"] in ("woke", "late")][:2]
            if len([e for e in candidates.events(stalled) if e["event"] in ("woke", "late")]) >= 2
            else None
        ),
        15,
        "the stopped leader to wake",
    )
    # Then on waking it knew it no longer led, before acting
    assert woke[0]["event"] == "woke" and woke[0]["term"] == term
    assert woke[0]["still_leading"] is False
    deposed = [e for e in candidates.events(stalled) if e["event"] == "deposed"]
    assert any(e["term"] == term for e in deposed), "it said it stepped down"
    # and the action it had in flight, with its old term, was refused
    assert woke[1]["event"] == "late" and woke[1]["accepted"] is False
    late_acts = [
        e
        for e in candidates.events(stalled)
        if e["event"] == "act" and e["term"] == term and e["mono"] > stopped
    ]
    assert late_acts == []


def _terms(b: Backend, group: str, n: int) -> list[int]:
    terms = []
    for i in range(n):
        election = Election(b, group, f"p{i}", TTL_S)
        assert election.hold()
        terms.append(election.term)
        election.resign()
    return terms


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_terms_only_grow_across_leaders_and_a_restart_of_the_backend(
    kind: str, tmp_path: Path
) -> None:
    group = new_group()
    server: EtcdServer | EmbeddedRedis
    if kind == "etcd":
        require(shutil.which("etcd") is not None, "etcd not installed (Debian: etcd-server)")
        server = EtcdServer(tmp_path / "etcd").start()
        url = server.url
    else:
        # Redis with its AOF, as the embedded one runs
        server = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
        url = server.url
    try:
        b = backend(url)
        # Given three leaderships, one after the other
        before = _terms(b, group, 3)
        assert before == sorted(set(before))
        # When the backend restarts on the same data
        server.stop()
        server.start()
        b = backend(url)
        # Then the next terms are above every earlier one
        after = _terms(b, group, 2)
        assert min(after) > max(before) and after == sorted(set(after)), (before, after)
    finally:
        server.stop()


def test_a_redis_that_lost_its_data_is_seeded_by_the_resources_highest_term(
    redis_client: redis.Redis, sqlite_url: str
) -> None:
    b = backend(LOCKS_URL)
    fence = TermFence(sqlite_url)
    group = new_group()
    # Given leaderships whose actions the resource accepted, up to term 3
    for term in _terms(b, group, 3):
        assert fence.accept(group, term)
    assert fence.highest(group) == 3
    # When Redis loses its data
    redis_client.flushdb()
    # Then without a floor it would hand out term 1, which the resource refuses
    bare = Election(b, group, "unseeded", TTL_S)
    assert bare.hold() and bare.term == 1
    assert not fence.accept(group, bare.term)
    bare.resign()
    redis_client.flushdb()
    # and seeded with the resource's highest term, the next term is above it
    seeded = Election(b, group, "seeded", TTL_S, floor=fence.floor_for(group))
    assert seeded.hold() and seeded.term == 4
    assert fence.accept(group, seeded.term)
    seeded.resign()


def test_etcd_refuses_to_campaign_below_the_resources_floor(etcd_server: EtcdServer) -> None:
    b = backend(f"{etcd_server.url}/floor-{uuid.uuid4().hex[:6]}")
    group = new_group()
    with pytest.raises(TermFloorError):
        b.campaign(group, "x", TTL_S, floor=10**12)
    election = Election(b, group, "x", TTL_S, floor=lambda: 10**12)
    assert not election.hold() and election.term == 0
    assert b.observe(group) is None


def test_a_campaign_is_not_held_up_by_a_writer_stopped_mid_transaction(
    leader_url: str, sqlite_url: str
) -> None:
    """A deposed leader SIGSTOPped inside a write transaction keeps SQLite's write
    lock; reading the term floor must not wait for it, or no replica can take
    over the group until the stopped one wakes."""
    b = backend(leader_url)
    fence = TermFence(sqlite_url)
    group = new_group()
    first = Election(b, group, "first", TTL_S, floor=fence.floor_for(group))
    assert first.hold() and fence.accept(group, first.term)
    seen = first.term
    first.resign()
    # Given a writer holding the write lock (as a stopped one would)
    with transaction(sqlite_url) as held:
        accept_in(held, new_group(), 1)
        # When a replica campaigns with the resource's floor
        election = Election(b, group, "taker", TTL_S, floor=fence.floor_for(group))
        started = time.monotonic()
        # Then it is elected at once, above the floor
        assert election.hold()
        assert time.monotonic() - started < 1.0
        assert election.term > seen
    election.resign()


def test_a_floor_that_cannot_be_read_means_no_campaign_and_no_crash(
    leader_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    b = backend(leader_url)
    group = new_group()
    reads: list[int] = []

    def floor() -> int:
        reads.append(1)
        if len(reads) == 1:
            raise OSError("results database unreachable")
        return 0

    election = Election(b, group, "me", TTL_S, floor=floor)
    # Given a resource that cannot say its highest term: no campaign, no exception
    assert not election.hold() and election.term == 0
    assert b.observe(group) is None
    assert "cannot read the term floor" in caplog.text
    # and once it answers, the next round campaigns
    assert election.hold() and election.term > 0
    election.resign()


class SlowRenewals:
    """A backend whose renewals are answered ``delay`` seconds of ``clock`` late."""

    def __init__(self, inner: Backend, clock: list[float], delay: float) -> None:
        self.inner, self.clock, self.delay = inner, clock, delay
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def renew(self, term: Term) -> bool:
        self.clock[0] += self.delay
        return self.inner.renew(term)


def test_a_leader_steps_down_on_its_own_clock(
    leader_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [100.0]
    deposed: list[int] = []
    slow = SlowRenewals(backend(leader_url), clock, delay=0.5)
    election = Election(
        slow, new_group(), "me", TTL_S,
        on_deposed=lambda t: deposed.append(t.number), clock=lambda: clock[0],
    )  # fmt: skip
    # Given a leader
    assert election.hold() and election.still_leading()
    term = election.term
    # When a renewal sent at 101 is answered at 101.5
    clock[0] = 101.0
    assert election.hold()
    # Then its deadline counts from the sending: 101 + TTL
    assert election.deadline == 101.0 + TTL_S
    # and once that passes with no renewal (the backend itself still answers),
    # it no longer leads and says so, without asking the backend
    clock[0] = 101.0 + TTL_S
    assert not election.still_leading()
    assert election.term == 0 and deposed == [term]
    assert "stepped down" in caplog.text


# The fence, on SQLite and PostgreSQL.


def test_the_fence_refuses_a_stale_term_and_accepts_an_equal_one(database_url: str) -> None:
    fence = TermFence(database_url)
    group = new_group()
    assert fence.highest(group) == 0
    assert fence.accept(group, 5)
    assert fence.accept(group, 5), "the same leader's next action"
    assert not fence.accept(group, 4)
    assert fence.accept(group, 6)
    assert fence.highest(group) == 6
    assert fence.accept(new_group(), 1), "groups are independent"
    with pytest.raises(ValueError, match="positive"):
        fence.accept(group, 0)


def test_the_fence_inside_the_callers_transaction_commits_with_it(database_url: str) -> None:
    fence = TermFence(database_url)
    group = new_group()
    # A transaction that accepts term 7 and then fails leaves nothing behind
    with pytest.raises(RuntimeError), transaction(database_url) as conn:
        assert accept_in(conn, group, 7)
        raise RuntimeError("the action failed")
    assert fence.highest(group) == 0
    with transaction(database_url) as conn:
        assert accept_in(conn, group, 7)
    assert fence.highest(group) == 7


def test_concurrent_accepts_end_with_the_highest_term(database_url: str) -> None:
    fence = TermFence(database_url)
    group = new_group()
    terms = list(range(1, 61))
    random.Random(7).shuffle(terms)
    results: dict[int, bool] = {}
    start = threading.Barrier(6)

    def accept(share: list[int]) -> None:
        start.wait()
        for term in share:
            results[term] = fence.accept(group, term)

    threads = [threading.Thread(target=accept, args=(terms[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert fence.highest(group) == 60
    assert results[60] is True and len(results) == 60
    assert not fence.accept(group, 59)


def test_leaders_command_lists_groups_with_term_and_backend(
    leader_url: str, tmp_path: Path
) -> None:
    b = backend(leader_url)
    group = new_group()
    election = Election(b, group, "lister", 30)
    assert election.hold()
    term = election.term
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_LEADERSHIP")}
    env["FLEET_LEADERSHIP_URL"] = leader_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fleetworks", "-A", "config",
             "leaders", "--json", "--prefix", group],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        election.resign()
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout)["leaders"]
    assert row["group"] == group and row["leader"] == "lister"
    assert row["term"] == term and row["backend"] == b.name
    assert row["since"]
