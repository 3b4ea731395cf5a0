"""The agent message: the one place that builds and parses its arguments.

Every agent task is called with keyword arguments only: ``payload`` (a JSON
object the agent's model validates) and, optionally, ``key`` (an explicit
idempotency key). :func:`pack` builds them for every publisher (enqueue,
fan-out, beat ticks, the reaper, replays); :func:`unpack` reads them back in
the worker and names what is wrong with a message of another shape, which
the guard records as ``rejected`` instead of crashing or retrying.

The checks on what a message may carry live here too: nesting the prefork
pool cannot pickle (:func:`too_deep`), text no database column stores
(:func:`unstorable_text`), and the Celery envelope of an agent's message:
its headers (:func:`header_problem`) and the shape of its body
(:func:`body_problem`). Celery copies every header onto the task's request
and unpacks the body without checking either, so a message whose ``id`` is a
list, whose time limit is a string or whose body is a number would break the
worker far from the message; the worker's request checks them first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

#: Keyword argument the worker's request puts in place of a body that cannot
#: be handed to the pool; its value says why (see :mod:`fleetworks.request`).
UNRUNNABLE: Final = "unrunnable"

#: Levels of nesting allowed in a task's arguments. The prefork pool pickles
#: arguments recursively and overflows at about 470 levels, killing the
#: worker; deeper payloads are rejected before they reach it, with a margin.
MAX_PAYLOAD_DEPTH: Final = 256


#: Count: highest ``retries`` header taken (Celery's count of re-queues). The
#: retry policy's back-off grows with it; nothing real comes near this.
MAX_RETRIES_HEADER: Final = 1_000_000

#: The Celery headers an agent's message may carry besides ``id`` and ``task``,
#: with the JSON type each must have when it is not null. ``args``, ``kwargs``
#: and the delivery fields Celery sets itself are left out: it overwrites them.
HEADER_TYPES: Final[dict[str, type]] = {
    "lang": str, "shadow": str, "root_id": str, "parent_id": str, "group": str,
    "taskset": str, "origin": str, "argsrepr": str, "kwargsrepr": str, "compression": str,
    "eta": str, "expires": str, "group_index": int, "replaced_task_nesting": int,
    "retries": int, "ignore_result": bool, "utc": bool, "called_directly": bool,
    "is_eager": bool, "timelimit": list, "stamped_headers": list, "stamps": dict,
    "headers": dict,
}  # fmt: skip

#: Celery's canvas links, in a body's ``embed`` (or a header of the same name).
#: An agent's message carries none: an agent hands work on with events or
#: ``enqueue``, which keep their once-per-key promise, where a link would run
#: again on every duplicate delivery and a malformed one breaks Celery's
#: failure handling, leaving the message unacknowledged.
CANVAS: Final = ("callbacks", "errbacks", "chain", "chord")

#: What else the third element of a body (Celery's ``embed``) may hold.
EMBED_TYPES: Final[dict[str, type]] = {"group": str, "group_index": int}


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


def not_json_data(value: Any) -> str | None:
    """Where in ``value`` something is not plain JSON data (a dotted path and
    what it is), or None.

    kombu's JSON decoder turns ``{"__type__": "bytes" | "datetime" |
    "decimal", "__value__": ...}`` into Python objects, and Python's reads
    ``NaN`` and ``Infinity``: a model may accept them, no JSON column stores them.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path or 'payload'}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{path or 'payload'}: {item!r} is not a JSON number"
        elif item is not None and not isinstance(item, str | int | float):
            return f"{path or 'payload'}: {type(item).__name__} is not JSON data"
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


def _type_problem(where: str, value: Any, kind: type) -> str | None:
    """Why ``value`` is not null or of JSON type ``kind`` (a bool is not an int)."""
    if value is None or (isinstance(value, kind) and not (kind is int and type(value) is bool)):
        return None
    return f"{where} must be {kind.__name__} or null, got {type(value).__name__}"


