"""Live progress of the long commands (``demo``, ``chaos``, ``bench``), with rich.

The command opens :func:`shown` around its work; the code doing the work
calls :func:`update` with a label and counts wherever it already polls. On a
terminal that draws one bar per label on stderr (counts, rate, time left);
with ``--json``, or when stderr is not a terminal, :func:`shown` installs
nothing and :func:`update` costs one context variable read, so reports and
pipes stay exactly as they were.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    """Items per second, as rich measures it over its recent samples."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "-/s", style="progress.data.speed")


class _Bars:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def update(self, label: str, completed: float, total: float | None) -> None:
        task = self.tasks.get(label)
        if task is None:
            task = self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(task, completed=completed, total=total)


_current: ContextVar[_Bars | None] = ContextVar("fleetworks_progress", default=None)


def wanted(as_json: bool, stream: object = None) -> bool:
    """Bars only for a person: not with ``--json``, and only on a terminal."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return not as_json and callable(isatty) and bool(isatty())


@contextmanager
def shown(enabled: bool, console: Console | None = None) -> Iterator[None]:
    """Draw the bars of every :func:`update` inside the block, if ``enabled``."""
    if not enabled:
        yield
        return
    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )
    token = _current.set(_Bars(progress))
    try:
        with progress:
            yield
    finally:
        _current.reset(token)


def active() -> bool:
    """True while bars are drawn (to skip counting what nobody will see)."""
    return _current.get() is not None


def update(label: str, completed: float, total: float | None = None) -> None:
    """Report ``completed`` of ``total`` under ``label`` (nothing when no bars are shown)."""
    bars = _current.get()
    if bars is not None:
        bars.update(label, completed, total)


__all__ = ["active", "shown", "update", "wanted"]
