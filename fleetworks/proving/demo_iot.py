"""The IoT part of ``fleetworks demo``: a leader per region, replicas killed and stopped.

It seeds a simulated fleet (``devices`` devices over ``regions`` regions,
:mod:`agents.iot`) and starts three ``fleetworks controllers`` replicas of
the reference deployment's regional controller (``tasks/iot.py``). Once the
regions are spread over the replicas it SIGKILLs the replica leading the
first region, waits for the regions it led to get new leaders, then
SIGSTOPs another leading replica for longer than its lease, waits for its
regions to move, and SIGCONTs it: the commands it had in flight go out with
its old term and the devices must refuse them.

It watches the leaders through the backend (``FLEET_LEADERSHIP_URL``) every
few tens of milliseconds and reports, per fault, the failover time (from the
signal until every region the replica led has another leader), and per
region the time with no acting leader (nobody leads, or the leader is
killed or stopped). From the durable record (``device_commands``, every
attempt with its term and whether the device took it) it counts commands
accepted, refused as stale, and accepted from a deposed leader: a command
taken with a term lower than one its region had already taken before it.
That last number must be 0. It also checks every device against the record:
a device must hold the setpoint and term of the last command it accepted
(its seeded setpoint and term 0 if it accepted none); a device that does not
counts as a command lost (``commands_lost``, must be 0).
"""

from __future__ import annotations

import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from fleetworks import progress
from fleetworks.db import reading
from fleetworks.leadership import Backend, LeadershipError, backend_for
from fleetworks.procs import Child
from fleetworks.services import FleetProcesses, echo
from fleetworks.settings import Settings

REPLICAS = 3
#: The lease of a region in the demo (FLEET_CONTROLLER_LEASE_S).
LEASE_S = 3.0
#: The demo's ``ok`` needs every failover under this many seconds.
MAX_FAILOVER_S = 5.0
POLL_S = 0.05


@dataclass
class Failover:
    fault: str
    replica: str
    groups: list[str]
    failover_s: float | None


@dataclass
class LeadersReport:
    devices: int
    groups: list[str]
    replicas: int
    backend: str
    lease_s: float
    spread: dict[str, list[str]] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)
    failover_max_s: float | None = None
    failover_p50_s: float | None = None
    commands_accepted: int = 0
    commands_refused_stale: int = 0
    accepted_from_deposed_leader: int = 0
    #: Devices whose setpoint and term are not those of the last command they
    #: accepted: an accepted command whose effect is missing or overwritten.
    commands_lost: int = 0
    late_commands_sent: int = 0
    late_commands_refused: int = 0
    #: Commands the stopped replica had begun before SIGSTOP, or sent on waking
    #: before its regions took a newer term (on SQLite its transaction may hold
    #: the write lock through the stop, so no newer term can land before it),
    #: and how many were accepted.
    in_flight_at_stop: int = 0
    in_flight_accepted: int = 0
    no_leader_s: dict[str, float] = field(default_factory=dict)
    terms: dict[str, list[int]] = field(default_factory=dict)
    wall_s: float = 0.0
    #: The demo's totals: ``tasks_lost`` is ``commands_lost``; a command is
    #: applied and recorded in one transaction, so none is applied twice.
    tasks_lost: int = 0
    effects_duplicated: int = 0
    ok: bool = False


def _pid(identity: str) -> int | None:
    tail = identity.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


