"""Live progress bars: drawn for a person on a terminal, silent otherwise."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

from rich.console import Console

from fleetworks import progress
from tests.test_cli import embedded_env


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_counts_and_nothing_is_drawn_when_not_wanted() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with progress.shown(True, console=console):
        assert progress.active()
        progress.update("chaos: keys settled", 40, 300)
        progress.update("chaos: keys settled", 300, 300)
    assert "chaos: keys settled" in out.getvalue() and "300/300" in out.getvalue()
    with progress.shown(False):
        assert not progress.active()
        progress.update("ignored", 1, 2)  # no bar, no error
    assert progress.wanted(as_json=False, stream=_Terminal())
    assert not progress.wanted(as_json=True, stream=_Terminal())
    assert not progress.wanted(as_json=False, stream=io.StringIO())


def test_bench_draws_its_bars_on_a_terminal(tmp_path: Path) -> None:
    # Given `bench throughput` run by a person: stderr is a terminal
    env = embedded_env(tmp_path / ".fleet") | {"COLUMNS": "120", "TERM": "xterm"}
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "fleetworks", "bench", "throughput", "--tasks", "100",
         "--rounds", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=follower, text=True,
    )  # fmt: skip
    os.close(follower)
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the child
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = child.communicate(timeout=300)
    reader.join(10)
    os.close(leader)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    # Then it exits as usual, its report on stdout, and its bars on the
    # terminal: both sides, counted to the end
    assert child.returncode == 0, screen[-3000:]
    assert "ratio" in stdout
    assert "bench: probe.plain" in screen and "bench: probe.run" in screen, screen[-2000:]
    assert "100/100" in screen
