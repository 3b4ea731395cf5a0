"""fleetworks inside another Celery project: ``examples/shop`` has its own
package name and its own Celery app, and binds one guarded agent with
``init_app``. A real worker of that app (``celery -A examples.shop.celery:app``)
charges each order once however often it is delivered."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import func, select

from fleetworks.db import transaction
from fleetworks.migrate import upgrade
from fleetworks.models import OUTCOMES
from fleetworks.procs import Child, wait_workers
from tests.conftest import BROKER_URL, LOCKS_URL, wait_for


@contextmanager
def shop_worker(tmp_path: Path) -> Iterator[tuple[Child, str]]:
    """A real worker of the shop's app on a queue of its own, with SQLite."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    queue = f"shop-{os.getpid()}"
    os.environ["SHOP_BROKER_URL"] = BROKER_URL
    os.environ["SHOP_QUEUE"] = queue
    from examples.shop.celery import app, fleet

    upgrade(url, fleet.migrations)
    name = f"shop-{os.getpid()}"
    argv = [
        sys.executable, "-m", "celery", "-A", "examples.shop.celery:app", "worker",
        "-n", f"{name}@%h", "-Q", queue, "-c", "2", "--loglevel", "INFO",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    env = dict(os.environ, FLEET_DATABASE_URL=url, FLEET_REDIS_URL=LOCKS_URL)
    child = Child(name, argv, env, log_path=tmp_path / "worker.log").start()
    try:
        wait_workers(app, [f"{name}@{socket.gethostname()}"], timeout_s=60)
        yield child, queue
    finally:
        child.stop(10)


def test_another_project_charges_each_order_once(tmp_path: Path) -> None:
    from examples.shop.celery import app
    from examples.shop.schema import receipts
    from fleetworks import enqueue_many

    url = f"sqlite:///{tmp_path / 'shop.db'}"
    with shop_worker(tmp_path) as (child, queue):
        # Given three orders, each delivered seven times, racing on two processes
        orders = [{"order_id": f"o{i}", "amount_cents": 100 + i} for i in range(3)] * 7
        enqueue_many(app, "shop.charge", orders, queue=queue)

        def settled() -> bool:
            with transaction(url) as conn:
                done = conn.execute(
                    select(func.count()).where(OUTCOMES.c.status == "succeeded")
                ).scalar_one()
            return done == 3

        wait_for(settled, timeout_s=60, what=f"three charges\n{child.log_tail()}")
        # Then each order was charged exactly once, by the shop's own table
        with transaction(url) as conn:
            rows = conn.execute(select(receipts.c.order_id, receipts.c.charges)).all()
        assert sorted(rows) == [("o0", 1), ("o1", 1), ("o2", 1)]
        assert "shop.charge" in child.log_tail(20_000)