class Watch:
    """The leaders of every group, polled; with what the demo did to each replica."""

    def __init__(self, backend: Backend, groups: list[str], children: list[Child]) -> None:
        self.backend = backend
        self.groups = groups
        self.by_pid = {ch.pid: ch for ch in children}
        self.leaders: dict[str, int | None] = dict.fromkeys(groups)
        self.terms: dict[str, list[int]] = {g: [] for g in groups}
        self.no_leader_s: dict[str, float] = dict.fromkeys(groups, 0.0)
        self.down: set[int] = set()  # pids killed or stopped now
        self._last = time.monotonic()

    def poll(self) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        for g in self.groups:
            try:
                info = self.backend.observe(g)
            except LeadershipError:
                info = None
            pid = _pid(info.leader) if info is not None else None
            if info is not None and (not self.terms[g] or self.terms[g][-1] != info.term):
                self.terms[g].append(info.term)
            self.leaders[g] = pid
            if pid is None or pid in self.down:
                self.no_leader_s[g] += elapsed

    def led_by(self, pid: int) -> list[str]:
        return [g for g, p in self.leaders.items() if p == pid]

    def spread(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {pid: [] for pid in self.by_pid if pid not in self.down}
        for g, p in self.leaders.items():
            if p is not None:
                out.setdefault(p, []).append(g)
        return out

    def until(self, done: Any, timeout_s: float) -> float | None:
        """Poll until ``done()``; the seconds it took, or None at the timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self.poll()
            if done():
                return time.monotonic() - started
            time.sleep(POLL_S)
        return None

    def spread_evenly(self) -> bool:
        alive = [p for p in self.by_pid if p not in self.down]
        spread = self.spread()
        if any(p is None or p in self.down for p in self.leaders.values()):
            return False
        counts = [len(spread.get(p, [])) for p in alive]
        return max(counts) - min(counts) <= 1


def _watermark(url: str) -> int:
    from tasks.schema import DEVICE_COMMANDS

    with reading(url) as conn:
        return int(conn.execute(select(func.max(DEVICE_COMMANDS.c.id))).scalar() or 0)


def count_commands(url: str, since_id: int) -> tuple[int, int, int]:
    """(accepted, refused, accepted from a deposed leader) of commands after ``since_id``."""
    from tasks.schema import DEVICE_COMMANDS

    d = DEVICE_COMMANDS.c
    with reading(url) as conn:
        rows = conn.execute(
            select(d.region, d.term, d.accepted).where(d.id > since_id).order_by(d.id)
        ).all()
    accepted = refused = deposed = 0
    highest: dict[str, int] = {}
    for region, term, ok in rows:
        if not ok:
            refused += 1
            continue
        accepted += 1
        if term < highest.get(region, 0):
            deposed += 1
        highest[region] = max(highest.get(region, 0), int(term))
    return accepted, refused, deposed


def lost_commands(url: str, since_id: int) -> int:
    """Devices that do not hold the setpoint and term of the last command they
    accepted after ``since_id`` (or, with none, still hold the seeded target
    and term 0)."""
    from agents.iot import TARGET
    from tasks.schema import DEVICE_COMMANDS, DEVICES

    d, c = DEVICES.c, DEVICE_COMMANDS.c
    with reading(url) as conn:
        held = {
            str(r[0]): (float(r[1]), int(r[2]))
            for r in conn.execute(select(d.device_id, d.setpoint, d.last_term))
        }
        last: dict[str, tuple[float, int]] = {}
        for device_id, setpoint, term in conn.execute(
            select(c.device_id, c.setpoint, c.term)
            .where(c.id > since_id, c.accepted.is_(True))
            .order_by(c.id)
        ):
            last[str(device_id)] = (float(setpoint), int(term))
    lost = 0
    for device_id, (setpoint, term) in held.items():
        want_setpoint, want_term = last.get(device_id, (TARGET, 0))
        if abs(setpoint - want_setpoint) > 1e-9 or term != want_term:
            lost += 1
    # An accepted command to a device the fleet does not have is lost too.
    return lost + len(set(last) - set(held))


@dataclass(frozen=True)
class Late:
    """What the stopped replica sent with the term it held, once resumed."""

    #: Begun after it was stopped (it woke believing it led) and landed once
    #: its region had taken a newer term: all must be refused.
    sent: int
    refused: int
    #: Begun before the stop, or landed before its region took a newer term:
    #: taken only if no newer term had.
    in_flight: int
    in_flight_accepted: int


def late_commands(
    url: str,
    since_id: int,
    sender_pid: int,
    held: dict[str, int],
    stopped_at: datetime,
    *,
    history_from: int = 0,
) -> Late:
    """The commands recorded after ``since_id`` from the resumed replica with a
    term no higher than the one it held for that region when it was stopped.

    Late: begun after ``stopped_at`` (``created_at`` is stamped before its
    transaction begins) and landed once its region had taken a newer term,
    so the fence must refuse it. In flight: begun before the stop, or landed
    before any newer term in its region. A cycle checks that it leads once,
    when it starts, so a replica stopped mid-cycle sends the rest of the cycle
    on waking; on SQLite, a replica stopped inside its transaction holds the
    write lock through the stop, so no newer leader can land a command first,
    and such a command is the newest its region has seen. Commands after
    ``history_from`` say which terms each region had taken.
    """
    from agents.iot import GROUP_PREFIX
    from tasks.schema import DEVICE_COMMANDS

    d = DEVICE_COMMANDS.c
    with reading(url) as conn:
        rows = conn.execute(
            select(d.id, d.sender, d.region, d.term, d.accepted, d.created_at)
            .where(d.id > min(history_from, since_id))
            .order_by(d.id)
        ).all()
    taken: dict[str, int] = {}
    late: list[bool] = []
    early: list[bool] = []
    for row_id, sender, region, term, ok, at in rows:
        newer_taken = taken.get(region, 0) > term
        if ok:
            taken[region] = max(taken.get(region, 0), int(term))
        mine = _pid(str(sender)) == sender_pid and term <= held.get(GROUP_PREFIX + region, 0)
        if row_id <= since_id or not mine:
            continue
        (late if _aware(at) >= stopped_at and newer_taken else early).append(bool(ok))
    return Late(len(late), sum(1 for ok in late if not ok), len(early), sum(early))


def _note_late(report: LeadersReport, late: Late) -> None:
    report.late_commands_sent, report.late_commands_refused = late.sent, late.refused
    report.in_flight_at_stop, report.in_flight_accepted = late.in_flight, late.in_flight_accepted


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _fault(
    watch: Watch, victim: Child, sig: signal.Signals, label: str, timeout_s: float
) -> Failover:
    groups = watch.led_by(victim.pid)
    victim.signal(sig)
    watch.down.add(victim.pid)
    echo(f"iot demo: {label} replica {victim.name} (pid {victim.pid}) leading {groups}")

    def moved() -> bool:
        return all(watch.leaders[g] not in (None, victim.pid) for g in groups)

    took = watch.until(moved, timeout_s)
    if took is not None:
        echo(f"iot demo: its regions lead elsewhere after {took:.2f}s")
    return Failover(label, victim.name, groups, round(took, 2) if took is not None else None)


def run_iot(
    settings: Settings, *, devices: int, regions: int, timeout_s: float, lease_s: float = LEASE_S
) -> LeadersReport:
    from agents.iot import region_groups, seed_devices

    url = settings.database
    groups = region_groups(regions)
    seed_devices(url, devices, regions)
    since = _watermark(url)
    env = {
        "FLEET_IOT_REGIONS": str(regions),
        "FLEET_CONTROLLER_LEASE_S": str(lease_s),
        # A cycle that spends most of its time sending: a replica stopped at a
        # random moment is most likely stopped with commands in flight.
        "FLEET_IOT_PER_CYCLE": "15",
        "FLEET_IOT_SEND_GAP_S": "0.03",
    }
    fleet = FleetProcesses(settings, env=env)
    backend = backend_for(settings)
    report = LeadersReport(devices, groups, REPLICAS, backend.name, lease_s)
    started = time.monotonic()
    try:
        children = [fleet.controllers(f"controllers-{i + 1}") for i in range(REPLICAS)]
        watch = Watch(backend, groups, children)
        progress.update("iot: regions spread", 0, 1)
        if watch.until(watch.spread_evenly, min(timeout_s, 60)) is None:
            raise RuntimeError(f"regions not spread over the replicas: {watch.spread()}")
        report.spread = {
            next(ch.name for ch in children if ch.pid == p): gs for p, gs in watch.spread().items()
        }
        echo(f"iot demo: {devices} devices, regions spread {report.spread}")
        # Time with no acting leader counts from here: the start-up is not a failover.
        watch.no_leader_s = dict.fromkeys(groups, 0.0)
        watch.until(lambda: False, 2.0)  # steady commands for a while
        victim = next(ch for ch in children if watch.led_by(ch.pid))
        report.failovers.append(_fault(watch, victim, signal.SIGKILL, "SIGKILL", 30))
        progress.update("iot: faults", 1, 2)
        watch.until(watch.spread_evenly, 30)
        watch.until(lambda: False, 1.0)
        stopped = next(ch for ch in children if ch.pid not in watch.down and watch.led_by(ch.pid))
        held = {g: watch.terms[g][-1] for g in watch.led_by(stopped.pid) if watch.terms[g]}
        report.failovers.append(_fault(watch, stopped, signal.SIGSTOP, "SIGSTOP", 30))
        # Stamped once it is frozen: what it began before this, it began before the stop.
        stopped_at = datetime.now(UTC)
        watch.until(lambda: False, max(0.0, lease_s + 1.0))  # well past its lease
        before_cont = _watermark(url)
        stopped.signal(signal.SIGCONT)
        watch.down.discard(stopped.pid)
        echo(f"iot demo: SIGCONT {stopped.name}")
        watch.until(lambda: False, lease_s + 2.0)  # it wakes, acts late, steps down, rejoins
        progress.update("iot: faults", 2, 2)
        _note_late(
            report,
            late_commands(url, before_cont, stopped.pid, held, stopped_at, history_from=since),
        )
        report.no_leader_s = {g: round(s, 2) for g, s in watch.no_leader_s.items()}
        report.terms = watch.terms
    finally:
        for ch in fleet.children:
            ch.signal(signal.SIGCONT)
        fleet.stop()
    accepted, refused, deposed = count_commands(url, since)
    report.commands_accepted = accepted
    report.commands_refused_stale = refused
    report.accepted_from_deposed_leader = deposed
    report.commands_lost = report.tasks_lost = lost_commands(url, since)
    report.wall_s = round(time.monotonic() - started, 1)
    return summarize(report)


def summarize(report: LeadersReport) -> LeadersReport:
    times = [f.failover_s for f in report.failovers if f.failover_s is not None]
    report.failover_max_s = max(times) if times else None
    report.failover_p50_s = round(statistics.median(times), 2) if times else None
    every = len(times) == len(report.failovers) == 2
    report.ok = (
        every
        and report.accepted_from_deposed_leader == 0
        and report.commands_lost == 0
        and report.late_commands_sent == report.late_commands_refused
        and report.commands_accepted > 0
        and (report.backend != "redis" or (report.failover_max_s or 0) < MAX_FAILOVER_S)
    )
    return report


def render(report: LeadersReport) -> str:
    verdict = "OK" if report.ok else "NOT OK"
    faults = ", ".join(f"{f.fault} {f.failover_s} s" for f in report.failovers)
    return "\n".join(
        [
            f"leaders: {verdict}  {report.devices} devices in {len(report.groups)} regions, "
            f"{report.replicas} controller replicas on {report.backend} "
            f"(lease {report.lease_s:g} s)",
            f"  failovers  {faults}  (max {report.failover_max_s} s, p50 "
            f"{report.failover_p50_s} s)",
            f"  commands   {report.commands_accepted} accepted, "
            f"{report.commands_refused_stale} refused as stale, "
            f"{report.accepted_from_deposed_leader} accepted from a deposed leader, "
            f"{report.commands_lost} lost",
            f"  late       {report.late_commands_sent} sent after SIGCONT with the old term, "
            f"{report.late_commands_refused} refused; {report.in_flight_at_stop} in flight "
            f"at the stop, {report.in_flight_accepted} of them taken before any newer term",
            f"  no leader  {report.no_leader_s}",
        ]
    )


def as_dict(report: LeadersReport) -> dict[str, Any]:
    return asdict(report)
