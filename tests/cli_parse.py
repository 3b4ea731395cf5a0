"""Parse a deployment's command lines with the real CLIs, as they would run.

A Compose service or a Kubernetes container runs ``fleetworks ...`` or
``celery -A config ...``; a typo in a subcommand or an option only shows when
the container starts. Here each command line goes through the CLI's own
click parser, down to its last subcommand, without running anything.
"""

from __future__ import annotations

import warnings
from typing import Any

import click
from celery.bin.celery import celery as celery_cli

from fleetworks.cli import main as fleetworks_cli

ROOTS: dict[str, click.Command] = {"fleetworks": fleetworks_cli, "celery": celery_cli}


def parse(argv: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The chain of ``(command, parsed options)`` of ``argv``; a click error if
    a command or an option does not exist or a value does not parse."""
    if argv[0] not in ROOTS:
        raise click.UsageError(f"{argv[0]!r} is neither fleetworks nor celery")
    command = ROOTS[argv[0]]
    ctx = command.make_context(argv[0], list(argv[1:]), resilient_parsing=False)
    if argv[0] == "celery":
        # What celery's own group callback would set: its options read the app.
        from celery.bin.base import CLIContext

        from fleetworks.app import load_app

        ctx.obj = CLIContext(app=load_app(ctx.params["app"]), no_color=True, workdir=None)
    chain: list[tuple[str, dict[str, Any]]] = [(argv[0], dict(ctx.params))]
    while isinstance(command, click.Group):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*ctx.protected_args, *ctx.args]
        if not rest:
            break
        name, *tail = rest
        sub = command.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"no command {name!r} in {' '.join(c for c, _ in chain)}")
        ctx = sub.make_context(name, tail, parent=ctx, resilient_parsing=False)
        chain.append((name, dict(ctx.params)))
        command = sub
    return chain
