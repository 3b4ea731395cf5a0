"""Flower as a person sees it: a real worker, Flower started the way ``up``
starts it, and its pages in headless Chromium.

What the guard decided is the state Flower shows: a run that did its work is
SUCCESS with its outcome status in the result, a payload the agent refuses
and a dead letter are FAILURE naming why, and what Flower saw survives its
restart (persistent mode, ``FLEET_HOME/flower.db``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fleetworks.embedded import free_port
from fleetworks.procs import Child
from fleetworks.services import FleetProcesses
from fleetworks.settings import Settings
from tests.conftest import (
    BROKER_URL,
    LOCKS_URL,
    Worker,
    broker_idle,
    require,
    start_worker,
    truncate,
    wait_for,
)
from tests.test_guard_integration import outcome

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _require_browser() -> None:
    require(shutil.which("chromedriver") is not None, "chromedriver not installed")
    require(os.path.exists(CHROMIUM), "chromium not installed")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


def _start_flower(fleet: FleetProcesses) -> Child:
    """Flower exactly as ``fleetworks up`` starts it, answering on its port."""
    child = fleet.flower()
    url = f"http://127.0.0.1:{fleet.settings.flower_port}/healthcheck"
    try:
        wait_for(lambda: _get(url)[0] == 200, timeout_s=60, what="Flower to answer")
    except AssertionError:
        child.stop(5)
        raise AssertionError(f"Flower did not start:\n{child.log_tail()}") from None
    return child


def _tasks(port: int) -> dict[str, dict[str, Any]]:
    """The tasks Flower knows, by task id, from the endpoint its tasks page reads."""
    query = "draw=1&start=0&length=1000&order[0][column]=0&columns[0][data]=received"
    status, body = _get(f"http://127.0.0.1:{port}/tasks/datatable?{query}")
    return {t["uuid"]: t for t in json.loads(body)["data"]} if status == 200 else {}


def _states(port: int, ids: Iterable[str]) -> dict[str, str | None]:
    seen = _tasks(port)
    return {t: seen.get(t, {}).get("state") for t in ids}


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    _require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1900,700")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def fleet_flower(tmp_path: Path, sqlite_url: str) -> Iterator[FleetProcesses]:
    """The processes of an ``up`` on the test broker; Flower started by the test."""
    redis.Redis.from_url(LOCKS_URL).flushdb()
    truncate(sqlite_url)
    settings = Settings(
        broker_url=BROKER_URL,
        redis_url=LOCKS_URL,
        database_url=sqlite_url,
        home=tmp_path / "home",
        flower_address="127.0.0.1",
        flower_port=free_port(),
        app="config",
    )
    fleet = FleetProcesses(settings)
    yield fleet
    fleet.stop()
    truncate(sqlite_url)


def _rows(driver: webdriver.Chrome) -> dict[str, dict[str, str]]:
    """Task id -> {column: text} of the rows the tasks table shows now, read in
    one script so a redraw by the page's own refresh cannot cut it in half."""
    columns, rows = driver.execute_script(
        "const heads = Array.from(document.querySelectorAll('#tasks-table thead th'));"
        "const rows = Array.from(document.querySelectorAll('#tasks-table tbody tr'));"
        "return [heads.map(th => th.getAttribute('data-column') || ''),"
        "        rows.map(tr => Array.from(tr.cells).map(td => td.innerText.trim()))];"
    )
    got: dict[str, dict[str, str]] = {}
    for texts in rows:
        cells = dict(zip(columns, texts, strict=False))
        if cells.get("uuid"):
            got[cells["uuid"]] = cells
    return got


def _row_states(driver: webdriver.Chrome) -> dict[str, str]:
    """Task id -> state of the rows the tasks table shows now."""
    return {uuid: row.get("state", "") for uuid, row in _rows(driver).items()}


def _wait_rows(driver: webdriver.Chrome, want: dict[str, str]) -> dict[str, str]:
    """Wait until the table shows each task id of ``want`` in its state."""

    def shown() -> dict[str, str] | None:
        rows = _row_states(driver)
        return rows if all(rows.get(t) == s for t, s in want.items()) else None

    try:
        return WebDriverWait(driver, 30, poll_frequency=0.5).until(lambda _: shown())
    except Exception:
        raise AssertionError(f"tasks table shows {_row_states(driver)}, want {want}") from None


@dataclass(frozen=True)
class Sent:
    """The task ids of the runs the test sends, and the state each must show."""

    ok: str
    duplicate: str
    refused: str
    dead: str
    dead_again: str

    @property
    def want(self) -> dict[str, str]:
        failed = (self.refused, self.dead, self.dead_again)
        return {self.ok: "SUCCESS", self.duplicate: "SUCCESS"} | dict.fromkeys(failed, "FAILURE")


def _send(worker: Worker, port: int) -> Sent:
    """A success, its duplicate, a refused payload, a dead letter and a delivery of its key."""
    ok = worker.enqueue("probe.run", {"id": "flower-ok"})
    wait_for(lambda: _states(port, [ok]) == {ok: "SUCCESS"}, what="the success")
    duplicate = worker.enqueue("probe.run", {"id": "flower-ok"})
    refused = worker.enqueue("probe.run", {"id": 7})
    dead = worker.enqueue("probe.run", {"id": "flower-dead", "fail_attempts": 50})
    wait_for(
        lambda: _states(port, [dead]) == {dead: "FAILURE"},
        timeout_s=90,
        what="the dead letter to run out of retries",
    )
    return Sent(ok, duplicate, refused, dead, worker.enqueue("probe.run", {"id": "flower-dead"}))


