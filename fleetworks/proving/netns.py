"""Test hosts on one machine: a network namespace each, cut off and healed at will.

A :class:`Network` makes hosts for fault runs (``fleetworks chaos``). A host
is a network namespace (``ip netns add``) with its loopback up and one veth
pair per *service link* to the root namespace, each pair with a /30 of
``10.213.0.0/16`` that the network picks (a third octet no address on this
machine uses). A process runs inside a host through ``ip netns exec NAME
argv...``, which ``exec``\\ s the command: the pid the caller starts is the
pid of the command itself, so signals and process groups work as usual.

The services the hosts need (Redis, PostgreSQL) listen on 127.0.0.1 in the
root namespace, which a host cannot reach. Each link has a forwarder for
each of its services: a small threaded TCP relay in this process, listening
on the link's root-side address and relaying to the service. Why not a DNAT
rule to 127.0.0.1 (iptables or nftables, with ``route_localnet`` on the
link): that needs the firewall tools and kernel modules installed, changes
the root namespace's firewall, and a run killed mid-way leaves the rules and
the sysctl behind; the relay needs nothing installed and ends with the
process that runs it. Its sockets are bound to the link's device, so while
a link is down nothing they send leaves by another route.

:meth:`Network.cut` partitions a host from the services of some or all of
its links by setting the root-side end of each link down: the host side
loses its carrier and drops what it sends, the root side has no route to it
(and sends nothing elsewhere). Packets are dropped, not refused: an open
connection hangs, a new one waits for its connect timeout, and nobody gets a
reset; the host's neighbour entry of the root side is permanent, so no
failed ARP turns the silence into a quick "no route to host". :meth:`heal`
sets the links up again and TCP delivers what it was retransmitting. One
link per service (Redis, the database) is what lets a cut take one service
away and leave the other.

:meth:`Network.close` (also on leaving the ``with`` block) closes the
forwarders, kills whatever still runs inside the hosts and deletes the veth
pairs and namespaces; :func:`leftovers` lists what a network left behind,
which is nothing. Names start with ``fwc`` and carry the owner's pid, so a
network started after a run that was killed removes what that run left.

Where namespaces cannot be made (not Linux, not root, no ``ip``, no
permission), :func:`check` raises :class:`NetnsUnavailable` naming the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import psutil

#: Every namespace and veth device made here starts with this.
PREFIX = "fwc"
#: The addresses hosts get: a /24 of it per network, a /30 per link.
SUBNET = ipaddress.ip_network("10.213.0.0/16")
#: Links one network can hold: the /30s of its /24.
MAX_LINKS = 64
#: Seconds a forwarder waits to connect to its service.
CONNECT_TIMEOUT_S = 5.0

_NAMESPACE = re.compile(rf"^{PREFIX}([0-9a-f]{{4}})h(\d+)p(\d+)$")
_DEVICE = re.compile(rf"^{PREFIX}([0-9a-f]{{4}})\d\d[oi]$")
_DEFAULT_PORTS = {
    "redis": 6379,
    "rediss": 6379,
    "amqp": 5672,
    "amqps": 5671,
    "postgresql": 5432,
    "postgres": 5432,
}


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has the command and its error."""


class NetnsUnavailable(RuntimeError):
    """This process cannot make network namespaces; the message says why.

    ``capable`` is True when the machine has what they need (Linux, root,
    ``ip``) and making one failed anyway: a setup that should work and does not.
    """

    def __init__(self, reason: str, *, capable: bool) -> None:
        super().__init__(reason)
        self.capable = capable


Endpoint = tuple[str, int]


def _ip_binary() -> str | None:
    return shutil.which("ip")


def _run(*args: str) -> str:
    binary = _ip_binary()
    if binary is None:
        raise NetnsError("no `ip` command (iproute2) on PATH")
    done = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


_checked: NetnsUnavailable | bool = False


def check() -> None:
    """Raise :class:`NetnsUnavailable` unless this process can make a host
    (a namespace, a veth pair into it, a process inside). Tried once per process."""
    global _checked
    if _checked is True:
        return
    if isinstance(_checked, NetnsUnavailable):
        raise _checked
    try:
        _check()
    except NetnsUnavailable as exc:
        _checked = exc
        raise
    _checked = True


