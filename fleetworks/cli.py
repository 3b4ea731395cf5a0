"""The ``fleetworks`` command. Every command that reports takes ``--json``."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from pydantic import ValidationError

from fleetworks import logs, progress
from fleetworks.settings import Settings, describe, get_settings, redact

if TYPE_CHECKING:
    from collections.abc import Callable

    from fleetworks.agent import Fleet
    from fleetworks.proving.chaos import StopFlag


def _app_ref() -> str:
    """The app reference: ``--app/-A``, else ``FLEET_APP``, else this repository's ``config``."""
    ctx = click.get_current_context(silent=True)
    ref = ctx.find_root().params.get("app_ref") if ctx is not None else None
    if ref:
        return str(ref)
    try:
        return get_settings().app
    except ValidationError as exc:
        raise click.ClickException(f"invalid FLEET_* settings:\n{describe(exc)}") from None


def _fleet() -> Fleet:
    """The fleet of the app the command runs on, loaded the way ``celery -A`` loads it."""
    from fleetworks.app import fleet_of, load_app

    ref = _app_ref()
    try:
        fleet = fleet_of(load_app(ref))
    except ValidationError as exc:
        raise click.ClickException(f"invalid FLEET_* settings:\n{describe(exc)}") from None
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    fleet.settings = fleet.settings.model_copy(update={"app": ref})
    return fleet


def _settings() -> Settings:
    return _fleet().settings


def _traced(fleet: Fleet, service: str) -> Fleet:
    """``fleet``, with tracing set up in this process when its settings ask for it."""
    from fleetworks.tracing import setup_tracing

    setup_tracing(fleet.settings, service)
    return fleet


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _migrate(settings: Settings) -> None:
    from fleetworks.migrate import upgrade

    upgrade(settings.database, _fleet().migrations)


#: The ranges of the counts and times commands take: a number out of them is a
#: usage error naming the option, not an overflow or a division by zero later.
_LIMIT = click.IntRange(1, 100_000)
_SIZE = click.IntRange(0, 10_000_000)
_TASKS = click.IntRange(1, 10_000_000)
_ROUNDS = click.IntRange(1, 10_000)
_SECONDS = click.FloatRange(0, 7 * 86_400)


class _FleetGroup(click.Group):
    """The ``fleetworks`` group: a results database that cannot answer is a
    message naming it (exit 1), not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            return super().invoke(ctx)
        except (OperationalError, ProgrammingError) as exc:
            raise click.ClickException(_database_problem(exc)) from None


def _database_problem(exc: Exception) -> str:
    from fleetworks.settings import redact

    cause = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300]
    try:
        where = redact(_settings().database)
    except (click.ClickException, ValidationError):
        where = "the results database"
    if "no such table" in cause or ("relation" in cause and "does not exist" in cause):
        return f"{where} has no fleetworks tables ({cause}): run `fleetworks db upgrade`"
    return f"{where} could not answer: {cause}"


@click.group(cls=_FleetGroup)
@click.version_option(package_name="fleetworks")
@click.option(
    "-A",
    "--app",
    "app_ref",
    default=None,
    metavar="MODULE[:ATTR]",
    help="The Celery app, as `celery -A` takes it [default: FLEET_APP, else config].",
)
def main(app_ref: str | None) -> None:
    """Run fleets of agents on Celery, each effect once per idempotency key."""
    try:
        settings = Settings()
    except ValidationError:
        logs.configure("WARNING")  # the command itself names what is wrong
    else:
        # The CLI's own lines: warnings and worse unless FLEET_LOG_LEVEL says
        # otherwise (the workers and beat it starts log at FLEET_LOG_LEVEL).
        explicit = "log_level" in settings.model_fields_set
        logs.configure(settings.log_level if explicit else "WARNING", settings.log_format)


@main.group()
def db() -> None:
    """The results database."""


@db.command("prune")
@click.option(
    "--keep-days",
    type=click.FloatRange(min=0, min_open=True, max=1e6),
    default=None,
    help="Days to keep [default: FLEET_OUTCOMES_KEEP_DAYS].",
)
@click.option("--json", "as_json", is_flag=True)
def db_prune(keep_days: float | None, as_json: bool) -> None:
    """Delete settled outcome rows (succeeded, rejected) and guard events older
    than KEEP_DAYS; never a claim in flight, a failed run awaiting its retry, or
    a dead one. A pruned key runs again if its message is ever sent again."""
    from fleetworks.retention import prune

    settings = _settings()
    keep = keep_days if keep_days is not None else settings.outcomes_keep_days
    if keep is None:
        raise click.UsageError("give --keep-days or set FLEET_OUTCOMES_KEEP_DAYS")
    _migrate(settings)
    pruned = prune(settings.database, keep)
    if as_json:
        _print_json(pruned.as_dict())
    else:
        click.echo(
            f"pruned {pruned.outcomes} outcome rows and {pruned.guard_events} guard events "
            f"from before {pruned.before:%Y-%m-%d %H:%M:%S} UTC"
        )


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations (Alembic) up to head."""
    settings = _settings()
    _migrate(settings)
    click.echo(f"database at head: {redact(settings.database)}")


