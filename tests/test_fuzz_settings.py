"""``FLEET_*`` variables fuzzed: :class:`fleetworks.settings.Settings` is
either valid and usable (its derived URLs, its timings) or refused with a
pydantic ``ValidationError`` whose every problem names its variable; never
anything else.

The values are what an environment can hold: any bytes but NUL, decoded the
way Python decodes the environment (undecodable bytes as surrogates).
"""

from __future__ import annotations

import os
import string
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetworks.settings import Settings, describe, redact
from fleetworks.timing import Timings
from tests.fuzzing import SHORT, SLOW, report, run

FIELDS = sorted(Settings.model_fields)
#: Variables of the deployment or of nothing at all: ignored by Settings.
OTHERS = ["FLEET_MENTIONS_SEED", "FLEET_NOT_A_SETTING", "FLEET_", "FLEET_QUEUE_NAME"]

ENV_BYTES = st.binary(max_size=60).map(lambda b: b.replace(b"\x00", b""))
ENV_TEXT = ENV_BYTES.map(os.fsdecode)
NUMBERS = (
    st.sampled_from(
        [
            "0",
            "1",
            "-1",
            "2",
            "8",
            "65535",
            "65536",
            "1e3",
            "0.1",
            "-0.0",
            "1e309",
            "inf",
            "-inf",
            "nan",
            "NaN",
            "9" * 30,
            "9" * 5000,
            "0x10",
            "1_000",
            " 7 ",
            "+3",
            "1.5",
            "",
            "true",
        ]
    )
    | st.integers(-(10**20), 10**20).map(str)
    | st.floats().map(str)
)
WORDS = st.sampled_from(
    [
        "json",
        "text",
        "auto",
        "required",
        "optional",
        "none",
        "INFO",
        "debug",
        "Warn",
        "FOO",
        "yes",
        "no",
        "on",
        "off",
        "1",
        "0",
        "True",
        "false",
        "prefork",
        "solo",
        "config",
        "127.0.0.1",
        "localhost",
        "::1",
        "0.0.0.0",
        "example.org",
        "user:pass",
        "",
    ]
)
HOSTS = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "[::1", "h", "", "user:pw@h", "@"])
PORTS = st.sampled_from(["", ":6379", ":abc", ":99999", ":-1", ":"])
URLS = st.builds(
    lambda scheme, host, port, rest: f"{scheme}{host}{port}{rest}",
    st.sampled_from(
        [
            "redis://",
            "rediss://",
            "unix://",
            "amqp://",
            "etcd://",
            "http://",
            "https://",
            "sqlite:///",
            "postgresql+psycopg://",
            "",
            "ftp://",
            "://",
        ]
    ),
    HOSTS,
    PORTS,
    st.sampled_from(["", "/0", "/db", "/v1/traces", "?x=1", "/a b", ",h2:1"]),
)
PATHS = st.sampled_from(["", ".", "/", "/nonexistent/ca.pem", "~", "a/../b", " "])
VALUES = ENV_TEXT | NUMBERS | WORDS | URLS | PATHS | st.text(string.printable, max_size=30)


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=6, unique=True))
    env = {f"FLEET_{name.upper()}": draw(VALUES) for name in names}
    if draw(st.integers(0, 9)) == 9:
        env[draw(st.sampled_from(OTHERS))] = draw(VALUES)
    return env


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Exactly ``values`` as the FLEET_* variables, the others put back after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("FLEET_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)


def check_named(exc: ValidationError, env: dict[str, str]) -> None:
    """Every problem of ``exc`` names a variable that was set, and so does
    what the CLI prints (:func:`describe`)."""
    text = describe(exc)
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if loc:
            name = f"FLEET_{str(loc[0]).upper()}"
            assert name in env, (name, err, env)
            assert name in text, (name, text)
        else:
            message = str(err["msg"])
            assert any(name in message for name in env), (message, env)


def check_usable(settings: Settings) -> None:
    """What the fleet derives from valid settings, before anything connects."""
    for url in (
        settings.broker, settings.database, settings.leadership_url, settings.redis_url,
        settings.otel_endpoint, settings.otel_traces_url,
    ):  # fmt: skip
        if url is not None:
            redact(url)
    assert isinstance(settings.modules, list)
    settings.redis_tls(settings.broker)
    try:
        settings.redis_tls(settings.redis)
    except ValueError as exc:  # the project's own error, naming the variable
        assert "FLEET_REDIS_URL" in str(exc)
    Timings.from_settings(settings).check()


def fuzz(examples: int, *, slow: bool) -> Counter[str]:
    counts: Counter[str] = Counter()

    def check(env: dict[str, str]) -> None:
        counts["environments"] += 1
        counts["variables set"] += len(env)
        with environment(env):
            try:
                settings = Settings(_env_file=None)  # type: ignore[call-arg]
            except ValidationError as exc:
                counts["refused"] += 1
                counts["problems named"] += len(exc.errors())
                check_named(exc, env)
                return
            except Exception:
                counts["crashed"] += 1
                raise
        counts["valid"] += 1
        check_usable(settings)

    chosen = run(environments(), examples, check, slow=slow)
    counts["crashed"] += 0
    report("settings", counts, chosen)
    assert counts["environments"] >= examples
    assert counts["crashed"] == 0
    assert counts["valid"] > 0 and counts["refused"] > 0
    return counts


def test_fuzzed_environments_are_valid_or_refused_naming_the_variable() -> None:
    fuzz(SHORT, slow=False)


@pytest.mark.slow
def test_fuzzed_environments_at_length() -> None:
    fuzz(SLOW, slow=True)


# --- what the fuzzing found ------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        # pydantic raised UnicodeEncodeError quoting it in Flower's loopback message.
        ({"FLEET_FLOWER_ADDRESS": os.fsdecode(b"\x80")}, "FLEET_FLOWER_ADDRESS: not UTF-8 text"),
        ({"FLEET_BROKER_URL": os.fsdecode(b"redis://h\xff/0")}, "FLEET_BROKER_URL: not UTF-8"),
        # The CLI configured logging with it and every command ended in a traceback.
        ({"FLEET_LOG_LEVEL": "loud"}, "FLEET_LOG_LEVEL: 'loud' is not a log level"),
        # Valid, then the timings derived from it refused to start the app.
        ({"FLEET_MAX_TIME_LIMIT_S": "inf"}, "FLEET_MAX_TIME_LIMIT_S: Input should be a finite"),
        ({"FLEET_MAX_TIME_LIMIT_S": "1e308"}, "FLEET_MAX_TIME_LIMIT_S: Input should be less"),
        ({"FLEET_AUTOSCALE_SCALE_DOWN_AFTER_S": "inf"}, "FLEET_AUTOSCALE_SCALE_DOWN_AFTER_S: "),
        ({"FLEET_FLOWER_PORT": "99999"}, "FLEET_FLOWER_PORT: Input should be less than or equal"),
        ({"FLEET_EMBEDDED_REDIS_PORT": "0"}, "FLEET_EMBEDDED_REDIS_PORT: Input should be greater"),
        # pydantic's "Value error, Invalid IPv6 URL", naming nothing.
        ({"FLEET_OTEL_ENDPOINT": "http://[::1"}, "FLEET_OTEL_ENDPOINT 'http://[::1' is not an"),
        # "Port could not be cast to integer value", from redacting the URL for the message.
        ({"FLEET_LEADERSHIP_URL": "ftp://u:pw@h:port"}, "FLEET_LEADERSHIP_URL 'ftp://***@h:port'"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(env: dict[str, str], named: str) -> None:
    with environment(env), pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert named in describe(refused.value)
    check_named(refused.value, env)


def test_an_empty_variable_is_as_if_unset() -> None:
    """``FLEET_BROKER_URL=`` made the broker "" (not embedded, yet the
    embedded URL), ``FLEET_QUEUE=`` a queue named ""."""
    with environment({"FLEET_BROKER_URL": "", "FLEET_QUEUE": "", "FLEET_OTEL_ENDPOINT": ""}):
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.embedded and settings.broker_url is None
    assert settings.queue == "fleet" and settings.otel_endpoint is None


def test_redact_masks_a_url_it_cannot_take_apart() -> None:
    assert redact("redis://:s3cret@h:port/0") == "redis://***@h:port/0"
    assert redact("redis://u:s3cret@[::1/0") == "redis://***@[::1/0"
    assert redact("redis://u:s3cret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact("not a url") == "not a url"
