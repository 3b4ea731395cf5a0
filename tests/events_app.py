"""A Celery app with event subscribers, for the tests that run a real worker
and a real relay (``celery -A tests.events_app worker``, ``fleetworks -A
tests.events_app relay``). Its broker, Redis, database and queue come from
``FLEET_*``. Each subscriber run writes one ``probe_effect_log`` row (no
UNIQUE key), so an event handled twice by one subscriber shows as two rows.
"""

from __future__ import annotations

from fleetworks import AgentSpec, RunContext, create_app, fleet_of
from fleetworks.events import Event
from fleetworks.proving.probe import SqlProbeSink

TOPIC = "test.happened"

app = create_app(name="eventstest")
fleet = fleet_of(app)


def _record(ctx: RunContext, event: Event) -> None:
    SqlProbeSink(ctx).record(f"{ctx.spec.name}|{event.id}", ctx.fencing_token, unique=False)


fleet.agent(AgentSpec(name="events.audit", payload=Event, on=(TOPIC,)))(_record)
fleet.agent(
    AgentSpec(name="events.even", payload=Event, on=(TOPIC,), where=lambda e: e.data["n"] % 2 == 0)
)(_record)
