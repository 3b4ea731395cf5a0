"""fleetworks: run fleets of agents on Celery, each effect once per idempotency key.

The public API: make a Celery app a fleet (:func:`init_app`, or
:func:`create_app` for a new one), declare agents (:class:`AgentSpec`, :class:`Batch`,
``@fleet.agent`` or :func:`shared_agent`), declare controllers run by a
group's leader only (``@fleet.controller`` or :func:`shared_controller`,
:class:`ControllerContext`), enqueue work (:func:`enqueue`,
:func:`enqueue_many`) and write effects fenced (:func:`fenced_upsert`,
:func:`fenced_update`).
"""

from __future__ import annotations

from fleetworks.agent import AgentTask, Fleet, UnknownAgentError, shared_agent
from fleetworks.app import GuaranteeError, create_app, fleet_of, init_app, load_app
from fleetworks.claims import StaleWriteError
from fleetworks.context import AgentSpec, Batch, RunContext
from fleetworks.controllers import ControllerContext, shared_controller
from fleetworks.enqueue import enqueue, enqueue_many
from fleetworks.fenced import fenced_update, fenced_upsert
from fleetworks.locks import LeaseLostError
from fleetworks.ticks import Tick

__version__ = "0.1.0"

__all__ = [
    "AgentSpec",
    "AgentTask",
    "Batch",
    "ControllerContext",
    "Fleet",
    "GuaranteeError",
    "LeaseLostError",
    "RunContext",
    "StaleWriteError",
    "Tick",
    "UnknownAgentError",
    "__version__",
    "create_app",
    "enqueue",
    "enqueue_many",
    "fenced_update",
    "fenced_upsert",
    "fleet_of",
    "init_app",
    "load_app",
    "shared_agent",
    "shared_controller",
]
