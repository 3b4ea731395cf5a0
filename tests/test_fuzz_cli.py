"""The ``fleetworks`` command line fuzzed: every command line ends with exit
0, 1 or 2 and never an uncaught exception, and every refusal prints a message
(a usage error, exit 2, names the option, argument or command at fault).

Command lines are drawn near the real ones: a real command path most of the
time (an unknown name sometimes), its own options with values of the right
type and of the wrong one (out of range, not a number, empty, NUL, very
long, odd Unicode), repeated, misspelled, and stray arguments.

Which commands run: the ones that only read (``outcomes``, ``dead``,
``events``, ``timeline``, ``leaders``) run for real, in this process, on the
test suite's Redis and results database. Every other command starts
processes, publishes or writes (``up``, ``worker``, ``chaos``, ``enqueue``,
``db prune``...): those are parsed only, the way click parses them before
their code runs (their own checks of values that click cannot express run
in their tests). ``--app`` takes values from a list and names that cannot
be a module: a fuzzer must not import whatever module a string names.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import strategies as st

from fleetworks.cli import main
from tests.fuzzing import SHORT, SLOW, report, run

#: Commands run for real: they only read.
READ_ONLY = {
    ("outcomes",), ("dead",), ("events",), ("timeline",), ("leaders",), ("running",),
}  # fmt: skip


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


PATHS = sorted(command_paths(main))


def resolve(path: tuple[str, ...]) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


#: No NUL: a command line cannot carry one (argv is C strings).
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30)
ODD = st.sampled_from([
    "", " ", "-", "--", "-1", "0", "1e999", "nan", "inf", "9" * 400, "x" * 5000,
    "🦀", "\u202e", "a\nb", "--json", "=", "%s", "{}", "[]",
])  # fmt: skip
NUMBERS = st.integers().map(str) | st.floats(allow_nan=True).map(str)
#: ``--app`` values: none of them names a module that could be imported but
#: the test app's own.
APPS = st.sampled_from(["config", "config:app", "config:nope", "no_such_module_x",
                        "no_such_module_x:app", "", ":", "a b", "x" * 300]) | TEXT.map(
    lambda t: f"-{t}"
)  # fmt: skip


def value_for(param: click.Parameter) -> st.SearchStrategy[str]:
    """Good and bad values for ``param``."""
    kind = param.type
    good: st.SearchStrategy[str]
    if isinstance(kind, click.Choice):
        good = st.sampled_from([str(c) for c in kind.choices])
    elif isinstance(kind, click.types.IntParamType):
        good = st.integers(min_value=-5, max_value=5000).map(str)
    elif isinstance(kind, click.types.FloatParamType):
        good = st.floats(min_value=-5, max_value=5000).map(str)
    else:
        good = st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=20)
    return good | NUMBERS | ODD | TEXT


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[tuple[str, ...], list[str]]:
    """A command path and a command line for it."""
    if draw(st.integers(0, 19)) == 0:
        return (), [
            draw(TEXT.filter(lambda t: (t,) not in PATHS)),
            *draw(st.lists(TEXT, max_size=3)),
        ]
    path = draw(st.sampled_from(PATHS))
    command = resolve(path)
    args: list[str] = []
    if draw(st.booleans()):
        args += [draw(st.sampled_from(["-A", "--app"])), draw(APPS)]
    args += list(path)
    options = [p for p in command.params if isinstance(p, click.Option)]
    for _ in range(draw(st.integers(0, 4))):
        if not options:
            break
        option = draw(st.sampled_from(options))
        name = draw(st.sampled_from(option.opts))
        if draw(st.integers(0, 9)) == 0:
            name = name + draw(st.sampled_from(["x", "-", "="]))  # misspelled
        args.append(name)
        if not option.is_flag or draw(st.integers(0, 9)) == 0:
            args.append(draw(value_for(option)))
    for argument in (p for p in command.params if isinstance(p, click.Argument)):
        if draw(st.integers(0, 4)):
            args.append(draw(value_for(argument)))
    args += draw(st.lists(TEXT | ODD, max_size=2))
    return path, args


@dataclass
class Outcome:
    code: int
    message: str
    ran: bool


def parse_only(args: list[str]) -> Outcome:
    """Parse ``args`` as click does before a command's code runs."""
    try:
        with main.make_context("fleetworks", list(args)) as ctx:
            # The group's own callback (it only records --app) runs in invoke;
            # here the subcommands are resolved and parsed in turn.
            command: click.Command = main
            rest = [*ctx._protected_args, *ctx.args]
            parent = ctx
            while isinstance(command, click.Group) and rest:
                name, sub, rest = command.resolve_command(parent, rest)
                assert sub is not None and name is not None
                parent = sub.make_context(name, rest, parent=parent)
                command, rest = sub, [*parent._protected_args, *parent.args]
    except click.exceptions.Exit as done:
        return Outcome(done.exit_code, "", False)
    except click.ClickException as refused:
        return Outcome(refused.exit_code, refused.format_message(), False)
    return Outcome(0, "", False)


