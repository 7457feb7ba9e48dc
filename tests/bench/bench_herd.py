"""Benchmark: a herd of `farmkeys sync` processes started at once, as a data centre powers up.

Not part of the test run (tests/system/test_scale.py checks the same with 100 processes, for
correctness and the connection count). From the repository root, after `make setup`:

    .venv/bin/python tests/bench/bench_herd.py --herd 500

It starts its own slapd and a PostgreSQL with the stock ``max_connections = 100`` (3 of them
reserved for superusers; the farm connects as an ordinary role), inits a farm, and gives
each of ``--herd`` nodes its store (an earlier sync: the machines were running before the
power went). Then it starts every node's ``farmkeys sync`` at once and reports the time
until the last one exits, the peak number of the farm's connections (pg_stat_activity,
sampled every 10 ms) and how many attempts met "too many clients" and were retried
(tenacity, exponential backoff with full jitter). Every process must exit 0 with its store
holding the farm's live set. ``--fresh`` starts the herd on empty stores instead (every
node reads the master key and installs; heavier, and not the goal's case).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench: _results

import psycopg
from _results import Row, compile_farmkeys, record
from farmtools import TestFarm, clean_env
from serving import live_identity, manifest_identity

from farmkeys.config import load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.store import Store
from farmkeys.sync import sync
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

REPO = Path(__file__).resolve().parent.parent.parent
GOAL_SECONDS = 30.0
MAX_CONNECTIONS = 100


def farm_role(postgres: LocalPostgres, folder: Path) -> str:
    """A database owned by an ordinary role; that role's DSN (password in a passfile)."""
    password = secrets.token_hex(16)
    with psycopg.connect(postgres.admin_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE herd LOGIN PASSWORD '{password}'")
        admin.execute("CREATE DATABASE herd OWNER herd")
    passfile = folder / "herd.pgpass"
    passfile.write_text(f"127.0.0.1:{postgres.port}:herd:herd:{password}\n")
    passfile.chmod(0o600)
    return psycopg.conninfo.make_conninfo(
        host="127.0.0.1",
        port=str(postgres.port),
        dbname="herd",
        user="herd",
        passfile=str(passfile),
        connect_timeout="10",
    )


class Sampler(threading.Thread):
    def __init__(self, admin_dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.peak, self.stop = admin_dsn, 0, threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'herd'"
                ).fetchone()
                self.peak = max(self.peak, row[0] if row else 0)
                self.stop.wait(0.01)


def farmkeys_command() -> list[str]:
    script = Path(sys.executable).with_name("farmkeys")
    return [str(script)] if script.exists() else [sys.executable, "-m", "farmkeys"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--herd", type=int, default=500)
    parser.add_argument("--fresh", action="store_true", help="start on empty stores")
    parser.add_argument("--results", help="append the goal rows to this JSON-lines file")
    args = parser.parse_args()
    compile_farmkeys()
    top = Path(tempfile.mkdtemp(prefix="farmkeys-bench-herd-"))
    try:
        with (
            LocalSlapd(top / "slapd") as slapd,
            LocalPostgres(top / "postgres", max_connections=MAX_CONNECTIONS) as postgres,
        ):
            (top / "farm").mkdir()
            farm = TestFarm(root=top / "farm", slapd=slapd, dsn=farm_role(postgres, top))
            assert farm.run("init").code == 0
            live = live_identity(farm.dsn)
            names = [f"node-{i:03d}" for i in range(args.herd)]
            configs = [str(farm.config(n)) for n in names]
            if not args.fresh:
                cfg = load(farm.config(names[0]))
                with (
                    ConfigDB(cfg.database, cfg.retry) as db,
                    Directory(cfg.directory, cfg.retry) as directory,
                ):
                    for name in names:
                        node = load(farm.config(name))
                        store = Store(node.store, node_id=name)
                        sync(node, db, directory, store, now=datetime.now(UTC))
            sampler = Sampler(postgres.admin_dsn)
            sampler.start()
            command = farmkeys_command()
            started = time.monotonic()
            procs = [
                subprocess.Popen(
                    [*command, "sync", "--config", c],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=clean_env(),
                    cwd=REPO,
                )
                for c in configs
            ]
            errors = [p.communicate(timeout=600)[1].decode(errors="replace") for p in procs]
            elapsed = time.monotonic() - started
            sampler.stop.set()
            sampler.join(5)
            failed = [n for n, p in zip(names, procs, strict=True) if p.returncode != 0]
            missing = [n for n in names if manifest_identity(farm.store(n)) != live]
            retried = sum(e.count("too many clients") for e in errors)
            gave_up = sum(1 for e in errors if "error:" in e and "too many clients" in e)
    finally:
        with contextlib.suppress(Exception):
            shutil.rmtree(top, ignore_errors=True)
    kind = "fresh stores" if args.fresh else "stores installed before the power went"
    print(f"a herd of {args.herd} `farmkeys sync` processes started at once ({kind}):")
    print(f"  all done in {elapsed:.1f} s; peak connections {sampler.peak} of {MAX_CONNECTIONS}")
    print(f"  attempts that met 'too many clients' and were retried: {retried}")
    print(f"  processes failed: {len(failed)}; stores not holding the live set: {len(missing)}")
    if failed:
        print("  first failure:", errors[names.index(failed[0])][-600:])
    record(
        args.results,
        Row(
            f"herd of {args.herd} cold syncs at once, all done",
            elapsed,
            "s",
            GOAL_SECONDS,
            f"{len(failed)} failed, {gave_up} gave up on too many clients, {retried} retried",
        ),
    )
    record(
        args.results,
        Row(
            f"herd of {args.herd}: peak connections",
            sampler.peak,
            "connections",
            MAX_CONNECTIONS,
            "max_connections",
        ),
    )
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
