"""Benchmark: what the directory costs a node's `farmkeys sync`, OpenLDAP against Active
Directory, and what a dead domain controller listed first adds.

Not part of the test run. From the repository root:

    make bench
    .venv/bin/python tests/bench/bench_directory.py --runs 15

It starts its own PostgreSQL, slapd and Samba AD DC (farmkeys_lab; the DC on
127.0.0.1:636, so no other lab DC may run), initialises one farm on each
directory, and times, as separate processes the way a service manager starts
them, `farmkeys sync` into an empty store (binds, reads the master key, opens
both blobs, installs) and into a store already in sync (no directory request
at all), for:

- slapd, ldap:// on loopback;
- the Samba DC over ldaps:// (TLS handshake, CA verified);
- the Samba DC listed after a dead address (refused at once: nothing listens).

Printed, never asserted: the median and the maximum of ``--runs`` runs, in ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab

from farmtools import TestFarm, run_python

from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.samba import LocalSambaDC, SambaTemplate
from farmkeys_lab.servers import free_port
from farmkeys_lab.slapd import LocalSlapd


def timed_syncs(farm: TestFarm, node: str, runs: int, *, empty: bool) -> list[float]:
    """``runs`` wall-clock times of `farmkeys sync` as a new process, in seconds."""
    config = farm.config(node)
    times = []
    for _ in range(runs):
        if empty:
            shutil.rmtree(farm.store(node), ignore_errors=True)
        started = time.perf_counter()
        result = run_python("-m", "farmkeys", "sync", "--config", str(config))
        times.append(time.perf_counter() - started)
        assert result.code == 0, result.err
    return times


def ad_directory(dc: LocalSambaDC, root: Path, url: Any) -> dict[str, Any]:
    return {
        "layout": "ad",
        "url": url,
        "bind_dn": dc.service_dn,
        "password_file": str(dc.write_password_file(root / "ad.password")),
        "container": dc.adfs_parent,
        "ca_file": str(dc.ca_file),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="farmkeys-bench-dir-"))
    postgres = LocalPostgres(root / "postgres")
    slapd = LocalSlapd(root / "slapd")
    started = time.perf_counter()
    template = SambaTemplate.provision(root / "samba-template")
    provisioned = time.perf_counter() - started
    dc = LocalSambaDC(template, root / "samba")
    try:
        postgres.start()
        slapd.start()
        started = time.perf_counter()
        dc.start()
        dc_start = time.perf_counter() - started
        dead = f"ldaps://127.0.0.1:{free_port()}"
        setups = {
            "slapd, ldap://": {},
            "Samba AD DC, ldaps://": {"directory": ad_directory(dc, root, dc.url)},
            "Samba AD DC after a dead DC": {"directory": ad_directory(dc, root, [dead, dc.url])},
        }
        print(
            f"Samba template provisioned in {provisioned:.1f} s; a copy started in {dc_start:.2f} s"
        )
        print(f"farmkeys sync as a new process, {args.runs} runs each: median / max, ms")
        print(f"{'directory':<32}{'empty store':>22}{'store in sync':>22}")
        farms: dict[str, TestFarm] = {}
        for label, overrides in setups.items():
            kind = "ad" if overrides else "openldap"
            if kind not in farms:
                dsn = postgres.create_database(f"farmkeys_bench_{uuid.uuid4().hex[:12]}")
                farm = TestFarm(root=root / kind, slapd=slapd, dsn=dsn, overrides=overrides)
                (root / kind).mkdir()
                assert farm.run("init").code == 0
                farms[kind] = farm
            farm = farms[kind]
            farm.overrides = overrides
            empty = timed_syncs(farm, "node-a", args.runs, empty=True)
            in_sync = timed_syncs(farm, "node-a", args.runs, empty=False)
            print(
                f"{label:<32}{statistics.median(empty) * 1000:>12.0f} / {max(empty) * 1000:>5.0f}"
                f"{statistics.median(in_sync) * 1000:>14.0f} / {max(in_sync) * 1000:>5.0f}"
            )
    finally:
        dc.remove()
        slapd.stop()
        postgres.remove()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
