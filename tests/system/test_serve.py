"""`farmkeys serve` as real processes: three nodes, real PostgreSQL and slapd, a year in seconds.

Each test inits a farm on a fresh database and starts three `python -m farmkeys
serve` subprocesses, each with its own store and log file (under tmp_path/logs;
failures show the tails). The fast policy below makes a day last a second:

    t0        init: one primary per purpose, valid t0 .. t0+20
    t0+12     a secondary is generated (generation_threshold 8 before NotAfter)
    t0+16     it is promoted; the old primary is retired (promotion_threshold 4)
    t0+20     the retired primary expires and is archived
    t0+24, t0+28, t0+32: the same again for the next certificate

Deadlines here are generous on purpose (a loaded 2-core machine must pass);
tests/bench/bench_propagation.py measures how fast it really is.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from farmtools import (
    TestFarm,
    audit_events,
    db_now,
    db_query,
    expect_ok,
    lease_row,
    snapshot,
    wait_until,
)
from serving import (
    BackgroundThread,
    Identity,
    ManifestWatcher,
    ServeNodes,
    ServeProcess,
    live_identity,
    live_sets,
    manifest_identity,
)

from farmkeys import policy as rollover_policy
from farmkeys.config import PolicyConfig
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

NODES = ("node-a", "node-b", "node-c")
PURPOSES = ("signing", "decryption")

TTL = 3.0  # generous: a renewal delayed on a loaded 2-core machine must not lapse
RENEW = 0.5
INTERVAL = 1.0
FAST_POLICY: dict[str, Any] = {
    "threshold_unit_seconds": 1,
    "certificate_duration": 20,
    "generation_threshold": 8,
    "promotion_threshold": 4,
    "critical_threshold": 2,
    "rollover_interval_seconds": INTERVAL,
}
FAST: dict[str, dict[str, Any]] = {
    "policy": FAST_POLICY,
    "lease": {"ttl_seconds": TTL, "renew_seconds": RENEW},
    # Longer than PROPAGATION: a change installed in time was announced, not polled for.
    "node": {"poll_seconds": 5},
    "retry": {"total_seconds": 1.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.2},
}
# AD FS's defaults: nothing rolls over by itself during a test.
CALM_POLICY: dict[str, Any] = {
    "threshold_unit_seconds": 86400,
    "certificate_duration": 365,
    "generation_threshold": 20,
    "promotion_threshold": 5,
    "critical_threshold": 2,
    "rollover_interval_seconds": 3600,
}

PROPAGATION = 3.0  # every node installs a committed change within this (generous) deadline
ON_TIME = INTERVAL + 2.0  # a step done later than this after it was due is late
FAILOVER_SLACK = TTL + RENEW  # a step due while nobody leads may wait this much longer
START = 30.0  # three processes start and sync on a loaded machine


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def fast_farm(farm: TestFarm) -> TestFarm:
    """The farm, not initialised, under the FAST policy: a day lasts a second."""
    farm.overrides.update(copy.deepcopy(FAST))
    return farm


@pytest.fixture
def nodes(fast_farm: TestFarm) -> Iterator[ServeNodes]:
    """The serve processes of the test; all killed at teardown, whatever happened."""
    with ServeNodes(fast_farm, fast_farm.root / "logs") as started:
        yield started


# -- helpers ---------------------------------------------------------------------------------


def init_and_serve(
    farm: TestFarm,
    nodes: ServeNodes,
    per_node: dict[str, dict[str, dict[str, Any]]] | None = None,
    *,
    init: bool = True,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """`farmkeys init`, then serve on every node; the lease once all stores hold the farm."""
    if init:
        result = farm.run("init")
        expect_ok(result)
    for node in NODES:
        nodes.start(node, **{**sections, **(per_node or {}).get(node, {})})
    first = live_identity(farm.dsn)
    wait_until(
        lambda: all(manifest_identity(farm.store(n)) == first for n in NODES),
        START,
        "every node installed the farm's first certificates",
        detail=nodes.logs,
    )
    return wait_until(lambda: _valid_lease(farm), START, "a node leads", detail=nodes.logs)


def _valid_lease(farm: TestFarm, above_term: int = -1) -> dict[str, Any] | None:
    lease = lease_row(farm.dsn)
    return lease if lease["valid"] and lease["term"] > above_term else None


def wait_converged(farm: TestFarm, nodes: ServeNodes, names: tuple[str, ...] = NODES) -> Identity:
    """Every named node's manifest equals the config DB's live set (generous deadline)."""

    def converged() -> Identity | None:
        live = live_identity(farm.dsn)
        return live if all(manifest_identity(farm.store(n)) == live for n in names) else None

    return wait_until(
        converged,
        PROPAGATION,
        f"the manifests of {', '.join(names)} equal the live set",
        detail=lambda: _state(farm, nodes, names),
    )


# Each purpose's live roles at some step of a rollover: a secondary generated, then promoted
# (the old primary retired), then the retired one archived.
ROLLOVER_STEPS = (["primary", "secondary"], ["primary", "retired"], ["primary"])


def check_rollover_step(live: Identity) -> None:
    """Each purpose's live set is one step of the rollover, whichever the farm has reached.

    With check_timeline (the audit log holds exactly the steps the rows imply) this is what
    a test that looks after a generation can require, however late it looks: a busy machine
    may let the promotion or the archive pass first."""
    for purpose in PURPOSES:
        found = sorted(r for p, r, _ in live if p == purpose)
        assert found in ROLLOVER_STEPS, f"{purpose}: roles {found} are no step of a rollover"


def _state(farm: TestFarm, nodes: ServeNodes, names: tuple[str, ...] = NODES) -> str:
    lines = [f"live set: {sorted(live_identity(farm.dsn))}"]
    lines += [f"{n} manifest: {sorted(manifest_identity(farm.store(n)) or [])}" for n in names]
    return "\n".join(lines) + "\n" + nodes.logs()


def count_events(farm: TestFarm, action: str) -> int:
    return sum(1 for e in audit_events(farm) if e["action"] == action and e["term"] is not None)


def first_generation_due(farm: TestFarm) -> datetime:
    """When the first secondaries are due: generation_threshold before the primaries expire."""
    rows = db_query(farm.dsn, "SELECT min(not_after) AS end FROM certificate")
    return rows[0]["end"] - timedelta(seconds=FAST_POLICY["generation_threshold"])


def next_step(farm: TestFarm) -> tuple[Identity, datetime]:
    """The live set and when its next rollover step is due by the policy (in the past when
    the step is overdue), from one read of the certificate rows."""
    policy = PolicyConfig(**FAST_POLICY)
    rows = [
        SimpleNamespace(**r)
        for r in db_query(
            farm.dsn,
            "SELECT id, purpose, role, thumbprint, not_before, not_after, created_at, now()"
            " FROM certificate WHERE role <> 'archived'",
        )
    ]
    now = rows[0].now
    steps = [
        scheduled.at
        for r in rows
        if (scheduled := rollover_policy.next_action(policy, now, rows, r.id)) is not None
    ]
    return frozenset((r.purpose, r.role, r.thumbprint) for r in rows), min(steps)


def seconds_until(when: datetime) -> float:
    return (when - datetime.now(UTC)).total_seconds()


def wait_for_events(
    farm: TestFarm, nodes: ServeNodes, action: str, count: int, due: datetime, late: float
) -> None:
    """Wait until ``count`` ``action`` events exist, at most until ``late`` s after ``due``."""
    wait_until(
        lambda: count_events(farm, action) >= count,
        max(0.0, seconds_until(due)) + late + 2.0,
        f"{count} {action} events (due at {due.isoformat()})",
        interval=0.1,
        detail=lambda: _event_table(audit_events(farm)) + "\n" + nodes.logs(),
    )


def _event_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {e['at'].isoformat()} {e['node']} term {e['term']} {e['action']} {e['purpose']}"
        f" {e['thumbprint'] or e.get('master_key')}"
        for e in rows
    )


def terminate_together(procs: list[ServeProcess], timeout: float = 10.0) -> list[int]:
    """SIGTERM several serve processes at once; their exit codes."""
    for p in procs:
        p.proc.send_signal(signal.SIGTERM)
    return [p.proc.wait(timeout) for p in procs]


# -- the timeline, as the audit log tells it -----------------------------------------------------


def check_timeline(farm: TestFarm, *, late: float, end: datetime) -> list[dict[str, Any]]:
    """Assert the audit log shows each purpose following the policy; the events.

    From the certificate rows, each purpose's chain C0, C1, ... (by creation)
    says which steps must have happened: generate Ci, retire Ci-1 + promote Ci
    (unless Ci is still the secondary), archive Ci-1 (once archived). The
    events (leaders' terms only) must be exactly these, in this order — so
    none is missing or repeated — and each at or after it was due by the rows,
    at most ``late`` s after. Terms never go back. And at ``end``, no step was
    left overdue by more than ``late`` (policy.next_action of every live row).
    """
    policy = PolicyConfig(**FAST_POLICY)
    unit = policy.units
    found = audit_events(farm)
    table = _event_table(found)
    rows = db_query(
        farm.dsn,
        "SELECT id, purpose, role, thumbprint, not_before, not_after, created_at FROM certificate",
    )
    terms = [e["term"] for e in found if e["term"] is not None]
    assert terms == sorted(terms), f"an event under an older term followed a newer one:\n{table}"
    problems = []
    for purpose in PURPOSES:
        chain = sorted((r for r in rows if r["purpose"] == purpose), key=lambda r: r["created_at"])
        expected: list[tuple[str, Any, datetime]] = []
        for prev, cur in itertools.pairwise(chain):
            expected.append(("generate", cur["id"], prev["not_after"] - unit(8)))
            if cur["role"] != "secondary":
                due = min(cur["created_at"] + unit(4), prev["not_after"] - unit(2))
                expected += [("retire", prev["id"], due), ("promote", cur["id"], due)]
            if prev["role"] == "archived":
                expected.append(("archive", prev["id"], prev["not_after"]))
        mine = [e for e in found if e["purpose"] == purpose]
        init = [(e["action"], e["certificate"]) for e in mine if e["term"] is None]
        assert init == [("generate_and_promote", chain[0]["id"])], table
        done = [e for e in mine if e["term"] is not None]
        assert [(e["action"], e["certificate"]) for e in done] == [
            (a, c) for a, c, _ in expected
        ], f"{purpose}: steps missing, repeated or out of order:\n{table}"
        for event, (action, _, due) in zip(done, expected, strict=True):
            delay = (event["at"] - due).total_seconds()
            if not 0 <= delay <= late:
                problems.append(f"{purpose} {action} at {event['at']}: {delay:+.2f} s after due")
    assert not problems, f"steps off schedule (allowed 0 .. {late} s):\n" + "\n".join(problems)

    live = [SimpleNamespace(**r) for r in rows if r["role"] != "archived"]
    overdue = [
        f"{r.purpose} {r.role} {r.thumbprint}: {scheduled}"
        for r in live
        if (scheduled := rollover_policy.next_action(policy, end, live, r.id)) is not None
        and scheduled.at <= end - timedelta(seconds=late)
    ]
    assert not overdue, f"steps left undone at {end.isoformat()}: {overdue}\n{table}"
    return found


def check_propagation(
    farm: TestFarm,
    watcher: ManifestWatcher,
    found: list[dict[str, Any]],
    since: dict[str, datetime | None],
) -> None:
    """Every node installed every change (or a later one) within PROPAGATION, never going back.

    ``since[node]``: only changes committed from then on are required of it
    (a killed or paused node cannot follow); every node's installs must still
    be sets the farm really had, in the farm's order.
    """
    sets = live_sets(found)
    assert sets[-1][1] == live_identity(farm.dsn), "the audit log does not explain the live set"
    index = {identity: i for i, (_, identity) in enumerate(sets)}
    for node, changes in watcher.changes.items():
        seen = [(t, index.get(identity)) for t, identity in changes]
        assert all(i is not None for _, i in seen), (
            f"{node} installed a set the farm never had: {changes}"
        )
        order = [i for _, i in seen]
        assert order == sorted(order), f"{node} went back to an older set: {order}"
        start = since.get(node)
        if start is None:
            continue
        for i, (at, _) in enumerate(sets[1:], start=1):
            if at < start:
                continue
            first = next((t for t, j in seen if j is not None and j >= i), None)
            assert first is not None, f"{node} never installed the change of {at.isoformat()}"
            took = first - at.timestamp()
            assert took <= PROPAGATION, (
                f"{node} installed the change of {at.isoformat()} only after {took:.2f} s"
            )


class RoleSampler(BackgroundThread):
    """A thread reading the certificate roles every 0.1 s: one primary and at most one
    secondary per purpose at every sample."""

    name = "role-sampler"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.samples = 0
        self.violations: list[str] = []
        self.errors: list[str] = []
        super().__init__()

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.wait(0.1):
                try:
                    rows = conn.execute(
                        "SELECT purpose, role, count(*) FROM certificate"
                        " WHERE role IN ('primary', 'secondary') GROUP BY 1, 2"
                    ).fetchall()
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                    continue
                counts = {(p, r): n for p, r, n in rows}
                self.samples += 1
                for purpose in PURPOSES:
                    primaries = counts.get((purpose, "primary"), 0)
                    secondaries = counts.get((purpose, "secondary"), 0)
                    if primaries != 1 or secondaries > 1:
                        self.violations.append(
                            f"{time.time():.2f}: {purpose} {primaries} primary,"
                            f" {secondaries} secondary"
                        )


def manifest_generation(store: Path) -> int:
    return int(json.loads((store / "manifest.json").read_text())["generation"])


def status(farm: TestFarm) -> dict[str, Any]:
    result = farm.run("status", "--json")
    assert result.code in (0, 1, 2), result.err
    return result.json


# -- 1. a whole lifetime -------------------------------------------------------------------------


MASTER_KEY = {"lifetime": 15, "retain": 4}  # rolls at t0+15 and t0+30, deletes 4 s after each


def test_three_nodes_follow_two_certificate_and_two_master_key_lifetimes(
    fast_farm: TestFarm, nodes: ServeNodes
) -> None:
    stores = {n: fast_farm.store(n) for n in NODES}
    # poll_seconds 60: every change reaching every node within PROPAGATION was announced.
    fast_farm.overrides["node"] = {"poll_seconds": 60}
    fast_farm.overrides["master_key"] = MASTER_KEY
    result = fast_farm.run("init")
    expect_ok(result)
    with ManifestWatcher(stores) as watcher, RoleSampler(fast_farm.dsn) as sampler:
        init_and_serve(fast_farm, nodes, init=False)
        t0 = db_query(fast_farm.dsn, "SELECT min(created_at) AS t FROM certificate")[0]["t"]
        # Both purposes: generate, promote, archive (t0+20), again (t0+32), and a third
        # primary promoted at t0+40, the end of the second certificate's lifetime.
        # Master keys: rolled at t0+15 and t0+30, each replaced key deleted 4 s later.
        wait_for_events(
            fast_farm, nodes, "master_key_delete", 2, t0 + timedelta(seconds=35), ON_TIME
        )
        wait_for_events(fast_farm, nodes, "promote", 6, t0 + timedelta(seconds=40), ON_TIME)
        wait_converged(fast_farm, nodes)
        current = db_query(fast_farm.dsn, "SELECT id FROM master_key WHERE state = 'current'")
        doc = wait_until(
            lambda: (
                (d := status(fast_farm))["leader"]
                and all(n["in_sync"] for n in d["nodes"])
                and all(n["master_keys"] == [str(current[0]["id"])] for n in d["nodes"])
                and d
            ),
            5,
            "status shows a leader, and every node in sync and reading the current master key",
            detail=lambda: str(status(fast_farm)) + nodes.logs(),
        )
        end = db_now(fast_farm.dsn)
        codes = terminate_together(list(nodes.procs.values()))
    assert codes == [0, 0, 0], nodes.logs()
    assert (end - t0).total_seconds() >= 2 * FAST_POLICY["certificate_duration"]

    found = check_timeline(fast_farm, late=ON_TIME, end=end)
    steps = [e for e in found if e["term"] is not None and e["purpose"] is not None]
    assert len(steps) >= 2 * 11, _event_table(found)  # 4 + 4 + generate, retire, promote
    check_propagation(fast_farm, watcher, found, since=dict.fromkeys(NODES, t0))
    check_master_key_timeline(fast_farm, found, late=ON_TIME)

    assert sampler.samples > 200, f"the role sampler ran only {sampler.samples} times"
    assert not sampler.errors, sampler.errors
    assert not sampler.violations, sampler.violations

    assert sorted(n["id"] for n in doc["nodes"]) == list(NODES)
    assert doc["leader"]["node"] in NODES
    node_or_lease_problems = [p for p in doc["problems"] if "node" in p or "lease" in p]
    assert not node_or_lease_problems, doc["problems"]


def check_master_key_timeline(farm: TestFarm, found: list[dict[str, Any]], *, late: float) -> None:
    """Two rolls and two deletions, each once, each on time by the recorded key times."""
    unit = timedelta(seconds=FAST_POLICY["threshold_unit_seconds"])
    keys = db_query(farm.dsn, "SELECT * FROM master_key ORDER BY created_at")
    assert [k["state"] for k in keys] == ["deleted", "deleted", "current"], keys
    by_action: dict[str, list[dict[str, Any]]] = {}
    for e in found:
        if e["master_key"] is not None:
            by_action.setdefault(e["action"], []).append(e)
    table = _event_table(found)
    assert [e["master_key"] for e in by_action.get("master_key_add", [])] == [
        keys[1]["id"],
        keys[2]["id"],
    ], table
    rolls = by_action.get("master_key_roll", [])
    assert [e["master_key"] for e in rolls] == [keys[1]["id"], keys[2]["id"]], table
    deletes = by_action.get("master_key_delete", [])
    assert [e["master_key"] for e in deletes] == [keys[0]["id"], keys[1]["id"]], table
    problems = []
    for roll, replaced in zip(rolls, keys[:2], strict=True):
        due = replaced["created_at"] + MASTER_KEY["lifetime"] * unit
        if not 0 <= (roll["at"] - due).total_seconds() <= late:
            problems.append(f"roll of {replaced['id']} at {roll['at']}, due {due}")
    for delete, gone in zip(deletes, keys[:2], strict=True):
        due = gone["unused_since"] + MASTER_KEY["retain"] * unit
        if not 0 <= (delete["at"] - due).total_seconds() <= late:
            problems.append(f"deletion of {gone['id']} at {delete['at']}, due {due}")
    assert not problems, "master-key steps off schedule:\n" + "\n".join(problems) + "\n" + table


# -- 2. kill -9 ----------------------------------------------------------------------------------


def test_kill_9_of_the_leader_fails_over(fast_farm: TestFarm, nodes: ServeNodes) -> None:
    stores = {n: fast_farm.store(n) for n in NODES}
    with ManifestWatcher(stores) as watcher:
        init_and_serve(fast_farm, nodes)
        due = first_generation_due(fast_farm)
        # Mid-run: the leader generated the secondaries; their promotion is still to come.
        wait_for_events(fast_farm, nodes, "generate", 2, due, ON_TIME)
        old = lease_row(fast_farm.dsn)
        leader = nodes.by_holder(old["holder"])
        killed_at = db_now(fast_farm.dsn)
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(5)

        new = wait_until(
            lambda: _valid_lease(fast_farm, above_term=old["term"]),
            TTL + RENEW + 3.0,
            f"another node leads after {leader.node} was killed",
            detail=nodes.logs,
        )
        assert new["term"] == old["term"] + 1
        assert new["holder_node"] != leader.node

        # The new leader carries on: promotion (t0+16) and archive (t0+20).
        archive_due = due + timedelta(seconds=8)
        wait_for_events(fast_farm, nodes, "archive", 2, archive_due, ON_TIME + FAILOVER_SLACK)
        survivors = tuple(n for n in NODES if n != leader.node)
        wait_converged(fast_farm, nodes, survivors)
        end = db_now(fast_farm.dsn)

    found = check_timeline(fast_farm, late=ON_TIME + FAILOVER_SLACK, end=end)
    after = [e for e in found if e["at"] >= killed_at]
    assert {(e["action"], e["term"], e["node"]) for e in after if e["action"] == "lead"} == {
        ("lead", new["term"], new["holder_node"])
    }, _event_table(found)
    assert {e["term"] for e in after} == {new["term"]}, _event_table(found)
    promotes = [e for e in found if e["action"] == "promote"]
    assert len(promotes) == 2
    assert all(e["term"] == new["term"] for e in promotes), _event_table(found)
    since: dict[str, datetime | None] = {n: killed_at for n in survivors}
    since[leader.node] = None
    check_propagation(fast_farm, watcher, found, since)


# -- 3. SIGSTOP: the fence ---------------------------------------------------------------------


def test_a_paused_leader_is_fenced_and_steps_down(fast_farm: TestFarm, nodes: ServeNodes) -> None:
    stores = {n: fast_farm.store(n) for n in NODES}
    with ManifestWatcher(stores) as watcher:
        old = init_and_serve(fast_farm, nodes)
        leader = nodes.by_holder(old["holder"])
        due = first_generation_due(fast_farm)
        # Pause it just before the first step is due: it wakes believing it leads, a step due.
        time.sleep(max(0.0, seconds_until(due) - 0.7))
        # Wherever it stops — even inside its fenced transaction, holding the lease row —
        # the server ends a silent transaction after ttl, so another node can take over.
        leader.proc.send_signal(signal.SIGSTOP)
        paused_at = db_now(fast_farm.dsn)
        new = wait_until(
            lambda: _valid_lease(fast_farm, above_term=old["term"]),
            2 * TTL + RENEW + 5.0,
            f"another node takes the lease from the paused {leader.node}",
            detail=nodes.logs,
        )
        takeover = new["acquired_at"]
        assert new["holder_node"] != leader.node
        wait_for_events(fast_farm, nodes, "generate", 2, due, ON_TIME + FAILOVER_SLACK)
        assert leader.alive()
        leader.proc.send_signal(signal.SIGCONT)
        resumed_at = db_now(fast_farm.dsn)

        wait_until(
            lambda: re.search(
                r"write refused by the fence|lost the lease of term \d+; stepping down",
                leader.log.read_text(),
            ),
            5.0,
            f"{leader.node} notices it lost the lease",
            detail=lambda: leader.tail(40),
        )
        # It keeps serving: it follows the promotion (t0+16) like everyone.
        wait_for_events(
            fast_farm, nodes, "promote", 2, due + timedelta(seconds=4), ON_TIME + FAILOVER_SLACK
        )
        wait_converged(fast_farm, nodes)
        assert leader.alive(), leader.tail()
        end = db_now(fast_farm.dsn)

    found = check_timeline(fast_farm, late=ON_TIME + FAILOVER_SLACK, end=end)
    stale = [e for e in found if e["term"] == old["term"] and e["at"] >= paused_at]
    assert not stale, f"writes under the stale term {old['term']}:\n{_event_table(stale)}"
    after = [e for e in found if e["at"] >= takeover]
    assert after, _event_table(found)
    assert {e["term"] for e in after} == {new["term"]}, _event_table(found)
    assert _valid_lease(fast_farm, above_term=old["term"])["term"] == new["term"]
    since: dict[str, datetime | None] = dict.fromkeys(NODES, paused_at)
    since[leader.node] = resumed_at
    check_propagation(fast_farm, watcher, found, since)


# -- 4. the config DB goes away ------------------------------------------------------------------


def recovered(farm: TestFarm, since: datetime) -> bool:
    """A leader, every node's connection (its LISTEN) back, every node heartbeating since
    ``since``."""
    try:
        listeners = db_query(
            farm.dsn,
            "SELECT application_name AS name FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'farmkeys node-%'",
        )
        beating = db_query(farm.dsn, "SELECT id FROM node WHERE heartbeat_at > %s", (since,))
        lease = lease_row(farm.dsn)
    except psycopg.OperationalError:
        return False
    return (
        sorted(r["name"] for r in listeners) == [f"farmkeys {n}" for n in NODES]
        and sorted(r["id"] for r in beating) == list(NODES)
        and bool(lease["valid"])
    )


def test_nodes_reconnect_after_their_connections_are_terminated_and_postgres_restarts(
    fast_farm: TestFarm, nodes: ServeNodes, postgres: LocalPostgres
) -> None:
    init_and_serve(fast_farm, nodes)

    cut_at = db_now(fast_farm.dsn)
    cut = db_query(
        fast_farm.dsn,
        "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    assert len(cut) >= len(NODES) and all(r["ok"] for r in cut), cut
    wait_until(
        lambda: recovered(fast_farm, cut_at),
        10.0,
        "every node reconnects after pg_terminate_backend",
        interval=0.1,
        detail=nodes.logs,
    )

    try:
        postgres.restart()  # the session's private cluster: same port, same data
        restarted_at = db_now(fast_farm.dsn)
        wait_until(
            lambda: recovered(fast_farm, restarted_at),
            15.0,
            "every node reconnects after the PostgreSQL restart",
            interval=0.1,
            detail=nodes.logs,
        )
    finally:
        postgres.start()

    # They catch up: the first step after the outage reaches every store. Normally the first
    # generation (t0+12); on a machine so busy that start-up and the outage outlasted it, the
    # next step not yet done. Whichever step the farm reaches before this looks, the roles are
    # a step of the rollover (a promotion can follow a late generation within a second).
    late = ON_TIME + FAILOVER_SLACK
    _, due = next_step(fast_farm)
    wait_until(
        lambda: next_step(fast_farm)[1] > due,
        max(0.0, seconds_until(due)) + late + 2.0,
        f"the step due at {due.isoformat()} is done",
        interval=0.1,
        detail=lambda: _event_table(audit_events(fast_farm)) + "\n" + nodes.logs(),
    )
    check_rollover_step(wait_converged(fast_farm, nodes))
    assert all(p.alive() for p in nodes.procs.values()), nodes.logs()
    check_timeline(fast_farm, late=late, end=db_now(fast_farm.dsn))


# -- 5. the directory goes away ------------------------------------------------------------------


def directory_problems(farm: TestFarm) -> list[str]:
    return [p for p in status(farm)["problems"] if "cannot reach the directory" in p]


def test_nodes_keep_serving_while_the_directory_is_down(
    fast_farm: TestFarm, nodes: ServeNodes, slapd: LocalSlapd
) -> None:
    init_and_serve(fast_farm, nodes)

    def every_node_reports_it() -> bool:
        found = directory_problems(fast_farm)
        return all(
            any(p.startswith(f"node {n} cannot reach the directory") for p in found) for n in NODES
        )

    slapd.stop()
    try:
        # The step the outage spans: the next one not yet done once the directory is down.
        # Normally the first generation (t0+12); on a machine so busy that start-up took
        # that long, a later one. Either way the leader took it without the directory.
        live_before, due = next_step(fast_farm)
        before = {n: snapshot(fast_farm.store(n)) for n in NODES}
        assert all(before.values())

        def stores_as_before_unless_stepped() -> bool:
            """Whether the leader has changed the live set; if not, every store is as it
            was. The stores are read first: a live set unchanged after them was unchanged
            while they were read, so no node could have installed another."""
            now = {n: snapshot(fast_farm.store(n)) for n in NODES}
            if live_identity(fast_farm.dsn) != live_before:
                return True
            for n in NODES:
                assert now[n] == before[n], f"{n}'s store changed"
            return False

        wait_until(
            every_node_reports_it,
            10.0,
            "status reports that every node cannot reach the directory",
            interval=0.3,
            detail=lambda: str(status(fast_farm)["problems"]) + "\n" + nodes.logs(),
        )
        # Until the step is taken, every store is exactly as it was, and readable. (On a busy
        # machine the reports may come after it: then the stores followed it.)
        if stores_as_before_unless_stepped():
            wait_converged(fast_farm, nodes)
        # Down across the due step: nodes keep serving what they have.
        while seconds_until(due) > -1.5:
            assert all(p.alive() for p in nodes.procs.values()), nodes.logs()
            time.sleep(0.3)
        if stores_as_before_unless_stepped():
            # The leader took the step from its in-memory keys: the stores followed.
            wait_converged(fast_farm, nodes)
        # Else the leader has not taken it (yet): every store is as it was.
    finally:
        slapd.start()
    returned = db_now(fast_farm.dsn)

    wait_until(
        lambda: not directory_problems(fast_farm),
        10.0,
        "the directory problems clear once it is back",
        interval=0.3,
        detail=nodes.logs,
    )
    # Caught up: the step that was due is done (every purpose's next step lies later), on time
    # or once the directory returned, and once; every node installed the live set. The farm
    # may have gone on to the next steps meanwhile (on a busy machine the promotion, t0+16,
    # can pass before this looks): whichever it reached, the roles are a step of the rollover
    # and the audit log holds exactly the steps the rows imply.
    wait_until(
        lambda: next_step(fast_farm)[1] > due,
        ON_TIME + 5.0,
        f"the step due at {due.isoformat()} is done once the directory is back",
        interval=0.1,
        detail=lambda: _event_table(audit_events(fast_farm)) + "\n" + nodes.logs(),
    )
    check_rollover_step(wait_converged(fast_farm, nodes))
    # A step is late by at most the outage's overrun past `due` (measured) + ON_TIME.
    late = ON_TIME + max(0.0, (returned - due).total_seconds())
    check_timeline(fast_farm, late=late, end=db_now(fast_farm.dsn))


# -- 6. `farmkeys rollover` ----------------------------------------------------------------------


def roles(farm: TestFarm) -> dict[str, dict[str, list[str]]]:
    """{purpose: {role: [thumbprints]}}."""
    found: dict[str, dict[str, list[str]]] = {p: {} for p in PURPOSES}
    for r in db_query(farm.dsn, "SELECT purpose, role, thumbprint FROM certificate ORDER BY 3"):
        found[r["purpose"]].setdefault(r["role"], []).append(r["thumbprint"])
    return found


def test_rollover_command_asks_the_leader_and_is_done_once(
    fast_farm: TestFarm, nodes: ServeNodes
) -> None:
    fast_farm.overrides["policy"] = dict(CALM_POLICY)
    lease = init_and_serve(fast_farm, nodes)
    leader, term = lease["holder_node"], lease["term"]
    first = roles(fast_farm)

    result = fast_farm.spawn("rollover", "--purpose", "signing", "--wait", "30", node="node-c")
    expect_ok(result)
    assert f"answered by {leader} (term {term})" in result.out, result.out
    match = re.search(r"signing: new secondary ([0-9A-F]{40})", result.out)
    assert match, result.out
    secondary = match.group(1)
    after = roles(fast_farm)
    assert after["signing"] == {**first["signing"], "secondary": [secondary]}
    assert after["decryption"] == first["decryption"]
    made = [e for e in audit_events(fast_farm) if e["action"] == "generate"]
    assert [(e["thumbprint"], e["node"], e["term"]) for e in made] == [(secondary, leader, term)]
    wait_converged(fast_farm, nodes)

    result = fast_farm.spawn("rollover", "--urgent", "--yes", "--wait", "30")
    expect_ok(result)
    assert f"answered by {leader} (term {term})" in result.out, result.out
    new = dict(re.findall(r"(signing|decryption): new primary ([0-9A-F]{40})", result.out))
    assert set(new) == set(PURPOSES), result.out
    now = roles(fast_farm)
    for purpose in PURPOSES:
        assert now[purpose]["primary"] == [new[purpose]]
        assert "secondary" not in now[purpose]
        assert "retired" not in now[purpose]
    assert sorted(now["signing"]["archived"]) == sorted([*first["signing"]["primary"], secondary])
    assert now["decryption"]["archived"] == first["decryption"]["primary"]
    urgent = [
        e for e in audit_events(fast_farm) if e["action"] in ("archive", "generate_and_promote")
    ]
    urgent = [e for e in urgent if e["term"] is not None]
    assert sorted((e["action"], e["purpose"]) for e in urgent) == [
        ("archive", "decryption"),
        ("archive", "signing"),
        ("archive", "signing"),
        ("generate_and_promote", "decryption"),
        ("generate_and_promote", "signing"),
    ]
    assert {(e["node"], e["term"]) for e in urgent} == {(leader, term)}
    assert lease_row(fast_farm.dsn)["term"] == term  # one writer throughout
    wait_converged(fast_farm, nodes)


def test_rollover_without_a_leader_takes_the_lease_and_gives_it_back(fast_farm: TestFarm) -> None:
    fast_farm.overrides["policy"] = dict(CALM_POLICY)
    expect_ok(fast_farm.run("init"))

    result = fast_farm.spawn("rollover", "--wait", "30")
    expect_ok(result)
    assert "answered by node-a (term 1)" in result.out, result.out
    assert len(re.findall(r"(signing|decryption): new secondary [0-9A-F]{40}", result.out)) == 2
    lease = lease_row(fast_farm.dsn)
    assert lease["holder"] is None and lease["holder_node"] is None, lease
    assert lease["term"] == 1
    made = [e for e in audit_events(fast_farm) if e["action"] == "generate"]
    assert sorted((e["purpose"], e["node"], e["term"]) for e in made) == [
        ("decryption", "node-a", 1),
        ("signing", "node-a", 1),
    ]


# -- 7. hooks ------------------------------------------------------------------------------------


def test_on_change_hook_runs_with_store_and_changed_thumbprints(
    fast_farm: TestFarm, nodes: ServeNodes, tmp_path: Path
) -> None:
    fast_farm.overrides["policy"] = dict(CALM_POLICY)
    hook = tmp_path / "on-change.sh"
    hook.write_text('#!/bin/sh\necho "$FARMKEYS_STORE $FARMKEYS_CHANGED" >> "$1"\n')
    failing = tmp_path / "on-change-fails.sh"
    failing.write_text("#!/bin/sh\necho 'reload failed' >&2\nexit 3\n")
    for script in (hook, failing):
        script.chmod(0o755)
    out = {n: tmp_path / f"{n}.hook" for n in NODES}
    per_node = {n: {"hooks": {"on_change": f"{hook} {out[n]}"}} for n in ("node-a", "node-b")}
    per_node["node-c"] = {"hooks": {"on_change": str(failing)}}
    init_and_serve(fast_farm, nodes, per_node=per_node)
    first = sorted(t for _, _, t in live_identity(fast_farm.dsn))

    def lines(node: str) -> list[str]:
        return out[node].read_text().splitlines() if out[node].exists() else []

    for n in ("node-a", "node-b"):
        wait_until(lambda n=n: lines(n), 5.0, f"{n}'s hook ran", detail=nodes.logs)
        assert lines(n) == [f"{fast_farm.store(n)} {' '.join(first)}"]

    result = fast_farm.spawn("rollover", "--purpose", "signing", "--wait", "30")
    expect_ok(result)
    match = re.search(r"new secondary ([0-9A-F]{40})", result.out)
    assert match, result.out
    for n in ("node-a", "node-b"):
        wait_until(lambda n=n: len(lines(n)) >= 2, PROPAGATION, f"{n}'s hook ran again")
        assert lines(n)[1:] == [f"{fast_farm.store(n)} {match.group(1)}"], lines(n)

    # node-c's hook fails: reported, never fatal; node-c still follows the farm.
    wait_converged(fast_farm, nodes)
    problems = status(fast_farm)["problems"]
    assert [p for p in problems if "on_change hook failed" in p] == [
        "node node-c's on_change hook failed: on_change hook exited 3: reload failed"
    ], problems
    assert nodes.procs["node-c"].alive(), nodes.logs()
    assert "on_change hook exited 3" in nodes.procs["node-c"].log.read_text()

    # A master-key roll re-seals every blob but changes no certificate: the nodes read the
    # new key, their stores stay as they are, and no hook runs.
    generations = {n: manifest_generation(fast_farm.store(n)) for n in NODES}
    result = fast_farm.spawn("rollover", "--master-key", "--wait", "30")
    expect_ok(result)
    key = db_query(fast_farm.dsn, "SELECT id FROM master_key WHERE state = 'current'")[0]["id"]
    wait_until(
        lambda: all(n["master_keys"] == [str(key)] for n in status(fast_farm)["nodes"]),
        PROPAGATION,
        "every node read the new master key",
        detail=nodes.logs,
    )
    assert {n: manifest_generation(fast_farm.store(n)) for n in NODES} == generations
    assert [len(lines(n)) for n in ("node-a", "node-b")] == [2, 2]


# -- 8. SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_releases_the_lease(fast_farm: TestFarm, nodes: ServeNodes) -> None:
    ttl = 30.0  # a lease left to run out would keep the others waiting half a minute
    old = init_and_serve(fast_farm, nodes, lease={"ttl_seconds": ttl, "renew_seconds": RENEW})
    leader = nodes.by_holder(old["holder"])

    started = time.monotonic()
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.proc.wait(5.0) == 0, leader.tail()
    after = lease_row(fast_farm.dsn)
    assert after["holder"] != old["holder"], after  # released (NULL) or already taken over

    new = wait_until(
        lambda: _valid_lease(fast_farm, above_term=old["term"]),
        5.0,
        "another node takes the released lease",
        detail=nodes.logs,
    )
    took = time.monotonic() - started
    assert took < ttl / 3, f"takeover took {took:.1f} s: as if the lease ran out"
    assert new["term"] == old["term"] + 1 and new["holder_node"] != leader.node
    # The new leader writes its `lead` event in a transaction after the one that took the
    # lease: wait for it rather than assume it is already there.
    leads = wait_until(
        lambda: [
            e for e in audit_events(fast_farm) if e["action"] == "lead" and e["term"] == new["term"]
        ],
        5.0,
        f"the lead event of term {new['term']}",
        detail=nodes.logs,
    )
    assert [e["node"] for e in leads] == [new["holder_node"]]
    beat = db_query(fast_farm.dsn, "SELECT heartbeat_at FROM node WHERE id = %s", (leader.node,))
    assert beat == [{"heartbeat_at": None}]  # a clean stop owes no heartbeat
    assert f"{leader.node} stopped" in leader.log.read_text()


# -- 9. a failed sync is retried, not left for the next poll -----------------------------------


def test_a_node_started_while_the_directory_is_down_installs_soon_after_it_returns(
    fast_farm: TestFarm, nodes: ServeNodes, slapd: LocalSlapd
) -> None:
    # The poll is a minute away: only the retry of the failed sync can install in time.
    fast_farm.overrides["node"] = {"poll_seconds": 60}
    fast_farm.overrides["policy"] = dict(CALM_POLICY)
    expect_ok(fast_farm.run("init"))
    live = live_identity(fast_farm.dsn)
    slapd.stop()
    try:
        node = nodes.start("node-a")
        wait_until(
            lambda: "sync failed" in node.log.read_text(),
            START,
            "node-a's first sync fails without the directory",
            detail=nodes.logs,
        )
        assert manifest_identity(fast_farm.store("node-a")) is None
    finally:
        slapd.start()
    wait_until(
        lambda: manifest_identity(fast_farm.store("node-a")) == live,
        10.0,
        "node-a installs the farm within seconds of the directory's return",
        detail=nodes.logs,
    )
    assert node.alive(), node.tail()