def _check() -> None:
    if sys.platform != "linux":
        raise NetnsUnavailable(
            f"network namespaces are a Linux feature (this is {sys.platform})", capable=False
        )
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            f"making network namespaces needs root (running as uid {os.geteuid()})", capable=False
        )
    if _ip_binary() is None:
        raise NetnsUnavailable("no `ip` command (iproute2) on PATH", capable=False)
    try:
        with Network({"probe": []}) as net:
            host = net.add_host("probe")
            done = subprocess.run(host.argv([sys.executable, "-c", "pass"]), capture_output=True,
                                  text=True, check=False)  # fmt: skip
            if done.returncode != 0:
                raise NetnsError(f"ip netns exec: {done.stderr.strip() or done.returncode}")
    except (NetnsError, OSError) as exc:
        raise NetnsUnavailable(f"cannot make a network namespace: {exc}", capable=True) from None


def endpoint_of(url: str) -> Endpoint | None:
    """The (address, port) a URL connects to, or None for one without a
    host (``sqlite:///...``, ``unix://``)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    scheme = parts.scheme.split("+", 1)[0]
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    if port is None:
        raise ValueError(f"{url!r} names no port and {scheme!r} has no default one")
    return _normal(parts.hostname), port


def _normal(address: str) -> str:
    return "127.0.0.1" if address == "localhost" else address


class Forwarder:
    """A threaded TCP relay: connections to ``listen`` (an address of this
    namespace, bound to ``device``) are relayed to ``target``."""

    def __init__(self, listen: str, target: Endpoint, device: str | None = None) -> None:
        self.target = target
        self._sockets: set[socket.socket] = set()
        self._upstreams: set[socket.socket] = set()
        self._mutex = threading.Lock()
        self._closed = False
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if device is not None:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            listener.bind((listen, 0))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.address: Endpoint = (listen, int(listener.getsockname()[1]))
        threading.Thread(target=self._accept, name=f"forward-{listen}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT_S)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._mutex:
            if self._closed:
                client.close()
                upstream.close()
                return
            self._sockets |= {client, upstream}
            self._upstreams.add(upstream)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._mutex:
            self._sockets -= {client, upstream}
            self._upstreams.discard(upstream)
        client.close()
        upstream.close()

    def upstream_addresses(self) -> set[Endpoint]:
        """The local address of each connection this forwarder made to its
        target: what the target sees as its clients (Redis's ``CLIENT LIST``)."""
        found: set[Endpoint] = set()
        with self._mutex:
            for upstream in self._upstreams:
                with contextlib.suppress(OSError):
                    ip, port = upstream.getsockname()[:2]
                    found.add((str(ip), int(port)))
        return found

    def connections(self) -> int:
        """Sockets open through this forwarder (two per relayed connection)."""
        with self._mutex:
            return len(self._sockets)

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@dataclass
class Link:
    """One veth pair of a host: ``outer`` in the root namespace, ``inner`` in
    the host, and a forwarder per service endpoint on the outer address."""

    service: str
    outer: str
    inner: str
    outer_ip: str
    inner_ip: str
    forwarders: dict[Endpoint, Forwarder] = field(default_factory=dict)


@dataclass
class Host:
    """One test host: a network namespace and its links."""

    label: str
    namespace: str
    links: dict[str, Link] = field(default_factory=dict)
    #: Services the host is cut from now.
    cut_from: set[str] = field(default_factory=set)

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this host (same pid: ``ip netns exec`` execs it)."""
        binary = _ip_binary() or "ip"
        return [binary, "netns", "exec", self.namespace, *command]

    def relayed_to(self, target: Endpoint) -> set[Endpoint]:
        """What ``target`` sees as this host's connections to it (the local
        addresses of its forwarder's upstream connections)."""
        target = (_normal(target[0]), target[1])
        found: set[Endpoint] = set()
        for link in self.links.values():
            if target in link.forwarders:
                found |= link.forwarders[target].upstream_addresses()
        return found

    def address(self, target: Endpoint) -> Endpoint:
        """Where this host reaches ``target``: its forwarder on the link."""
        target = (_normal(target[0]), target[1])
        for link in self.links.values():
            if target in link.forwarders:
                return link.forwarders[target].address
        raise ValueError(
            f"{target[0]}:{target[1]} is not forwarded to host {self.label}: "
            f"its links forward {sorted(e for lk in self.links.values() for e in lk.forwarders)}"
        )

    def url(self, url: str) -> str:
        """``url`` as this host reaches it (its address and port replaced by
        the forwarder's); a URL without a host (SQLite) is returned as it is."""
        target = endpoint_of(url)
        if target is None:
            return url
        address, port = self.address(target)
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{address}:{port}" if userinfo else f"{address}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))


