"""Benchmark: re-sealing the live blobs in a master-key roll, with N serve nodes following.

Not part of the test run. From the repository root:

    make bench
    .venv/bin/python tests/bench/bench_master_key.py --blobs 1 10 100 --nodes 5 --rolls 3

It starts its own slapd and PostgreSQL (farmkeys_lab, in a temporary folder,
on free loopback ports), one database per blob count, and N `farmkeys serve`
processes that only follow (they never lead: the bench holds the lease). For
each count B it fills the live set to B blobs (the two primaries and B-2
retired certificates, each a real RSA-2048 certificate sealed under the
farm's key), then rolls the master key through the leader's own code
(leader.Leader.roll_master_key) and times

- the fenced transactions of the roll: how long each held the lease row
  (the re-seal of every blob, and the one that makes the key current);
- from the roll's start to every node having confirmed the new key id
  (node.master_keys in the config DB: the node opened the re-sealed blobs
  under it), read every 10 ms.

Printed, never asserted. Every node, the leader and the bench share one
machine and its clock.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab

from farmtools import TestFarm, db_query, lease_row, seal_state, wait_until
from serving import ServeNodes

from farmkeys.config import LeaseConfig, load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election, Fence
from farmkeys.leader import Leader, new_certificate
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

OVERRIDES: dict[str, dict[str, Any]] = {
    "policy": {"rollover_interval_seconds": 3600},
    "lease": {"ttl_seconds": 60, "renew_seconds": 20},
    "node": {"poll_seconds": 60.0},
    "retry": {"total_seconds": 1.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.2},
}


@dataclass
class Figures:
    blobs: int
    nodes: int
    reseal_hold: list[float] = field(default_factory=list)
    current_hold: list[float] = field(default_factory=list)
    to_all_nodes: list[float] = field(default_factory=list)


class TimedElection(Election):
    """The leader's election, timing every fenced transaction it opens."""

    held: list[float]

    @contextlib.contextmanager
    def fenced(self, db: ConfigDB | None = None) -> Iterator[Fence]:
        started = time.perf_counter()
        with super().fenced(db) as fence:
            yield fence
        self.held.append(time.perf_counter() - started)


def fill(farm: TestFarm, blobs: int) -> None:
    """Make the live set ``blobs`` long: retired certificates under the current key, or,
    for one blob, the signing primary alone (the decryption primary archived). The farm
    state record is sealed again afterwards, as the leader would, or nodes refuse the set."""
    try:
        _fill(farm, blobs)
    finally:
        seal_state(farm)


def _fill(farm: TestFarm, blobs: int) -> None:
    if blobs == 1:
        db_query(
            farm.dsn,
            "UPDATE certificate SET role = 'archived' WHERE purpose = 'decryption' RETURNING id",
        )
        return
    config = load(farm.config())
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as d,
    ):
        found = db.require_farm()
        [current] = [k for k in db.master_keys() if k.stage == "current"]
        key = d.master_key(found.dkm_group, current.id)
        with db.transaction() as tx:
            for i in range(blobs - 2):
                tx.insert_certificate(
                    new_certificate(
                        config,
                        dkm_group=found.dkm_group,
                        purpose=("signing", "decryption")[i % 2],
                        role="retired",
                        master_key_id=current.id,
                        master_key=key,
                        now=datetime.now(UTC),
                    )
                )


def confirmed_by_all(dsn: str, names: list[str], key_id: uuid.UUID) -> bool:
    rows = db_query(dsn, "SELECT id, master_keys FROM node WHERE id = ANY(%s)", (names,))
    return len(rows) == len(names) and all(r["master_keys"] == [key_id] for r in rows)


def run(
    root: Path, slapd: LocalSlapd, postgres: LocalPostgres, blobs: int, n: int, rolls: int
) -> Figures:
    name = f"farmkeys_bench_{uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name)
    figures = Figures(blobs=blobs, nodes=n)
    root.mkdir(parents=True)
    try:
        farm = TestFarm(root=root, slapd=slapd, dsn=dsn, overrides=OVERRIDES)
        assert farm.run("init").code == 0
        fill(farm, blobs)
        config = load(farm.config("bench-leader"))
        names = [f"node-{i:02d}" for i in range(n)]
        with (
            ConfigDB(config.database, config.retry) as db,
            Directory(config.directory, config.retry) as directory,
            ServeNodes(farm) as nodes,
        ):
            election = TimedElection(db, node_id="bench-leader", lease=LeaseConfig(60, 20))
            election.held = []
            assert election.try_acquire()  # before the nodes start: none of them leads
            nodes.start_all(names)
            first = db_query(dsn, "SELECT id FROM master_key WHERE state = 'current'")[0]["id"]
            wait_until(
                lambda: confirmed_by_all(dsn, names, first),
                120,
                f"{n} nodes sync",
                detail=nodes.logs,
            )
            leader = Leader(config, db, directory, election)
            farm_row = db.require_farm()
            for _ in range(rolls):
                assert election.try_acquire() and lease_row(dsn)["holder_node"] == "bench-leader"
                election.held.clear()
                started = time.perf_counter()
                leader.roll_master_key(farm_row, urgent=False, request=None)
                new = db_query(dsn, "SELECT id FROM master_key WHERE state = 'current'")[0]["id"]
                wait_until(
                    lambda new=new: confirmed_by_all(dsn, names, new),
                    120,
                    "every node confirms the new key",
                    interval=0.01,
                    detail=nodes.logs,
                )
                figures.to_all_nodes.append(time.perf_counter() - started)
                # recorded, added, resealed, current: the last two carry the work.
                figures.reseal_hold.append(election.held[-2])
                figures.current_hold.append(election.held[-1])
                time.sleep(0.5)
    finally:
        postgres.drop_database(name)
    return figures


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} {max(values) * 1000:8.1f}"


def report(results: list[Figures]) -> str:
    lines = [
        f"farmkeys master-key roll — {os.cpu_count()} CPUs, RSA-2048 certificates,"
        f" {results[0].nodes} serve nodes following",
        "",
        f"{'blobs':>5}  {'measure':<52} {'median':>8} {'max':>8}  samples",
    ]
    for f in results:
        for label, values in (
            ("re-seal transaction: lease row held (ms)", f.reseal_hold),
            ("make-current transaction: lease row held (ms)", f.current_hold),
            ("roll start -> every node confirmed the new key (ms)", f.to_all_nodes),
        ):
            lines.append(f"{f.blobs:>5}  {label:<52} {_ms(values)}  {len(values)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rolls", type=int, default=3)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="farmkeys-bench-"))
    results = []
    try:
        with LocalSlapd(top / "slapd") as slapd, LocalPostgres(top / "postgres") as postgres:
            for blobs in args.blobs:
                started = time.monotonic()
                results.append(
                    run(top / f"b{blobs}", slapd, postgres, blobs, args.nodes, args.rolls)
                )
                print(f"{blobs} blobs: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