def _check_log(log: str, sent: Sent) -> None:
    """A dead letter is one error; a refused payload one warning, without a
    traceback (the worker logs JSON lines: its log is a file)."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    dead = [x for x in lines if f"Task probe.run[{sent.dead}] raised unexpected" in x["message"]]
    assert len(dead) == 1 and "DeadLetterError" in dead[0].get("exception", ""), dead
    refused = [x for x in lines if sent.refused in x["message"] + str(x.get("task_id"))]
    assert len(refused) == 3, refused  # received, the reason, Celery's own line
    assert refused[1]["level"] == "warning" and "invalid payload" in refused[1]["message"]
    assert "raised expected: RejectedError" in refused[2]["message"]
    assert "exception" not in refused[2], refused[2]


def _check_pages(browser: webdriver.Chrome, port: int, worker_name: str, sent: Sent) -> None:
    # The workers page lists the fleet's worker by name, online
    browser.get(f"http://127.0.0.1:{port}/workers")
    link = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#workers-table a[title='{worker_name}']")
    )
    assert link.text.replace("\n", "") == worker_name
    assert "Online" in link.find_element(By.XPATH, "./ancestor::tr").text
    # The tasks page shows the agent's tasks by name, state, outcome status and reason
    browser.get(f"http://127.0.0.1:{port}/tasks")
    _wait_rows(browser, sent.want)
    rows = _rows(browser)
    assert {rows[t]["name"] for t in sent.want} == {"probe.run"}
    assert "'status': 'succeeded'" in rows[sent.ok]["result"]
    assert "'status': 'skipped_duplicate'" in rows[sent.duplicate]["result"]
    assert "RejectedError" in rows[sent.refused]["exception"]
    assert "DeadLetterError" in rows[sent.dead]["exception"]


def test_flower_shows_what_the_guard_decided(
    fleet_flower: FleetProcesses, browser: webdriver.Chrome, tmp_path: Path, sqlite_url: str
) -> None:
    # Given Flower started as `up` starts it, and a fleet worker (task events on)
    flower = _start_flower(fleet_flower)
    port = fleet_flower.settings.flower_port
    name = f"flower{os.getpid()}"
    worker = start_worker(sqlite_url, tmp_path, name)
    worker_name = f"{name}@{socket.gethostname()}"
    try:
        # When it runs a success, its duplicate, a refused payload and a dead letter
        sent = _send(worker, port)
        want = sent.want
        try:
            wait_for(lambda: _states(port, want) == want, what="Flower to see every state")
        except AssertionError:
            raise AssertionError(f"Flower shows {_states(port, want)}, want {want}") from None
        # Then every message is acknowledged once: none waits, none is held unacked
        wait_for(lambda: broker_idle(worker.queue), what="every message to be acked")
        assert outcome(sqlite_url, f"rejected:{sent.refused}").attempts == 1
        seen = _tasks(port)
        assert "'status': 'succeeded'" in seen[sent.ok]["result"]
        assert "'status': 'skipped_duplicate'" in seen[sent.duplicate]["result"]
        assert "id: Input should be a valid string" in seen[sent.refused]["exception"]
        assert "'probe:flower-dead' is dead: ProbeFailure" in seen[sent.dead]["exception"]
        assert "'probe:flower-dead' is dead" in seen[sent.dead_again]["exception"]
        # The dead letter ran its retries as one task, then failed once, not retried
        assert seen[sent.dead]["retries"] == 3
        _check_log(worker.child.log_tail(200_000), sent)
        _check_pages(browser, port, worker_name, sent)
        browser.save_screenshot(str(tmp_path / "flower-tasks.png"))
        # Flower's "Failed" filter finds the dead letters and the refused payload only
        browser.find_element(By.CSS_SELECTOR, "button[data-task-state='FAILURE']").click()
        failed = {sent.refused, sent.dead, sent.dead_again}
        WebDriverWait(browser, 30, poll_frequency=0.5).until(
            lambda d: _row_states(d) == dict.fromkeys(failed, "FAILURE")
        )
        browser.save_screenshot(str(tmp_path / "flower-failed.png"))
        # Flower's /metrics stays reachable
        status, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert f'flower_worker_online{{worker="{worker_name}"}} 1.0' in metrics
        assert 'flower_events_total{task="probe.run",type="task-failed"' in metrics

        # When Flower stops and starts again on the same database
        assert flower.stop() == 0
        fleet_flower.children.remove(flower)
        assert any(fleet_flower.settings.home.glob("flower.db*"))
        _start_flower(fleet_flower)
        # Then the tasks it saw before are still listed, in their state
        assert _states(port, want) == want
        browser.get(f"http://127.0.0.1:{port}/tasks")
        browser.find_element(By.CSS_SELECTOR, "button[data-task-state='']").click()
        _wait_rows(browser, want)
        browser.save_screenshot(str(tmp_path / "flower-tasks-after-restart.png"))
    finally:
        worker.child.stop(15)
