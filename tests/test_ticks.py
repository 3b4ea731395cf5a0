"""Slots, tick ids and misfire policies (pure: no Redis, no beat)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from celery.schedules import crontab
from celery.schedules import schedule as every
from hypothesis import given
from hypothesis import strategies as st

from config import app
from fleetworks import constants as c
from fleetworks.ticks import Misfire, check, misfire_of, next_slot, plan, tick_id

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


def test_interval_slots_are_multiples_of_the_interval_since_the_epoch() -> None:
    ten = every(secs(10))
    assert next_slot(ten, T0 + secs(3)) == T0 + secs(10)
    assert next_slot(ten, T0) == T0 + secs(10), "strictly after"
    assert next_slot(every(secs(0.5)), T0 + secs(0.2)) == T0 + secs(0.5)


def test_crontab_slots_are_its_matches() -> None:
    quarter = crontab(minute="*/15")
    quarter.app = app
    assert next_slot(quarter, T0 + secs(7 * 60 + 31)) == T0 + secs(15 * 60)
    assert next_slot(quarter, T0 + secs(15 * 60)) == T0 + secs(30 * 60)


def test_a_new_entry_starts_at_its_next_slot() -> None:
    p = plan(every(secs(10)), Misfire.COALESCE, None, T0 + secs(4))
    assert p.run == [] and p.handled_to == T0 + secs(4) and p.next_slot == T0 + secs(10)


def test_one_due_slot_runs_under_every_policy() -> None:
    for policy in Misfire:
        p = plan(every(secs(10)), policy, T0, T0 + secs(10.3))
        assert p.run == [T0 + secs(10)], policy
        assert p.dropped == 0 and p.handled_to == T0 + secs(10)


def test_coalesce_runs_the_latest_missed_slot_once() -> None:
    # Given slots up to T0 handled, and no beat leading for 55 s
    p = plan(every(secs(10)), Misfire.COALESCE, T0, T0 + secs(55))
    assert p.run == [T0 + secs(50)]
    assert p.dropped == 4
    assert p.next_slot == T0 + secs(60)


def test_catch_up_runs_every_missed_slot_in_order() -> None:
    p = plan(every(secs(10)), Misfire.CATCH_UP, T0, T0 + secs(55))
    assert p.run == [T0 + secs(s) for s in (10, 20, 30, 40, 50)]
    assert p.dropped == 0


def test_catch_up_is_capped_and_counts_what_it_dropped() -> None:
    extra = 250
    p = plan(every(secs(1)), Misfire.CATCH_UP, T0, T0 + secs(c.CATCH_UP_MAX_SLOTS + extra))
    assert len(p.run) == c.CATCH_UP_MAX_SLOTS
    assert p.dropped == extra
    assert p.run[-1] == T0 + secs(c.CATCH_UP_MAX_SLOTS + extra), "the newest are kept"


def test_skip_runs_a_slot_on_time_but_not_a_missed_one() -> None:
    minute = every(secs(60))
    on_time = plan(minute, Misfire.SKIP, T0, T0 + secs(60 + c.MISFIRE_GRACE_S - 1))
    assert on_time.run == [T0 + secs(60)]
    late = plan(minute, Misfire.SKIP, T0, T0 + secs(60 + c.MISFIRE_GRACE_S + 1))
    assert late.run == [] and late.dropped == 1 and late.handled_to == T0 + secs(60)
    # The grace is at most half the period: a 2-s entry 1.5 s late is missed.
    assert plan(every(secs(2)), Misfire.SKIP, T0, T0 + secs(3.5)).run == []


def test_tick_ids_are_deterministic_and_name_entry_and_slot() -> None:
    assert tick_id("poll-prices", T0 + secs(10)) == "poll-prices@2026-11-22T10:00:10.000Z"
    local = (T0 + secs(10)).astimezone(timezone(timedelta(hours=2)))
    assert tick_id("poll-prices", local) == tick_id("poll-prices", T0 + secs(10))


def test_unsupported_schedules_and_policies_are_named() -> None:
    class Jittered(every):  # type: ignore[misc]
        """A schedule of its own kind: its slots cannot be enumerated."""

    with pytest.raises(ValueError, match=r"'jittered'.*neither an interval nor a crontab"):
        check("jittered", Jittered(secs(5)))
    with pytest.raises(
        ValueError, match=r"'poll'.*misfire must be one of coalesce, catch_up, skip"
    ):
        misfire_of("poll", "twice")
    assert misfire_of("poll", None) is Misfire.COALESCE


@given(
    period=st.sampled_from([0.5, 1, 7, 10, 60]),
    steps=st.lists(st.floats(min_value=0.01, max_value=40), min_size=1, max_size=40),
)
def test_catch_up_runs_each_slot_exactly_once_over_any_sequence_of_looks(
    period: float, steps: list[float]
) -> None:
    # Given a beat that looks at irregular times (stalls, failovers included)
    sched, policy = every(secs(period)), Misfire.CATCH_UP
    handled, now, ran = T0, T0, []
    for step in steps:
        now += secs(step)
        p = plan(sched, policy, handled, now)
        ran += p.run
        handled = p.handled_to
        assert p.handled_to <= now and p.next_slot > now - secs(period)
    # Then every slot in (T0, handled] ran once, in order
    expected, slot = [], next_slot(sched, T0)
    while slot <= handled:
        expected.append(slot)
        slot = next_slot(sched, slot)
    assert ran == expected


@given(
    policy=st.sampled_from([Misfire.COALESCE, Misfire.SKIP]),
    steps=st.lists(st.floats(min_value=0.01, max_value=40), min_size=1, max_size=40),
)
def test_coalesce_and_skip_never_run_a_slot_twice_or_in_the_future(
    policy: Misfire, steps: list[float]
) -> None:
    sched = every(secs(3))
    handled, now, ran = T0, T0, []
    for step in steps:
        now += secs(step)
        p = plan(sched, policy, handled, now)
        assert len(p.run) <= 1 and all(handled < s <= now for s in p.run)
        ran += p.run
        handled = p.handled_to
    assert ran == sorted(set(ran))
