"""``POST /events/<topic>``: events from outside, every bad request a 4xx naming it.

The route runs in the test process (``fleetworks.ingest.serve`` on a free
port) against the plugin's ``fleet``: real Redis, SQLite.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy import select

from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.events import MAX_DATA_DEPTH
from fleetworks.ingest import IngestHandler, serve
from fleetworks.models import EVENTS
from fleetworks.settings import Settings


@pytest.fixture
def endpoint(fleet: Fleet) -> Iterator[tuple[str, int]]:
    server = serve(fleet, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", int(server.server_address[1])
    finally:
        server.shutdown()


DEEP_DATA = ('{"a":' * 300 + "1" + "}" * 300).encode()


def post(
    endpoint: tuple[str, int],
    path: str,
    body: bytes | None = b"{}",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    conn = http.client.HTTPConnection(*endpoint, timeout=10)
    try:
        conn.putrequest(method, path)
        sent = {"Content-Type": "application/json"} | (headers or {})
        if body is not None and "Content-Length" not in sent:
            sent["Content-Length"] = str(len(body))
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.endheaders()
        if body is not None:
            conn.send(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    finally:
        conn.close()


def stored(fleet: Fleet) -> list[Any]:
    with transaction(fleet.settings.database) as conn:
        return list(conn.execute(select(EVENTS).order_by(EVENTS.c.position)))


def test_an_event_is_stored_and_a_resend_is_a_no_op(
    fleet: Fleet, endpoint: tuple[str, int]
) -> None:
    body = json.dumps({"ticket": "T-1", "by": "ana"}).encode()
    headers = {"Idempotency-Key": "ack-T-1"}
    status, first, _ = post(endpoint, "/events/ticket.acknowledged?key=T-1", body, headers)
    assert (status, first) == (202, {"id": "ack-T-1", "topic": "ticket.acknowledged",
                                     "stored": True})  # fmt: skip
    status, again, _ = post(endpoint, "/events/ticket.acknowledged?key=T-1", body, headers)
    assert status == 202 and again["stored"] is False and "already stored" in again["detail"]
    rows = stored(fleet)
    assert [(r.event_id, r.topic, r.key, r.data, r.source_agent) for r in rows] == [
        ("ack-T-1", "ticket.acknowledged", "T-1", {"ticket": "T-1", "by": "ana"}, None)
    ]


def test_the_body_id_is_the_event_id_and_without_one_each_post_is_new(
    fleet: Fleet, endpoint: tuple[str, int]
) -> None:
    assert post(endpoint, "/events/file.uploaded", b'{"id": "f-1"}')[1]["id"] == "f-1"
    assert post(endpoint, "/events/file.uploaded", b'{"id": "f-1"}')[1]["stored"] is False
    a = post(endpoint, "/events/file.uploaded", b'{"n": 1}')[1]
    b = post(endpoint, "/events/file.uploaded", b'{"n": 1}')[1]
    assert a["stored"] and b["stored"] and a["id"] != b["id"]
    assert len(stored(fleet)) == 3


@pytest.mark.parametrize(
    "case",
    [
        ("/events/t", b"{not json", {}, 400, "body: invalid JSON"),
        ("/events/t", b"\xff\xfe", {}, 400, "body: invalid JSON"),
        ("/events/t", b"[1, 2]", {}, 400, "body: must be a JSON object, got list"),
        ("/events/t", b'"text"', {}, 400, "body: must be a JSON object, got str"),
        ("/events/t", b'{"a": "x\\u0000"}', {}, 400, "data: a: text must be valid Unicode"),
        ("/events/bad%20topic", b"{}", {}, 400, "topic: 'bad topic' must be dotted words"),
        ("/events/t?key=", b"{}", {}, 400, "key: must be a non-empty string"),
        ("/events/t", b'{"id": 7}', {}, 400, "id: must be a string"),
        ("/events/t", b"{}", {"Idempotency-Key": "k" * 201}, 400, "Idempotency-Key: must be"),
        ("/events/t", b"{}", {"Content-Type": "text/plain"}, 415, "Content-Type: 'text/plain'"),
        ("/events/t", b"{}", {"Content-Length": "x"}, 400, "Content-Length: not a number"),
        ("/events/t", None, {}, 411, "Content-Length: required"),
        ("/events/", b"{}", {}, 404, "not found: POST /events/<topic>"),
        ("/metrics", b"{}", {}, 404, "not found"),
        # Read to the end of the connection, and stored.
        ("/events/t", b"{}", {"Content-Length": "-1"}, 400, "Content-Length: -1 is negative"),
        # json raised RecursionError: the connection dropped without an answer.
        ("/events/t", b"[" * 5000 + b"]" * 5000, {}, 400, "body: invalid JSON: nested too deeply"),
        # Stored, then refused by every subscriber (their message nests it deeper).
        ("/events/t", DEEP_DATA, {}, 400, f"data: nested deeper than {MAX_DATA_DEPTH} levels"),
        # Stored with a NUL in its id (refused by PostgreSQL as a 503), which no
        # subscriber's idempotency key can hold.
        ("/events/t", b"{}", {"Idempotency-Key": "a\x00b"}, 400, "Idempotency-Key: must be"),
        ("/events/t", b'{"id": "a\\u0000b"}', {}, 400, "id: must be a string of 1 to 200"),
    ],
)
def test_a_bad_request_is_a_4xx_naming_the_problem(
    fleet: Fleet, endpoint: tuple[str, int], case: tuple[Any, ...]
) -> None:
    path, body, headers, status, names = case
    got, answer, _ = post(endpoint, path, body, headers)
    assert got == status, answer
    assert names in answer["error"], answer
    assert stored(fleet) == []


def test_a_body_over_the_limit_is_413_unread(fleet: Fleet, endpoint: tuple[str, int]) -> None:
    # The answer comes before the body is sent: the server never reads it
    limit = fleet.settings.ingest_max_bytes
    headers = {"Content-Length": str(limit + 1)}
    status, answer, _ = post(endpoint, "/events/t", None, headers)
    assert status == 413 and f"over the limit of {limit}" in answer["error"]
    assert stored(fleet) == []


def test_another_method_is_405(endpoint: tuple[str, int]) -> None:
    status, answer, headers = post(endpoint, "/events/t", None, method="GET")
    assert status == 405 and headers["Allow"] == "POST" and "not allowed" in answer["error"]


def test_with_a_token_configured_a_request_without_it_is_401(
    fleet: Fleet, endpoint: tuple[str, int]
) -> None:
    fleet.settings = fleet.settings.model_copy(update={"ingest_token": SecretStr("s3cret")})
    for auth in (None, "Bearer wrong", "Basic czNjcmV0", "s3cret"):
        headers = {"Authorization": auth} if auth else {}
        status, answer, sent = post(endpoint, "/events/t", b"{}", headers)
        assert status == 401, auth
        assert "bearer token" in answer["error"] and "Bearer" in sent["WWW-Authenticate"]
    assert stored(fleet) == []
    status, _, _ = post(endpoint, "/events/t", b"{}", {"Authorization": "Bearer s3cret"})
    assert status == 202


def test_listening_beyond_loopback_without_a_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="FLEET_INGEST_TOKEN"):
        Settings(ingest_address="0.0.0.0")
    assert Settings(ingest_address="0.0.0.0", ingest_token=SecretStr("t")).ingest_token


def test_a_method_or_request_the_server_cannot_handle_is_a_4xx_in_json(
    endpoint: tuple[str, int],
) -> None:
    """http.server answered these itself, in HTML: 501 for a method it has no
    handler for, 400 for a request line it cannot read."""
    from tests.test_fuzz_ingest import exchange, parse

    status, answer = parse(exchange(endpoint, b"BREW /events/t HTTP/1.1\r\n\r\n"))
    assert status == 405 and "method BREW not allowed" in answer["error"]
    status, answer = parse(exchange(endpoint, b"POST /events/t HTTP/1.1 extra\r\n\r\n"))
    assert status == 400 and answer["error"].startswith("request: Bad request version")
    status, answer = parse(exchange(endpoint, b"POST /events/t HTTP/1.1\r\n" + b"X: y\r\n" * 101))
    assert status == 431 and answer["error"].startswith("request: Too many headers")


def test_a_body_refused_before_it_is_read_does_not_reset_the_connection(
    fleet: Fleet, endpoint: tuple[str, int]
) -> None:
    """A request refused before its body is read (401 here) gets its answer
    whole: the server reads the body first, when it is within the limit; the
    connection was reset under the client before."""
    from tests.test_fuzz_ingest import parse

    fleet.settings = fleet.settings.model_copy(update={"ingest_token": SecretStr("s3cret")})
    body = b'{"a": "' + b"x" * 500_000 + b'"}'
    head = f"POST /events/t HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    for _ in range(5):
        with socket.create_connection(endpoint, timeout=10) as sock:
            sock.sendall(head + body)
            answer = b"".join(iter(lambda: sock.recv(65_536), b""))
        status, reply = parse(answer)
        assert status == 401 and "bearer token" in reply["error"]
    assert stored(fleet) == []


def test_a_body_announced_and_not_sent_is_408_in_time(
    fleet: Fleet, endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that announces a body and then says nothing held a server
    thread forever; it gets 408 after the handler's timeout."""
    from tests.test_fuzz_ingest import parse

    monkeypatch.setattr(IngestHandler, "timeout", 0.5)
    with socket.create_connection(endpoint, timeout=10) as sock:
        sock.sendall(b"POST /events/t HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        answer = b"".join(iter(lambda: sock.recv(65_536), b""))
    status, reply = parse(answer)
    assert status == 408 and reply["error"] == "body: 100 bytes announced, not sent in time"
    assert stored(fleet) == []
