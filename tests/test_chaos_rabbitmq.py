"""The fleet on RabbitMQ: its queues of either type, and ``fleetworks chaos
--broker amqp://...`` on a vhost of the run's own, deleted afterwards.

RabbitMQ at ``FLEET_TEST_RABBITMQ_URL`` (default the local broker as
``guest``), its vhosts made with ``rabbitmqctl``; without either the tests
skip, saying which, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from kombu import Connection

from fleetworks import create_app, message
from fleetworks.constants import DONE_KEY
from fleetworks.proving import rabbitmq
from fleetworks.settings import Settings, redact
from tests.conftest import LOCKS_URL, require, start_worker, truncate, wait_for
from tests.test_chaos import run_chaos
from tests.test_cli import embedded_env, fleetworks
from tests.test_faults import status_is

RABBITMQ_URL = os.environ.get("FLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
FAULTS = ("child-kill", "worker-kill", "client-kill")


def _unavailable() -> str | None:
    """Why RabbitMQ cannot be used here, or None."""
    try:
        with Connection(RABBITMQ_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return (
            f"RabbitMQ not reachable at {redact(RABBITMQ_URL)} ({type(exc).__name__}: {exc}); "
            "set FLEET_TEST_RABBITMQ_URL"
        )
    try:
        rabbitmq.vhosts()
    except rabbitmq.RabbitMQError as exc:
        return str(exc)
    return None


@pytest.fixture
def rabbitmq_url() -> str:
    why = _unavailable()
    require(why is None, why or "")
    return RABBITMQ_URL


def queue_types(vhost: str) -> dict[str, str]:
    out = rabbitmq.rabbitmqctl("list_queues", "--vhost", vhost, "name", "type")
    return dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_the_fleet_declares_its_queues_of_the_type_asked_and_counts_down_on_them(
    rabbitmq_url: str, sqlite_url: str, tmp_path: Path, queue_type: str
) -> None:
    """A worker on RabbitMQ declares the agent queue and its control queue of
    FLEET_QUEUE_TYPE; a task and a countdown task are each delivered once and
    run (the countdown, on quorum queues, through native delayed delivery,
    which carries it in the routing key: the claim still names the queue)."""
    truncate(sqlite_url)
    # and the keys' done marks, which the other queue type's run left
    redis.Redis.from_url(LOCKS_URL).delete(*(f"{DONE_KEY}probe:{k}" for k in ("now", "later")))
    vhost = rabbitmq.RunVhost.create(rabbitmq_url)
    queue = f"rq-{queue_type}"
    try:
        settings = Settings(broker_url=vhost.url, redis_url=LOCKS_URL, queue=queue,
                            queue_type=queue_type, database_url=sqlite_url)  # fmt: skip
        app = create_app(settings, modules=["fleetworks.proving.probe"])
        worker = start_worker(
            sqlite_url, tmp_path, f"rq-{queue_type}-{os.getpid()}", queue=queue, ready_app=app,
            control=True, FLEET_BROKER_URL=vhost.url, FLEET_QUEUE_TYPE=queue_type,
        )  # fmt: skip
        try:
            types = queue_types(vhost.name)
            assert types[queue] == types[f"{queue}.control"] == queue_type, types
            # Quorum queues: Celery's delayed delivery queues are there too.
            assert ("celery_delayed_0" in types) == (queue_type == "quorum"), types
            sent = time.monotonic()
            ids = {
                key: app.send_task("probe.run", kwargs=message.pack({"id": key}, None),
                                   queue=queue, countdown=countdown).id
                for key, countdown in (("now", None), ("later", 2))
            }  # fmt: skip
            done = wait_for(lambda: status_is(sqlite_url, "probe:later", "succeeded"), 30)
            assert time.monotonic() - sent >= 2
            assert done.queue == queue
            assert status_is(sqlite_url, "probe:now", "succeeded")
            time.sleep(1)  # a second delivery, if any, would be in by now
            log = worker.child.log_tail(200_000)
            # Each message was delivered once: a queue bound under another's
            # routing key would have had a copy of it.
            for task_id in ids.values():
                assert log.count(f"probe.run[{task_id}] received") == 1, log[-3000:]
            assert ("Global QoS is disabled" in log) == (queue_type == "quorum")
            assert "direct exchange" not in log, "native delayed delivery bound every queue"
        finally:
            worker.child.stop(15)
    finally:
        vhost.delete()
    assert vhost.name not in rabbitmq.vhosts()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_short_chaos_run_on_rabbitmq_loses_and_doubles_nothing(
    rabbitmq_url: str, tmp_path: Path, queue_type: str
) -> None:
    """150 tasks on RabbitMQ through a child kill, a worker kill and every
    client connection of the vhost closed: all settle, each effect once, and
    the run's vhost is gone afterwards."""
    report = run_chaos(
        tmp_path, "--broker", rabbitmq_url, "--queue-type", queue_type,
        "--faults", ",".join(FAULTS), "--tasks", "150", "--seed", "3",
    )  # fmt: skip
    assert report["ok"] is True, report
    assert report["tasks_lost"] == 0 and report["tasks_settled"] == 150
    assert report["effects_duplicated"] == 0 and report["dead"] == 0
    assert report["effects"] == report["succeeded"] == 150
    assert report["faults"] == dict.fromkeys(FAULTS, 1)
    assert report["worker_restarts"] >= 1
    for fault in report["fault_log"]:
        assert fault["in_flight"] > 0, fault
        assert fault["recovery_s"] is not None, fault
    for name, handled in report["subscribers"].items():
        assert handled == {"handled": 150, "lost": 0, "duplicated": 0}, name
    (closed,) = [x["detail"] for x in report["fault_log"] if x["kind"] == "client-kill"]
    assert int(re.findall(r"all (\d+) client", closed)[0]) >= 2, closed  # both workers at least
    assert (report["broker"], report["queue_type"]) == ("rabbitmq", queue_type)
    assert report["vhost"].startswith(rabbitmq.VHOST_PREFIX)
    assert report["vhost"] not in rabbitmq.vhosts()
    log = (tmp_path / ".fleet" / "logs" / "chaos0.log").read_text()
    assert f"/{report['vhost']}" in log, "the workers ran on the run's vhost"
    assert ("Global QoS is disabled" in log) == (queue_type == "quorum")


