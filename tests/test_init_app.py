"""``init_app``: an existing Celery app made a fleet, guarantees checked by name."""

from __future__ import annotations

import dataclasses

import pytest
from celery import Celery

from fleetworks import GuaranteeError, fleet_of, init_app, load_app
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
    assert app.conf.task_routes == {"shop.*": {"queue": "shop"}}
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
