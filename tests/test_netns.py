"""Test hosts (:mod:`fleetworks.proving.netns`): real namespaces, real Redis.

A process inside a host reaches Redis through the host's forwarder; cut off,
its requests time out (packets dropped, no reset); healed, it gets through
again, on the connection it had and on new ones; closing the network leaves
no namespace, device or forwarder behind. Without root (or ``ip``) these
tests skip with the reason, except under ``CI=true`` on a machine that has
what namespaces need, where they fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetworks.embedded import free_port
from fleetworks.proving import netns
from tests.conftest import IN_CI, LOCKS_URL, POSTGRES_URL, _require_postgres

#: Seconds the process inside gives a request (and a connect).
TIMEOUT_S = 1.5

#: Runs inside a host: for each line read ("old", "new", or "db"), one
#: request (on its first Redis connection, on a new one, or to PostgreSQL),
#: answered with "ok" or the error's type, and how long it took.
CLIENT = r"""
import os, sys, time
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
redis_url, db_url, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
print(os.getpid(), flush=True)
def client():
    return redis.Redis.from_url(redis_url, socket_timeout=timeout,
                                socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
first = client()
for line in sys.stdin:
    started = time.monotonic()
    try:
        if line.strip() == "db":
            import psycopg
            with psycopg.connect(db_url, connect_timeout=max(2, int(timeout))) as conn:
                conn.execute("SELECT 1")
        else:
            (first if line.strip() == "old" else client()).ping()
        answer = "ok"
    except Exception as exc:
        answer = type(exc).__name__
    print(answer, round(time.monotonic() - started, 2), flush=True)
"""


def require_netns() -> None:
    """Skip with the reason where namespaces cannot be made; under CI=true on
    a machine that has what they need (Linux, root, ``ip``), fail instead."""
    try:
        netns.check()
    except netns.NetnsUnavailable as exc:
        if IN_CI and exc.capable:
            pytest.fail(f"{exc}; CI=true on a machine that can make namespaces requires them")
        pytest.skip(str(exc))


def _redis_endpoint() -> netns.Endpoint:
    endpoint = netns.endpoint_of(LOCKS_URL)
    assert endpoint is not None
    return endpoint


class Inside:
    """The client process, running inside a host."""

    def __init__(self, host: netns.Host, db_url: str = "") -> None:
        argv = [sys.executable, "-c", CLIENT, host.url(LOCKS_URL), db_url, str(TIMEOUT_S)]
        self.proc = subprocess.Popen(host.argv(argv), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.pid = int(self.proc.stdout.readline())

    def ask(self, what: str) -> tuple[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        answer, took = self.proc.stdout.readline().split()
        return answer, float(took)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def network() -> Iterator[netns.Network]:
    require_netns()
    net = netns.Network({"redis": [_redis_endpoint()]})
    try:
        yield net
    finally:
        net.close()
    assert netns.leftovers(net.tag) == []


def test_a_process_in_a_host_reaches_redis_until_cut_and_again_once_healed(
    network: netns.Network,
) -> None:
    host = network.add_host("a")
    inside = Inside(host)
    try:
        # The pid started is the pid of the command (ip netns exec execs it)
        assert inside.pid == inside.proc.pid
        # Given a process inside the host, connected to Redis through it
        assert inside.ask("old")[0] == "ok"
        assert inside.ask("new")[0] == "ok"
        # When the host is cut off
        network.cut(host)
        assert host.cut_from == {"redis"}
        # Then its requests hang until their timeout (dropped, never refused),
        # on the connection it had and on a new one
        for which in ("old", "new"):
            answer, took = inside.ask(which)
            assert answer == "TimeoutError", (which, answer)
            assert took >= TIMEOUT_S - 0.1, (which, took)
        # And once healed, both get through again
        network.heal(host)
        assert host.cut_from == set()
        assert inside.ask("old")[0] == "ok"
        assert inside.ask("new")[0] == "ok"
    finally:
        inside.close()


def test_a_cut_host_leaves_the_others_connected(network: netns.Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    inside_a, inside_b = Inside(a), Inside(b)
    try:
        network.cut(a)
        assert inside_a.ask("new")[0] == "TimeoutError"
        assert inside_b.ask("new")[0] == "ok"
        assert inside_b.ask("old")[0] == "ok"
    finally:
        network.heal(a)
        inside_a.close()
        inside_b.close()


@pytest.mark.postgres
def test_a_cut_from_redis_alone_leaves_the_database_reachable() -> None:
    require_netns()
    _require_postgres()
    database = netns.endpoint_of(POSTGRES_URL)
    assert database is not None
    with netns.Network({"redis": [_redis_endpoint()], "db": [database]}) as net:
        host = net.add_host("a")
        db_url = host.url(POSTGRES_URL).replace("postgresql+psycopg://", "postgresql://")
        inside = Inside(host, db_url)
        try:
            assert inside.ask("db")[0] == "ok"
            net.cut(host, ["redis"])
            assert inside.ask("new")[0] == "TimeoutError"
            assert inside.ask("db")[0] == "ok"
            net.cut(host, ["db"])
            assert inside.ask("db")[0] != "ok"
            net.heal(host)
            assert inside.ask("db")[0] == "ok"
            assert inside.ask("new")[0] == "ok"
        finally:
            inside.close()
    assert netns.leftovers(net.tag) == []


def test_closing_removes_hosts_devices_forwarders_and_what_runs_inside() -> None:
    require_netns()
    net = netns.Network({"redis": [_redis_endpoint()]})
    host = net.add_host("a")
    link = host.links["redis"]
    forwarded = host.address(_redis_endpoint())
    # A process left running inside the host
    sleeper = subprocess.Popen(host.argv([sys.executable, "-c", "import time; time.sleep(600)"]))
    assert set(netns.leftovers(net.tag)) == {host.namespace, link.outer}
    net.close()
    assert netns.leftovers(net.tag) == []
    assert host.namespace not in netns.namespaces()
    assert link.outer not in netns.devices()
    assert sleeper.wait(10) == -signal.SIGKILL
    # Nothing listens on the forwarder's address any more
    with pytest.raises(OSError), socket.create_connection(forwarded, timeout=1):
        pass


def test_a_network_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    """A process that made a host and was killed leaves it; the next network
    made on this machine removes it."""
    require_netns()
    made = tmp_path / "made"
    code = (
        "import sys, time\nfrom fleetworks.proving import netns\n"
        "net = netns.Network({'probe': []})\nhost = net.add_host('left')\n"
        f"open({str(made)!r}, 'w').write(host.namespace)\ntime.sleep(600)\n"
    )
    orphan = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not made.exists() or not made.read_text():
            assert time.monotonic() < deadline, "the host was not made"
            time.sleep(0.1)
    finally:
        orphan.kill()
        orphan.wait()
    left = made.read_text()
    assert left in netns.namespaces()
    with netns.Network({}) as net:
        assert left not in netns.namespaces()
        assert net.hosts == []
    assert not [n for n in netns.leftovers() if n.startswith(left[:7])]


def test_urls_are_rewritten_to_the_host_forwarder(network: netns.Network) -> None:
    host = network.add_host("a")
    address, port = host.address(_redis_endpoint())
    assert address == host.links["redis"].outer_ip
    redis_host, redis_port = _redis_endpoint()
    url = f"redis://:secret@localhost:{redis_port}/3"
    assert host.url(url) == f"redis://:secret@{address}:{port}/3"
    assert host.url("sqlite:////var/db/fleet.db") == "sqlite:////var/db/fleet.db"
    with pytest.raises(ValueError, match="not forwarded to host a"):
        host.url(f"redis://{redis_host}:{free_port()}/0")


def test_without_ip_the_reason_is_given() -> None:
    """On a machine without iproute2, the check says so (and that the machine
    lacks what namespaces need, so CI skips rather than fails)."""
    code = (
        "from fleetworks.proving import netns\n"
        "try:\n    netns.check()\nexcept netns.NetnsUnavailable as exc:\n"
        "    print(exc.capable, exc)\n"
    )
    env = {**os.environ, "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    if sys.platform != "linux":
        assert done.stdout.startswith("False network namespaces are a Linux feature")
    elif os.geteuid() != 0:
        assert done.stdout.startswith("False making network namespaces needs root")
    else:
        assert done.stdout == "False no `ip` command (iproute2) on PATH\n"
