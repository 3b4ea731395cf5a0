"""What a CLI command needs running: the broker (embedded or configured) and
the fleet's own processes, started in order and stopped in reverse.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import click

from fleetworks.embedded import EmbeddedRedis, ping
from fleetworks.procs import Child, celery_argv, fleet_env, stop_all, worker_argv
from fleetworks.settings import Settings, redact


class BrokerUnreachableError(click.ClickException):
    pass


@contextmanager
def broker(settings: Settings) -> Iterator[str]:
    """The broker URL, with the embedded Redis started for the block if needed.

    An embedded Redis already answering on its port (another ``up``) is used
    as it is and left running.
    """
    if not settings.embedded:
        yield settings.broker
        return
    if ping(settings.broker):
        yield settings.broker
        return
    server = EmbeddedRedis(
        settings.home / "redis", port=settings.embedded_redis_port, binary=settings.redis_server
    ).start()
    try:
        yield server.url
    finally:
        server.stop()


def require_broker(settings: Settings) -> None:
    """Fail with a clear message when a Redis broker does not answer."""
    url = settings.broker
    if url.startswith(("redis://", "rediss://")) and not ping(url, timeout=2):
        hint = "start the fleet with `fleetworks up`" if settings.embedded else "check it"
        raise BrokerUnreachableError(f"broker {redact(url)} is not reachable: {hint}")


@dataclass
class FleetProcesses:
    """The processes of one ``up`` or ``demo``."""

    settings: Settings
    #: ``FLEET_*`` overrides for these processes only (a demo's own schedule).
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def add(self, name: str, argv: list[str]) -> Child:
        log = self.settings.home / "logs" / f"{name}.log"
        child = Child(name, argv, fleet_env(self.settings, **self.env), log_path=log).start()
        self.children.append(child)
        return child

    def worker(self, name: str = "worker", *, autoscale: bool = False) -> Child:
        return self.add(name, worker_argv(self.settings, name, autoscale=autoscale))

    def beat(self, name: str = "beat") -> Child:
        schedule = str((self.settings.home / "celerybeat-schedule").resolve())
        return self.add(
            name,
            celery_argv(
                self.settings.app,
                "beat",
                "-s",
                schedule,
                "--pidfile=",
                "--loglevel",
                self.settings.log_level,
            ),
        )

    def relay(self, name: str = "relay") -> Child:
        argv = [sys.executable, "-m", "fleetworks", "-A", self.settings.app, "relay"]
        return self.add(name, argv)

    def controllers(self, name: str = "controllers") -> Child:
        argv = [sys.executable, "-m", "fleetworks", "-A", self.settings.app, "controllers"]
        return self.add(name, argv)

    def flower(self) -> Child:
        argv = celery_argv(self.settings.app, "flower", *flower_args(self.settings))
        return self.add("flower", argv)

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop(self) -> None:
        stop_all(self.children)

    @property
    def hostname(self) -> str:
        return socket.gethostname()


#: The columns of Flower's tasks page: its defaults plus the result (the
#: outcome status of a SUCCESS) and the exception (why a FAILURE failed).
FLOWER_TASK_COLUMNS = "name,uuid,state,result,exception,received,runtime,worker"
#: How often Flower writes its state to ``FLEET_HOME/flower.db`` besides at a
#: clean stop, so a killed Flower loses at most this much history.
FLOWER_SAVE_INTERVAL_MS = 60_000


def flower_args(settings: Settings) -> list[str]:
    """Arguments of ``celery flower`` for the fleet: its address, its auth, and
    persistent mode, where the tasks and workers it has seen are kept in
    ``FLEET_HOME/flower.db`` across a restart."""
    s = settings
    s.home.mkdir(parents=True, exist_ok=True)
    args = [
        f"--address={s.flower_address}",
        f"--port={s.flower_port}",
        "--persistent=True",
        f"--db={(s.home / 'flower.db').resolve()}",
        f"--state_save_interval={FLOWER_SAVE_INTERVAL_MS}",
        f"--tasks_columns={FLOWER_TASK_COLUMNS}",
    ]
    if s.flower_basic_auth is not None:
        args.append(f"--basic-auth={s.flower_basic_auth.get_secret_value()}")
    return args


def echo(message: str) -> None:
    click.echo(message, err=True)
