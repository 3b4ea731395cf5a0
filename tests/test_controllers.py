"""Controllers: ``fleetworks controllers`` replicas spread the groups, take over
a killed replica's groups within the lease and one renewal, and a stopped
leader's late command is refused where it lands; the IoT demo on top."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fleetworks.controllers import GroupLoop, _Share, make_spec
from fleetworks.controllers import Replicas as ControllerReplicas
from fleetworks.leadership import Backend, backend_from_url
from fleetworks.settings import Settings
from tests.conftest import LOCKS_URL, EtcdServer, wait_for
from tests.test_cli import embedded_env, fleetworks

REPO = Path(__file__).resolve().parent.parent
#: The controllers' lease in these tests, and their renewal interval.
LEASE_S = 2.0
RENEW_S = LEASE_S / 3
#: What a busy 2-core machine adds on top of lease + renewal.
SLACK_S = 1.5


class Replicas:
    """``fleetworks -A tests.controllers_app controllers`` processes over ``groups``."""

    def __init__(self, groups: list[str], database_url: str, folder: Path) -> None:
        self.groups, self.folder = groups, folder
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            FLEET_DATABASE_URL=database_url,
            FLEET_HOME=str(folder / ".fleet"),
            FLEET_CONTROLLER_LEASE_S=str(LEASE_S),
            CTL_GROUPS=",".join(groups),
            CTL_APP_NAME=f"ctl{uuid.uuid4().hex[:8]}",
            CTL_REPORT_DIR=str(folder),
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.backend: Backend = backend_from_url(None, lambda: redis.Redis.from_url(LOCKS_URL))

    def start(self, count: int) -> None:
        for i in range(count):
            log = (self.folder / f"replica-{i}.log").open("ab")
            argv = [sys.executable, "-m", "fleetworks", "-A", "tests.controllers_app",
                    "controllers"]  # fmt: skip
            self.procs.append(
                subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=log)
            )

    def leaders(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for g in self.groups:
            info = self.backend.observe(g)
            out[g] = int(info.leader.rsplit("/", 1)[1]) if info is not None else None
        return out

    def term(self, group: str) -> int:
        info = self.backend.observe(group)
        return info.term if info is not None else 0

    def spread(self) -> dict[int, list[str]] | None:
        """Leaders per live replica, once every group is led and each live one leads one."""
        live = [p.pid for p in self.procs if p.poll() is None]
        by: dict[int, list[str]] = {pid: [] for pid in live}
        for g, pid in self.leaders().items():
            if pid not in by:
                return None
            by[pid].append(g)
        return by if all(len(gs) >= 1 for gs in by.values()) else None

    def events(self, pid: int) -> list[dict[str, Any]]:
        path = self.folder / f"{pid}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def replicas(sqlite_url: str, tmp_path: Path, redis_client: redis.Redis) -> Iterator[Replicas]:
    tag = uuid.uuid4().hex[:6]
    group = Replicas([f"region:{r}-{tag}" for r in ("eu", "us", "ap")], sqlite_url, tmp_path)
    yield group
    group.stop()


def test_three_replicas_spread_three_groups(replicas: Replicas) -> None:
    # Given three replicas over three groups
    replicas.start(3)
    # Then each leads exactly one of them (none leads all while another leads none)
    spread = wait_for(replicas.spread, 60, "the groups spread")
    assert sorted(len(gs) for gs in spread.values()) == [1, 1, 1], spread
    # and it stays that way: each leader's loop runs its group and its actions land
    seen = {pid: len(replicas.events(pid)) for pid in spread}
    time.sleep(2 * LEASE_S)
    assert replicas.spread() == spread
    for pid, groups in spread.items():
        acts = [e for e in replicas.events(pid)[seen[pid] :] if e["event"] == "act"]
        assert {e["group"] for e in acts} == set(groups)
        assert all(e["accepted"] for e in acts)


def test_a_killed_replicas_group_is_taken_within_the_lease_and_one_renewal(
    replicas: Replicas,
) -> None:
    replicas.start(3)
    spread = wait_for(replicas.spread, 60, "the groups spread")
    victim = next(iter(spread))
    (group,) = spread[victim]
    term = replicas.term(group)
    # When the replica leading it is killed with no chance to resign
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()

    def taken() -> bool:
        return replicas.leaders()[group] not in (None, victim)

    wait_for(taken, 30, "another leader")
    took = time.monotonic() - killed
    print(f"\ncontroller failover after SIGKILL: {took:.2f} s")
    # Then another replica leads it in a higher term, within lease + one renewal
    assert took < LEASE_S + RENEW_S + SLACK_S, took
    assert replicas.term(group) > term
    # and the two left share the three groups (two and one)
    assert sorted(len(gs) for gs in wait_for(replicas.spread, 10, "a spread").values()) == [1, 2]


def test_a_stopped_leaders_late_command_is_refused_by_the_fence(replicas: Replicas) -> None:
    replicas.start(3)
    spread = wait_for(replicas.spread, 60, "the groups spread")
    stalled = next(iter(spread))
    (group,) = spread[stalled]
    start = len(replicas.events(stalled))

    def in_flight() -> int | None:
        events = replicas.events(stalled)
        fresh = len(events) > start and events[-1]["event"] == "checked"
        return len(events) if fresh else None

    # Given a leader with a command in flight (it checked that it leads)
    seen: int = wait_for(in_flight, 20, "a command in flight")
    # When it is stopped past its lease, before the command lands
    os.kill(stalled, signal.SIGSTOP)
    stopped = time.monotonic()
    checked = replicas.events(stalled)[seen - 1]
    assert len(replicas.events(stalled)) == seen, "stopped with the command in flight"

    def successor() -> int | None:
        pid = replicas.leaders()[group]
        return pid if pid not in (None, stalled) else None

    new = wait_for(successor, 30, "another leader")
    new_term = replicas.term(group)
    assert new_term > checked["term"]
    wait_for(
        lambda: any(
            e["event"] == "act" and e["group"] == group and e["term"] == new_term and e["accepted"]
            for e in replicas.events(new)
        ),
        10,
        "the new leader to act",
    )
    # (its lease ran from its last renewal, before the stop: a successor may
    # lead before LEASE_S has passed since the stop; it stays stopped past that)
    time.sleep(max(0.0, LEASE_S - (time.monotonic() - stopped)))
    os.kill(stalled, signal.SIGCONT)

    # Then the command it had in flight lands with its old term and is refused
    def late() -> dict[str, Any] | None:
        acts = [e for e in replicas.events(stalled)[seen:] if e["event"] == "act"]
        return acts[0] if acts else None

    landed = wait_for(late, 15, "the late command")
    assert landed["term"] == checked["term"] and landed["group"] == group
    assert landed["accepted"] is False
    # and it sends nothing more for the group with its old term
    time.sleep(1.0)
    old = [e for e in replicas.events(stalled)[seen - 1 :] if e["term"] == checked["term"]]
    assert [e["event"] for e in old] == ["checked", "act"], old


class FailsOnce:
    """A backend whose first campaign raises what no backend should."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.failed = inner, inner.name, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def campaign(self, group: str, identity: str, ttl_s: float, floor: int = 0) -> Any:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unexpected failure in a campaign")
        return self.inner.campaign(group, identity, ttl_s, floor=floor)


