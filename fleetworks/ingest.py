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
other path; 405 for another method; 411 without a length; 413 past
``FLEET_INGEST_MAX_BYTES``; 415 for a body that is not JSON; 503 while the
results database is unreachable (the caller retries; nothing half-stored).

The standard library's threading HTTP server is enough for this one route
and is what the metrics endpoint already uses: no web framework is added.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sqlalchemy.exc import DBAPIError

from fleetworks import events, tracing
from fleetworks.agent import Fleet

log = logging.getLogger(__name__)

PREFIX = "/events/"
MAX_ID_CHARS = 200


class Refused(Exception):
    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


class IngestHandler(BaseHTTPRequestHandler):
    """The ingest route; :func:`serve` makes a subclass bound to one fleet."""

    fleet: Fleet

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

    do_PUT = do_DELETE = do_PATCH = do_GET

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
        limit = self.fleet.settings.ingest_max_bytes
        if size > limit:
            self.close_connection = True  # the body is not read
            raise Refused(413, f"body: {size} bytes is over the limit of {limit}")
        kind = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if kind.lower() != "application/json":
            raise Refused(415, f"Content-Type: {kind!r} is not application/json")
        raw = self.rfile.read(size)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise Refused(400, f"body: invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Refused(400, f"body: must be a JSON object, got {type(data).__name__}")
        return data

    def _event_id(self, data: dict[str, Any]) -> str | None:
        header = self.headers.get("Idempotency-Key")
        if header is not None:
            if not header or len(header) > MAX_ID_CHARS:
                raise Refused(400, f"Idempotency-Key: must be 1 to {MAX_ID_CHARS} characters")
            return header
        if "id" not in data:
            return None
        given = data["id"]
        if not isinstance(given, str) or not given or len(given) > MAX_ID_CHARS:
            raise Refused(400, f"id: must be a string of 1 to {MAX_ID_CHARS} characters")
        return given

    def _reply(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
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