class Network:
    """Test hosts made by this process, each with one link per service.

    ``services`` maps a link name to the endpoints (address, port) forwarded
    on it, e.g. ``{"redis": [("127.0.0.1", 6379)], "db": [("127.0.0.1", 5432)]}``.
    """

    def __init__(self, services: Mapping[str, Sequence[Endpoint]]) -> None:
        if sys.platform != "linux":
            raise NetnsError(f"network namespaces are a Linux feature (this is {sys.platform})")
        self.services = {name: [(_normal(a), p) for a, p in eps] for name, eps in services.items()}
        sweep()
        self.tag = _free_tag()
        self.hosts: list[Host] = []
        self._octet: int | None = None
        self._links = 0
        self._made = 0
        self._mutex = threading.Lock()
        self._closed = False

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add_host(self, label: str) -> Host:
        """A new host with a link per service; raises :class:`NetnsError`
        (having removed what it made) if the system refuses."""
        with self._mutex:
            if self._closed:
                raise NetnsError("the network is closed")
            host = Host(label, f"{PREFIX}{self.tag}h{self._made}p{os.getpid()}")
            self._made += 1
            self.hosts.append(host)
        try:
            _run("netns", "add", host.namespace)
            _run("-n", host.namespace, "link", "set", "lo", "up")
            for service, endpoints in self.services.items():
                host.links[service] = self._link(host, service, endpoints)
        except BaseException:
            self._remove(host)
            raise
        return host

    def _link(self, host: Host, service: str, endpoints: Sequence[Endpoint]) -> Link:
        with self._mutex:
            k = self._links
            self._links += 1
        if k >= MAX_LINKS:
            raise NetnsError(f"a network holds at most {MAX_LINKS} links")
        outer, inner = f"{PREFIX}{self.tag}{k:02d}o", f"{PREFIX}{self.tag}{k:02d}i"
        with _address_lock():
            if self._octet is None:
                self._octet = _free_octet()
            base = int(SUBNET.network_address) + (self._octet << 8) + 4 * k
            link = Link(service, outer, inner, str(ipaddress.ip_address(base + 1)),
                        str(ipaddress.ip_address(base + 2)))  # fmt: skip
            _run("link", "add", outer, "type", "veth", "peer", "name", inner, "netns",
                 host.namespace)  # fmt: skip
            host.links[service] = link  # removed with the host from here on
            _run("addr", "add", f"{link.outer_ip}/30", "dev", outer)
        outer_ip, inner_ip = link.outer_ip, link.inner_ip
        _run("link", "set", outer, "up")
        ns = host.namespace
        _run("-n", ns, "addr", "add", f"{inner_ip}/30", "dev", inner)
        _run("-n", ns, "link", "set", inner, "up")
        # Permanent: while the link is cut, an ARP that fails would turn the
        # silence into a quick EHOSTUNREACH; a partition drops packets instead.
        mac = json.loads(_run("-j", "link", "show", outer))[0]["address"]
        neigh = ("neigh", "replace", outer_ip, "lladdr", mac, "dev", inner, "nud", "permanent")
        _run("-n", ns, *neigh)
        for target in endpoints:
            link.forwarders[target] = Forwarder(outer_ip, target, device=outer)
        return link

    def host(self, label: str) -> Host:
        for h in self.hosts:
            if h.label == label:
                return h
        raise KeyError(f"no host {label!r}; hosts: {[h.label for h in self.hosts]}")

    def _links_of(self, host: Host, services: Iterable[str] | None) -> list[Link]:
        names = list(host.links) if services is None else list(services)
        unknown = sorted(set(names) - set(host.links))
        if unknown:
            links = sorted(host.links)
            raise ValueError(f"host {host.label} has no link {unknown}; links: {links}")
        return [host.links[n] for n in names]

    def cut(self, host: Host, services: Iterable[str] | None = None) -> None:
        """Drop every packet between ``host`` and ``services`` (default all)."""
        for link in self._links_of(host, services):
            _run("link", "set", link.outer, "down")
            host.cut_from.add(link.service)

    def heal(self, host: Host, services: Iterable[str] | None = None) -> None:
        """Undo :meth:`cut` for ``services`` (default all)."""
        for link in self._links_of(host, services):
            _run("link", "set", link.outer, "up")
            host.cut_from.discard(link.service)

    def close(self) -> None:
        """Remove every host (killing what still runs in it), link and forwarder."""
        with self._mutex:
            self._closed = True
            hosts = list(self.hosts)
        errors = []
        for host in hosts:
            try:
                self._remove(host)
            except NetnsError as exc:
                errors.append(str(exc))
        if errors:
            raise NetnsError("; ".join(errors))

    def _remove(self, host: Host) -> None:
        for link in host.links.values():
            for forwarder in link.forwarders.values():
                forwarder.close()
        _kill_inside(host.namespace)
        for link in host.links.values():
            if _device_exists(link.outer):
                _run("link", "del", link.outer)
        if host.namespace in namespaces():
            _run("netns", "del", host.namespace)
        with self._mutex:
            if host in self.hosts:
                self.hosts.remove(host)