def test_a_failed_round_does_not_end_the_groups_thread(
    sqlite_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A round that raises (before: the group's thread ended, and the group
    had no leader in this replica until it restarted) is logged, and the next
    round campaigns."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    cycles: list[int] = []
    spec = make_spec(lambda ctx: cycles.append(ctx.term), [group], 0.1, name="t.fails_once")
    settings = Settings(database_url=sqlite_url, redis_url=LOCKS_URL)
    flaky = FailsOnce(backend_from_url(None, lambda: redis.Redis.from_url(LOCKS_URL)))
    beats = ControllerReplicas(lambda: redis.Redis.from_url(LOCKS_URL), group, "me/1", LEASE_S)
    loop = GroupLoop(
        spec, group, backend=flaky, settings=settings, identity="me/1", ttl_s=LEASE_S,
        share=_Share(1, beats),
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(cycles) >= 2, 10, "cycles after a failed round")
        assert flaky.failed and thread.is_alive()
        assert "round for" in caplog.text and "failed" in caplog.text
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert flaky.observe(group) is None  # resigned on stop


@pytest.mark.parametrize(
    ("groups", "every_s", "wrong"),
    [
        ([], 1.0, "non-empty"),
        ("region:eu", 1.0, "non-empty list"),
        (["a", "a"], 1.0, "distinct"),
        (["has space"], 1.0, "without whitespace"),
        (["a"], 0.0, "every_s must be positive"),
    ],
)
def test_a_bad_declaration_names_what_is_wrong(groups: Any, every_s: float, wrong: str) -> None:
    with pytest.raises(ValueError, match=wrong):
        make_spec(lambda ctx: None, groups, every_s)


@pytest.mark.parametrize("backend", ["redis", "etcd"])
def test_demo_leaders_part_has_no_command_from_a_deposed_leader(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The IoT scenario of ``fleetworks demo`` on each backend: a replica killed,
    another stopped past its lease; nothing taken from a deposed leader, nothing
    lost, and on Redis every failover under 5 s."""
    env = embedded_env(tmp_path / ".fleet")
    if backend == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        env["FLEET_LEADERSHIP_URL"] = f"{server.url}/iot-{uuid.uuid4().hex[:8]}"
    done = fleetworks(
        "demo", "--mentions", "0", "--products", "0", "--tickets", "0", "--files", "0",
        "--devices", "300", "--regions", "3", "--json",
        env=env, cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    leaders = report["leaders"]
    print(f"\nleaders: {json.dumps({k: v for k, v in leaders.items() if k != 'terms'})}")
    assert report["ok"] is True and leaders["ok"] is True
    assert leaders["replicas"] == 3 and len(leaders["groups"]) == 3
    assert [f["fault"] for f in leaders["failovers"]] == ["SIGKILL", "SIGSTOP"]
    assert leaders["backend"] == backend
    if backend == "redis":
        assert leaders["failover_max_s"] < 5.0
    else:  # the demo's lease (3 s) and renewal (1 s), and a busy machine's slack
        assert leaders["failover_max_s"] < 3.0 + 1.0 + SLACK_S
    assert leaders["commands_accepted"] > 0
    assert leaders["accepted_from_deposed_leader"] == 0
    assert leaders["commands_lost"] == 0 and report["tasks_lost"] == 0
    assert leaders["late_commands_refused"] == leaders["late_commands_sent"]
    assert all(len(gs) == 1 for gs in leaders["spread"].values())


def test_the_demo_counts_a_device_that_lost_its_last_command(database_url: str) -> None:
    """``commands_lost``: a device whose setpoint is not its last accepted
    command's is counted; one that accepted none must still hold the target."""
    from agents import iot
    from fleetworks.db import transaction
    from fleetworks.proving.demo_iot import lost_commands
    from tasks.schema import DEVICES

    iot.seed_devices(database_url, 6, 2)
    group = iot.GROUP_PREFIX + "eu"
    for term, setpoint in ((3, 19.5), (4, 22.0)):
        assert iot.send_setpoint(
            database_url, group, term, sender="r/1", device_id="dev-000000", setpoint=setpoint
        )
    assert not iot.send_setpoint(
        database_url, group, 2, sender="r/2", device_id="dev-000002", setpoint=25.0
    )
    assert lost_commands(database_url, 0) == 0
    with transaction(database_url) as conn:
        # The last accepted command's setpoint overwritten by the earlier one's...
        conn.execute(
            DEVICES.update().where(DEVICES.c.device_id == "dev-000000").values(setpoint=19.5)
        )
        # ...and a device moved with no command at all.
        conn.execute(
            DEVICES.update().where(DEVICES.c.device_id == "dev-000004").values(last_term=1)
        )
    assert lost_commands(database_url, 0) == 2


def test_the_demo_tells_a_command_in_flight_at_the_stop_from_a_late_one(
    database_url: str,
) -> None:
    """A command the stopped replica began before SIGSTOP and that landed after
    it (its transaction held through the stop) is in flight, not late, and so
    is one of the same cycle sent on waking before any newer term landed (the
    lock it held kept the new leader out); one it began after waking, with
    its old term, that landed once a newer term had, is late and must be
    refused."""
    from datetime import UTC, datetime, timedelta

    from agents import iot
    from fleetworks.db import transaction
    from fleetworks.proving.demo_iot import Late, late_commands
    from tasks.schema import DEVICE_COMMANDS

    iot.seed_devices(database_url, 4, 1)
    group = iot.GROUP_PREFIX + "eu"
    with transaction(database_url) as conn:
        since = int(conn.execute(
            DEVICE_COMMANDS.select().with_only_columns(DEVICE_COMMANDS.c.id)
            .order_by(DEVICE_COMMANDS.c.id.desc()).limit(1)
        ).scalar() or 0)  # fmt: skip
    stopped_at = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
    # Given the stopped replica (pid 41) held term 3: one command begun before
    # the stop and taken, one sent on waking before any newer term landed and
    # taken, one from the new leader, one begun after waking and refused, and
    # one with a newer term it won later
    rows = [
        ("r/41", 3, True, stopped_at - timedelta(seconds=1)),
        ("r/41", 3, True, stopped_at + timedelta(seconds=4)),
        ("r/42", 4, True, stopped_at + timedelta(seconds=2)),
        ("r/41", 3, False, stopped_at + timedelta(seconds=5)),
        ("r/41", 5, True, stopped_at + timedelta(seconds=9)),
    ]
    with transaction(database_url) as conn:
        for sender, term, accepted, at in rows:
            conn.execute(DEVICE_COMMANDS.insert().values(
                device_id="dev-000000", region="eu", term=term, setpoint=20.0,
                accepted=accepted, sender=sender, created_at=at,
            ))  # fmt: skip
    # When the demo splits them
    late = late_commands(database_url, since, 41, {group: 3}, stopped_at)
    # Then the one that met the newer term is late (and was refused); the two
    # that landed before any newer term are in flight
    assert late == Late(sent=1, refused=1, in_flight=2, in_flight_accepted=2)