def invoke(runner: CliRunner, args: list[str]) -> Outcome:
    result = runner.invoke(main, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"fleetworks {args!r} raised {result.exception!r}:\n{result.output[-2000:]}"
        ) from result.exception
    return Outcome(result.exit_code, result.output, True)


def fuzz_cli(examples: int, *, slow: bool) -> None:
    runner = CliRunner()
    counts: Counter[str] = Counter()

    def check(case: tuple[tuple[str, ...], list[str]]) -> None:
        path, args = case
        if path in READ_ONLY and "--help" not in args:
            outcome = invoke(runner, args)
        else:
            outcome = parse_only(args)
        counts["command lines"] += 1
        counts["run" if outcome.ran else "parsed only"] += 1
        counts[f"exit {outcome.code}"] += 1
        assert outcome.code in (0, 1, 2), (args, outcome)
        if outcome.code != 0:
            assert outcome.message.strip(), f"exit {outcome.code} without a message: {args!r}"
        if outcome.code == 2 and not outcome.ran:
            assert any(
                word in outcome.message
                for word in ("option", "argument", "command", "Option", "Argument", "Command",
                             "parameter", "value", "Invalid", "Missing", "No such")
            ), f"usage error naming nothing: {outcome.message!r} for {args!r}"  # fmt: skip

    chosen = run(command_lines(), examples, check, slow=slow)
    report("command lines", counts, chosen)
    assert counts["exit 2"] > 0 and counts["exit 0"] > 0, counts


@pytest.fixture
def on_test_database(sqlite_url: str) -> Iterator[None]:
    """The commands that run read the suite's migrated SQLite database."""
    from config import app
    from fleetworks.app import fleet_of

    fleet = fleet_of(app)
    kept = fleet.settings
    fleet.settings = kept.model_copy(update={"database_url": sqlite_url})
    yield
    fleet.settings = kept


@pytest.mark.usefixtures("on_test_database")
def test_fuzzed_command_lines_exit_0_1_or_2_with_a_message() -> None:
    """300 command lines (the same on every run)."""
    fuzz_cli(SHORT, slow=False)


@pytest.mark.slow
@pytest.mark.usefixtures("on_test_database")
def test_fuzzed_command_lines_exit_0_1_or_2_with_a_message_10000() -> None:
    """10,000 command lines, drawn anew each run."""
    fuzz_cli(SLOW, slow=True)


def test_a_database_without_tables_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """Found by the fuzzer: ``fleetworks outcomes`` before ``db upgrade`` raised."""
    from tests.test_cli import embedded_env, fleetworks

    env = embedded_env(tmp_path / ".fleet")
    env["FLEET_DATABASE_URL"] = f"sqlite:///{tmp_path / 'empty.db'}"
    for command in (["outcomes"], ["dead"], ["timeline", "k"], ["events"]):
        done = fleetworks(*command, env=env, cwd=tmp_path)
        assert done.returncode == 1, (command, done.stderr)
        assert "has no fleetworks tables" in done.stderr, (command, done.stderr)
        assert "run `fleetworks db upgrade`" in done.stderr and "Traceback" not in done.stderr


def test_a_parse_error_is_refused_here_as_on_the_command_line() -> None:
    """The parse-only path refuses what the real command line refuses."""
    outcome = parse_only(["chaos", "--tasks", "many"])
    assert (outcome.code, "'many' is not a valid integer" in outcome.message) == (2, True)
    assert parse_only(["chaos", "--tasks", "5"]).code == 0
    assert parse_only(["no-such-command"]).code == 2


def test_an_app_reference_without_a_module_is_refused_by_name() -> None:
    """Found by the fuzzer: ``-A :`` raised ValueError out of the command."""
    result = CliRunner().invoke(main, ["-A", ":", "outcomes"])
    assert result.exit_code == 1, result.output
    assert "cannot load the Celery app ':'" in result.output


def test_a_count_out_of_range_is_a_usage_error_naming_the_option() -> None:
    """Found by the fuzzer: ``dead --limit 999...9`` overflowed in SQLite."""
    result = CliRunner().invoke(main, ["dead", "--limit", "9" * 100])
    assert result.exit_code == 2 and "'--limit'" in result.output, result.output
    refused = parse_only(["bench", "throughput", "--rounds", "0"])
    assert refused.code == 2 and "'--rounds'" in refused.message, refused
