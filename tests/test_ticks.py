"""Slots, tick ids and misfire policies (pure: no Redis, no beat)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone

import pytest
from celery.schedules import crontab
from celery.schedules import schedule as every
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetworks import constants as c
from fleetworks.ticks import (
    Misfire,
    UnsupportedSchedule,
    check,
    due_slots,
    misfire_of,
    next_slot,
    plan,
    tick_id,
)

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)  # a Sunday


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


def at(moment: str) -> datetime:
    """``at("2026-03-01 23:15")``: a moment in UTC."""
    return datetime.fromisoformat(moment).replace(tzinfo=UTC)


# --- A brute-force oracle for crontabs, independent of fleetworks.ticks ------


def matches(cron: crontab, moment: datetime) -> bool:
    """Celery's rule, restated: a whole minute whose minute, hour, day of the
    month, month *and* day of the week (Sunday is 0) the crontab all lists."""
    m = moment.astimezone(UTC)
    return (
        m.second == 0
        and m.microsecond == 0
        and m.minute in cron.minute
        and m.hour in cron.hour
        and m.day in cron.day_of_month
        and m.month in cron.month_of_year
        and (m.weekday() + 1) % 7 in cron.day_of_week
    )


def oracle(cron: crontab, after: datetime, now: datetime) -> list[datetime]:
    """Every minute in ``(after, now]`` that ``cron`` matches, one minute at a time."""
    minute = after.astimezone(UTC).replace(second=0, microsecond=0)
    found = []
    while (minute := minute + timedelta(minutes=1)) <= now:
        if matches(cron, minute):
            found.append(minute)
    return found


def cron(spec: str) -> crontab:
    minute, hour, dom, month, dow = spec.split()
    return crontab(minute, hour, dow, dom, month)


#: Crontab shapes (minute hour day-of-month month day-of-week).
SHAPES = [
    "*/15 * * * *",
    "0 */6 * * *",
    "30 23 * * *",
    "0 0 1 * *",
    "0 12 * * 1-5",
    "0 0 29 * *",
    "0 0 31 * *",
    "0 0 29 2 *",
    "59 23 28-31 * *",
    "0 9 1-7 * 1",
]
#: The longest window the oracle walks (4320 minutes).
WINDOW = timedelta(days=3)

#: Days around which schedules go wrong: month and year ends, February 28/29
#: of leap, non-leap and century years.
EDGE_DAYS = [
    date(2026, 12, 31),
    date(2027, 2, 28),
    date(2028, 2, 28),
    date(2028, 2, 29),
    date(2100, 2, 28),
    date(2000, 2, 29),
    date(2026, 4, 30),
    date(2027, 1, 31),
    date(2026, 11, 22),
]

near_edges = st.builds(
    lambda day, offset: datetime.combine(day + timedelta(days=1), time(), UTC) + secs(offset),
    st.sampled_from(EDGE_DAYS),
    st.one_of(
        st.sampled_from([0, -0.001, -1, -30, -60, -900, -3600, 59.999, 60]),
        st.floats(min_value=-2 * 86400, max_value=86400),
    ),
)
moments = st.one_of(
    near_edges,
    st.datetimes(datetime(1999, 12, 1), datetime(2101, 1, 31), timezones=st.just(UTC)),
)
shapes = st.sampled_from(SHAPES)


def test_interval_slots_are_multiples_of_the_interval_since_the_epoch() -> None:
    ten = every(secs(10))
    assert next_slot(ten, T0 + secs(3)) == T0 + secs(10)
    assert next_slot(ten, T0) == T0 + secs(10), "strictly after"
    assert next_slot(every(secs(0.5)), T0 + secs(0.2)) == T0 + secs(0.5)


def test_crontab_slots_are_its_matches() -> None:
    quarter = cron("*/15 * * * *")
    assert next_slot(quarter, T0 + secs(7 * 60 + 31)) == T0 + secs(15 * 60)
    assert next_slot(quarter, T0 + secs(15 * 60)) == T0 + secs(30 * 60), "strictly after"
    assert next_slot(quarter, at("2026-12-31 23:59:59.500")) == at("2027-01-01")
    assert next_slot(cron("30 23 * * *"), at("2027-02-28 23:30")) == at("2027-03-01 23:30")
    assert next_slot(cron("0 0 1 * *"), at("2028-02-28 12:00")) == at("2028-03-01")
    assert next_slot(cron("0 0 31 * *"), at("2027-01-31 00:00:01")) == at("2027-03-31")
    # Weekdays: 2026-11-21 is a Saturday, 2026-11-23 a Monday.
    assert next_slot(cron("0 12 * * 1-5"), at("2026-11-20 12:00")) == at("2026-11-23 12:00")
    local = at("2026-11-22 10:07").astimezone(timezone(timedelta(hours=2)))
    assert next_slot(quarter, local) == T0 + secs(15 * 60)


def test_crontab_slots_do_not_depend_on_the_clock() -> None:
    # Given a crontab whose clock reads a different year than the moment asked
    far = crontab(minute="*/15", nowfun=lambda: datetime(1999, 6, 1, 8, 3, tzinfo=UTC))
    assert next_slot(far, at("2031-03-01 23:59")) == at("2031-03-02")
    slots, count = due_slots(far, at("2031-03-01 23:00"), at("2031-03-02 01:00"), 100)
    assert count == 8 and slots == [at("2031-03-01 23:15") + secs(900 * i) for i in range(8)]


def test_rare_crontabs_are_found_and_impossible_ones_named() -> None:
    leap_day = cron("0 0 29 2 *")
    assert next_slot(leap_day, at("2025-03-01")) == at("2028-02-29")
    assert next_slot(leap_day, at("2096-02-29")) == at("2104-02-29"), "2100 is not a leap year"
    # Day of month and day of week must both match (Celery's rule, not cron's):
    # the next 29 February that is a Monday.
    assert next_slot(cron("0 0 29 2 1"), at("2025-03-01")) == at("2044-02-29")
    assert next_slot(cron("0 9 1-7 * 1"), at("2026-11-03")) == at("2026-12-07 09:00")
    feb30 = cron("0 0 30 2 *")
    with pytest.raises(ValueError, match=r"crontab: 0 0 30 2 \*.*matches no minute"):
        next_slot(feb30, T0)
    with pytest.raises(UnsupportedSchedule, match=r"'feb30'.*0 0 30 2"):
        check("feb30", feb30)
    check("leap-day", leap_day)


def test_catch_up_across_midnight_runs_the_previous_days_slots_too() -> None:
    # Given */15 handled to 23:00, and no beat leading until 01:00:30
    p = plan(
        cron("*/15 * * * *"), Misfire.CATCH_UP, at("2026-03-01 23:00"), at("2026-03-02 01:00:30")
    )
    assert p.run == [at("2026-03-01 23:15") + secs(900 * i) for i in range(8)]
    assert p.dropped == 0 and p.handled_to == at("2026-03-02 01:00")
    assert p.next_slot == at("2026-03-02 01:15")


def test_catch_up_over_a_whole_day_runs_each_quarter_once() -> None:
    quarter = cron("*/15 * * * *")
    p = plan(quarter, Misfire.CATCH_UP, at("2028-02-28"), at("2028-02-29"))
    assert len(p.run) == 96 == len(set(p.run)) and p.dropped == 0
    assert all(matches(quarter, s) for s in p.run) and p.run == sorted(p.run)
    assert p.run[0] == at("2028-02-28 00:15") and p.run[-1] == at("2028-02-29")


def test_crontab_catch_up_is_capped_and_keeps_the_newest() -> None:
    every_minute = cron("* * * * *")
    p = plan(every_minute, Misfire.CATCH_UP, at("2026-12-31"), at("2027-01-01 00:00:01"))
    assert len(p.run) == c.CATCH_UP_MAX_SLOTS and p.dropped == 1440 - c.CATCH_UP_MAX_SLOTS
    assert p.run[-1] == at("2027-01-01") and p.run[0] == at("2027-01-01") - timedelta(minutes=999)


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


@settings(max_examples=80, deadline=None)
@given(policy=st.sampled_from([Misfire.COALESCE, Misfire.CATCH_UP]), data=st.data())
def test_a_due_slot_always_runs_under_coalesce_and_catch_up(
    policy: Misfire, data: st.DataObject
) -> None:
    # Given an interval or a crontab, looked at at irregular times
    sched, step_max = data.draw(
        st.sampled_from([(every(secs(3)), 40.0), (cron("*/15 * * * *"), 3 * 3600.0)])
    )
    steps = data.draw(st.lists(st.floats(0.01, step_max), min_size=1, max_size=20))
    handled, now = T0, T0
    for step in steps:
        now += secs(step)
        p = plan(sched, policy, handled, now)
        # Then whenever a slot is due, at least the latest due slot runs
        if next_slot(sched, handled) <= now:
            assert p.run and p.run[-1] == p.handled_to > handled
            assert next_slot(sched, p.handled_to) > now
        else:
            assert p.run == [] and p.handled_to == handled
        handled = p.handled_to


# --- Crontabs against the brute-force oracle ---------------------------------


@settings(max_examples=100, deadline=None)
@given(spec=shapes, after=moments)
def test_next_crontab_slot_is_the_oracles_first_match(spec: str, after: datetime) -> None:
    sched = cron(spec)
    window = after + WINDOW
    first = next_slot(sched, after)
    found = oracle(sched, after, window)
    assert first > after and matches(sched, first)
    # The oracle's first match within the window, or, if none, a later match
    assert first == found[0] if found else first > window


@settings(max_examples=100, deadline=None)
@given(spec=shapes, after=moments, minutes=st.floats(0, 1), keep=st.sampled_from([1, 3, 1000]))
def test_due_crontab_slots_are_the_oracles(
    spec: str, after: datetime, minutes: float, keep: int
) -> None:
    sched = cron(spec)
    now = after + minutes * WINDOW
    expected = oracle(sched, after, now)
    assert due_slots(sched, after, now, keep) == (expected[-keep:], len(expected))


def reference_plan(
    sched: crontab, policy: Misfire, after: datetime, now: datetime
) -> tuple[list[datetime], int, datetime]:
    """What ``policy`` runs, how many slots it drops, and the new handled_to,
    from the oracle and the rules in the module's docstring."""
    due = oracle(sched, after, now)
    if not due:
        return [], 0, after
    latest = due[-1]
    if policy is Misfire.CATCH_UP:
        run = due[-c.CATCH_UP_MAX_SLOTS :]
    elif policy is Misfire.COALESCE:
        run = [latest]
    else:
        # On time: due for at most the grace, or half the period if shorter.
        following = oracle(sched, latest, latest + secs(2 * c.MISFIRE_GRACE_S))
        grace = c.MISFIRE_GRACE_S
        if following:
            grace = min(grace, (following[0] - latest).total_seconds() / 2)
        run = [latest] if (now - latest).total_seconds() <= grace else []
    return run, len(due) - len(run), latest


