"""The nodes as the operator sees them: whether each one's `serve` runs, which farmkeys it
runs, a cleanly stopped one flagged after `[status] stopped_warning_seconds`; and
`farmkeys nodes` / `farmkeys nodes remove`."""

from __future__ import annotations

import socket
from typing import Any

from farmtools import TestFarm, db_query, expect_ok, one_error_line

import farmkeys
from farmkeys.config import load
from farmkeys.db import ConfigDB
from farmkeys.operator import account


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


def test_nodes_lists_every_node_and_remove_forgets_one_that_is_gone(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    for node in ("node-a", "node-b", "node-c"):
        expect_ok(farm.run("sync", node=node))
    listed = farm.run("nodes")
    expect_ok(listed)
    lines = listed.out.splitlines()
    assert [line.split()[0] for line in lines] == ["node-a", "node-b", "node-c"]
    assert all("in sync" in line and "sync only" in line for line in lines)
    as_json = farm.run("nodes", "--json")
    assert [n["id"] for n in as_json.json["nodes"]] == ["node-a", "node-b", "node-c"]
    assert as_json.json["nodes"][0]["version"] == farmkeys.__version__

    # node-c was seen a moment ago: it still runs, so it is not removed without --force.
    refused = farm.run("nodes", "remove", "node-c")
    assert refused.code == 1
    assert "node node-c was heard from" in one_error_line(refused)
    assert "node-c" in [n["id"] for n in farm.run("nodes", "--json").json["nodes"]]

    # node-b is gone for good: last heard from an hour ago.
    db_query(
        farm.dsn,
        "UPDATE node SET last_seen = now() - interval '1 hour' WHERE id = 'node-b' RETURNING id",
    )
    removed = farm.run("nodes", "remove", "node-b", "--reason", "decommissioned, CHG-7")
    expect_ok(removed)
    assert removed.out.startswith("removed node node-b")
    assert [n["id"] for n in farm.run("nodes", "--json").json["nodes"]] == ["node-a", "node-c"]
    expect_ok(farm.run("nodes", "remove", "node-c", "--force"))

    (event, forced) = db_query(
        farm.dsn,
        "SELECT node, detail, request, account, host, reason FROM audit_event"
        " WHERE action = 'node_remove' ORDER BY id",
    )
    assert event["node"] == "node-a"  # the node whose config the command ran with
    assert event["detail"].startswith("removed node node-b (last seen ")
    assert (event["request"], event["account"], event["host"], event["reason"]) == (
        None,
        account(),
        socket.gethostname(),
        "decommissioned, CHG-7",
    )
    assert forced["detail"].startswith("removed node node-c") and forced["reason"] is None
    line = next(x for x in farm.run("events").out.splitlines() if "node-b" in x)
    assert line.endswith(f"[by {account()} on {socket.gethostname()}: 'decommissioned, CHG-7']")

    unknown = farm.run("nodes", "remove", "node-z")
    assert unknown.code == 1
    assert "the config DB has no node 'node-z'" in one_error_line(unknown)
