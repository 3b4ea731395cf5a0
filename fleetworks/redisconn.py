"""One Redis client per process for locks and fencing tokens.

Clients are keyed by URL and process id: a pool inherited across ``fork()``
would share sockets between parent and child, so a child gets its own.
"""

from __future__ import annotations

import os

import redis

_clients: dict[str, tuple[int, redis.Redis]] = {}


def get_redis(url: str) -> redis.Redis:
    pid = os.getpid()
    cached = _clients.get(url)
    if cached is not None and cached[0] == pid:
        return cached[1]
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=30,
        retry_on_timeout=True,
    )
    _clients[url] = (pid, client)
    return client


def reset_after_fork() -> None:
    _clients.clear()
