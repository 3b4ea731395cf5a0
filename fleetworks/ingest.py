"""Triggers from outside: ``POST /events/<topic>`` stores an event for the relay.

Served by ``fleetworks ingest`` and by ``up`` (``FLEET_INGEST_ADDRESS``,
``FLEET_INGEST_PORT``). The body is one JSON object, the event's data. Its
id is the ``Idempotency-Key`` header, else the body's ``id`` field, else a
new UUID; a resend with an id already stored changes nothing and says so
(``"stored": false``). ``?key=`` sets the event's key (its subscribers' runs
of one key go one at a time).

Answers: 202 ``{"id", "topic", "stored"}``; 400 naming the field (invalid
JSON, a body that is not an object, a bad topic, key or id); 401 without the
bearer token when ``FLEET_INGEST_TOKEN`` is set (and it must be set to
listen beyond loopback, as Flower requires its basic auth); 404 for any
other path; 405 for any other method; 408 for a body announced and not sent
within :attr:`IngestHandler.timeout`; 411 without a length; 413 past
``FLEET_INGEST_MAX_BYTES``; 415 for a body that is not JSON; 503 while the
results database is unreachable (the caller retries; nothing half-stored).
A request the server cannot parse (its request line, too many headers) gets
the server's own 4xx, as JSON too. Every refusal is ``{"error": "<what>: ..."}``.
A body refused before it is read is read anyway when within the limit, so
the client gets the answer rather than a reset connection.

The standard library's threading HTTP server is enough for this one route
and is what the metrics endpoint already uses: no web framework is added.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sqlalchemy.exc import DBAPIError

from fleetworks import events, tracing
from fleetworks.agent import Fleet

log = logging.getLogger(__name__)

PREFIX = "/events/"


class Refused(Exception):
    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


class IngestHandler(BaseHTTPRequestHandler):
    """The ingest route; :func:`serve` makes a subclass bound to one fleet."""

    fleet: Fleet
    #: Seconds a connection may stay silent (the request line, headers or body).
    timeout = 30.0
    #: Whether the body was read (or is not to be): what is left is read before answering.
    _body_read = False

    @property
    def _token(self) -> str | None:
        secret = self.fleet.settings.ingest_token
        return secret.get_secret_value() if secret else None

    def do_POST(self) -> None:
        try:
            status, body = self._ingest()
            self._reply(status, body)
        except Refused as refused:
            self._reply(refused.status, {"error": refused.error}, refused.headers)

    def do_GET(self) -> None:
        error = f"method {self.command} not allowed: POST {PREFIX}<topic>"
        self._reply(405, {"error": error}, {"Allow": "POST"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What the server itself refuses (a request line or headers it cannot
        parse, a method it has no handler for), answered as JSON like the rest."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            self.do_GET()  # any other method: 405, not 501
            return
        self.close_connection = True
        # A request line it could not read leaves HTTP/0.9, which has no status
        # line: the refusal gets one.
        self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "refused"
        self._reply(code, {"error": f"request: {message or phrase}"})

    def _ingest(self) -> tuple[int, dict[str, Any]]:
        url = urlsplit(self.path)
        if not url.path.startswith(PREFIX) or len(url.path) == len(PREFIX):
            raise Refused(404, f"not found: POST {PREFIX}<topic>")
        self._authorize()
        topic = unquote(url.path[len(PREFIX) :])
        data = self._body()
        event_id = self._event_id(data)
        keys = parse_qs(url.query, keep_blank_values=True).get("key")
        key = keys[0] if keys else None
        try:
            with tracing.incoming(f"ingest {topic}", self.headers, {"fleetworks.topic": topic}):
                published = events.publish(
                    topic, data, key=key, event_id=event_id, app=self.fleet.app
                )
        except events.EventError as bad:
            raise Refused(400, str(bad)) from None
        except DBAPIError as exc:
            log.warning("ingest: results database unreachable: %s", exc)
            raise Refused(
                503, "results database unreachable; retry", {"Retry-After": "1"}
            ) from None
        body: dict[str, Any] = {"id": published.event_id, "topic": topic}
        body["stored"] = published.stored
        if not published.stored:
            body["detail"] = "an event with this id is already stored; nothing changed"
        return 202, body

    def _authorize(self) -> None:
        token = self._token
        if token is None:
            return
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise Refused(
                401, "Authorization: a valid bearer token is required",
                {"WWW-Authenticate": 'Bearer realm="fleetworks"'},
            )  # fmt: skip

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise Refused(411, "Content-Length: required")
        try:
            size = int(length)
        except ValueError:
            raise Refused(400, f"Content-Length: not a number: {length[:40]!r}") from None
        if size < 0:
            raise Refused(400, f"Content-Length: {size} is negative")
        limit = self.fleet.settings.ingest_max_bytes
        if size > limit:
            self.close_connection = self._body_read = True  # the body is not read
            raise Refused(413, f"body: {size} bytes is over the limit of {limit}")
        kind = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if kind.lower() != "application/json":
            raise Refused(415, f"Content-Type: {kind!r} is not application/json")
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            self.close_connection = True
            raise Refused(408, f"body: {size} bytes announced, not sent in time") from None
        finally:
            self._body_read = True
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise Refused(400, f"body: invalid JSON: {exc}") from None
        except RecursionError:
            raise Refused(400, "body: invalid JSON: nested too deeply to read") from None
        if not isinstance(data, dict):
            raise Refused(400, f"body: must be a JSON object, got {type(data).__name__}")
        return data

    def _event_id(self, data: dict[str, Any]) -> str | None:
        header = self.headers.get("Idempotency-Key")
        if header is not None:
            if events.id_problem(header) is not None:
                raise Refused(400, f"Idempotency-Key: {events.id_problem(header)}")
            return header
        if "id" not in data:
            return None
        given = data["id"]
        if events.id_problem(given) is not None:
            raise Refused(400, f"id: {events.id_problem(given)}")
        return str(given)

    def _drain(self) -> None:
        """Read a body no answer needed, when it is within the limit, so the
        client gets the answer and not a reset connection."""
        self._body_read = True
        try:
            size = int(self.headers.get("Content-Length", ""))
        except (ValueError, AttributeError):
            size = -1
        if not 0 < size <= self.fleet.settings.ingest_max_bytes:
            self.close_connection = True
            return
        try:
            self.rfile.read(size)
        except OSError:
            self.close_connection = True

    def _reply(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        if not self._body_read and self.command is not None:
            self._drain()
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("ingest: " + format, *args)


def serve(fleet: Fleet, address: str | None = None, port: int | None = None) -> ThreadingHTTPServer:
    """Serve the ingest route from a daemon thread; returns the server."""
    settings = fleet.settings
    server = ThreadingHTTPServer(
        (address or settings.ingest_address, settings.ingest_port if port is None else port),
        type("BoundIngestHandler", (IngestHandler,), {"fleet": fleet}),
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fleet-ingest", daemon=True).start()
    return server
