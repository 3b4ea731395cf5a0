"""What the fleet did, on /metrics: counted from the results database."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fleetworks import events
from fleetworks.agent import Fleet
from fleetworks.metrics import serve


def scrape(fleet: Fleet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    server = serve(fleet.app, fleet.settings, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_outcomes_guard_events_dead_letters_and_events_are_counted(
    fleet: Fleet, run_agent: Any
) -> None:
    # Given runs that succeeded, one run twice, a rejected payload, a dead key
    # and an event nobody relayed yet
    for i in range(3):
        run_agent("probe.run", {"id": f"m-{i}"})
    run_agent("probe.run", {"id": "m-0"})
    run_agent("probe.run", {"id": 7})
    run_agent("probe.run", {"id": "m-dead", "fail_attempts": 99})
    for _ in range(3):
        run_agent("probe.run", {"id": "m-dead", "fail_attempts": 99})
    events.publish("order.placed", {"n": 1}, app=fleet.app)
    # When /metrics is scraped
    got = scrape(fleet)
    probe = (("agent", "probe.run"),)

    def value(name: str, **labels: str) -> float | None:
        return got.get((name, tuple(sorted({**dict(probe), **labels}.items()))))

    # Then every run is counted from the results database
    assert got[("fleetworks_ledger_up", ())] == 1
    assert value("fleetworks_outcomes_total", status="succeeded") == 3
    assert value("fleetworks_outcomes_total", status="skipped_duplicate") == 1
    assert value("fleetworks_outcomes_total", status="rejected") == 1
    assert value("fleetworks_outcomes_total", status="dead") == 1
    assert value("fleetworks_dead_letters") == 1
    assert value("fleetworks_guard_events_total", kind="skipped_duplicate") == 1
    assert got[("fleetworks_events_stored_total", (("topic", "order.placed"),))] == 1
    assert got[("fleetworks_events_pending", ())] == 1


def test_an_unreachable_database_is_a_gauge_not_a_failed_scrape(fleet: Fleet) -> None:
    fleet.settings = fleet.settings.model_copy(
        update={"database_url": "sqlite:////nonexistent/folder/fleet.db"}
    )
    got = scrape(fleet)
    assert got[("fleetworks_ledger_up", ())] == 0
    assert not any(name.startswith("fleetworks_outcomes") for name, _ in got)
