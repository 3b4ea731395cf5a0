"""Leaders per group on etcd: a lease with keep-alive, a transaction on the
key's create revision, the term etcd's own revision.

A campaign grants a lease (TTL rounded up to whole seconds, etcd's unit) and
runs one transaction: *if the group's key has create revision 0* (nobody
holds it) *put it, attached to the lease*. The revision of that transaction
is the key's create revision, and it is the **term**: etcd's revision counter
only grows, for every key, and is kept in its write-ahead log, so terms grow
across leaders and across etcd restarts without any counter of ours. Renewal
is a lease keep-alive; resigning revokes the lease, which deletes the key. A
leader that dies stops its keep-alives and etcd deletes the key when the
lease ends. The lease and the transaction go through Raft, so on a cluster of
three or five members a majority agrees on who leads.

Client: etcd3gw (OpenStack's client of etcd's v3 gRPC gateway: JSON over
HTTP with ``requests``). The gRPC clients do not fit: ``etcd3`` 0.12 is
unmaintained and pins old grpcio/protobuf releases that conflict with the
protobuf 7 the OpenTelemetry exporter needs, and ``aetcd`` is asyncio-only.
etcd3gw needs neither grpcio nor protobuf, is typed, and speaks the gateway
every etcd 3.4+ serves on its client port (``/v3/kv/txn``,
``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/kv/range``, base64
keys).

The floor (the resource's highest term, see :mod:`fleetworks.leadership`):
etcd's revision cannot be moved forward on request, so a campaign whose floor
is at or above the cluster's revision (an etcd restored from an old backup)
raises :class:`~fleetworks.leadership.TermFloorError` instead of handing out
a term the resource already saw. Restore etcd from its latest snapshot, or
write to it until its revision passes the floor.

Keys (under ``fleetworks/`` by default, the URL's path changes it):
``leader/<group>`` (the leader: JSON identity and since, with the lease) and
``elected/<group>`` (the last term, no lease: it tells a failover from a
group's first election).
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from fleetworks import stats
from fleetworks.leadership import (
    LeaderInfo,
    LeadershipError,
    Term,
    TermFloorError,
    check_group,
    parse_since,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fleetworks/"
#: Seconds per HTTP request: well under a lease, so a dead endpoint is left in time.
REQUEST_TIMEOUT_S = 1.0

_FAILURES = (Etcd3Exception, requests.RequestException, ValueError, KeyError)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    """The key just past every key starting with ``prefix`` (etcd's prefix range)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return base64.b64encode(b"\0").decode()
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def parse_endpoints(url: str) -> tuple[list[tuple[str, int]], str]:
    """``etcd://host:port[,host:port][/prefix]`` -> endpoints and key prefix."""
    if not url.startswith("etcd://"):
        raise ValueError(f"etcd URL {url!r} must start with etcd://")
    rest = url[len("etcd://") :]
    hosts, _, path = rest.partition("/")
    endpoints: list[tuple[str, int]] = []
    for part in filter(None, hosts.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd URL {url!r}: {part!r} is not host:port")
        endpoints.append((host.strip("[]"), int(port)))
    if not endpoints:
        raise ValueError(f"etcd URL {url!r} names no host:port")
    prefix = path.strip("/")
    return endpoints, (prefix + "/") if prefix else DEFAULT_PREFIX


class EtcdBackend:
    """Elections on etcd (see the module docstring)."""

    name = "etcd"

    def __init__(
        self,
        endpoints: list[tuple[str, int]],
        *,
        prefix: str = DEFAULT_PREFIX,
        stats_redis: Callable[[], redis.Redis] | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self._clients = [
            Etcd3Client(host=h, port=p, timeout=timeout_s, api_path="/v3/") for h, p in endpoints
        ]
        self._current = 0
        self.prefix = prefix
        self._stats_redis = stats_redis

    @classmethod
    def from_url(
        cls, url: str, *, stats_redis: Callable[[], redis.Redis] | None = None
    ) -> EtcdBackend:
        endpoints, prefix = parse_endpoints(url)
        return cls(endpoints, prefix=prefix, stats_redis=stats_redis)

    def _key(self, group: str) -> str:
        return f"{self.prefix}leader/{group}"

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the gateway, trying each endpoint once from the last that answered."""
        errors: list[str] = []
        for i in range(len(self._clients)):
            index = (self._current + i) % len(self._clients)
            client = self._clients[index]
            try:
                reply: dict[str, Any] = client.post(client.get_url(path), json=body)
            except _FAILURES as exc:
                errors.append(f"{client.host}:{client.port}: {type(exc).__name__} {exc}")
                continue
            self._current = index
            return reply
        raise LeadershipError("etcd unreachable: " + "; ".join(errors))

    def _range(self, key: str, *, prefix: bool = False) -> dict[str, Any]:
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _range_end(key)
        return self._post("/kv/range", body)

    def campaign(self, group: str, identity: str, ttl_s: float, floor: int = 0) -> Term | None:
        check_group(group)
        key = self._key(group)
        seen = self._range(key)
        if seen.get("kvs"):
            return None
        revision = int(seen["header"]["revision"])
        if floor > revision:
            # The put would take revision + 1 at most: not above the floor.
            raise TermFloorError(
                f"etcd's revision {revision} is below the term floor {floor} of {group!r} "
                "(etcd restored from an old backup?); refusing to campaign"
            )
        ttl = max(1, math.ceil(ttl_s))
        lease = int(self._post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])
        value = json.dumps({"leader": identity, "since": datetime.now(UTC).isoformat()})
        marker = f"{self.prefix}elected/{group}"
        txn = {
            "compare": [
                {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}
            ],
            "success": [
                {"request_put": {"key": _b64(key), "value": _b64(value), "lease": lease}},
                {"request_put": {"key": _b64(marker), "value": "", "prev_kv": True}},
            ],
            "failure": [],
        }
        try:
            reply = self._post("/kv/txn", txn)
        except LeadershipError:
            self._revoke(lease)
            raise
        if not reply.get("succeeded"):
            self._revoke(lease)
            return None
        term = int(reply["header"]["revision"])
        if floor >= term:  # writes raced the check above; never hand out a seen term
            self._revoke(lease)
            raise TermFloorError(f"etcd's term {term} for {group!r} is not above floor {floor}")
        previous = reply["responses"][1].get("response_put", {}).get("prev_kv")
        if previous:
            self._count_failover(group)
        return Term(group, identity, term, str(lease), ttl_s)

    def _count_failover(self, group: str) -> None:
        if self._stats_redis is None:
            return
        try:
            client = self._stats_redis()
        except (ValueError, redis.RedisError) as exc:  # never costs the leadership
            log.warning("etcd: failover of %s not counted (%s)", group, exc)
            return
        stats.count(client, stats.leader_failovers_field(group))

    def _revoke(self, lease: int) -> None:
        try:
            self._post("/lease/revoke", {"ID": lease})
        except LeadershipError as exc:
            log.warning("etcd: lease %x not revoked (%s); it expires", lease, exc)

    def renew(self, term: Term) -> bool:
        reply = self._post("/lease/keepalive", {"ID": int(term.handle)})
        return int(reply.get("result", {}).get("TTL", 0)) > 0

    def resign(self, term: Term) -> None:
        self._post("/lease/revoke", {"ID": int(term.handle)})

    def _info(self, group: str, kv: dict[str, Any]) -> LeaderInfo:
        try:
            value = json.loads(_unb64(kv.get("value", "")))
        except ValueError:
            value = {}
        leader = str(value.get("leader", "?")) if isinstance(value, dict) else "?"
        since = parse_since(value.get("since")) if isinstance(value, dict) else None
        return LeaderInfo(group, leader, int(kv["create_revision"]), since, self.name)

    def observe(self, group: str) -> LeaderInfo | None:
        kvs = self._range(self._key(group)).get("kvs") or []
        return self._info(group, kvs[0]) if kvs else None

    def list_groups(self, prefix: str = "") -> list[LeaderInfo]:
        base = self._key("")
        kvs = self._range(base + prefix, prefix=True).get("kvs") or []
        found = [self._info(_unb64(kv["key"])[len(base) :], kv) for kv in kvs]
        return sorted(found, key=lambda info: info.group)

    def raise_term_floor(self, group: str, at_least: int) -> int:
        """etcd's revision cannot be moved: raises unless it is already above ``at_least``."""
        revision = int(self._range(self._key(group))["header"]["revision"])
        if revision < at_least:
            raise TermFloorError(
                f"etcd's revision {revision} is below the term floor {at_least} of {group!r}"
            )
        return revision
