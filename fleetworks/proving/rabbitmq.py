"""A RabbitMQ vhost of a run's own, made and removed with ``rabbitmqctl``.

``fleetworks chaos --broker amqp://...`` runs its rig on a vhost it creates
(``fleet-chaos-<8 hex>``), so that what the run declares, publishes and
breaks stays apart from everything else on the broker, and deletes it
afterwards.

Why ``rabbitmqctl`` and not the management HTTP API: the management plugin
is optional (a stock broker runs without it), while ``rabbitmqctl`` ships
with every RabbitMQ node and needs neither another port nor an
administrator's password; and it closes every connection of a vhost in one
command (the ``client-kill`` fault), where the HTTP API closes them one by
one from a list that is stale as soon as the clients reconnect. The price:
the run must happen where ``rabbitmqctl`` reaches the node (the broker's
host, as root or the ``rabbitmq`` user, or a machine sharing its Erlang
cookie).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fleetworks.settings import is_amqp, redact

#: Every vhost a run creates is named this, then 8 hex digits.
VHOST_PREFIX = "fleet-chaos-"
#: Seconds one ``rabbitmqctl`` call may take.
RABBITMQCTL_TIMEOUT_S = 60.0


class RabbitMQError(RuntimeError):
    """``rabbitmqctl`` is missing or refused; the message says which and why."""


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl --silent args``; its standard output, or RabbitMQError."""
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        raise RabbitMQError(
            "rabbitmqctl not found on PATH: a run on RabbitMQ creates and deletes its own "
            "vhost with it (run it on the broker's host, as root or the rabbitmq user)"
        )
    try:
        done = subprocess.run(
            [binary, "--silent", *args],
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise RabbitMQError(
            f"rabbitmqctl {args[0]} did not answer in {RABBITMQCTL_TIMEOUT_S:g} s"
        ) from None
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip())[-600:]
        raise RabbitMQError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {why}")
    return done.stdout


def check_broker_url(url: str) -> None:
    """ValueError unless ``url`` is a RabbitMQ URL naming no vhost (the run makes its own)."""
    if not is_amqp(url):
        raise ValueError(
            f"{redact(url)} is not a RabbitMQ URL (amqp://user:password@host:port/); "
            "for a Redis broker set FLEET_BROKER_URL, or leave it unset for the embedded one"
        )
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{redact(url)} names no host")
    vhost = unquote(parts.path[1:]) if parts.path.startswith("/") else parts.path
    if vhost:
        raise ValueError(
            f"{redact(url)} names the vhost {vhost!r}: the run creates a vhost of its own; "
            "give the broker's URL without one (ending in '/')"
        )


def on_vhost(url: str, vhost: str) -> str:
    """``url`` (a RabbitMQ URL without a vhost) pointed at ``vhost``."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def vhosts() -> list[str]:
    """The names of the broker's vhosts."""
    return [line.strip() for line in rabbitmqctl("list_vhosts", "name").splitlines() if line]


def close_connections(vhost: str, reason: str) -> int:
    """Close every client connection of ``vhost``; how many were closed."""
    out = rabbitmqctl("close_all_connections", "--vhost", vhost, reason)
    found = re.search(r"Closed (\d+) connection", out)
    return int(found.group(1)) if found else 0


@dataclass(frozen=True)
class RunVhost:
    """A vhost made for one run; its ``url`` is the broker URL on it."""

    name: str
    url: str

    @classmethod
    def create(cls, broker_url: str) -> RunVhost:
        """A new ``fleet-chaos-<8 hex>`` vhost, with every permission on it for
        the URL's user (``guest`` when the URL names none, as for kombu)."""
        check_broker_url(broker_url)
        name = f"{VHOST_PREFIX}{uuid.uuid4().hex[:8]}"
        user = unquote(urlsplit(broker_url).username or "guest")
        rabbitmqctl("add_vhost", name, "--description", "fleetworks chaos run")
        try:
            rabbitmqctl("set_permissions", "--vhost", name, user, ".*", ".*", ".*")
        except BaseException:
            rabbitmqctl("delete_vhost", name)
            raise
        return cls(name, on_vhost(broker_url, name))

    def delete(self) -> None:
        """Delete the vhost, with everything in it (its connections are closed)."""
        rabbitmqctl("delete_vhost", self.name)
