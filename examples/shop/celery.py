"""The shop's Celery app, as it was before fleetworks, plus one ``init_app`` call."""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

from fleetworks import init_app

app = Celery("shop", broker=os.environ.get("SHOP_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.task_default_queue = os.environ.get("SHOP_QUEUE", "shop")

# The fleet keeps the shop's broker and queue; FLEET_DATABASE_URL and
# FLEET_REDIS_URL (or the broker, when it is Redis) say where outcomes and
# leases live.
fleet = init_app(
    app,
    modules=["examples.shop.tasks"],
    migrations=str(Path(__file__).with_name("migrations")),
)
