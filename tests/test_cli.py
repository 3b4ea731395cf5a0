"""The ``fleetworks`` command as a user runs it, on the embedded default."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleetworks.embedded import free_port
from tests.conftest import wait_for

FLEET_URL_VARS = ("FLEET_BROKER_URL", "FLEET_REDIS_URL", "FLEET_DATABASE_URL")


REPO = Path(__file__).resolve().parent.parent


def embedded_env(home: Path) -> dict[str, str]:
    """The environment of a user who configured nothing: embedded Redis, SQLite.

    The commands run in a temporary folder; the reference deployment (``config``)
    is found through ``PYTHONPATH``, as it would be for any app outside the
    working directory.
    """
    env = {k: v for k, v in os.environ.items() if k not in FLEET_URL_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(
        FLEET_HOME=str(home),
        FLEET_EMBEDDED_REDIS_PORT=str(free_port()),
        FLEET_FLOWER_PORT=str(free_port()),
        FLEET_METRICS_PORT=str(free_port()),
        FLEET_INGEST_PORT=str(free_port()),
        FLEET_MENTIONS_POLL_INTERVAL_S="2",
    )
    return env


def fleetworks(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetworks", *args],
        check=False,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_on_embedded_default_reports_ok(tmp_path: Path) -> None:
    """`fleetworks demo --json` with nothing configured: real redis-server, SQLite, ok."""
    env = embedded_env(tmp_path / ".fleet")
    done = fleetworks(
        "demo", "--mentions", "300", "--products", "200", "--interval", "4",
        "--tickets", "150", "--files", "40", "--devices", "0", "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["tasks_lost"] == 0
    assert report["effects_duplicated"] == 0
    mentions = report["mentions"]
    assert mentions["effects"] == 300
    assert mentions["tasks_settled"] == mentions["tasks_enqueued"]
    assert mentions["duplicates_injected"] >= 0.2 * 300
    assert mentions["skipped_duplicate"] == mentions["duplicates_injected"]
    assert mentions["rejected"] == 6
    # Two pricing cycles over the whole catalogue, the leading beat killed
    pricing = report["pricing"]
    assert [c["products_priced"] for c in pricing["cycles"]] == [200, 200]
    assert all(c["tasks_lost"] == 0 and c["effects_duplicated"] == 0 for c in pricing["cycles"])
    assert all(c["duplicates_suppressed"] >= 1 for c in pricing["cycles"]), "re-sent ticks"
    assert pricing["beat_killed"] is True and pricing["beat_failover_s"] < 10
    assert pricing["price_chain_breaks"] == 0
    # Competitor price drops announced by the pricing agent, each alerted once
    assert sum(c["price_drops_emitted"] for c in pricing["cycles"]) > 0
    assert all(c["alerts_recorded"] == c["price_drops_emitted"] for c in pricing["cycles"])
    assert_support_section(report["support"], 150)
    # The IoT region leaders run on their own, on both backends: tests/test_controllers.py.
    assert report["leaders"] is None
    uploads = report["uploads"]
    assert uploads["ok"] is True and uploads["files_dropped"] == 40
    assert uploads["tasks_lost"] == 0 and uploads["effects_duplicated"] == 0
    assert uploads["distinct_contents"] < 40, "some files were copies"
    assert uploads["quarantined"] == uploads["verdicts"]["infected"] > 0
    # The embedded Redis kept its data (AOF) and the results database under the home.
    assert (tmp_path / ".fleet" / "fleet.db").exists()
    assert any((tmp_path / ".fleet" / "redis").glob("appendonly*"))
    # Nothing left running: the embedded Redis port is closed again.
    port = int(env["FLEET_EMBEDDED_REDIS_PORT"])
    listening = [c for c in psutil.net_connections() if c.status == psutil.CONN_LISTEN and c.laddr]
    assert not any(c.laddr.port == port for c in listening)


def assert_support_section(support: dict[str, Any], tickets: int) -> None:
    """Events, a trigger from outside and waits: each escalation handled once."""
    assert support["ok"] is True, support
    assert support["tickets"] == tickets and support["tasks_lost"] == 0
    assert support["triage_deliveries"] > tickets, "some tickets were delivered twice"
    assert support["duplicates_suppressed"] >= support["triage_deliveries"] - tickets
    assert support["escalated"] > 0
    assert support["events_emitted"] == support["escalation_deliveries"] == support["escalated"]
    # Every escalation waited; each wait was resolved once, by an
    # acknowledgement or by its deadline; a first timeout re-escalated once.
    waits = support["waits_resolved_by_event"] + support["waits_timed_out"]
    assert waits == support["escalated"] + support["re_escalations"]
    # (an acknowledgement posted just after its wait timed out resolves nothing)
    assert 0 < support["waits_resolved_by_event"] <= support["acks_posted"]
    assert support["waits_timed_out"] == support["re_escalations"] + support["unacknowledged"]
    assert support["effects_duplicated"] == 0
    assert 0 < support["relay_lag_p50_ms"] <= support["relay_lag_p99_ms"]


@pytest.mark.postgres
def test_the_support_scenario_on_postgresql(tmp_path: Path) -> None:
    """The events scenario on PostgreSQL (SKIP LOCKED relay, the same waits)."""
    from tests.test_chaos import chaos_postgres_url

    env = embedded_env(tmp_path / ".fleet")
    env["FLEET_DATABASE_URL"] = chaos_postgres_url()
    done = fleetworks(
        "demo", "--mentions", "0", "--products", "0", "--tickets", "150", "--files", "0",
        "--devices", "0", "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_support_section(json.loads(done.stdout)["support"], 150)


def test_up_serves_flower_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """`fleetworks up`: broker, worker, beat (its poll runs) and Flower; SIGINT stops all."""
    env = embedded_env(tmp_path / ".fleet")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetworks", "up"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{env['FLEET_FLOWER_PORT']}/metrics"

        def flower_sees_worker() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    metrics = resp.read().decode()
            except OSError:
                return False
            # The worker's events reached Flower: it is online and ran beat's poll.
            return 'flower_worker_online{worker="worker@' in metrics and (
                'task="mentions.poll",type="task-succeeded",worker="worker@' in metrics
            )

        wait_for(flower_sees_worker, timeout_s=90, what="Flower to see the worker run a poll")
        # And up's own endpoint reports the queue and the autoscaled pool
        ours = f"http://127.0.0.1:{env['FLEET_METRICS_PORT']}/metrics"

        def pool_reported() -> str | None:
            with urllib.request.urlopen(ours, timeout=5) as resp:
                text = resp.read().decode()
            return text if 'fleetworks_workers_actual{queue="fleet"}' in text else None

        text = wait_for(pool_reported, timeout_s=30, what="the autoscaler's first report")
        assert 'fleetworks_queue_backlog{queue="fleet"}' in text
        assert 'fleetworks_workers_desired{queue="fleet"}' in text
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 5  # up, redis-server, worker (+ pool), beat, flower
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping" in out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in tree[1:]):
        time.sleep(0.1)
    left = [p for p in tree[1:] if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert left == [], f"still running after Ctrl-C: {left}"


def test_bench_throughput_reports_ratio_against_plain_celery(tmp_path: Path) -> None:
    """A short `bench throughput --json` run has both sides and where the time goes."""
    env = embedded_env(tmp_path / ".fleet")
    args = ("bench", "throughput", "--tasks", "100", "--rounds", "1", "--json")
    done = fleetworks(*args, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert "bench:" not in done.stderr, "no progress bars with --json"
    assert result["plain_tps"] > 0 and result["guarded_tps"] > 0
    assert result["ratio"] == pytest.approx(result["guarded_tps"] / result["plain_tps"], rel=0.01)
    costs = result["where_time_goes"]
    # Acquire and release, 2 scripts: 19 commands (see the cost bench), still
    # 2 round trips.
    assert costs["redis_commands_per_task"] == pytest.approx(19, abs=0.1)
    # A first delivery: BEGIN + the outcome upsert, with the effects.
    assert costs["sql_statements_per_task"] == pytest.approx(2, abs=0.1)
    # The floor is the guard's own round trips and write with nothing around
    # them: less than the guard, and it leaves no row behind.
    floor = costs["floor"]
    assert floor["redis_round_trip_ms"] > 0 and floor["database_write_ms"] > 0
    assert floor["guard_floor_ms"] < costs["guard_ms_per_task_in_process"], costs
    with sqlite3.connect(tmp_path / ".fleet" / "fleet.db") as db:
        left = db.execute("SELECT count(*) FROM outcomes WHERE agent = 'bench.floor'").fetchone()
    assert left == (0,)
    # CPU per task of each side: the worker's main process, its pool, the local
    # Redis. The kernel counts in clock ticks, one tick over 100 tasks is the
    # resolution, and a part under it (a plain task's pool) can read 0.
    cpu = result["cpu_ms_per_task"]
    assert cpu["resolution_ms"] == pytest.approx(1000 / os.sysconf("SC_CLK_TCK") / 100, abs=0.001)
    for side in ("plain", "guarded"):
        parts = [cpu[side][part] for part in ("worker_main", "pool", "redis")]
        assert all(part >= 0 for part in parts), cpu
        assert cpu[side]["total"] == pytest.approx(sum(parts), abs=0.002)
        # The main process takes, dispatches and acknowledges every message.
        assert cpu[side]["worker_main"] > cpu["resolution_ms"], cpu
    # The guard's scripts and its write run in the pool.
    assert cpu["guarded"]["pool"] > cpu["resolution_ms"], cpu
    assert cpu["ratio_plain_to_guarded"] == pytest.approx(
        cpu["plain"]["total"] / cpu["guarded"]["total"], rel=0.01
    )


def test_bench_fanout_measures_enqueue_many_against_send_task(tmp_path: Path) -> None:
    """`bench fanout --json`: the three ways in the same run, every message in
    its queue (the bench checks), and enqueue_many not slower than send_task
    one by one (it is many times faster; the figure is in the README)."""
    env = embedded_env(tmp_path / ".fleet")
    done = fleetworks(
        "bench", "fanout", "--tasks", "1000", "--rounds", "1", "--json", env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    rates = {w: result[f"{w}_per_s"] for w in ("send_task", "send_task_batched", "enqueue_many")}
    assert all(rate > 0 for rate in rates.values()), rates
    assert result["ratio"] == pytest.approx(rates["enqueue_many"] / rates["send_task"], rel=0.01)
    assert result["ratio"] > 1, rates


def test_bench_batch_reports_keys_per_second_against_plain_celery(tmp_path: Path) -> None:
    """`bench batch --json`: guarded keys through the batch agent against plain
    Celery messages on the same worker; even a short run is faster per key."""
    env = embedded_env(tmp_path / ".fleet")
    args = ("bench", "batch", "--tasks", "400", "--rounds", "1", "--json")
    done = fleetworks(*args, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["batch_size"] == 100
    assert result["ratio"] == pytest.approx(
        result["batched_keys_per_s"] / result["plain_tps"], rel=0.01
    )
    # (a short run is mostly fixed costs: the figure is the benchmark's, at
    # thousands of tasks; here only that batching is not slower per key)
    assert result["ratio"] > 1.0, result


def test_bench_cost_counts_what_a_guarded_task_costs(tmp_path: Path) -> None:
    """`bench cost --json`: counted per task, so exact on any machine."""
    env = embedded_env(tmp_path / ".fleet")
    done = fleetworks("bench", "cost", "--tasks", "60", "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    guard = result["guard"]
    # Two scripts: the lease (the done mark looked at; the lock, the fencing
    # token, the outbox record dropped, the delivery counted, the in-flight
    # record, its owner and its time written) and the release (the lock, the
    # record, its owner, time and count dropped; the done mark set). One
    # transaction: a BEGIN and the outcome upsert, with the effects.
    assert (guard["redis_round_trips"], guard["redis_commands"]) == (2.0, 19.0), guard
    assert (guard["sql_transactions"], guard["sql_statements"]) == (1.0, 2.0), guard
    assert guard["commands"]["evalsha"] == 2.0
    assert (guard["commands"]["exists"], guard["commands"]["hincrby"]) == (1.0, 1.0)
    # One by one: the outbox record, the message, its task-sent event; pipelined,
    # the records of a batch are one command and the batch one round trip.
    assert result["enqueue"]["redis_round_trips"] == 3.0, result["enqueue"]
    assert result["enqueue"]["commands"]["lpush"] == 1.0
    assert result["enqueue_many"]["redis_round_trips"] < 0.1, result["enqueue_many"]
    # Through a real worker the guard adds its commands to what plain Celery costs.
    plain, guarded = result["worker"]["plain_celery"], result["worker"]["guarded"]
    assert plain["commands"]["brpop"] == pytest.approx(1.0, abs=0.05)
    added = guarded["redis_commands"] - plain["redis_commands"]
    assert added == pytest.approx(guard["redis_commands"], abs=1.0), (plain, guarded)
    # Each guarded task leaves its outcome row; a plain one leaves nothing.
    assert guarded["database_bytes"] > 100 and plain["database_bytes"] < 50, (plain, guarded)
    assert result["worker"]["rss_mib"]["total"] > result["worker"]["rss_mib"]["main"] > 0
    # A batch agent: per batch of 100 keys, two transactions (the claims; the
    # outcomes) and a handful of round trips (take, lease, release, acknowledge).
    batch = result["batch_agent"]
    assert batch["sql_transactions"] == pytest.approx(0.02, abs=0.001), batch
    assert batch["redis_round_trips"] <= 0.06, batch
    assert "guard (in process)" in fleetworks("bench", "cost", "--tasks", "5", env=env,
                                              cwd=tmp_path).stdout  # fmt: skip


def test_bench_events_handles_every_event_twice_and_reports_ratio_and_lag(
    tmp_path: Path,
) -> None:
    """A short `bench events --json`: both sides measured, every event reached
    both subscribers once (the run waits for it), lag percentiles ordered."""
    env = embedded_env(tmp_path / ".fleet")
    done = fleetworks("bench", "events", "--events", "60", "--rounds", "1", "--json",
                      env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["events_per_s"] > 0 and result["plain_per_s"] > 0
    ratio = result["events_per_s"] / result["plain_per_s"]
    assert result["ratio"] == pytest.approx(ratio, rel=0.01)
    assert 0 < result["lag_p50_ms"] <= result["lag_p99_ms"]


def test_bench_autoscale_grows_the_pool_and_loses_nothing(tmp_path: Path) -> None:
    """A short step load: the pool leaves its minimum, reaches its maximum and
    comes back; no task interrupted, lost or doubled (times are the bench's to report)."""
    env = embedded_env(tmp_path / ".fleet") | {"FLEET_AUTOSCALE_MAX_WORKERS": "4"}
    args = ("bench", "autoscale", "--tasks", "48", "--work-ms", "150", "--scale-down-after", "1")
    done = fleetworks(*args, "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert r["idle_workers"] == 1 and r["peak_workers"] == 4
    assert r["reaction_s"] is not None and r["full_capacity_s"] is not None
    assert r["scale_down_s"] is not None
    assert (r["interrupted"], r["lost"], r["effects_duplicated"]) == (0, 0, 0)
    assert r["completion_s"] and r["fixed_max_completion_s"] and r["fixed_min_completion_s"]


def test_enqueue_refuses_bad_json_and_unknown_agent(tmp_path: Path) -> None:
    """Bad input to `enqueue` is a clear error naming the problem, exit code 2."""
    env = dict(os.environ, FLEET_HOME=str(tmp_path / ".fleet"), PYTHONPATH=str(REPO))
    bad_json = fleetworks(
        "enqueue", "mentions.respond", "--payload", "{nope", env=env, cwd=tmp_path
    )
    assert bad_json.returncode == 2
    assert "not JSON" in bad_json.stderr
    unknown = fleetworks("enqueue", "no.such", "--payload", "{}", env=env, cwd=tmp_path)
    assert unknown.returncode == 2
    assert "unknown agent 'no.such'" in unknown.stderr


def test_enqueue_then_outcomes_json(tmp_path: Path, sqlite_url: str) -> None:
    """`enqueue` sends a task a worker runs; `outcomes --json` shows its row."""
    from tests.conftest import start_worker, truncate

    truncate(sqlite_url)
    worker = start_worker(sqlite_url, tmp_path, f"cli{os.getpid()}")
    env = dict(
        os.environ, FLEET_DATABASE_URL=sqlite_url, FLEET_QUEUE=worker.queue, PYTHONPATH=str(REPO)
    )
    try:
        sent = fleetworks(
            "enqueue", "probe.run", "--payload", '{"id": "cli-1"}', "--json", env=env, cwd=tmp_path
        )
        assert sent.returncode == 0, sent.stderr
        task_id = json.loads(sent.stdout)["task_id"]

        def listed() -> dict[str, Any] | None:
            out = fleetworks("outcomes", "--agent", "probe.run", "--json", env=env, cwd=tmp_path)
            rows = json.loads(out.stdout)["outcomes"]
            return next((r for r in rows if r["task_id"] == task_id), None)

        row = wait_for(listed, what="the outcome row in `fleetworks outcomes`")
        assert row["status"] == "succeeded"
        assert row["idempotency_key"] == "probe:cli-1"
    finally:
        worker.child.stop(15)
        truncate(sqlite_url)


def test_flower_refuses_public_bind_without_auth(tmp_path: Path) -> None:
    """Flower beyond loopback without basic auth is a settings error, not a silent risk."""
    env = dict(os.environ, FLEET_FLOWER_ADDRESS="0.0.0.0")
    done = fleetworks("outcomes", env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "FLEET_FLOWER_BASIC_AUTH" in done.stderr


def test_dead_lists_dead_letters_and_replay_runs_one_again(tmp_path: Path, sqlite_url: str) -> None:
    """`fleetworks dead --json` shows a dead key with its last error; `replay ID`
    gives it a fresh delivery budget, records the replay and publishes it again."""
    import redis
    from sqlalchemy import select

    from fleetworks.db import transaction
    from fleetworks.ledger import Ledger, RunId
    from fleetworks.models import GUARD_EVENTS, OUTCOMES
    from tests.conftest import BROKER_URL, truncate

    truncate(sqlite_url)
    ledger = Ledger(sqlite_url)
    run = RunId("probe.run", "probe:gone", "t-gone", "w")
    ledger.claim(run, entity="probe:gone", token=3, payload={"id": "gone"}, queue="replay-q")
    ledger.declare_dead(run, 3, "out of retries (3): ProbeFailure: boom")
    env = dict(os.environ, FLEET_DATABASE_URL=sqlite_url, PYTHONPATH=str(REPO))
    listed = fleetworks("dead", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["dead"]
    assert row["idempotency_key"] == "probe:gone" and "ProbeFailure: boom" in row["error"]
    broker = redis.Redis.from_url(BROKER_URL)
    broker.delete("replay-q")
    replayed = fleetworks("replay", str(row["id"]), "--json", env=env, cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["key"] == "probe:gone"
    with transaction(sqlite_url) as conn:
        status, attempts = conn.execute(
            select(OUTCOMES.c.status, OUTCOMES.c.attempts).where(OUTCOMES.c.id == row["id"])
        ).one()
        kinds = conn.execute(select(GUARD_EVENTS.c.kind)).scalars().all()
    assert (status, attempts) == ("failed", 0) and kinds == ["replayed"]
    (message,) = broker.lrange("replay-q", 0, -1)
    assert json.loads(message)["headers"]["id"] == "t-gone"
    broker.delete("replay-q")
    again = fleetworks("replay", str(row["id"]), env=env, cwd=tmp_path)
    assert again.returncode == 2 and "not dead" in again.stderr
