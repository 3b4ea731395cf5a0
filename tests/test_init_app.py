"""``init_app``: an existing Celery app made a fleet, guarantees checked by name."""

from __future__ import annotations

import dataclasses

import pytest
from celery import Celery
from kombu import Queue
from kombu.transport.native_delayed_delivery import calculate_routing_key
from pydantic import ValidationError

from fleetworks import GuaranteeError, create_app, fleet_of, init_app, load_app
from fleetworks.agent import queue_of
from fleetworks.reaper import control_queue
from fleetworks.settings import Settings
from fleetworks.timing import Timings

SETTINGS = Settings(broker_url="redis://127.0.0.1:1/0", redis_url="redis://127.0.0.1:1/1")


def app_with(**conf: object) -> Celery:
    app = Celery("team", broker="redis://127.0.0.1:1/5")
    app.conf.update(conf)
    return app


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"accept_content": ["json", "pickle"]}, "accept_content"),
        ({"accept_content": ["application/x-yaml"]}, "accept_content"),
        ({"task_serializer": "pickle"}, "task_serializer"),
        ({"task_acks_late": False}, "task_acks_late"),
        ({"task_reject_on_worker_lost": False}, "task_reject_on_worker_lost"),
        (
            {"broker_transport_options": {"visibility_timeout": 60}},
            "broker_transport_options['visibility_timeout']",
        ),
    ],
)
def test_a_setting_that_breaks_a_guarantee_is_refused_by_name(
    conf: dict[str, object], named: str
) -> None:
    with pytest.raises(GuaranteeError, match=named.replace("[", r"\[")):
        init_app(app_with(**conf), SETTINGS)


def test_the_teams_own_choices_are_kept_and_the_fleets_applied() -> None:
    app = app_with(
        task_default_queue="shop",
        broker_transport_options={"visibility_timeout": 3600, "fanout_prefix": True},
        task_routes={"shop.*": {"queue": "shop"}},
    )
    fleet = init_app(app, Settings(broker_url=None, redis_url="redis://127.0.0.1:1/1"))
    assert fleet_of(app) is fleet
    assert app.conf.task_default_queue == "shop"
    # the team's routes come after the fleet's router of batch agents' queues
    assert app.conf.task_routes[1:] == [{"shop.*": {"queue": "shop"}}]
    assert getattr(app.conf.task_routes[0], "fleet_batch_router", False)
    assert app.conf.broker_url == "redis://127.0.0.1:1/5", "the app's broker is kept"
    assert fleet.settings.broker == "redis://127.0.0.1:1/5"
    assert fleet.settings.queue == "shop", "its workers consume the app's own queue"
    options = app.conf.broker_transport_options
    assert options["fanout_prefix"] is True
    assert (
        options["visibility_timeout"] == Timings.from_settings(fleet.settings).visibility_timeout_s
    )
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.accept_content == ["json"]
    assert "fleet.reap" in app.tasks
    # The fleet's beat runs the reaper on a control queue every worker consumes.
    (reaper,) = [e for e in app.conf.beat_schedule.values() if e["task"] == "fleet.reap"]
    assert reaper["options"]["queue"] == "shop.control"
    assert [q.name for q in app.conf.task_queues] == ["shop", "shop.control"]


def test_a_plain_app_has_no_fleet_and_says_how_to_get_one() -> None:
    with pytest.raises(LookupError, match=r"init_app"):
        fleet_of(Celery("plain"))


def test_load_app_finds_module_and_attribute_like_celery() -> None:
    assert load_app("config").main == "fleetworks"
    assert load_app("config.celery:app") is load_app("config")
    with pytest.raises(LookupError, match="no_such_module"):
        load_app("no_such_module:app")


def test_timings_hold_their_relations_and_name_a_broken_one() -> None:
    timings = Timings.from_settings(SETTINGS)
    assert timings.problems() == []
    assert timings.visibility_timeout_s > SETTINGS.max_time_limit_s + timings.retry_backoff_max_s
    assert timings.renew_interval_s * 3 <= timings.lease_ttl_s
    assert timings.stranded_after_s > timings.lease_ttl_s + timings.reap_interval_s
    broken = dataclasses.replace(timings, renew_interval_s=timings.lease_ttl_s)
    with pytest.raises(ValueError, match="three lease renewals must fit in one lease"):
        broken.check()


def test_two_fleets_in_one_process_each_run_their_own_agent() -> None:
    """An agent bound to one fleet never leaks into another app (Celery shares
    decorated tasks with every app finalized later unless told not to)."""
    from pydantic import BaseModel

    from fleetworks import AgentSpec

    class Nothing(BaseModel):
        id: str

    fleets = []
    for label in ("first", "second"):
        app = Celery(f"two-fleets-{label}")
        fleet = init_app(app, Settings(broker_url="memory://", redis_url="redis://127.0.0.1:1"))
        spec = AgentSpec(name="two.fleets", payload=Nothing, key=lambda n: n.id)
        fleet.agent(spec)(lambda ctx, n, label=label: label)
        fleets.append(fleet)
    for fleet in fleets:
        fleet.app.finalize()
        task = fleet.app.tasks["two.fleets"]
        assert task.fleet is fleet
        assert task.behaviour(None, None) == fleet.app.main.rsplit("-", 1)[1]


