"""One Redis client per process for locks and fencing tokens.

Clients are keyed by URL and process id: a pool inherited across ``fork()``
would share sockets between parent and child, so a child gets its own.
"""

from __future__ import annotations

import os
from typing import Any

import redis

_clients: dict[str, tuple[int, redis.Redis]] = {}


def get_redis(url: str, **tls: Any) -> redis.Redis:
    """This process's client for ``url`` (``tls``: redis-py ``ssl_*`` options)."""
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
        **tls,
    )
    _clients[url] = (pid, client)
    return client


def reset_after_fork() -> None:
    _clients.clear()