class _Stop(BaseException):
    """SIGTERM or SIGINT: a BaseException, like KeyboardInterrupt, so no broad
    ``except Exception`` swallows it."""


def _raise_stop(signum: int, _frame: Any) -> NoReturn:
    raise _Stop(signum)


def _handle_stop_signals() -> None:
    """SIGINT and SIGTERM both stop cleanly, even where SIGINT was inherited ignored
    (a process started in the background by a non-interactive shell)."""
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)


@main.command()
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option("--no-beat", is_flag=True, help="Do not start beat.")
def up(no_flower: bool, no_beat: bool) -> None:
    """The whole fleet on this machine: broker, an autoscaled worker, the events
    relay, beat, Flower and the metrics endpoint. Ctrl-C stops it."""
    from fleetworks.ingest import serve as serve_ingest
    from fleetworks.metrics import serve
    from fleetworks.services import FleetProcesses, broker, echo

    fleet_ = _traced(_fleet(), "fleetworks-ingest")
    app, settings = fleet_.app, fleet_.settings
    _migrate(settings)
    _handle_stop_signals()
    with broker(settings) as url:
        fleet = FleetProcesses(settings)
        metrics = serve(app, settings, settings.metrics_address, settings.metrics_port)
        intake = serve_ingest(fleet_)
        try:
            fleet.worker(autoscale=True)
            fleet.relay()
            fleet_.import_task_modules()
            if fleet_.controllers:
                fleet.controllers()
            if not no_beat:
                fleet.beat()
            if not no_flower:
                fleet.flower()
            echo(f"broker   {redact(url)}{' (embedded)' if settings.embedded else ''}")
            echo(f"database {redact(settings.database)}")
            if not no_flower:
                echo(f"flower   http://{settings.flower_address}:{settings.flower_port}")
            host, port = metrics.server_address[:2]
            echo(f"metrics  http://{host!s}:{port}/metrics")
            host, port = intake.server_address[:2]
            echo(f"events   POST http://{host!s}:{port}/events/<topic>")
            low, high = settings.autoscale_min_workers, settings.autoscale_max_workers
            echo(f"workers  pool of {low}..{high} processes, sized by queue depth")
            echo(f"logs     {settings.home / 'logs'}   (Ctrl-C to stop)")
            while not (dead := fleet.dead()):
                time.sleep(0.5)
            names = ", ".join(
                f"{c.name} (exit {c.proc.returncode if c.proc else '?'})" for c in dead
            )
            echo(f"stopping: {names} exited; last log lines:\n{dead[0].log_tail(1500)}")
            code = 1
        except (KeyboardInterrupt, _Stop):
            echo("stopping (warm shutdown: running tasks finish first)...")
            code = 0
        finally:
            # A second Ctrl-C must not abort the stop halfway; the grace period bounds it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            metrics.shutdown()
            intake.shutdown()
            fleet.stop()
    sys.exit(code)


@main.command()
@click.option("--address", default=None, help="[default: FLEET_METRICS_ADDRESS]")
@click.option("--port", type=int, default=None, help="[default: FLEET_METRICS_PORT]")
def metrics(address: str | None, port: int | None) -> None:
    """Serve /metrics (Prometheus) and /scale (KEDA metrics-api) until stopped."""
    from fleetworks.metrics import serve
    from fleetworks.services import echo

    fleet_ = _fleet()
    app, settings = fleet_.app, fleet_.settings
    _handle_stop_signals()
    server = serve(
        app, settings, address or settings.metrics_address, port or settings.metrics_port
    )
    host, bound = server.server_address[:2]
    echo(f"metrics  http://{host!s}:{bound}/metrics and /scale?queue={settings.queue}")
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        server.shutdown()


def _exec_celery(command: str, *args: str) -> NoReturn:
    """Run one Celery program in the foreground with the fleet's settings."""
    import subprocess

    from fleetworks.procs import celery_argv, fleet_env
    from fleetworks.services import broker

    settings = _settings()
    _migrate(settings)
    _handle_stop_signals()
    with broker(settings):
        proc = subprocess.Popen(celery_argv(settings.app, command, *args), env=fleet_env(settings))
        try:
            code = proc.wait()
        except (KeyboardInterrupt, _Stop):
            proc.send_signal(signal.SIGTERM)
            code = proc.wait()
    sys.exit(code)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """A worker (arguments after the command go to `celery worker`)."""
    from fleetworks.procs import worker_args

    _exec_celery("worker", *worker_args(_settings(), "worker"), *celery_args)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat(celery_args: tuple[str, ...]) -> None:
    """Celery beat with the fleet's schedule (beat_schedule.py)."""
    settings = _settings()
    schedule = str((settings.home / "celerybeat-schedule").resolve())
    _exec_celery("beat", "-s", schedule, "--pidfile=", *celery_args)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def flower(celery_args: tuple[str, ...]) -> None:
    """Flower on FLEET_FLOWER_ADDRESS:FLEET_FLOWER_PORT (loopback unless auth is set),
    keeping what it has seen in FLEET_HOME/flower.db across restarts."""
    from fleetworks.services import flower_args

    _exec_celery("flower", *flower_args(_settings()), *celery_args)


