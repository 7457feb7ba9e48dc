"""Benchmark: how fast a change reaches every node; how fast a killed leader is replaced.

Not part of the test run (pytest collects test_*.py only). From the repository root:

    make bench
    .venv/bin/python tests/bench/bench_propagation.py --nodes 3 10 --rollovers 5 --failovers 3

It needs what the tests need: slapd and PostgreSQL installed (`make setup`).
It starts its own slapd and PostgreSQL (farmkeys_lab, in a temporary folder,
on free loopback ports) and, for each N, its own database and N `farmkeys
serve` processes; all of it is stopped and removed at the end, whatever
happens.

(a) Propagation. The bench asks the leader for `rollover --urgent --purpose
    signing` (requesting.request_rollover, what the CLI runs): one transaction
    replaces the signing primary. It times
    - from commit: the bench LISTENs on the farm's change channel itself; the
      NOTIFY arrives when the transaction commits;
    - from the transaction's start (audit_event.at: includes key generation);
    to the first and to the last of the N nodes whose store names the new
    primary (each store's `current` link and manifest.json read every ~5 ms).
    Nodes poll every 60 s, so only LISTEN/NOTIFY can explain sub-second times.
(b) Failover. SIGKILL the leader; time until leader_lease shows a higher term
    (read every 10 ms). The killed node is restarted before the next trial.

Every node, the leader and the bench share one machine and its clock.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench: _results

import psycopg
from _results import Row, record
from farmtools import TestFarm, db_query, lease_row, wait_until
from serving import ServeNodes, live_identity, manifest_identity

from farmkeys import requesting
from farmkeys.config import load
from farmkeys.db import CHANGED_CHANNEL, ConfigDB
from farmkeys.directory import Directory
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

TTL = 2.0
RENEW = 0.5
# The goals: nodes -> (median, max) seconds from the leader's commit to the last switch.
GOALS = {10: (0.3, 1.0), 50: (0.5, 1.5)}
POLL = 60.0
OVERRIDES: dict[str, dict[str, Any]] = {
    # AD FS's defaults: nothing rolls over by itself; every change is the bench's.
    "policy": {"rollover_interval_seconds": 3600},
    "lease": {"ttl_seconds": TTL, "renew_seconds": RENEW},
    "node": {"poll_seconds": POLL},
    "retry": {"total_seconds": 1.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.2},
}


@dataclass
class Figures:
    nodes: int
    from_commit_last: list[float] = field(default_factory=list)
    from_commit_first: list[float] = field(default_factory=list)
    from_start_last: list[float] = field(default_factory=list)
    failover: list[float] = field(default_factory=list)
    lease_left: list[float] = field(default_factory=list)


def signing_primary(store: Path) -> str | None:
    identity = manifest_identity(store)
    return next((t for p, r, t in identity or () if p == "signing" and r == "primary"), None)


def watch_stores(stores: list[Path], old: str, installed: dict[Path, float], stop: threading.Event):
    """Note when each store switched to a set whose signing primary is not ``old``: the
    mtime of its ``current`` link, which an install creates just before the atomic rename
    (read every ~20 ms; the time is the link's own, so polling adds nothing to it)."""
    links = {s: None for s in stores}
    while not stop.is_set() and len(installed) < len(stores):
        for store in stores:
            if store in installed:
                continue
            try:
                link = os.readlink(store / "current")
                switched = os.lstat(store / "current").st_mtime
            except OSError:
                continue
            if link != links[store]:
                links[store] = link
                primary = signing_primary(store)
                if primary is not None and primary != old:
                    installed[store] = switched
        time.sleep(0.02)


def one_rollover(farm: TestFarm, stores: list[Path], figures: Figures) -> None:
    old = signing_primary(stores[0])
    assert old is not None and all(signing_primary(s) == old for s in stores)
    installed: dict[Path, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_stores, args=(stores, old, installed, stop))
    cfg = load(farm.config("bench"))
    outcome: list[Any] = []

    def request() -> None:
        with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as d:
            outcome.append(
                requesting.request_rollover(
                    cfg, db, d, purpose="signing", urgent=True, timeout_seconds=30
                )
            )

    with psycopg.connect(farm.dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANGED_CHANNEL}")
        watcher.start()
        asker = threading.Thread(target=request)
        asker.start()
        committed = None
        for _ in listener.notifies(timeout=30, stop_after=1):
            committed = time.time()
        asker.join(35)
        watcher.join(15)
        stop.set()
    assert committed is not None, "no change was announced"
    assert outcome and outcome[0].ok, outcome
    assert len(installed) == len(stores), f"only {len(installed)} of {len(stores)} nodes installed"
    new = signing_primary(stores[0])
    started = db_query(
        farm.dsn,
        "SELECT at FROM audit_event WHERE action = 'generate_and_promote' AND thumbprint = %s",
        (new,),
    )[0]["at"].timestamp()
    # The commit itself, by the server's clock (track_commit_timestamp): not when this
    # process happened to read the NOTIFY.
    committed = db_query(
        farm.dsn,
        "SELECT pg_xact_commit_timestamp(xmin) AS at FROM certificate WHERE thumbprint = %s",
        (new,),
    )[0]["at"].timestamp()
    last, first = max(installed.values()), min(installed.values())
    figures.from_commit_last.append(last - committed)
    figures.from_commit_first.append(first - committed)
    figures.from_start_last.append(last - started)


def one_failover(farm: TestFarm, nodes: ServeNodes, figures: Figures) -> None:
    old = lease_row(farm.dsn)
    assert old["valid"], old
    leader = nodes.by_holder(old["holder"])
    left = db_query(farm.dsn, "SELECT expires_at - now() AS left FROM leader_lease")[0]["left"]
    killed = time.time()
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(5)
    while True:
        lease = lease_row(farm.dsn)
        if lease["valid"] and lease["term"] > old["term"]:
            break
        if time.time() - killed > 4 * TTL + 10:
            raise AssertionError(f"no node took over:\n{nodes.logs()}")
        time.sleep(0.01)
    figures.failover.append(time.time() - killed)
    figures.lease_left.append(left.total_seconds())
    # Back to N nodes before the next trial.
    restarted = db_query(farm.dsn, "SELECT now() AS now")[0]["now"]
    nodes.start(leader.node)
    wait_until(
        lambda: db_query(
            farm.dsn,
            "SELECT 1 FROM node WHERE id = %s AND heartbeat_at > %s",
            (leader.node, restarted),
        ),
        30,
        f"{leader.node} serves again",
        detail=nodes.logs,
    )


def run_farm(
    root: Path, slapd: LocalSlapd, postgres: LocalPostgres, n: int, rollovers: int, failovers: int
) -> Figures:
    name = f"farmkeys_bench_{uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name)
    figures = Figures(nodes=n)
    root.mkdir(parents=True)
    try:
        farm = TestFarm(root=root, slapd=slapd, dsn=dsn, overrides=OVERRIDES)
        result = farm.run("init")
        assert result.code == 0, result.err
        names = [f"node-{i:02d}" for i in range(n)]
        stores = [farm.store(x) for x in names]
        with ServeNodes(farm) as nodes:
            nodes.start_all(names)
            first = live_identity(farm.dsn)
            wait_until(
                lambda: (
                    all(manifest_identity(s) == first for s in stores)
                    and lease_row(farm.dsn)["valid"]
                ),
                60 + 3 * n,
                f"{n} nodes serve",
                detail=nodes.logs,
            )
            for _ in range(rollovers):
                one_rollover(farm, stores, figures)
                time.sleep(0.5)  # let every node report its sync before the next change
            for _ in range(failovers):
                one_failover(farm, nodes, figures)
    finally:
        postgres.drop_database(name)
    return figures


def _ms(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8}"
    return f"{statistics.median(values) * 1000:8.0f} {max(values) * 1000:8.0f}"


def _s(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8}"
    return f"{statistics.median(values):8.2f} {max(values):8.2f}"


def report(all_figures: list[Figures]) -> str:
    lines = [
        f"farmkeys propagation and failover — {os.cpu_count()} CPUs, lease ttl {TTL} s,"
        f" renew {RENEW} s, node poll {POLL:.0f} s (so only NOTIFY is fast)",
        "",
        f"{'N':>3}  {'measure':<44} {'median':>8} {'max':>8}  samples",
    ]
    for f in all_figures:
        rows = [
            ("commit -> last node installed (ms)", _ms(f.from_commit_last), f.from_commit_last),
            ("commit -> first node installed (ms)", _ms(f.from_commit_first), f.from_commit_first),
            ("tx start -> last node installed (ms)", _ms(f.from_start_last), f.from_start_last),
            ("kill -9 of leader -> new term (s)", _s(f.failover), f.failover),
            ("  of which lease still valid at kill (s)", _s(f.lease_left), f.lease_left),
        ]
        for label, figures, values in rows:
            lines.append(f"{f.nodes:>3}  {label:<44} {figures}  {len(values)}")
    lines += [
        "",
        "tx start: the leader's transaction began (audit_event.at); it includes generating",
        "the key pair. Failover is bounded by the lease left at the kill plus one renew period.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--results", help="append the goal rows to this JSON-lines file")
    parser.add_argument("--rollovers", type=int, default=5)
    parser.add_argument("--failovers", type=int, default=3)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="farmkeys-bench-"))
    results = []
    try:
        with (
            LocalSlapd(top / "slapd") as slapd,
            LocalPostgres(top / "postgres", settings={"track_commit_timestamp": "on"}) as postgres,
        ):
            for n in args.nodes:
                started = time.monotonic()
                root = top / f"n{n}"
                results.append(run_farm(root, slapd, postgres, n, args.rollovers, args.failovers))
                print(f"N={n}: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(report(results))
    for f in results:
        last = f.from_commit_last
        # Smaller farms have no goal of their own: they are held to 10 nodes' goals.
        median_goal, max_goal = GOALS.get(f.nodes, GOALS[10])
        note = f"{len(last)} rollovers" + ("" if f.nodes in GOALS else "; 10 nodes' goal")
        for what, figure, goal in (
            ("median", statistics.median(last), median_goal),
            ("max", max(last), max_goal),
        ):
            label = f"propagation, {f.nodes} nodes: commit -> last switch, {what}"
            record(args.results, Row(label, figure, "s", goal, note))
        if f.failover:
            record(
                args.results,
                Row(
                    f"failover after SIGKILL of the leader, {f.nodes} nodes (max)",
                    max(f.failover),
                    "s",
                    TTL + RENEW,
                    "goal: ttl + one renew period",
                ),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