def namespaces() -> list[str]:
    """Names of the network namespaces ``ip netns`` knows."""
    return [line.split()[0] for line in _run("netns", "list").splitlines() if line.strip()]


def devices() -> list[str]:
    """Names of the network devices of the root namespace."""
    return [d["ifname"] for d in json.loads(_run("-j", "link", "show") or "[]")]


def _device_exists(name: str) -> bool:
    return name in devices()


def leftovers(tag: str | None = None) -> list[str]:
    """Namespaces and devices made here (by the network ``tag``, or any) that exist now."""
    mine = [n for n in namespaces() if _NAMESPACE.match(n)]
    mine += [d for d in devices() if _DEVICE.match(d)]
    return [n for n in mine if tag is None or n.startswith(f"{PREFIX}{tag}")]


def _kill_inside(namespace: str) -> None:
    """SIGKILL what still runs in a host this process made (its own children)."""
    if namespace not in namespaces():
        return
    for pid in _run("netns", "pids", namespace).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def sweep() -> list[str]:
    """Remove the hosts and devices of networks whose process is gone (a run
    that was killed); returns what was removed."""
    removed: list[str] = []
    live_tags: set[str] = set()
    for name in namespaces():
        match = _NAMESPACE.match(name)
        if match is None:
            continue
        if psutil.pid_exists(int(match.group(3))):
            live_tags.add(match.group(1))
            continue
        _kill_inside(name)
        with contextlib.suppress(NetnsError):
            _run("netns", "del", name)
            removed.append(name)
    for device in devices():
        match = _DEVICE.match(device)
        if match is None or match.group(1) in live_tags:
            continue
        with contextlib.suppress(NetnsError):
            _run("link", "del", device)
            removed.append(device)
    return removed


def _free_tag() -> str:
    taken = {m.group(1) for n in namespaces() if (m := _NAMESPACE.match(n))}
    taken |= {m.group(1) for d in devices() if (m := _DEVICE.match(d))}
    while True:
        tag = secrets.token_hex(2)
        if tag not in taken:
            return tag


def _free_octet() -> int:
    """A third octet of :data:`SUBNET` that no address of this machine uses."""
    used: set[int] = set()
    for line in _run("-4", "-o", "addr", "show").splitlines():
        for word in line.split():
            if "/" in word:
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_interface(word).ip
                    if address in SUBNET:
                        used.add(address.packed[2])
    free = sorted(set(range(256)) - used)
    if not free:
        raise NetnsError(f"every /24 of {SUBNET} is in use")
    return random.choice(free)


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    """Serialises address picking between processes (two networks, one octet)."""
    path = Path(tempfile.gettempdir()) / "fleetworks-netns.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