@main.command()
@click.argument("agent")
@click.option("--payload", required=True, help="The payload, a JSON object.")
@click.option("--key", default=None, help="Explicit idempotency key (default: the agent's).")
@click.option("--json", "as_json", is_flag=True)
def enqueue(agent: str, payload: str, key: str | None, as_json: bool) -> None:
    """Send one task to AGENT (e.g. mentions.respond)."""
    from fleetworks.services import require_broker

    settings = _settings()
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None
    require_broker(settings)
    from fleetworks.agent import UnknownAgentError
    from fleetworks.enqueue import enqueue as send

    try:
        task_id = send(_traced(_fleet(), "fleetworks-cli").app, agent, body, key=key)
    except UnknownAgentError as exc:
        raise click.BadParameter(str(exc), param_hint="AGENT") from None
    if as_json:
        _print_json({"task_id": task_id, "agent": agent, "key": key})
    else:
        click.echo(task_id)


@main.command()
@click.option("--agent", default=None)
@click.option(
    "--status",
    default=None,
    help="claimed, succeeded, failed, rejected or dead (runs in flight: `fleetworks running`)",
)
@click.option("--limit", type=_LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def outcomes(agent: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """The newest outcome rows, and the count per status."""
    from fleetworks.reports import list_outcomes, status_counts

    settings = _settings()
    rows = list_outcomes(settings.database, agent=agent, status=status, limit=limit)
    counts = status_counts(settings.database, agent)
    if as_json:
        _print_json({"counts": counts, "outcomes": rows})
        return
    click.echo("  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no outcomes yet")
    for r in rows:
        err = f"  {r['error'].splitlines()[0][:80]}" if r["error"] else ""
        click.echo(
            f"{r['id']:>6} {r['status']:<9} {r['agent']:<18} {r['idempotency_key']:<40} "
            f"try={r['attempts']} fence={r['fencing_token']}{err}"
        )


@main.command()
@click.option("--agent", default=None)
@click.option("--limit", type=_LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def running(agent: str | None, limit: int, as_json: bool) -> None:
    """Runs in flight now, longest first, from the records their leases keep in
    Redis: a key's first delivery has no outcome row until it ends."""
    import time

    import redis

    from fleetworks.redisconn import get_redis
    from fleetworks.reports import in_flight
    from fleetworks.settings import redact

    settings = _settings()
    client = get_redis(settings.redis, **settings.redis_tls(settings.redis))
    try:
        runs = in_flight(client, settings.database, agent=agent, limit=limit, now=time.time())
    except redis.RedisError as exc:
        raise click.ClickException(
            f"Redis at {redact(settings.redis)} is not reachable ({exc}); is the fleet up?"
        ) from None
    if as_json:
        _print_json({"running": runs})
        return
    if not runs:
        click.echo("nothing running")
    for r in runs:
        row = f"row={r['row']}" if r["row"] else "first delivery"
        click.echo(
            f"{r['agent']:<18} {r['idempotency_key']:<40} {r['running_s']:>8.1f}s "
            f"{r['worker']}  {row}"
        )


@main.command()
@click.option("--prefix", default="", help="Only groups whose name starts with this.")
@click.option("--json", "as_json", is_flag=True)
def leaders(prefix: str, as_json: bool) -> None:
    """Who leads each group now: leader, term, since when, on which backend
    (beat's own election shows as ``beat:<app>``)."""
    from fleetworks.leadership import LeadershipError, current_leaders

    fleet = _fleet()
    try:
        found = current_leaders(fleet.settings, fleet.app.main or "fleet", prefix)
    except LeadershipError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _print_json({"leaders": [info.as_dict() for info in found]})
        return
    if not found:
        click.echo("no group has a leader")
    for info in found:
        since = info.since.isoformat(timespec="seconds") if info.since else "?"
        click.echo(
            f"{info.group:<24} {info.leader:<36} term={info.term:<8} since={since} "
            f"backend={info.backend}"
        )


@main.command()
@click.option("--agent", default=None)
@click.option("--limit", type=_LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dead(agent: str | None, limit: int, as_json: bool) -> None:
    """Dead letters: keys that ran out of deliveries or retries, with their last error."""
    from fleetworks.reports import list_outcomes

    rows = list_outcomes(_settings().database, agent=agent, status="dead", limit=limit)
    if as_json:
        _print_json({"dead": rows})
        return
    if not rows:
        click.echo("no dead letters")
    for r in rows:
        click.echo(
            f"{r['id']:>6} {r['agent']:<18} {r['idempotency_key']:<40} tries={r['attempts']}"
        )
        click.echo(f"       {(r['error'] or '').splitlines()[0][:200]}")


@main.command()
def relay() -> None:
    """Send stored events to their subscribers until stopped (any number may run)."""
    import threading

    from fleetworks.events import Relay
    from fleetworks.services import echo, require_broker

    fleet_ = _traced(_fleet(), "fleetworks-relay")
    require_broker(fleet_.settings)
    _handle_stop_signals()
    stop = threading.Event()
    relay_ = Relay(fleet_)
    echo(f"relay: sending events of {redact(fleet_.settings.database)} to their subscribers")
    try:
        relay_.run(stop)
    except (KeyboardInterrupt, _Stop):
        stop.set()
    echo(f"relay: stopped after {relay_.sent} deliveries")


@main.command()
def controllers() -> None:
    """Run the app's controllers until stopped: each group's loop runs in its
    leader only; any number of these processes spread the groups among them."""
    import threading

    from fleetworks.controllers import ControllerRunner
    from fleetworks.services import echo, require_broker

    fleet_ = _traced(_fleet(), "fleetworks-controllers")
    require_broker(fleet_.settings)
    fleet_.import_task_modules()
    if not fleet_.controllers:
        raise click.ClickException(f"app {fleet_.settings.app!r} declares no controllers")
    try:
        runner = ControllerRunner(fleet_)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    _handle_stop_signals()
    stop = threading.Event()
    groups = ", ".join(loop.group for loop in runner.loops)
    echo(
        f"controllers {runner.identity}: campaigning for {groups} on {runner.backend_name} "
        f"(lease {runner.ttl_s:g} s)"
    )
    try:
        runner.run(stop)
    except (KeyboardInterrupt, _Stop):
        stop.set()
    echo(f"controllers {runner.identity}: stopped")


@main.command()
@click.option("--address", default=None, help="[default: FLEET_INGEST_ADDRESS]")
@click.option("--port", type=int, default=None, help="[default: FLEET_INGEST_PORT]")
def ingest(address: str | None, port: int | None) -> None:
    """Take events from outside until stopped: POST /events/<topic> with a JSON object."""
    from fleetworks.ingest import serve
    from fleetworks.services import echo

    fleet_ = _traced(_fleet(), "fleetworks-ingest")
    _handle_stop_signals()
    server = serve(fleet_, address, port)
    host, bound = server.server_address[:2]
    auth = "bearer token required" if fleet_.settings.ingest_token else "no token (loopback)"
    echo(f"ingest: POST http://{host!s}:{bound}/events/<topic> ({auth})")
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        server.shutdown()


@main.command()
@click.argument(
    "folder", type=click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path)
)
@click.option("--topic", default="file.uploaded", show_default=True)
def watch(folder: Path, topic: str) -> None:
    """Store a TOPIC event for each file content put in FOLDER (once per SHA-256)."""
    import threading

    from fleetworks.filedrop import watch as watch_folder
    from fleetworks.services import echo

    fleet_ = _fleet()
    _handle_stop_signals()
    stop = threading.Event()
    echo(f"watch: {folder} -> {topic} events (Ctrl-C to stop)")
    try:
        seen = watch_folder(fleet_, folder, stop, topic=topic)
    except (KeyboardInterrupt, _Stop):
        stop.set()
        return
    echo(f"watch: {seen.stored} stored, {seen.already} already stored")


@main.group(invoke_without_command=True)
@click.option("--topic", "topics", multiple=True, help="Only this topic (repeatable).")
@click.option("--key", default=None, help="Only events with this key.")
@click.option("--limit", type=_LIMIT, default=50, show_default=True, help="The newest N.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def events(
    ctx: click.Context, topics: tuple[str, ...], key: str | None, limit: int, as_json: bool
) -> None:
    """Stored events, oldest first (see `fleetworks events replay`)."""
    if ctx.invoked_subcommand is not None:
        return
    from fleetworks.events import stored

    found = stored(_settings().database, topics=topics, key=key, newest=limit)
    if as_json:
        _print_json({"events": [e.model_dump() for e in found]})
        return
    if not found:
        click.echo("no events")
    for e in found:
        source = f"{e.source_agent} {e.source_key}" if e.source_agent else "application"
        click.echo(f"{e.created_at}  {e.topic:<24} key={e.key or '-':<20} {e.id}  from {source}")
        click.echo(f"    {json.dumps(e.data)[:200]}")


@events.command("replay")
@click.option("--subscriber", required=True, help="The subscribing agent to send them to.")
@click.option("--since", default=None, help="Only events stored since (ISO 8601, UTC).")
@click.option("--topic", "topics", multiple=True, help="Only this topic (repeatable).")
@click.option("--json", "as_json", is_flag=True)
def events_replay(
    subscriber: str, since: str | None, topics: tuple[str, ...], as_json: bool
) -> None:
    """Send SUBSCRIBER its stored events again; effects already done are skipped
    and counted (skipped_duplicate)."""
    from datetime import UTC, datetime

    from fleetworks.events import replay as replay_events
    from fleetworks.services import require_broker

    when = None
    if since is not None:
        try:
            when = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(
                f"{since!r} is not an ISO 8601 time", param_hint="--since"
            ) from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    fleet_ = _fleet()
    require_broker(fleet_.settings)
    try:
        sent = replay_events(fleet_, subscriber, since=when, topics=topics)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--subscriber") from None
    if as_json:
        _print_json({"subscriber": subscriber, "sent": sent})
    else:
        click.echo(f"sent {sent} event(s) to {subscriber} again")


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True)
def timeline(key: str, as_json: bool) -> None:
    """Everything recorded for KEY (an idempotency key or entity), in time order:
    claims, outcomes, failed attempts, stale refusals, events, waits, state versions."""
    from fleetworks.timeline import timeline as entries_of

    entries = entries_of(_settings().database, key)
    if as_json:
        _print_json({"key": key, "entries": [e.as_dict() for e in entries]})
        return
    if not entries:
        click.echo(f"nothing recorded for {key!r}")
    for e in entries:
        token = f" token={e.token}" if e.token is not None else ""
        who = f" by {e.worker}" if e.worker else ""
        click.echo(f"{e.at or '-':<33} {e.what:<22} {e.agent or '-'} {e.key or '-'}{who}{token}")
        if e.detail:
            click.echo(f"{'':<34}{e.detail.splitlines()[0][:160]}")


@main.command()
@click.argument("outcome_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def replay(outcome_id: int, as_json: bool) -> None:
    """Run dead outcome OUTCOME_ID again (see `fleetworks dead`)."""
    from fleetworks.reaper import replay as replay_dead
    from fleetworks.services import require_broker

    fleet_ = _fleet()
    require_broker(fleet_.settings)
    try:
        row = replay_dead(fleet_.app, fleet_.ledger, outcome_id)
    except (LookupError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="OUTCOME_ID") from None
    if as_json:
        _print_json({"replayed": outcome_id, "agent": row.agent, "key": row.idempotency_key})
    else:
        click.echo(f"replayed {row.agent} {row.idempotency_key} (task {row.task_id})")


@main.command()
@click.option(
    "--mentions", type=_SIZE, default=1000, show_default=True, help="Distinct mentions to feed."
)
@click.option("--duplicate-rate", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option(
    "--products", type=_SIZE, default=1000, show_default=True, help="Catalogue size to reprice."
)
@click.option(
    "--cycles", type=_ROUNDS, default=2, show_default=True, help="Pricing cycles to wait for."
)
@click.option(
    "--interval",
    "interval_s",
    type=_SECONDS,
    default=None,
    help="Seconds between pricing ticks [default: about twice a cycle's expected time].",
)
@click.option(
    "--tickets", type=_SIZE, default=300, show_default=True, help="Support tickets to triage."
)
@click.option(
    "--files", type=_SIZE, default=60, show_default=True, help="Files to drop for the scanner."
)
@click.option(
    "--ack-timeout",
    "ack_timeout_s",
    type=_SECONDS,
    default=3.0,
    show_default=True,
    help="Seconds an escalation waits for its acknowledgement in the demo.",
)
@click.option(
    "--devices",
    type=_SIZE,
    default=1000,
    show_default=True,
    help="IoT devices steered by region leaders.",
)
@click.option(
    "--regions", type=_ROUNDS, default=3, show_default=True, help="IoT regions (one leader each)."
)
@click.option("--timeout", "timeout_s", type=_SECONDS, default=900.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def demo(
    *,
    mentions: int,
    duplicate_rate: float,
    products: int,
    cycles: int,
    interval_s: float | None,
    tickets: int,
    files: int,
    ack_timeout_s: float,
    devices: int,
    regions: int,
    timeout_s: float,
    as_json: bool,
) -> None:
    """A bounded end-to-end run of the mentions, pricing, support and upload
    agents and the IoT fleet's region leaders; exit 0 only if nothing was lost
    or duplicated and no deposed leader's command landed. ``--mentions 0``,
    ``--products 0``, ``--tickets 0``, ``--files 0`` or ``--devices 0``
    (``--regions 0``) skips one."""
    from fleetworks.proving import demo as mentions_demo
    from fleetworks.proving import demo_iot, demo_pricing, demo_support, demo_uploads
    from fleetworks.services import broker

    if devices < 0 or regions < 0:
        raise click.BadParameter("--devices and --regions must not be negative")
    _handle_stop_signals()
    settings = _settings()
    _migrate(settings)
    out: dict[str, Any] = {
        "mentions": None, "pricing": None, "support": None, "uploads": None, "leaders": None,
    }  # fmt: skip
    text: list[str] = []
    with broker(settings), progress.shown(progress.wanted(as_json)):
        if mentions > 0:
            m = mentions_demo.run_demo(
                _fleet().app,
                settings,
                mentions=mentions,
                duplicate_rate=duplicate_rate,
                timeout_s=timeout_s,
            )
            out["mentions"] = asdict(m)
            text.append(mentions_demo.render(m))
        if products > 0:
            interval = interval_s or demo_pricing.default_interval_s(products)
            p = demo_pricing.run_pricing(
                _fleet().app,
                settings,
                products=products,
                interval_s=interval,
                cycles=cycles,
                timeout_s=timeout_s,
            )
            out["pricing"] = demo_pricing.as_dict(p)
            text.append(demo_pricing.render(p))
        if files > 0:
            u = demo_uploads.run_uploads(_fleet().app, settings, files=files, timeout_s=timeout_s)
            out["uploads"] = demo_uploads.as_dict(u)
            text.append(demo_uploads.render(u))
        if tickets > 0:
            s = demo_support.run_support(
                _fleet().app, settings, tickets=tickets, ack_timeout_s=ack_timeout_s,
                timeout_s=timeout_s,
            )  # fmt: skip
            out["support"] = demo_support.as_dict(s)
            text.append(demo_support.render(s))
        if devices > 0 and regions > 0:
            try:
                iot = demo_iot.run_iot(
                    settings, devices=devices, regions=regions, timeout_s=timeout_s
                )
            except RuntimeError as exc:
                raise click.ClickException(f"IoT demo: {exc}") from None
            out["leaders"] = demo_iot.as_dict(iot)
            text.append(demo_iot.render(iot))
    names = ("mentions", "pricing", "support", "uploads", "leaders")
    parts = [r for r in (out[k] for k in names) if r]
    out["tasks_lost"] = sum(r["tasks_lost"] for r in parts)
    out["effects_duplicated"] = sum(r["effects_duplicated"] for r in parts)
    out["ok"] = bool(parts) and all(r["ok"] for r in parts)
    if as_json:
        _print_json(out)
    else:
        click.echo("\n".join(text))
    sys.exit(0 if out["ok"] else 1)


@main.command()
@click.option("--tasks", type=_TASKS, default=300, show_default=True)
@click.option(
    "--faults",
    "fault_kinds",
    default=None,
    help="Comma-separated fault kinds [default: child-kill,worker-kill,redis-restart,db-pause,"
    "stop-cont,relay-kill,client-kill; on RabbitMQ child-kill,worker-kill]; partition and "
    "beat-partition (faults across hosts) need root, to make network namespaces.",
)
@click.option("--per-kind", type=_ROUNDS, default=1, show_default=True, help="Faults of each kind.")
@click.option("--db-pause", "db_pause_s", type=_SECONDS, default=10.0, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--timeout", "timeout_s", type=_SECONDS, default=900.0, show_default=True)
@click.option(
    "--broker",
    "broker_url",
    default=None,
    metavar="amqp://USER:PASS@HOST:PORT/",
    help="Run on this RabbitMQ, on a vhost the run creates and deletes (rabbitmqctl); "
    "Redis (embedded, or FLEET_REDIS_URL) keeps the leases [default: the Redis broker].",
)
@click.option(
    "--queue-type",
    type=click.Choice(["classic", "quorum"]),
    default="classic",
    show_default=True,
    help="RabbitMQ queue type (with --broker).",
)
@click.option("--json", "as_json", is_flag=True)
def chaos(
    *,
    tasks: int,
    fault_kinds: str | None,
    per_kind: int,
    db_pause_s: float,
    seed: int,
    timeout_s: float,
    broker_url: str | None,
    queue_type: str,
    as_json: bool,
) -> None:
    """Run guarded tasks under real faults; exit 0 only if none was lost or duplicated."""
    import functools
    import random

    from fleetworks.proving import faults
    from fleetworks.proving.chaos import StopFlag, Stopped, plan

    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.handle)
    signal.signal(signal.SIGINT, stop.handle)
    default = faults.RABBITMQ_DEFAULT_KINDS if broker_url else faults.DEFAULT_KINDS
    kinds = [k.strip() for k in (fault_kinds or ",".join(default)).split(",") if k.strip()]
    try:
        plan(kinds, per_kind, random.Random(seed), rabbitmq=broker_url is not None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from None
    run = functools.partial(
        _chaos, kinds, tasks=tasks, per_kind=per_kind, db_pause_s=db_pause_s, seed=seed,
        timeout_s=timeout_s, as_json=as_json, stop=stop,
    )  # fmt: skip
    try:
        if broker_url is None:
            if queue_type != "classic":
                raise click.BadParameter(
                    "queue types are RabbitMQ's: give --broker amqp://...",
                    param_hint="--queue-type",
                )
            run()
        else:
            _chaos_on_rabbitmq(broker_url, queue_type, run)
    except Stopped as stopped:
        click.echo(f"chaos: stopped by signal {stopped.signum}; its rig is stopped", err=True)
        sys.exit(128 + stopped.signum)


def _chaos_on_rabbitmq(broker_url: str, queue_type: str, run: Callable[..., None]) -> None:
    """``run`` on a vhost of its own, deleted afterwards whatever happens."""
    from fleetworks.proving import rabbitmq

    try:
        rabbitmq.check_broker_url(broker_url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    try:
        vhost = rabbitmq.RunVhost.create(broker_url)
    except rabbitmq.RabbitMQError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        # Every part of the run, this process's app included, reads FLEET_*.
        os.environ.update(FLEET_BROKER_URL=vhost.url, FLEET_QUEUE_TYPE=queue_type)
        try:
            current = Settings()
        except ValidationError as exc:
            raise click.ClickException(f"invalid FLEET_* settings: {exc}") from None
        own_redis = current.redis_url is None
        if own_redis:
            # The leases: the embedded Redis, which the run starts.
            port = current.embedded_redis_port
            os.environ["FLEET_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        get_settings.cache_clear()
        run(own_redis=own_redis, vhost=vhost.name)
    finally:
        try:
            vhost.delete()
        except rabbitmq.RabbitMQError as exc:
            raise click.ClickException(
                f"the run's vhost {vhost.name} is left behind ({exc}): "
                f"rabbitmqctl delete_vhost {vhost.name}"
            ) from None


def _chaos(
    kinds: list[str],
    *,
    tasks: int,
    per_kind: int,
    db_pause_s: float,
    seed: int,
    timeout_s: float,
    as_json: bool,
    stop: StopFlag,
    own_redis: bool = False,
    vhost: str | None = None,
) -> None:
    """One chaos run; ``own_redis``: the run starts the embedded Redis as its
    lock store (RabbitMQ), as it does as its broker when none is configured."""
    from fleetworks.embedded import EmbeddedRedis, ping
    from fleetworks.proving import netns
    from fleetworks.proving.chaos import render, run_chaos
    from fleetworks.proving.faults import HOST_KINDS

    settings = _settings()
    if settings.amqp and vhost is None:
        raise click.ClickException(
            f"FLEET_BROKER_URL is RabbitMQ ({redact(settings.broker)}): give it as "
            "--broker amqp://user:password@host:port/ instead, and the run makes a vhost of its own"
        )
    if "redis-restart" in kinds and not settings.embedded:
        raise click.BadParameter(
            "redis-restart restarts the embedded Redis: unset FLEET_BROKER_URL",
            param_hint="--faults",
        )
    across = sorted(set(kinds) & set(HOST_KINDS))
    if across:
        try:
            netns.check()
        except netns.NetnsUnavailable as exc:
            raise click.BadParameter(
                f"{', '.join(across)} need test hosts (network namespaces): {exc}",
                param_hint="--faults",
            ) from None
    embedded = settings.embedded or own_redis
    url = settings.broker if settings.embedded else settings.redis
    if embedded and ping(url):
        raise click.ClickException(
            f"something already answers on {redact(url)}: chaos owns its embedded Redis; "
            "stop `fleetworks up` or set FLEET_EMBEDDED_REDIS_PORT"
        )
    from fleetworks.proving.faults import heal

    heal(settings.database)
    _migrate(settings)
    redis = None
    if embedded:
        redis = EmbeddedRedis(
            settings.home / "redis", settings.embedded_redis_port, settings.redis_server
        ).start()
    try:
        with progress.shown(progress.wanted(as_json)):
            report = run_chaos(
                _fleet().app,
                settings,
                redis,
                tasks=tasks,
                kinds=kinds,
                per_kind=per_kind,
                seed=seed,
                db_pause_s=db_pause_s,
                timeout_s=timeout_s,
                vhost=vhost,
                stop=stop,
            )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from None
    finally:
        if redis is not None:
            redis.stop()
    if as_json:
        _print_json(asdict(report))
    else:
        click.echo(render(report))
    sys.exit(0 if report.ok else 1)


@main.group()
def bench() -> None:
    """Benchmarks, each against plain Celery measured in the same run."""


@bench.command("throughput")
@click.option("--tasks", type=_TASKS, default=2000, show_default=True)
@click.option("--rounds", type=_ROUNDS, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_throughput(tasks: int, rounds: int, as_json: bool) -> None:
    """No-op tasks through plain Celery and through the guard; prints the ratio."""
    from fleetworks.proving.bench import render, run_throughput
    from fleetworks.services import broker

    _handle_stop_signals()
    settings = _settings()
    _migrate(settings)
    with broker(settings), progress.shown(progress.wanted(as_json)):
        result = run_throughput(_fleet().app, settings, tasks=tasks, rounds=rounds)
    if as_json:
        _print_json(result)
    else:
        click.echo(render(result))


@bench.command("batch")
@click.option("--tasks", type=_TASKS, default=5000, show_default=True)
@click.option("--rounds", type=_ROUNDS, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_batch(tasks: int, rounds: int, as_json: bool) -> None:
    """Guarded keys through a batch agent against plain Celery messages; prints the ratio."""
    from fleetworks.proving.bench import run_batch
    from fleetworks.services import broker

    _handle_stop_signals()
    settings = _settings()
    _migrate(settings)
    with broker(settings), progress.shown(progress.wanted(as_json)):
        result = run_batch(_fleet().app, settings, tasks=tasks, rounds=rounds)
    if as_json:
        _print_json(result)
    else:
        click.echo(
            f"batch of {result['batch_size']}, {tasks} keys x {rounds} rounds: plain Celery "
            f"{result['plain_tps']} messages/s, batch agent {result['batched_keys_per_s']} "
            f"guarded keys/s; ratio {result['ratio']}"
        )


@bench.command("events")
@click.option("--events", "count", type=_TASKS, default=1000, show_default=True)
@click.option("--rounds", type=_ROUNDS, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_events(count: int, rounds: int, as_json: bool) -> None:
    """Events emitted by one agent and handled by two subscribers, against as many
    plain Celery tasks on the same pool; prints the ratio and the relay's lag."""
    from fleetworks.proving.bench_events import render, run_events
    from fleetworks.services import broker

    _handle_stop_signals()
    settings = _settings()
    _migrate(settings)
    with broker(settings), progress.shown(progress.wanted(as_json)):
        result = run_events(_fleet().app, settings, events=count, rounds=rounds)
    if as_json:
        _print_json(result)
    else:
        click.echo(render(result))


@bench.command("fanout")
@click.option("--tasks", type=_TASKS, default=10_000, show_default=True)
@click.option("--rounds", type=_ROUNDS, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_fanout(tasks: int, rounds: int, as_json: bool) -> None:
    """Publishing a fan-out: enqueue_many against Celery's send_task, one by one and batched."""
    from fleetworks.proving.bench import run_fanout
    from fleetworks.services import broker

    settings = _settings()
    with broker(settings):
        result = run_fanout(_fleet().app, settings, tasks=tasks, rounds=rounds)
    if as_json:
        _print_json(result)
    else:
        click.echo(
            f"fan-out of {tasks}: send_task {result['send_task_per_s']}/s, send_task "
            f"batched {result['send_task_batched_per_s']}/s, enqueue_many "
            f"{result['enqueue_many_per_s']}/s; ratio {result['ratio']} "
            f"({result['ratio_to_batched']} to batched)"
        )


@bench.command("cost")
@click.option(
    "--tasks", type=_TASKS, default=500, show_default=True, help="Tasks counted per figure."
)
@click.option("--json", "as_json", is_flag=True)
def bench_cost(tasks: int, as_json: bool) -> None:
    """Per task, counted: Redis commands, round trips and bytes, SQL statements
    and transactions, for the guard, enqueueing, and a real worker against plain Celery."""
    from fleetworks.proving.bench_cost import render, run_cost
    from fleetworks.services import broker

    _handle_stop_signals()
    settings = _settings()
    _migrate(settings)
    with broker(settings):
        result = run_cost(_fleet().app, settings, tasks=tasks)
    if as_json:
        _print_json(result)
    else:
        click.echo(render(result))


@bench.command("autoscale")
@click.option("--tasks", type=_TASKS, default=800, show_default=True, help="Tasks in the burst.")
@click.option(
    "--work-ms",
    type=click.IntRange(0, 600_000),
    default=100,
    show_default=True,
    help="Milliseconds each task works.",
)
@click.option(
    "--scale-down-after",
    "scale_down_s",
    type=_SECONDS,
    default=3.0,
    show_default=True,
    help="Seconds of low load before each step down (FLEET_AUTOSCALE_SCALE_DOWN_AFTER_S).",
)
@click.option("--timeout", "timeout_s", type=_SECONDS, default=600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_autoscale(
    tasks: int, work_ms: int, scale_down_s: float, timeout_s: float, as_json: bool
) -> None:
    """A step load on an autoscaled pool, and on fixed pools of its min and max size."""
    from fleetworks.proving.bench_autoscale import render, run_autoscale
    from fleetworks.services import broker

    _handle_stop_signals()
    settings = _settings().model_copy(update={"autoscale_scale_down_after_s": scale_down_s})
    os.environ["FLEET_AUTOSCALE_SCALE_DOWN_AFTER_S"] = str(scale_down_s)
    _migrate(settings)
    with broker(settings), progress.shown(progress.wanted(as_json)):
        result = run_autoscale(
            _fleet().app, settings, tasks=tasks, work_ms=work_ms, timeout_s=timeout_s
        )
    if as_json:
        _print_json(result)
    else:
        click.echo(render(result))
