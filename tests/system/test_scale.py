"""A farm at scale on a stock PostgreSQL (max_connections = 100): the connection budget of
`serve`, and a herd of `farmkeys sync` processes started at once.

Correctness and connection counts only: how fast is for tests/bench/ (make bench).
"""

from __future__ import annotations

import contextlib
import copy
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from farmtools import REPO, TestFarm, clean_env, db_query, expect_ok, lease_row, wait_until
from serving import ServeNodes, live_identity, manifest_identity

from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

MAX_CONNECTIONS = 100
SERVE_NODES = 60
SERVE_BUDGET = 70  # farmkeys connections pg_stat_activity may show with 60 nodes serving
HERD = 100

CALM: dict[str, dict[str, Any]] = {
    # Nothing rolls over by itself; leases renew every 2 s (60 nodes on 2 cores).
    "policy": {"rollover_interval_seconds": 3600},
    "lease": {"ttl_seconds": 10.0, "renew_seconds": 2.0},
    "node": {"poll_seconds": 60},
}


@pytest.fixture(scope="module")
def stock_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A private PostgreSQL with the stock connection limit."""
    server = LocalPostgres(
        tmp_path_factory.mktemp("stock-postgres"), max_connections=MAX_CONNECTIONS
    )
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def farm_dsn(stock_postgres: LocalPostgres, tmp_path: Path) -> Iterator[str]:
    """A database owned by an ordinary role (no superuser slots), and that role's DSN."""
    name = f"scale_{secrets.token_hex(4)}"
    password = secrets.token_hex(16)
    with psycopg.connect(stock_postgres.admin_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        admin.execute(f'CREATE DATABASE "{name}" OWNER {name}')
    passfile = tmp_path / "farm.pgpass"
    passfile.write_text(f"127.0.0.1:{stock_postgres.port}:{name}:{name}:{password}\n")
    passfile.chmod(0o600)
    try:
        yield psycopg.conninfo.make_conninfo(
            host="127.0.0.1",
            port=str(stock_postgres.port),
            dbname=name,
            user=name,
            passfile=str(passfile),
            connect_timeout="30",
        )
    finally:
        stock_postgres.drop_database(name)
        with psycopg.connect(stock_postgres.admin_dsn, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {name}")


class ConnectionSampler:
    """Counts the farm role's connections in pg_stat_activity every 20 ms, from a
    superuser connection of its own; ``peak`` is the highest count seen."""

    def __init__(self, admin_dsn: str, role: str) -> None:
        self._dsn, self._role = admin_dsn, role
        self.peak = 0
        self.by_name: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True, application_name="sampler") as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity"
                    " WHERE usename = %s GROUP BY application_name",
                    (self._role,),
                ).fetchall()
                self.peak = max(self.peak, sum(n for _, n in rows))
                for name, n in rows:
                    self.by_name[name] = max(self.by_name.get(name, 0), n)
                self._stop.wait(0.02)


def role_of(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["user"])


def test_sixty_serving_nodes_fit_a_stock_postgres(
    tmp_path: Path, slapd: LocalSlapd, farm_dsn: str, stock_postgres: LocalPostgres
) -> None:
    farm = TestFarm(root=tmp_path, slapd=slapd, dsn=farm_dsn, overrides=copy.deepcopy(CALM))
    expect_ok(farm.run("init"))
    names = [f"node-{i:02d}" for i in range(SERVE_NODES)]
    live = live_identity(farm.dsn)
    with (
        ConnectionSampler(stock_postgres.admin_dsn, role_of(farm_dsn)) as sampler,
        ServeNodes(farm) as nodes,
    ):
        nodes.start_all(names)
        wait_until(
            lambda: all(manifest_identity(farm.store(n)) == live for n in names),
            180.0,
            f"all {SERVE_NODES} nodes install the farm",
            interval=0.5,
            detail=lambda: nodes.logs(5),
        )
        wait_until(
            lambda: lease_row(farm.dsn)["valid"], 60.0, "a leader", detail=lambda: nodes.logs(5)
        )
        # A rollover reaches all of them.
        result = farm.run("rollover", "--urgent", "--yes", "--purpose", "signing", node="node-00")
        expect_ok(result)
        rolled = live_identity(farm.dsn)
        assert rolled != live
        wait_until(
            lambda: all(manifest_identity(farm.store(n)) == rolled for n in names),
            120.0,
            f"all {SERVE_NODES} nodes install the rollover",
            interval=0.5,
            detail=lambda: nodes.logs(5),
        )
        leaders = {
            r["holder_node"]
            for r in db_query(
                farm.dsn, "SELECT holder_node FROM leader_lease WHERE holder_node IS NOT NULL"
            )
        }
        assert len(leaders) == 1
        time.sleep(1.0)  # a last few samples in steady state
        logs = nodes.logs(200)
        assert all(p.alive() for p in nodes.procs.values()), logs

    assert "too many clients" not in logs and "remaining connection slots" not in logs
    assert sampler.peak <= SERVE_BUDGET, (sampler.peak, sampler.by_name)
    # One connection per node, and a second only for the leader's writes.
    per_node = {k: v for k, v in sampler.by_name.items() if k.startswith("farmkeys node-")}
    assert len(per_node) == SERVE_NODES and max(per_node.values()) == 1, per_node
    leader_conns = {k: v for k, v in sampler.by_name.items() if k.startswith("farmkeys leader")}
    assert set(leader_conns) <= {f"farmkeys leader {n}" for n in leaders}, leader_conns


