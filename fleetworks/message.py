"""The agent message: the one place that builds and parses its arguments.

Every agent task is called with keyword arguments only: ``payload`` (a JSON
object the agent's model validates) and, optionally, ``key`` (an explicit
idempotency key). :func:`pack` builds them for every publisher (enqueue,
fan-out, beat ticks, the reaper, replays); :func:`unpack` reads them back in
the worker and names what is wrong with a message of another shape, which
the guard records as ``rejected`` instead of crashing or retrying.

The checks on what a message may carry live here too: nesting the prefork
pool cannot pickle (:func:`too_deep`) and text no database column stores
(:func:`unstorable_text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

#: Keyword argument the worker's request puts in place of a body that cannot
#: be handed to the pool; its value says why (see :mod:`fleetworks.request`).
UNRUNNABLE: Final = "unrunnable"

#: Levels of nesting allowed in a task's arguments. The prefork pool pickles
#: arguments recursively and overflows at about 470 levels, killing the
#: worker; deeper payloads are rejected before they reach it, with a margin.
MAX_PAYLOAD_DEPTH: Final = 256


@dataclass(frozen=True, slots=True)
class Parsed:
    """An agent message's arguments, of the right shape."""

    payload: Any
    key: str | None
    #: What a continuation run resumes with (see :mod:`fleetworks.events`).
    resume: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a message's arguments are not an agent message."""

    reason: str


def pack(
    payload: Any, key: str | None = None, resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The keyword arguments of an agent task for ``payload``, an optional key
    and, for a run resuming from a wait, what it resumes with."""
    kwargs: dict[str, Any] = {"payload": payload}
    if key is not None:
        kwargs["key"] = key
    if resume is not None:
        kwargs["resume"] = resume
    return kwargs


def unrunnable(problem: str) -> dict[str, Any]:
    """Keyword arguments that stand for a body the pool cannot take; the guard rejects them."""
    return {"payload": None, UNRUNNABLE: problem}


def unpack(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> Parsed | Problem:
    """The payload and explicit key of a task's raw arguments, or what is wrong with them."""
    if UNRUNNABLE in kwargs:
        return Problem(str(kwargs[UNRUNNABLE]))
    extra = set(kwargs) - {"payload", "key", "resume"}
    if args or extra or "payload" not in kwargs:
        got = f"{len(args)} positional args, keyword args {sorted(kwargs)}"
        return Problem(f"agent tasks take payload=<object> and optional key=<str>; got {got}")
    key = kwargs.get("key")
    if key is not None and not isinstance(key, str):
        return Problem(f"key must be a string, got {type(key).__name__}")
    resume = kwargs.get("resume")
    if resume is not None and not isinstance(resume, dict):
        return Problem(f"resume must be an object, got {type(resume).__name__}")
    return Parsed(kwargs["payload"], key, resume)


def describe(exc: ValidationError) -> str:
    """One line per problem, ``field: message``, without pydantic's doc links."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        problems.append(f"{where}: {err['msg']}")
    return f"{len(problems)} problem(s): " + "; ".join(problems)


def encodable(text: str) -> bool:
    """True when ``text`` encodes as UTF-8 (no unpaired surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(text: str) -> bool:
    return "\x00" in text or not encodable(text)


def unstorable_text(value: Any) -> str | None:
    """Where in ``value`` a string holds NUL or an unpaired surrogate (a dotted
    path, ``payload`` for the value itself), or None."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _bad_text(item):
                return path or "payload"
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str) and _bad_text(k):
                    return f"{path or 'payload'} (a field name)"
                stack.append((v, f"{path}.{k}" if path else str(k)))
        elif isinstance(item, list):
            stack.extend((v, f"{path or 'payload'}[{i}]") for i, v in enumerate(item))
    return None


def too_deep(value: Any, limit: int = MAX_PAYLOAD_DEPTH) -> str | None:
    """Why ``value`` cannot be handed to a pool child (nesting past ``limit``), or None.

    The prefork pool pickles task arguments recursively: a payload nested a
    few hundred levels deep, valid JSON, overflows the pickler and kills the
    worker's main process, then every worker that receives it after.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return f"payload nested deeper than {limit} levels"
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
    return None
