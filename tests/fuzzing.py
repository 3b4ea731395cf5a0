"""What the fuzz tests (``tests/test_fuzz_*.py``) share: how many inputs,
which seed, and the counts each one prints and asserts.

Every entry of outside input has two tests: a short one in the regular
suite (:data:`SHORT`, the same inputs on every run, so a failure there
reproduces) and one marked ``slow`` with :data:`SLOW` inputs, drawn from a
new seed each run unless ``FLEET_FUZZ_SEED`` is set; the seed is printed
with the counts, so a failure can be run again with it.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

#: Inputs per entry in the slow tests.
SLOW = 10_000
#: Inputs per entry in the regular suite.
SHORT = 300


def run(
    strategy: st.SearchStrategy[Any], examples: int, check: Callable[[Any], None], *, slow: bool
) -> int | None:
    """Call ``check`` on ``examples`` inputs drawn from ``strategy``; returns the
    seed of a slow run (None: the fixed inputs of the short one).

    A failing input is shrunk by hypothesis and raised with its value.
    """
    chosen = None
    if slow:
        chosen = int(os.environ.get("FLEET_FUZZ_SEED") or random.SystemRandom().randrange(2**32))

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not slow,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def one(value: Any) -> None:
        check(value)

    if chosen is not None:
        print(f"fuzzing with seed {chosen} (FLEET_FUZZ_SEED={chosen} draws these inputs again)")
        one = seed(chosen)(one)
    one()
    return chosen


def report(entry: str, counts: Counter[str], chosen: int | None) -> str:
    """One line of counts for ``entry``, printed by each fuzz test."""
    where = f"seed {chosen}" if chosen is not None else "fixed inputs"
    figures = ", ".join(f"{name} {value:,}" for name, value in sorted(counts.items()))
    line = f"fuzz {entry} ({where}): {figures}"
    print(line)
    return line
