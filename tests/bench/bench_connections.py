"""Benchmark: config DB connections per serving node, following and leading.

Not part of the test run (tests/system/test_scale.py asserts the same budget with 60 nodes). From
the repository root, after `make setup`:

    .venv/bin/python tests/bench/bench_connections.py --nodes 20

It starts its own slapd and PostgreSQL, ``--nodes`` `farmkeys serve` processes, and samples
pg_stat_activity every 10 ms by application name (``farmkeys <node>`` is a node's shared
connection, ``farmkeys leader <node>`` the leader's second) while the nodes start, sync, take
the lease, and follow three urgent rollovers. It reports the most connections any one
following node held, the most the leader held, and the farm's peak.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench: _results

import psycopg
from _results import Row, record
from farmtools import TestFarm, lease_row, wait_until
from serving import ServeNodes, live_identity, manifest_identity

from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

SETTINGS = {
    "policy": {"rollover_interval_seconds": 3600},
    "lease": {"ttl_seconds": 6.0, "renew_seconds": 1.0},
    "node": {"poll_seconds": 60},
}


class Sampler(threading.Thread):
    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.stop = dsn, threading.Event()
        self.by_node: dict[str, int] = {}  # "<node>" or "leader <node>" -> most at once
        self.peak = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity"
                    " WHERE application_name LIKE 'farmkeys%%' GROUP BY 1"
                ).fetchall()
                self.peak = max(self.peak, sum(n for _, n in rows))
                for name, n in rows:
                    key = name.removeprefix("farmkeys ")
                    self.by_node[key] = max(self.by_node.get(key, 0), n)
                self.stop.wait(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--results", help="append the goal rows to this JSON-lines file")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="farmkeys-bench-conn-"))
    try:
        with LocalSlapd(top / "slapd") as slapd, LocalPostgres(top / "postgres") as postgres:
            (top / "farm").mkdir()
            farm = TestFarm(
                root=top / "farm",
                slapd=slapd,
                dsn=postgres.create_database("c"),
                overrides=SETTINGS,
            )
            assert farm.run("init").code == 0
            names = [f"node-{i:02d}" for i in range(args.nodes)]
            sampler = Sampler(postgres.admin_dsn)
            sampler.start()
            with ServeNodes(farm) as nodes:
                nodes.start_all(names)
                live = live_identity(farm.dsn)
                wait_until(
                    lambda: (
                        all(manifest_identity(farm.store(n)) == live for n in names)
                        and lease_row(farm.dsn)["valid"]
                    ),
                    60 + 3 * args.nodes,
                    f"{args.nodes} nodes serve",
                    detail=nodes.logs,
                )
                for _ in range(3):
                    result = farm.run("rollover", "--urgent", "--yes", "--purpose", "signing")
                    assert result.code == 0, result.err
                    rolled = live_identity(farm.dsn)
                    wait_until(
                        lambda r=rolled: all(manifest_identity(farm.store(n)) == r for n in names),
                        60,
                        "every node installs the rollover",
                        detail=nodes.logs,
                    )
                leader = lease_row(farm.dsn)["holder_node"]
            sampler.stop.set()
            sampler.join(5)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    following = max(v for k, v in sampler.by_node.items() if k in names and k != leader)
    leading = sampler.by_node.get(leader, 0) + sampler.by_node.get(f"leader {leader}", 0)
    print(f"{args.nodes} serving nodes, three rollovers:")
    print(f"  most connections held by one following node: {following}")
    print(f"  most held by the leader ({leader}): {leading}")
    print(f"  the farm's peak (with the rollover command's own): {sampler.peak}")
    record(args.results, Row("connections per following node", following, "connections", 1))
    record(args.results, Row("connections of the leading node", leading, "connections", 2))
    record(
        args.results,
        Row(
            f"connections of {args.nodes} serving nodes, peak",
            sampler.peak,
            "connections",
            args.nodes + 2,
            "+1 leader, +1 the rollover command",
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
