"""``POST /events/<topic>`` fuzzed: every answer a 202 that stored the event,
or a 4xx whose JSON body names the problem; never a 5xx, never a dropped
connection, never an exception in the server.

The requests are written byte by byte on a socket (any method, path,
header, length and body, and some that are not HTTP at all) to the ingest
server ``fleetworks ingest`` and ``up`` run (:func:`fleetworks.ingest.serve`),
on a real Redis and on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import re
import socket
import string
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import func, select

from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.events import TOPIC_PATTERN
from fleetworks.ingest import serve
from fleetworks.models import EVENTS
from fleetworks.tracing import EVENT_TRACE_KEY
from tests.fuzzing import SHORT, SLOW, report, run

TOKEN = "fuzz-token"
#: Bytes: the largest body taken in these tests (small, so 413 is cheap to reach).
LIMIT = 65_536
#: How a refusal's error starts: the field, header or part of the request at fault.
NAMED = re.compile(
    r"^((body|topic|key|id|data|Idempotency-Key|Content-Length|Content-Type|Authorization|"
    r"not found|request): |method \S+ not allowed: )"
)

# --- requests -------------------------------------------------------------------

TEXT = st.characters(exclude_categories=("Cs",))
#: Printable Latin-1 (what an HTTP header can carry), without CR and LF.
LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(lambda c: c != "\x7f")
#: Dotted words (what TOPIC_PATTERN takes), built directly: drawing from the
#: pattern itself is several times slower.
VALID_TOPIC = st.lists(
    st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12),
    min_size=1,
    max_size=4,
).map(".".join)
VALID_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
VALID_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | VALID_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(VALID_TEXT, inner, max_size=4),
    max_leaves=16,
)
VALID_DATA = st.dictionaries(
    VALID_TEXT.filter(lambda k: k not in ("id", EVENT_TRACE_KEY)), VALID_VALUES, max_size=6
)
#: Event ids: new ones mostly, a few sent again and again (resends).
VALID_ID = st.integers(0, 9).flatmap(
    lambda n: (
        st.uuids().map(str)
        if n < 7
        else st.sampled_from([f"resent-{n}" for n in range(5)])
        if n < 9
        else st.text(string.ascii_letters + "-_.:", min_size=1, max_size=200)
    )
)
#: The body holds no ``id`` (None is an id, an invalid one).
NO_ID = object()
INVALID_ID = st.none() | st.integers() | st.just("") | st.text(TEXT, min_size=201, max_size=260)
VALID_KEY = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=40
)


def usually(draw: st.DrawFn) -> bool:
    """True nine times in ten: the valid choice (hypothesis starts from it)."""
    return bool(draw(st.integers(0, 9)) < 9)


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@dataclass
class Request:
    """One request, its parts, and whether every part was drawn valid."""

    raw: bytes
    method: str = "POST"
    path: str = ""
    valid: bool = True
    token_on: bool = False
    #: What a 202 must have stored: (event id if given, topic, key, data).
    topic: str = ""
    key: str | None = None
    data: Any = None
    event_id: str | None = None
    expected: int | None = None
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        shown = self.raw if len(self.raw) <= 600 else self.raw[:600] + b"..."
        return f"Request({shown!r}, valid={self.valid}, expected={self.expected})"


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, Any, bool]:
    """A body, the data it holds when it is a JSON object, and whether it is valid."""
    if usually(draw):
        data = draw(VALID_DATA)
        return json.dumps(data, ensure_ascii=draw(st.booleans())).encode(), data, True
    hostile = draw(
        st.sampled_from(
            [
                b'{"a": "x\\u0000y"}',
                b'{"\\u0000": 1}',
                b'{"a": "\\ud800"}',
                b'{"a": NaN}',
                b'{"a": Infinity}',
                b'{"a": -Infinity}',
                b'{"a": ' + b"9" * 5000 + b"}",
                nested(300).encode(),
                nested(5_000).encode(),
                b"[" * 30_000 + b"]" * 30_000,
                b"[1, 2]",
                b'"text"',
                b"null",
                b"",
                b"\xef\xbb\xbf{}",
                b"\xff\xfe{}",
                b"{not json",
                json.dumps({EVENT_TRACE_KEY: {"traceparent": "x"}}).encode(),
            ]
        )
        | st.binary(max_size=200)
        | st.builds(lambda v: json.dumps(v).encode(), VALID_VALUES)
    )
    try:
        data = json.loads(hostile.decode("utf-8"))
    except (ValueError, RecursionError):
        data = None
    return hostile, data, False


#: Headers the generator sets itself; the extra ones it draws are named otherwise.
OWN_HEADERS = {
    "content-type", "content-length", "authorization", "idempotency-key", "transfer-encoding",
    "expect", "connection",
}  # fmt: skip
PATH_CHARS = string.ascii_letters + string.digits + string.punctuation


@st.composite
def paths(draw: st.DrawFn) -> str:
    topic = draw(VALID_TOPIC) if usually(draw) else draw(st.text(TEXT, max_size=60))
    if draw(st.integers(0, 30)) == 30:
        topic = draw(st.text(string.ascii_letters, min_size=190, max_size=240))
    path = "/events/" + quote(topic, safe=draw(st.sampled_from(["", "/", ".-_~"])))
    if not usually(draw):
        path = draw(
            st.sampled_from(["/events/", "/events", "/", "/metrics", "/events//x", "//x/events/t"])
            | st.text(PATH_CHARS, max_size=30).map(lambda p: "/" + p)
        )
    if draw(st.booleans()):
        key = draw(VALID_KEY) if usually(draw) else draw(st.text(TEXT, max_size=40))
        if draw(st.integers(0, 30)) == 30:
            key = "k" * draw(st.integers(490, 510))
        path += "?key=" + quote(key, safe="")
    return path


@st.composite
def own_headers(draw: st.DrawFn, size: int) -> tuple[dict[str, str], bool]:
    """Content-Type, Content-Length, Idempotency-Key, Authorization; and
    whether the server is to require the token."""
    headers: dict[str, str] = {}
    kind = draw(st.sampled_from(["application/json", "APPLICATION/JSON; charset=utf-8"]))
    if not usually(draw):
        kind = draw(st.sampled_from(["text/plain", "", "json"]) | st.text(LATIN1))
    if draw(st.integers(0, 9)) < 9:
        headers["Content-Type"] = kind
    length: str | None = str(size)
    if not usually(draw):
        length = draw(
            st.none()
            | st.sampled_from(["-1", "abc", "", " 5 ", "1e3", str(LIMIT + 1), "9" * 5000])
            | st.integers(0, max(0, size - 1)).map(str)
        )
    if length is not None:
        headers["Content-Length"] = length
    if draw(st.integers(0, 3)) == 3:
        header_id = draw(VALID_ID) if usually(draw) else draw(st.text(LATIN1, max_size=260))
        headers["Idempotency-Key"] = header_id
    token_on = draw(st.integers(0, 9)) >= 7
    auth: str | None = f"Bearer {TOKEN}" if token_on else None
    if not usually(draw):
        auth = draw(
            st.sampled_from([f"bearer {TOKEN} ", "Bearer wrong", TOKEN, ""])
            | st.text(LATIN1, max_size=40)
            | st.none()
        )
    if auth is not None:
        headers["Authorization"] = auth
    return headers, token_on


@st.composite
def requests(draw: st.DrawFn) -> Request:
    if draw(st.integers(0, 19)) == 19:
        garbage = draw(st.binary(max_size=300) | st.text(LATIN1, max_size=300).map(str.encode))
        return Request(raw=garbage, valid=False, notes=["not HTTP"])
    method = "POST"
    if not usually(draw):
        others = st.sampled_from(["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
        method = draw(others | st.text(string.ascii_uppercase, min_size=1, max_size=8))
    path = draw(paths())
    body, data, body_ok = draw(bodies())
    body_id: Any = NO_ID
    if draw(st.integers(0, 3)) == 3 and isinstance(data, dict):
        body_id = draw(VALID_ID) if usually(draw) else draw(INVALID_ID)
        data = {**data, "id": body_id}
        body = json.dumps(data).encode()
    headers, token_on = draw(own_headers(len(body)))
    names = st.text(string.ascii_letters + "-", min_size=1, max_size=20)
    extra = draw(st.dictionaries(names, st.text(LATIN1, max_size=60), max_size=3))
    headers |= {k: v for k, v in extra.items() if k.lower() not in OWN_HEADERS}
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sent = body
    if len(body) > LIMIT:
        # Refused unread (413): what the server never reads is not sent in full,
        # or the connection it closes would reset before its answer is read.
        sent = body[:4096]
    request = Request(raw=head.encode("latin-1") + b"\r\n" + sent, method=method, path=path)
    request.token_on = token_on
    return judged(request, headers, body, data, body_ok=body_ok, body_id=body_id)


def judged(
    request: Request,
    headers: dict[str, str],
    body: bytes,
    data: Any,
    *,
    body_ok: bool,
    body_id: Any,
) -> Request:
    """``request`` with what the server must do with it: the refusal it must
    get before its body is read, or what it stores and whether all is valid.

    Parsed with the standard library as an HTTP server would: a header's
    value loses its leading blanks, the path is split, unquoted, and its
    query read for ``key``.
    """
    seen = {k.lower(): v.lstrip(" \t") for k, v in headers.items()}
    # http.server makes a path starting with // one starting with / (gh-87389).
    path = "/" + request.path.lstrip("/") if request.path.startswith("//") else request.path
    url = urlsplit(path)
    request.topic = unquote(url.path[len("/events/") :])
    keys = parse_qs(url.query, keep_blank_values=True).get("key")
    request.key = keys[0] if keys else None
    request.data = data
    request.event_id = seen.get("idempotency-key", None if body_id is NO_ID else body_id)
    request.expected = expected_status(request, url.path, seen)
    length_ok = seen.get("content-length", "").strip() == str(len(body))
    topic_ok = bool(TOPIC_PATTERN.fullmatch(request.topic)) and len(request.topic) <= 200
    key = request.key
    key_ok = key is None or (0 < len(key) <= 500 and "\x00" not in key)
    if "idempotency-key" in seen:
        # The header is the id; the body's id is only data then, text a row must hold.
        id_ok = _valid_id(seen["idempotency-key"])
        id_ok = id_ok and (not isinstance(body_id, str) or _storable(body_id))
    else:
        id_ok = body_id is NO_ID or _valid_id(body_id)
    request.valid = request.expected is None and length_ok and body_ok and topic_ok and key_ok
    request.valid = request.valid and id_ok
    return request


def _storable(text: str) -> bool:
    return "\x00" not in text and all(not 0xD800 <= ord(c) <= 0xDFFF for c in text)


def _valid_id(event_id: Any) -> bool:
    return isinstance(event_id, str) and 0 < len(event_id) <= 200 and _storable(event_id)


def expected_status(request: Request, path: str, headers: dict[str, str]) -> int | None:
    """The refusal the request must get before its body is read, or None."""
    if request.method != "POST":
        return 405
    if not path.startswith("/events/") or path == "/events/":
        return 404
    if request.token_on and not _authorized(headers.get("authorization", "")):
        return 401
    if "content-length" not in headers:
        return 411
    return _length_status(headers)


def _authorized(value: str) -> bool:
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and token.strip() == TOKEN


def _length_status(headers: dict[str, str]) -> int | None:
    try:
        size = int(headers["content-length"])
    except ValueError:
        return 400
    if size < 0:
        return 400
    if size > LIMIT:
        return 413
    kind = headers.get("content-type", "application/json").split(";")[0].strip()
    return None if kind.lower() == "application/json" else 415


# --- sending ----------------------------------------------------------------------


def exchange(endpoint: tuple[str, int], raw: bytes) -> bytes:
    """Send ``raw``, close the sending side, read the whole answer."""
    with socket.create_connection(endpoint, timeout=20) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65_536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


@dataclass
class Ingest:
    fleet: Fleet
    endpoint: tuple[str, int]
    errors: list[str]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ingest(fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[Ingest]:
    """The ingest server on a free port, on each results database in turn,
    counting every exception a request raised inside the server."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgresql_url")
        fleet.settings = fleet.settings.model_copy(update={"database_url": url})
    with transaction(fleet.settings.database) as conn:
        conn.execute(EVENTS.delete())
    fleet.settings = fleet.settings.model_copy(update={"ingest_max_bytes": LIMIT})
    server = serve(fleet, "127.0.0.1", 0)
    errors: list[str] = []

    def handle_error(_request: Any, _address: Any) -> None:
        import traceback

        errors.append(traceback.format_exc())

    server.handle_error = handle_error  # type: ignore[method-assign]
    try:
        yield Ingest(fleet, ("127.0.0.1", int(server.server_address[1])), errors)
    finally:
        server.shutdown()
        with transaction(fleet.settings.database) as conn:
            conn.execute(EVENTS.delete())


