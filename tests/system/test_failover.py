"""The config DB fails over to its streaming standby, under three serving nodes.

A private primary with a synchronous standby (pg_basebackup -R, synchronous_standby_names:
a commit the primary acknowledged is on both); the farm's database.dsn lists both hosts
with target_session_attrs=read-write. The primary is stopped while a rollover is asked
for, the standby promoted (pg_ctl promote), and the farm must carry on: the nodes
reconnect to the new primary, a leader takes a higher term, the rollover is done exactly
once, no acknowledged write is lost, and no two leaders write in one term.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from farmtools import TestFarm, db_query, expect_ok, lease_row, wait_until
from serving import ServeNodes, live_identity, manifest_identity

from farmkeys import requesting
from farmkeys.config import load
from farmkeys.db import ConfigDB, describe_dsn
from farmkeys.directory import Directory
from farmkeys_lab.postgres import LocalPostgres, multi_host_dsn
from farmkeys_lab.slapd import LocalSlapd

NODES = ("node-a", "node-b", "node-c")
TTL = 3.0
RENEW = 0.5
SETTINGS: dict[str, dict[str, Any]] = {
    "policy": {"rollover_interval_seconds": 3600},
    "lease": {"ttl_seconds": TTL, "renew_seconds": RENEW},
    "node": {"poll_seconds": 5},
    "retry": {"total_seconds": 2.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.5},
}


class Writer:
    """Inserts a row every 20 ms through the multi-host DSN and keeps the ids of the
    inserts whose commit was acknowledged: none of those may be missing afterwards."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.acknowledged: list[int] = []
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS acked (id integer PRIMARY KEY)")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            n += 1
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                conn.execute("INSERT INTO acked (id) VALUES (%s)", (n,))
            except psycopg.Error:
                self.refused += 1
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.2)
                continue
            self.acknowledged.append(n)  # the commit returned: acknowledged
            self._stop.wait(0.02)
        if conn is not None:
            conn.close()


def test_describe_dsn_names_every_host_of_a_multi_host_dsn() -> None:
    dsn = "host=db1,db2 port=5432,5433 dbname=farm user=svc target_session_attrs=read-write"
    assert describe_dsn(dsn) == "db1:5432,db2:5433/farm as svc"
    assert describe_dsn("host=db1,db2 dbname=farm") == "db1:5432,db2:5432/farm"


def test_the_farm_carries_on_when_its_config_db_fails_over_to_the_standby(
    tmp_path: Path, slapd: LocalSlapd, replicated: tuple[LocalPostgres, LocalPostgres]
) -> None:
    primary, standby = replicated
    primary.create_database("farm")
    dsn = multi_host_dsn([primary, standby], "farm")
    (tmp_path / "farm").mkdir()
    farm = TestFarm(root=tmp_path / "farm", slapd=slapd, dsn=dsn, overrides=copy.deepcopy(SETTINGS))
    expect_ok(farm.run("init"))
    cfg = load(farm.config("asker"))

    with ServeNodes(farm) as nodes, Writer(dsn) as writer:
        nodes.start_all(NODES)
        live = live_identity(dsn)
        wait_until(
            lambda: (
                all(manifest_identity(farm.store(n)) == live for n in NODES)
                and lease_row(dsn)["valid"]
            ),
            60.0,
            "three nodes serve",
            detail=nodes.logs,
        )
        before = lease_row(dsn)
        time.sleep(0.5)  # some acknowledged writes before the failover

        # A rollover is asked for, and the primary stops at once: the leader is in the
        # middle of it (or has not begun, or has just committed: each must end the same).
        with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
            request = requesting.file_request(
                cfg,
                db,
                dirx,
                kind="rollover",
                purpose="signing",
                urgent=True,
                lifetime_seconds=120,
            )
        primary.stop()
        time.sleep(TTL + 1.0)  # the lease runs out while there is no primary
        standby.promote()

        wait_until(
            lambda: db_query(
                dsn,
                "SELECT done_at IS NOT NULL AS done FROM rollover_request WHERE id = %s",
                (request,),
            )[0]["done"],
            60.0,
            "the rollover request is done on the new primary",
            detail=nodes.logs,
        )
        rolled = live_identity(dsn)
        assert rolled != live
        wait_until(
            lambda: all(manifest_identity(farm.store(n)) == rolled for n in NODES),
            60.0,
            "every node installs the rollover from the new primary",
            detail=nodes.logs,
        )
        after = lease_row(dsn)
        time.sleep(0.5)
        logs = nodes.logs(400)
        assert all(p.alive() for p in nodes.procs.values()), logs

        # The nodes reconnected to the new primary (the standby's port), one each.
        on_new = db_query(
            dsn,
            "SELECT inet_server_port() AS port,"
            " (SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'farmkeys node-%')"
            " AS nodes",
        )[0]
        assert on_new == {"port": standby.port, "nodes": len(NODES)}, logs

    # A leader under a higher term.
    assert after["valid"] and after["term"] > before["term"], (before, after)
    # The rollover happened exactly once: one new signing certificate, one event for it.
    signing = db_query(dsn, "SELECT count(*) AS n FROM certificate WHERE purpose = 'signing'")
    assert signing[0]["n"] == 2  # init's and the rollover's
    promoted = db_query(
        dsn,
        "SELECT count(*) AS n FROM audit_event WHERE action = 'generate_and_promote'"
        " AND purpose = 'signing'",
    )
    assert promoted[0]["n"] == 2  # init's and the rollover's
    # No acknowledged write was lost.
    present = {r["id"] for r in db_query(dsn, "SELECT id FROM acked")}
    assert writer.acknowledged and set(writer.acknowledged) <= present
    assert writer.refused > 0  # the writer did see the outage
    # No two leaders wrote in the same term.
    shared = db_query(
        dsn,
        "SELECT term, array_agg(DISTINCT node) AS nodes FROM audit_event"
        " WHERE term IS NOT NULL GROUP BY term HAVING count(DISTINCT node) > 1",
    )
    assert shared == [], shared
    leads = db_query(
        dsn,
        "SELECT term, count(*) AS n FROM audit_event WHERE action = 'lead' GROUP BY term"
        " HAVING count(*) > 1",
    )
    assert leads == [], leads
    with contextlib.suppress(Exception):
        primary.remove()  # its data diverged: it must never come back as a primary
