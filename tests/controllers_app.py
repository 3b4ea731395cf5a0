"""The Celery app the controller tests run ``fleetworks controllers`` on.

One controller over the groups in ``CTL_GROUPS`` (comma-separated), every
0.2 s. A cycle checks that it leads, reports ``checked``, keeps its action in
flight for ``CTL_INFLIGHT_S`` (a command on its way to a device), then lands
it through a :class:`~fleetworks.leadership.TermFence` on the results
database and reports ``act`` with whether it was accepted. Reports are JSON
lines in ``CTL_REPORT_DIR/<pid>.jsonl``; the app is named ``CTL_APP_NAME``
(it names the replicas' heartbeat key).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fleetworks import create_app, fleet_of
from fleetworks.controllers import ControllerContext
from fleetworks.leadership import TermFence

app = create_app(name=os.environ.get("CTL_APP_NAME", "ctltest"), modules=[])
fleet = fleet_of(app)
GROUPS = [g for g in os.environ.get("CTL_GROUPS", "a,b,c").split(",") if g]
INFLIGHT_S = float(os.environ.get("CTL_INFLIGHT_S", "0.3"))


def _say(event: str, **fields: Any) -> None:
    folder = Path(os.environ.get("CTL_REPORT_DIR", "."))
    line = {"event": event, "pid": os.getpid(), "mono": time.monotonic(), **fields}
    with (folder / f"{os.getpid()}.jsonl").open("a") as out:
        out.write(json.dumps(line) + "\n")


@fleet.controller(groups=GROUPS, every_s=0.2, name="test.steer")
def steer(ctx: ControllerContext) -> None:
    if not ctx.still_leading():
        return
    _say("checked", group=ctx.group, term=ctx.term)
    time.sleep(INFLIGHT_S)
    accepted = TermFence(ctx.db_url).accept(ctx.group, ctx.term)
    _say("act", group=ctx.group, term=ctx.term, accepted=accepted)