def processes_of(home: str) -> list[psutil.Process]:
    """Live processes started with ``FLEET_HOME=home``."""
    homes = {home, str(Path(home).resolve())}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("FLEET_HOME") in homes:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_deletes_its_vhost(rabbitmq_url: str, tmp_path: Path, signum: int) -> None:
    """Ctrl-C (or SIGTERM) in the middle of a run, while it talks to the
    broker: the run stops at its next step, stops its rig and deletes its vhost."""
    env = embedded_env(tmp_path / ".fleet")
    argv = [sys.executable, "-m", "fleetworks", "chaos", "--broker", rabbitmq_url,
            "--tasks", "3000", "--json"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = tmp_path / ".fleet" / "logs" / "chaos0.log"
    try:
        named: Any = wait_for(
            lambda: log.exists() and re.search(r"fleet-chaos-[0-9a-f]{8}", log.read_text()),
            timeout_s=60,
            what="the workers on the run's vhost",
        )
        vhost = named.group(0)
        assert vhost in rabbitmq.vhosts()
        assert len(processes_of(env["FLEET_HOME"])) >= 5  # the run, its workers, beat, relay
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"stopped by signal {signum}" in err
    assert vhost not in rabbitmq.vhosts()
    # Nothing of the rig outlives it (its workers, beat, relay, Redis).
    assert not processes_of(env["FLEET_HOME"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--broker", "redis://127.0.0.1:1/0"), "is not a RabbitMQ URL"),
        (("--broker", "amqp://guest:guest@127.0.0.1:1/shop"), "names the vhost 'shop'"),
        (("--queue-type", "quorum"), "queue types are RabbitMQ's: give --broker"),
        (
            ("--broker", "amqp://guest:guest@127.0.0.1:1/", "--faults", "child-kill,db-pause"),
            "db-pause not applicable on RabbitMQ",
        ),
    ],
)
def test_a_run_rabbitmq_cannot_make_is_a_clear_error(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    """Refused before anything is created (port 1: nothing listens there)."""
    env = embedded_env(tmp_path / ".fleet")
    done = fleetworks("chaos", *args, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert says in " ".join(done.stderr.split()), done.stderr