@settings(max_examples=100, deadline=None)
@given(
    spec=shapes,
    policy=st.sampled_from(list(Misfire)),
    after=moments,
    minutes=st.floats(0, 1),
    late=st.one_of(st.none(), st.floats(0, 2 * c.MISFIRE_GRACE_S)),
)
def test_plan_over_crontabs_follows_its_policy(
    spec: str, policy: Misfire, after: datetime, minutes: float, late: float | None
) -> None:
    sched = cron(spec)
    now = after + minutes * WINDOW
    if late is not None:
        # Look shortly after a match, so that skip sees on-time slots too
        due = oracle(sched, after, now)
        now = due[-1] + secs(late) if due else now
    run, dropped, handled_to = reference_plan(sched, policy, after, now)
    p = plan(sched, policy, after, now)
    assert (p.run, p.dropped, p.handled_to) == (run, dropped, handled_to)
    assert p.next_slot == next_slot(sched, handled_to) and matches(sched, p.next_slot)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.floats(min_value=1, max_value=6 * 3600), min_size=1, max_size=20))
def test_crontab_catch_up_runs_each_slot_exactly_once_over_any_sequence_of_looks(
    steps: list[float],
) -> None:
    sched = cron("*/15 * * * *")
    start = at("2027-12-31 22:00")
    handled, now, ran = start, start, []
    for step in steps:
        now += secs(step)
        p = plan(sched, Misfire.CATCH_UP, handled, now)
        ran += p.run
        handled = p.handled_to
    assert ran == oracle(sched, start, handled)
