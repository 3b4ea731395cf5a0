"""Moves the wall clock of every Python process of a test run, for ``make test-dates``.

With ``FLEET_TEST_CLOCK_OFFSET_S`` set and this folder on ``PYTHONPATH``,
each Python process (pytest, workers, beats, the CLI) starts with its wall
clock (``time.time``, ``datetime.now``, ...) moved by that many seconds,
through ``time-machine``, and ticking. The offset, not a fixed moment, is
what every process shares, so they agree with each other whenever each one
started. Monotonic clocks, sleeps and timeouts are left alone, and so are the
servers (Redis, PostgreSQL), as in production.
"""

from __future__ import annotations

import os

_offset = os.environ.get("FLEET_TEST_CLOCK_OFFSET_S")
if _offset:
    from datetime import UTC, datetime, timedelta

    import time_machine

    _traveller = time_machine.travel(
        datetime.now(UTC) + timedelta(seconds=float(_offset)), tick=True
    )
    _traveller.start()