def stored_row(fleet: Fleet, event_id: str) -> Any:
    with transaction(fleet.settings.database) as conn:
        return conn.execute(select(EVENTS).where(EVENTS.c.event_id == event_id)).first()


class Fuzz:
    """Sends each request and checks its answer against what it must be."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.counts: Counter[str] = Counter()
        self.new_ids: set[str] = set()
        settings = ingest.fleet.settings
        self.with_token = settings.model_copy(update={"ingest_token": SecretStr(TOKEN)})
        self.without = settings.model_copy(update={"ingest_token": None})

    def check(self, request: Request) -> None:
        self.counts["requests"] += 1
        self.ingest.fleet.settings = self.with_token if request.token_on else self.without
        answer = exchange(self.ingest.endpoint, request.raw)
        assert not self.ingest.errors, self.ingest.errors[-1]
        if request.notes == ["not HTTP"] and not answer.startswith(b"HTTP/"):
            # Nothing, a blank line, or an HTTP/0.9 request line: no status line to give.
            self.counts["not HTTP, closed without a status"] += 1
            return
        assert answer, f"no answer to {request.raw[:300]!r}"
        status, body = parse(answer)
        context = (status, body, request.raw[:300])
        if status >= 500:
            self.counts["5xx"] += 1
        assert status < 500, context
        assert request.expected is None or status == request.expected, context
        assert status == 202 or not request.valid, context
        if status == 202:
            self.accepted(request, body)
            return
        self.counts[f"refused {status}"] += 1
        assert 400 <= status < 500, context
        if request.method == "HEAD":
            assert (status, body) == (405, {}), context  # an answer to HEAD has no body
            return
        assert NAMED.match(str(body.get("error", ""))), context

    def accepted(self, request: Request, body: dict[str, Any]) -> None:
        self.counts["accepted"] += 1
        assert body["topic"] == request.topic
        if request.event_id is not None:
            assert body["id"] == request.event_id
        row = stored_row(self.ingest.fleet, body["id"])
        assert row is not None, f"202 but {body['id']!r} is not stored"
        if not body["stored"]:
            self.counts["accepted, already stored"] += 1
            return
        assert (row.topic, row.key, row.data) == (request.topic, request.key, request.data)
        assert body["id"] not in self.new_ids, body
        self.new_ids.add(body["id"])

    def finish(self, examples: int, chosen: int | None) -> Counter[str]:
        counts, ingest = self.counts, self.ingest
        with transaction(ingest.fleet.settings.database) as conn:
            rows = conn.execute(select(func.count()).select_from(EVENTS)).scalar_one()
        assert rows == len(self.new_ids), "every event answered as stored is stored, only those"
        counts["events stored"] = rows
        counts["server exceptions"] = len(ingest.errors)
        counts["5xx"] += 0
        # The server still takes a valid event.
        ingest.fleet.settings = self.without
        status, body = parse(exchange(ingest.endpoint, _valid_request()))
        assert status == 202 and body["stored"], body
        report(f"ingest on {ingest.fleet.settings.database.split(':')[0]}", counts, chosen)
        assert counts["requests"] >= examples
        assert counts["server exceptions"] == 0 and counts["5xx"] == 0
        assert threading.active_count() < 50, "request threads left behind"
        return counts


def fuzz(ingest: Ingest, examples: int, *, slow: bool) -> Counter[str]:
    fuzzing = Fuzz(ingest)
    chosen = run(requests(), examples, fuzzing.check, slow=slow)
    return fuzzing.finish(examples, chosen)


def _valid_request() -> bytes:
    body = json.dumps({"n": 1, "id": f"after-{uuid.uuid4()}"}).encode()
    return (
        b"POST /events/fuzz.done HTTP/1.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_fuzzed_requests_are_stored_or_refused_naming_the_problem(ingest: Ingest) -> None:
    counts = fuzz(ingest, SHORT, slow=False)
    assert counts["accepted"] > 0 and counts["refused 400"] > 0


@pytest.mark.slow
def test_fuzzed_requests_at_length(ingest: Ingest) -> None:
    counts = fuzz(ingest, SLOW, slow=True)
    assert counts["accepted"] > 0 and counts["refused 400"] > 0