AMQP = "amqp://guest:guest@127.0.0.1:5672/"


def test_quorum_queues_are_declared_as_celery_needs_them() -> None:
    """FLEET_QUEUE_TYPE=quorum: the agent and control queues, and any created on
    the fly, are quorum queues on topic exchanges (native delayed delivery binds
    no other), the workers drop global QoS, and every publish is confirmed."""
    settings = Settings(broker_url=AMQP, redis_url="redis://127.0.0.1:1/1", queue_type="quorum")
    app = create_app(settings)
    queues = app.amqp.queues
    assert sorted(queues) == ["fleet", "fleet.control"]
    for name in ("fleet", "fleet.control"):
        assert queues[name].queue_arguments == {"x-queue-type": "quorum"}
        assert queues[name].exchange.type == "topic"
        # Bound under its own name: a topic exchange routes by binding.
        assert queues[name].routing_key == name
    made = queues.new_missing("elsewhere")
    assert made.queue_arguments == {"x-queue-type": "quorum"} and made.exchange.type == "topic"
    assert app.conf.worker_detect_quorum_queues is True
    assert app.conf.broker_transport_options["confirm_publish"] is True


def test_classic_queues_on_rabbitmq_are_confirmed_and_redis_is_unchanged() -> None:
    classic = create_app(Settings(broker_url=AMQP, redis_url="redis://127.0.0.1:1/1"))
    assert classic.amqp.queues["fleet"].queue_arguments is None
    assert classic.amqp.queues["fleet"].exchange.type == "direct"
    assert classic.conf.broker_transport_options["confirm_publish"] is True
    on_redis = create_app(SETTINGS)
    assert "confirm_publish" not in on_redis.conf.broker_transport_options
    assert on_redis.amqp.queues["fleet"].queue_arguments is None


def test_quorum_queues_on_redis_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="FLEET_QUEUE_TYPE=quorum needs a RabbitMQ broker"):
        Settings(broker_url="redis://127.0.0.1:1/0", queue_type="quorum")
    with pytest.raises(ValidationError, match="FLEET_QUEUE_TYPE=quorum needs a RabbitMQ broker"):
        Settings(broker_url=None, queue_type="quorum")  # the embedded Redis


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"task_queue_max_priority": 9}, "task_queue_max_priority"),
        ({"worker_detect_quorum_queues": False}, "worker_detect_quorum_queues"),
    ],
)
def test_a_setting_quorum_queues_cannot_take_is_refused_by_name(
    conf: dict[str, object], named: str
) -> None:
    quorum = Settings(broker_url=AMQP, redis_url="redis://127.0.0.1:1/1", queue_type="quorum")
    app = Celery("team", broker=AMQP)
    app.conf.update(conf)
    with pytest.raises(GuaranteeError, match=named):
        init_app(app, quorum)
    init_app(app_with(**conf), SETTINGS)  # classic queues take them


def test_a_teams_queues_keep_their_type_and_the_control_queue_takes_the_fleets() -> None:
    app = Celery("team", broker=AMQP)
    app.conf.task_queues = [Queue("shop")]
    app.conf.task_default_queue = "shop"
    app.conf.task_default_exchange_type = "direct"
    quorum = Settings(broker_url=AMQP, redis_url="redis://127.0.0.1:1/1", queue_type="quorum")
    init_app(app, quorum)
    assert app.amqp.queues["shop"].queue_arguments is None
    assert app.amqp.queues["shop.control"].queue_arguments == {"x-queue-type": "quorum"}
    assert app.conf.task_default_exchange_type == "direct"


def test_a_delayed_routing_key_names_its_queue() -> None:
    """Native delayed delivery puts the countdown before the routing key; the
    claim records the queue without it."""
    assert queue_of(calculate_routing_key(37, "fleet.control")) == "fleet.control"
    assert queue_of(calculate_routing_key(1, "fleet")) == "fleet"
    assert queue_of("fleet") == "fleet"
    assert queue_of("0.1.fleet") == "0.1.fleet"  # not a countdown prefix
    assert queue_of(None) is None


def test_a_control_queue_is_its_own_control_queue() -> None:
    """A key republished to the control queue and orphaned again is republished
    there again, not to a queue nobody consumes."""
    assert control_queue("fleet") == "fleet.control"
    assert control_queue(control_queue("fleet")) == "fleet.control"
