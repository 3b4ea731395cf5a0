"""The embedded Redis: one server per data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetworks.embedded import EmbeddedRedis, EmbeddedRedisError, free_port, ping


def test_a_second_server_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    # Given a server (one a killed run left behind, say) on a data directory
    first = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    try:
        assert first.proc is not None
        # When another start uses the same directory, even on another port
        second = EmbeddedRedis(tmp_path / "redis", port=free_port())
        # Then it refuses, naming the server in the way
        with pytest.raises(EmbeddedRedisError, match=rf"pid {first.proc.pid} already uses"):
            second.start()
        assert not ping(second.url)
    finally:
        first.stop()
    # And once that server is gone, the directory is free again
    with EmbeddedRedis(tmp_path / "redis", port=free_port()) as again:
        assert ping(again.url)
