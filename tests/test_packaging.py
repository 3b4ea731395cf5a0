"""The wheel ships the runtime alone: ``fleetworks`` and nothing else at the top level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_only_fleetworks_with_its_typing_marker_and_plugin(
    tmp_path: Path,
) -> None:
    # Built from a copy of what the sdist holds, so the build leaves nothing in
    # the checkout, and a top-level folder of the checkout cannot sneak in.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("fleetworks", "config", "agents", "tasks", "examples"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "beat_schedule.py", source / "beat_schedule.py")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("fleetworks-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"fleetworks"}, top
    assert "fleetworks/py.typed" in names
    assert "fleetworks/migrations/versions/0005_agent_tables_leave_the_runtime.py" in names
    assert "fleetworks/proving/probe.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[pytest11]" in text and "fleetworks = fleetworks.testing" in text
    assert "[console_scripts]" in text and "fleetworks = fleetworks.cli:main" in text


@pytest.mark.parametrize(
    ("env", "db"),
    [
        ({}, "13"),
        ({"PYTEST_XDIST_WORKER": "gw0"}, "13"),
        ({"PYTEST_XDIST_WORKER": "gw3"}, "10"),
        ({"PYTEST_XDIST_WORKER": "gw3", "FLEET_TEST_REDIS_DB": "5"}, "5"),
    ],
)
def test_the_plugins_redis_database_differs_per_xdist_process(
    env: dict[str, str], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``fleet`` fixture flushes its database: two pytest-xdist processes
    sharing one would flush each other's queues and bindings mid-test."""
    from fleetworks.testing import _redis_db

    for name in ("PYTEST_XDIST_WORKER", "FLEET_TEST_REDIS_DB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _redis_db() == db
