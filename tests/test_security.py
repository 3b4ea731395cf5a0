"""Security defaults: Redis password and TLS through settings, no secret in output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select

from fleetworks.app import create_app
from fleetworks.db import transaction
from fleetworks.embedded import free_port, ping
from fleetworks.enqueue import enqueue
from fleetworks.models import OUTCOMES
from fleetworks.settings import Settings, redact
from tests.conftest import (
    POSTGRES_URL,
    _require_postgres,
    require,
    start_worker,
    truncate,
    wait_for,
)
from tests.test_cli import REPO, fleetworks

SECRET = "s3cr3t-Pw-91"


def redis_server(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--save",
            "",
            "--dir",
            str(tmp_path),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def succeeded(url: str, key: str) -> bool:
    with transaction(url) as conn:
        status = conn.execute(
            select(OUTCOMES.c.status).where(OUTCOMES.c.idempotency_key == key)
        ).scalar()
    return status == "succeeded"


def run_probe_through(broker: str, sqlite_url: str, tmp_path: Path, name: str, **env: str) -> str:
    """Start a worker on ``broker``, run one probe through it; returns the worker's log."""
    truncate(sqlite_url)
    settings = Settings(broker_url=broker, **{k[6:].lower(): v for k, v in env.items()})
    app = create_app(settings, {}, modules=["fleetworks.proving.probe"])
    worker = start_worker(
        sqlite_url, tmp_path, name, FLEET_BROKER_URL=broker, FLEET_REDIS_URL=broker,
        ready_app=app, **env,
    )  # fmt: skip
    try:
        enqueue(app, "probe.run", {"id": name}, queue=worker.queue)
        wait_for(lambda: succeeded(sqlite_url, f"probe:{name}"), what=f"the probe via {name}")
        return worker.child.log_tail(200_000)
    finally:
        worker.child.stop(15)


def test_password_redis_works_and_the_password_never_shows(tmp_path: Path, sqlite_url: str) -> None:
    """A Redis that requires a password, given in the URL: tasks run; logs mask it."""
    port = free_port()
    server = redis_server(tmp_path, "--port", str(port), "--requirepass", SECRET)
    next(server)
    broker = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    wait_for(lambda: ping(broker), what="the password-protected Redis")
    assert not ping(f"redis://127.0.0.1:{port}/0"), "the server must refuse anonymous clients"
    log = run_probe_through(broker, sqlite_url, tmp_path, f"pw{os.getpid()}")
    # Celery masks it as ``**``; the log formatter masks any URL password as ``***``
    assert re.search(r"Connected to redis://:\*{2,3}@127\.0\.0\.1", log), log[-2000:]
    assert SECRET not in log
    server.close()


def make_tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, made with the openssl command."""
    ca_key, ca, key, csr, cert = (
        tmp_path / n for n in ("ca.key", "ca.crt", "s.key", "s.csr", "s.crt")
    )
    ext = tmp_path / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=fleetworks test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return ca, cert, key


def test_tls_redis_verified_against_the_configured_ca(tmp_path: Path, sqlite_url: str) -> None:
    """rediss:// with FLEET_REDIS_TLS_CA_FILE: broker and locks both go over TLS."""
    require(shutil.which("openssl") is not None, "the openssl command makes the test certificates")
    ca, cert, key = make_tls_files(tmp_path)
    port = free_port()
    server = redis_server(
        tmp_path, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
    )  # fmt: skip
    next(server)
    broker = f"rediss://127.0.0.1:{port}/0"
    import redis

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(broker, ssl_ca_certs=str(ca)).ping())
        except redis.RedisError:
            return False

    wait_for(answers, what="the TLS Redis")
    log = run_probe_through(
        broker, sqlite_url, tmp_path, f"tls{os.getpid()}", FLEET_REDIS_TLS_CA_FILE=str(ca)
    )
    assert re.search(rf"Connected to rediss://:\*{{2,3}}@127\.0\.0\.1:{port}", log), log[-2000:]
    server.close()


def test_redact_hides_passwords_only() -> None:
    """URLs in reports keep user, host and port, never the password."""
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("postgresql+psycopg://u:p%40ss@db/x") == "postgresql+psycopg://u:***@db/x"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_cli_never_prints_the_database_password(tmp_path: Path) -> None:
    """`fleetworks db upgrade` names the database without its password."""
    _require_postgres()
    with_password = POSTGRES_URL.replace("postgres@", f"postgres:{SECRET}@")
    env = dict(os.environ, FLEET_DATABASE_URL=with_password, PYTHONPATH=str(REPO))
    done = fleetworks("db", "upgrade", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "postgres:***@" in done.stdout
    assert SECRET not in done.stdout + done.stderr