def test_a_follower_holds_one_connection_and_the_leader_two(
    tmp_path: Path, slapd: LocalSlapd, farm_dsn: str
) -> None:
    farm = TestFarm(root=tmp_path, slapd=slapd, dsn=farm_dsn, overrides=copy.deepcopy(CALM))
    expect_ok(farm.run("init"))
    names = ["node-a", "node-b", "node-c"]

    def connections() -> dict[str, int]:
        rows = db_query(
            farm.dsn,
            "SELECT application_name AS name, count(*) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'farmkeys %'"
            " GROUP BY application_name",
        )
        return {r["name"]: r["n"] for r in rows}

    with ServeNodes(farm) as nodes:
        nodes.start_all(names)
        live = live_identity(farm.dsn)
        wait_until(
            lambda: all(manifest_identity(farm.store(n)) == live for n in names),
            60.0,
            "three nodes install the farm",
            detail=nodes.logs,
        )
        wait_until(lambda: lease_row(farm.dsn)["valid"], 30.0, "a leader", detail=nodes.logs)
        expect_ok(farm.run("rollover", "--urgent", "--yes", "--purpose", "signing"))
        leader = lease_row(farm.dsn)["holder_node"]
        seen = connections()
        assert {f"farmkeys {n}" for n in names} <= seen.keys(), seen
        assert all(seen[f"farmkeys {n}"] == 1 for n in names), seen
        assert seen.get(f"farmkeys leader {leader}") == 1, seen  # it wrote the rollover
        assert not {f"farmkeys leader {n}" for n in names if n != leader} & seen.keys(), seen

        # The leader steps down (SIGTERM): the new leader opens its second connection
        # only when it writes; the old one is gone.
        assert nodes.stop(leader) == 0
        wait_until(
            lambda: lease_row(farm.dsn)["valid"] and lease_row(farm.dsn)["holder_node"] != leader,
            30.0,
            "another leader",
            detail=nodes.logs,
        )
        after = connections()
        assert f"farmkeys {leader}" not in after and f"farmkeys leader {leader}" not in after


def sync_process(farm: TestFarm, node: str) -> subprocess.Popen[bytes]:
    config = farm.config(node)
    return subprocess.Popen(
        [sys.executable, "-m", "farmkeys", "sync", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=REPO,
    )


def test_a_herd_of_syncs_all_install_without_too_many_clients(
    tmp_path: Path, slapd: LocalSlapd, farm_dsn: str, stock_postgres: LocalPostgres
) -> None:
    """A data centre powering up: 100 `farmkeys sync` processes at once, each a node of its
    own with an empty store, against 97 connection slots (3 are the superuser's)."""
    farm = TestFarm(root=tmp_path, slapd=slapd, dsn=farm_dsn)
    expect_ok(farm.run("init"))
    live = live_identity(farm.dsn)
    names = [f"node-{i:03d}" for i in range(HERD)]
    for name in names:
        farm.config(name)  # written before the herd starts
    with ConnectionSampler(stock_postgres.admin_dsn, role_of(farm_dsn)) as sampler:
        procs = {name: sync_process(farm, name) for name in names}
        try:
            outcomes = {name: p.communicate(timeout=300) for name, p in procs.items()}
        finally:
            for p in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
    failed = {
        name: err.decode(errors="replace")[-500:]
        for name, (_, err) in outcomes.items()
        if procs[name].returncode != 0
    }
    assert not failed, failed
    assert all(manifest_identity(farm.store(n)) == live for n in names)
    errors = "".join(err.decode(errors="replace") for _, err in outcomes.values())
    assert "error:" not in errors.lower()
    assert sampler.peak <= MAX_CONNECTIONS
    recorded = db_query(farm.dsn, "SELECT count(*) AS n FROM node WHERE last_sync IS NOT NULL")
    assert recorded[0]["n"] == HERD
