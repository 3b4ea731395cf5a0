"""Child processes of the fleet: workers, beat and Flower, started and stopped.

Every child runs ``python -m celery -A <app> ...`` (``FLEET_APP``, ``--app``)
with the fleet's settings passed as ``FLEET_*`` variables, in its own process
group, so stopping it
(SIGTERM = Celery's warm shutdown, then SIGKILL after the grace period) never
leaves a pool child behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fleetworks import constants as c
from fleetworks import logs
from fleetworks.reaper import control_queue
from fleetworks.settings import Settings


def fleet_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment for a child: ours, plus the resolved ``FLEET_*`` URLs."""
    env = dict(os.environ)
    env["FLEET_BROKER_URL"] = settings.broker
    env["FLEET_DATABASE_URL"] = settings.database
    env["FLEET_HOME"] = str(settings.home.resolve())
    env["FLEET_APP"] = settings.app
    env["FLEET_QUEUE_TYPE"] = settings.queue_type
    if settings.redis_url:
        env["FLEET_REDIS_URL"] = settings.redis_url
    env.update(overrides)
    return env


def celery_argv(app: str, command: str, *args: str) -> list[str]:
    """``celery -A app command args`` with this interpreter."""
    return [sys.executable, "-m", "celery", *logs.celery_global_args(), "-A", app, command, *args]


def worker_args(
    settings: Settings, name: str, *, queues: Sequence[str] = (), autoscale: bool = False
) -> list[str]:
    """Arguments of ``celery worker`` for a fleet worker called ``name``; with
    ``autoscale``, its pool follows the queue depth between the
    ``FLEET_AUTOSCALE_*`` bounds (fleetworks.autoscale.worker)."""
    pool = (
        ["--autoscale", f"{settings.autoscale_max_workers},{settings.autoscale_min_workers}"]
        if autoscale
        else ["-c", str(settings.worker_concurrency)]
    )
    return [
        "-n", f"{name}@%h",
        *pool,
        "-P", settings.worker_pool,
        "-Q", ",".join(queues or [settings.queue, control_queue(settings.queue)]),
        "--loglevel", settings.log_level,
        "--without-mingle",
        "--without-gossip",
    ]  # fmt: skip


def worker_argv(
    settings: Settings, name: str, *, queues: Sequence[str] = (), autoscale: bool = False
) -> list[str]:
    args = worker_args(settings, name, queues=queues, autoscale=autoscale)
    return celery_argv(settings.app, "worker", *args)


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: Mapping[str, str]
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> Child:
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=dict(self.env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, grace_s: float = c.STOP_GRACE_S) -> int | None:
        """Warm shutdown: SIGTERM, wait ``grace_s``, then SIGKILL the whole group."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        _kill_group(proc.pid)  # pool children that outlived their parent
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop_all(children: Sequence[Child], grace_s: float = c.STOP_GRACE_S) -> None:
    """SIGTERM every child at once, then wait for each (shared deadline)."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in reversed(children):
        child.stop(max(0.1, deadline - time.monotonic()))


def wait_workers(app: object, names: Sequence[str], timeout_s: float = 60.0) -> None:
    """Block until every worker in ``names`` (``name@host``) answers a ping."""
    import socket

    wanted = {n if "@" in n else f"{n}@{socket.gethostname()}" for n in names}
    control = app.control  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = control.ping(destination=sorted(wanted), timeout=0.5) or []
        answered = {name for reply in replies for name in reply}
        if wanted <= answered:
            return
    raise TimeoutError(f"workers {sorted(wanted)} did not answer within {timeout_s}s")