def _time_limit_problem(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        return "'timelimit' header must be [hard, soft] seconds"
    for limit in value:
        if limit is None:
            continue
        if type(limit) not in (int, float) or not math.isfinite(limit) or limit <= 0:
            return f"'timelimit' header: {limit!r} is not a positive number of seconds"
    return None


def _when(name: str, value: Any, parse: Callable[[str], datetime]) -> str | None:
    """Why ``value`` (``eta``, ``expires``) is not an ISO 8601 time, or None."""
    if not value:
        return None
    try:
        parse(value).timestamp()
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        return f"{name!r} header {value[:60]!r} is not an ISO 8601 time ({exc})"
    return None


def _canvas_problem(where: str, name: str, value: Any) -> str | None:
    if value is None or value == []:
        return None
    return f"{where} {name!r}: an agent's message carries no Celery canvas links"


def _header_types_problem(headers: dict[str, Any], reserved: Collection[str]) -> str | None:
    for name, value in headers.items():
        if name.startswith("_") or name in reserved:
            return f"header {name[:60]!r} is reserved"
        if name in CANVAS:
            problem = _canvas_problem("header", name, value)
            if problem is not None:
                return problem
            continue
        kind = HEADER_TYPES.get(name)
        problem = None if kind is None else _type_problem(f"{name!r} header", value, kind)
        if problem is not None:
            return problem
    stamped = headers.get("stamped_headers") or []
    odd = next((name for name in stamped if not isinstance(name, str)), None)
    if odd is not None:
        # Celery looks each one up in a dict in the worker's main process.
        return f"'stamped_headers' header must list names, got {type(odd).__name__}"
    retries = headers.get("retries") or 0
    if not 0 <= retries <= MAX_RETRIES_HEADER:
        return f"'retries' header must be 0 to {MAX_RETRIES_HEADER}, got {retries}"
    return None


def _eta_problem(
    eta: str, parse_time: Callable[[str], datetime], horizon_s: float | None, now: float | None
) -> str | None:
    if not eta or horizon_s is None or now is None:
        return None
    ahead = parse_time(eta).timestamp() - now
    if ahead <= horizon_s:
        return None
    return (
        f"'eta' is {ahead:.0f} s ahead, beyond the broker's visibility timeout "
        f"({horizon_s:g} s): it would be delivered again before it ran"
    )


def header_problem(
    headers: dict[str, Any],
    *,
    reserved: Collection[str],
    parse_time: Callable[[str], datetime],
    eta_horizon_s: float | None = None,
    now: float | None = None,
) -> str | None:
    """What is wrong with the headers of an agent's message, or None.

    ``reserved`` names what a header must not be called (the methods of the
    task's request, which Celery would overwrite with it); ``parse_time``
    reads an ``eta`` or ``expires``; an ``eta`` more than ``eta_horizon_s``
    after ``now`` is refused: the broker would hand it out again before it ran.
    """
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return f"message 'id' header must be a non-empty string, got {type(task_id).__name__}"
    problem = (
        _header_types_problem(headers, reserved)
        or _time_limit_problem(headers.get("timelimit"))
        or _when("eta", headers.get("eta"), parse_time)
        or _when("expires", headers.get("expires"), parse_time)
        or _eta_problem(headers.get("eta") or "", parse_time, eta_horizon_s, now)
    )
    return None if problem is None else f"message {problem}"


def _embed_problem(embed: Any) -> str | None:
    if embed is None:
        return None
    if not isinstance(embed, dict):
        return f"embed must be an object or null, got {type(embed).__name__}"
    for name, value in embed.items():
        kind = EMBED_TYPES.get(name)
        if name in CANVAS:
            problem = _canvas_problem("embed", name, value)
        elif kind is None:
            problem = f"embed may not hold {name[:60]!r}"
        else:
            problem = _type_problem(f"embed {name!r}", value, kind)
        if problem is not None:
            return problem
    return None


def body_problem(body: Any) -> str | None:
    """What is wrong with the shape of a decoded task body ``[args, kwargs, embed]``, or None."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        size = f" of {len(body)}" if isinstance(body, list | tuple) else ""
        return f"message body must be [args, kwargs, embed], got {type(body).__name__}{size}"
    args, kwargs, embed = body
    problem = None
    if not isinstance(args, list | tuple):
        problem = f"args must be a list, got {type(args).__name__}"
    elif not isinstance(kwargs, dict):
        problem = f"kwargs must be an object, got {type(kwargs).__name__}"
    else:
        problem = _embed_problem(embed)
    return None if problem is None else f"message body: {problem}"
