"""The nodes as the operator sees them: whether each one's `serve` runs, which farmkeys it
runs, a cleanly stopped one flagged after `[status] stopped_warning_seconds`; and
`farmkeys nodes` / `farmkeys nodes remove`."""

from __future__ import annotations

from typing import Any

from farmtools import TestFarm, db_query, expect_ok

import farmkeys
from farmkeys.config import load
from farmkeys.db import ConfigDB


def nodes_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in status["nodes"]}


def test_a_cleanly_stopped_serve_shows_as_stopped_and_is_a_warning_after_a_while(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    for node in ("node-a", "node-b"):
        expect_ok(farm.run("sync", node=node))
    cfg = load(farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db:
        db.heartbeat("node-a", directory_error=None)  # node-a's serve runs ...
        db.stopped_serving("node-a")  # ... and stops cleanly
    doc = farm.run("status", "--json").json
    found = nodes_of(doc)
    assert found["node-a"]["serving"] == "stopped" and found["node-a"]["stopped_at"]
    assert found["node-b"]["serving"] == "never"  # it has only ever synced
    assert found["node-a"]["version"] == farmkeys.__version__
    assert not [p for p in doc["problems"] if "stopped at" in p]  # within the hour
    text = farm.run("status", "--wide").out
    assert "stopped since " in text and "sync only" in text

    db_query(
        farm.dsn,
        "UPDATE node SET stopped_at = now() - interval '2 hours' WHERE id = 'node-a' RETURNING id",
    )
    (problem,) = [p for p in farm.run("status", "--json").json["problems"] if "stopped at" in p]
    assert problem.startswith("node node-a's serve stopped at ")
    assert "farmkeys nodes remove node-a" in problem
    # The time is configurable.
    calm = farm.run("status", "--json", status={"stopped_warning_seconds": 3 * 3600}).json
    assert not [p for p in calm["problems"] if "stopped at" in p]

    with ConfigDB(cfg.database, cfg.retry) as db:
        db.heartbeat("node-a", directory_error=None)  # it serves again
    assert nodes_of(farm.run("status", "--json").json)["node-a"]["serving"] == "serving"
    assert not [p for p in farm.run("status", "--json").json["problems"] if "stopped at" in p]
