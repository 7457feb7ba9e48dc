"""Benchmark: what a command costs as a fresh process, against Python importing its libraries.

Not part of the test run. From the repository root (after `make setup`):

    .venv/bin/python tests/bench/bench_cold.py --runs 21

It starts its own slapd and PostgreSQL (farmkeys_lab), inits a farm and syncs one node, then
runs, interleaved so that a busy moment of the machine hurts all alike, ``--runs`` times each:

- the baseline: ``python -c "import cryptography.x509, psycopg, ldap3"``;
- ``farmkeys sync`` on the node, which finds nothing to do (goal: at most 1.15 x baseline);
- ``farmkeys status --json`` on a farm of 1,000 nodes with ten years of audit events
  (200,000 rows) (goal: at most 1.3 x baseline).

Figures are medians of wall time, each process from exec to exit.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench: _results

from _results import Row, compile_farmkeys, record
from farmtools import TestFarm, clean_env, db_query

from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

REPO = Path(__file__).resolve().parent.parent.parent
BASELINE = [sys.executable, "-c", "import cryptography.x509, psycopg, ldap3"]
NODES = 1000
EVENTS = 200_000


def farmkeys_command() -> list[str]:
    """The `farmkeys` console script beside this Python, as an operator runs it."""
    script = Path(sys.executable).with_name("farmkeys")
    return [str(script)] if script.exists() else [sys.executable, "-m", "farmkeys"]


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=clean_env(), cwd=REPO, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1, 2):  # status exits 1/2 for warning/critical farms
        raise SystemExit(f"{argv} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return elapsed


def seed(dsn: str) -> None:
    """999 more nodes like node-a, and EVENTS audit events spread over ten years."""
    db_query(
        dsn,
        "INSERT INTO node (id, last_sync, last_seen, generation, installed, master_keys,"
        " state_version, heartbeat_at)"
        " SELECT 'bench-' || lpad(i::text, 4, '0'), now(), now(), n.generation, n.installed,"
        "  n.master_keys, n.state_version, now()"
        " FROM node n, generate_series(1, %s) AS i WHERE n.id = 'node-a' RETURNING 1",
        (NODES - 1,),
    )
    db_query(
        dsn,
        "INSERT INTO audit_event (at, node, term, action, purpose, detail)"
        " SELECT now() - make_interval(secs => i * 1577.0), 'bench-' || lpad((i %% 999)::text, 4,"
        " '0'), i / 1000, (ARRAY['lead', 'generate', 'promote', 'retire'])[1 + i %% 4],"
        " (ARRAY['signing', 'decryption'])[1 + i %% 2], 'seeded by bench_cold'"
        " FROM generate_series(1, %s) AS i RETURNING 1",
        (EVENTS,),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--results", help="append the goal rows to this JSON-lines file")
    args = parser.parse_args()
    compile_farmkeys()
    top = Path(tempfile.mkdtemp(prefix="farmkeys-bench-cold-"))
    try:
        with LocalSlapd(top / "slapd") as slapd, LocalPostgres(top / "postgres") as postgres:
            (top / "farm").mkdir()
            farm = TestFarm(root=top / "farm", slapd=slapd, dsn=postgres.create_database("cold"))
            assert farm.run("init").code == 0
            assert farm.run("sync").code == 0
            seed(farm.dsn)
            config = str(farm.config("node-a"))
            sync = [*farmkeys_command(), "sync", "--config", config]
            status = [*farmkeys_command(), "status", "--json", "--config", config]
            for argv in (BASELINE, sync, status):  # warm the page cache and the .pyc files
                timed(argv)
            base, synced, stat = [], [], []
            for _ in range(args.runs):
                base.append(timed(BASELINE))
                synced.append(timed(sync))
                stat.append(timed(status))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    b, s, t = (statistics.median(x) for x in (base, synced, stat))
    print(f"cold processes, median of {args.runs} interleaved runs:")
    print(f"  baseline (import cryptography.x509, psycopg, ldap3): {b * 1000:.0f} ms")
    print(f"  farmkeys sync, nothing to do:                        {s * 1000:.0f} ms")
    print(f"  farmkeys status --json, {NODES} nodes, {EVENTS} events:  {t * 1000:.0f} ms")
    record(
        args.results,
        Row("cold sync (nothing to do) / bare imports", s / b, "x", 1.15, f"{s * 1000:.0f} ms"),
    )
    record(
        args.results,
        Row(
            f"status --json ({NODES} nodes, {EVENTS // 1000}k events) / bare imports",
            t / b,
            "x",
            1.3,
            f"{t * 1000:.0f} ms",
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
