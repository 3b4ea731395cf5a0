"""A candidate process for tests/test_leadership.py: campaigns for one group in
a loop and, while it leads, acts through a TermFence; every step is a JSON
line in its report file (monotonic times: one clock for every process of
the machine).

    python -m tests.leader_candidate URL GROUP IDENTITY TTL_S DATABASE_URL REPORT [--turnover]

``URL``: the backend (``redis://...`` or ``etcd://...``). ``--turnover``: a
leader resigns after about a second of leading, so the lead changes hands
often. A loop that wakes up more than a TTL after it went to sleep (the
process was stopped) first reports ``still_leading()``, then sends the action
it had in flight with the term it had then, the way a stalled leader would.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import redis

from fleetworks.leadership import Election, Term, TermFence, backend_from_url


def main(argv: list[str]) -> None:
    url, group, identity, ttl, database_url, report_path = argv[:6]
    turnover = "--turnover" in argv
    ttl_s = float(ttl)
    loop_s = ttl_s / 4
    report = Path(report_path)

    def say(event: str, **fields: Any) -> None:
        line = {"event": event, "id": identity, "mono": time.monotonic(), **fields}
        with report.open("a") as out:
            out.write(json.dumps(line) + "\n")

    def elected(term: Term) -> None:
        say("elected", term=term.number)

    def deposed(term: Term) -> None:
        say("deposed", term=term.number)

    # Failovers are counted in the lock store's Redis, whichever the backend.
    locks_url = os.environ["FLEET_REDIS_URL"]
    backend = backend_from_url(url, lambda: redis.Redis.from_url(locks_url))
    election = Election(backend, group, identity, ttl_s, on_elected=elected, on_deposed=deposed)
    fence = TermFence(database_url)
    led_since = 0.0
    say("started")
    term, last = 0, time.monotonic()
    while True:
        time.sleep(loop_s * random.uniform(0.8, 1.2))
        if term and time.monotonic() - last > ttl_s:
            # Woke up from a stall longer than the lease, holding term ``term``.
            say("woke", term=term, still_leading=election.still_leading())
            say("late", term=term, accepted=fence.accept(group, term))
        if election.hold():
            led_since = led_since or time.monotonic()
            checked = time.monotonic()  # before the check: it said yes at or after this
            if election.still_leading():
                held = election.term
                say("act", term=held, checked=checked, accepted=fence.accept(group, held))
            if turnover and time.monotonic() - led_since > random.uniform(0.5, 1.5):
                election.resign()
                led_since = 0.0
                time.sleep(loop_s)
        term, last = election.term, time.monotonic()


if __name__ == "__main__":
    main(sys.argv[1:])
