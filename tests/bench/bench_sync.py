"""Benchmark: a warm sync in one process, against its irreducible parts.

Not part of the test run. From the repository root, after `make setup`:

    .venv/bin/python tests/bench/bench_sync.py --rounds 20

It starts its own slapd and PostgreSQL (farmkeys_lab), inits a farm and syncs a node in
this process (connection open, master key cached: what `serve` does on a NOTIFY). Then,
``--rounds`` times each:

- nothing changed: the sync, against the one statement it sends (the live-set read,
  timed alone with the same parameters);
- a new secondary (what a rollover's first step brings): the sync, against the sum of
  the live-set read, the AEAD open of the one new blob, and writing that certificate's
  three files, the manifest and the switch with the same fsyncs, into a scratch folder.

The ratio is what everything else costs (the store inspection, the checks of the farm
state record and the bundle, Python): goal at most 2x when nothing changed. A change also
costs a second statement (the record of the sync), carrying the unchanged files, and
removing the generation before last, none of which the parts count: goal at most 3x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench: _results

from _results import Row, record
from farmtools import TestFarm, add_certificate, db_query, seal_state

from farmkeys.config import load
from farmkeys.db import Claim, ConfigDB
from farmkeys.directory import Directory
from farmkeys.formats import blob
from farmkeys.formats.blob import blob_context
from farmkeys.store import Store
from farmkeys.sync import sync
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

GOAL = 2.0  # nothing changed
GOAL_CHANGED = 3.0  # a new secondary: + the record, the carry, the clean-up


def write_like_an_install(folder: Path, files: dict[str, bytes], manifest: bytes) -> None:
    """The writes an install of one new certificate cannot avoid: its files (fsynced), the
    manifest, the folders' fsyncs, a rename and a symlink swap."""
    staging = folder / ".new"
    os.mkdir(staging)
    os.mkdir(staging / "signing")
    for name, data in files.items():
        fd = os.open(staging / "signing" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(staging / "manifest.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, manifest)
    os.fsync(fd)
    os.close(fd)
    for path in (staging / "signing", staging):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    os.rename(staging, folder / "gen")
    os.symlink("gen", folder / ".link")
    os.replace(folder / ".link", folder / "current")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--results", help="append the goal rows to this JSON-lines file")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="farmkeys-bench-sync-"))
    idle_sync, idle_query, new_sync, new_parts = [], [], [], []
    try:
        with LocalSlapd(top / "slapd") as slapd, LocalPostgres(top / "postgres") as postgres:
            (top / "farm").mkdir()
            farm = TestFarm(root=top / "farm", slapd=slapd, dsn=postgres.create_database("w"))
            assert farm.run("init").code == 0
            cfg = load(farm.config("node-a"))
            store = Store(cfg.store, node_id="node-a")
            with (
                ConfigDB(cfg.database, cfg.retry) as db,
                Directory(cfg.directory, cfg.retry) as directory,
            ):

                def run_sync() -> float:
                    started = time.perf_counter()
                    sync(cfg, db, directory, store, now=datetime.now(UTC))
                    return time.perf_counter() - started

                run_sync()
                for _ in range(args.rounds):
                    # Nothing changed.
                    idle_sync.append(run_sync())
                    installed = store.inspect()
                    assert installed is not None
                    m = installed.manifest
                    claim = Claim(m.generation, m.identity(), m.state_version)
                    have = [t for _, t in installed.intact]
                    started = time.perf_counter()
                    db.live_set("node-a", claim=claim, have=have)
                    idle_query.append(time.perf_counter() - started)

                    # A new secondary.
                    thumb = add_certificate(farm, purpose="signing", role="secondary")
                    new_sync.append(run_sync())
                    row = db_query(
                        farm.dsn,
                        "SELECT f.dkm_group, c.id, c.blob, c.master_key FROM certificate c,"
                        " farm f WHERE c.thumbprint = %s",
                        (thumb,),
                    )[0]
                    installed = store.inspect()
                    assert installed is not None
                    folder = store.path / "current" / "signing"
                    files = {p.name: p.read_bytes() for p in folder.glob(f"{thumb}.*")}
                    manifest = (store.path / "manifest.json").read_bytes()
                    started = time.perf_counter()
                    db.live_set("node-a", have=[t for _, t in installed.intact])
                    key = directory.master_key(row["dkm_group"], row["master_key"])
                    blob.open_blob(
                        bytes(row["blob"]),
                        master_key=key,
                        context=blob_context(row["dkm_group"], row["id"], "signing"),
                    )
                    scratch = Path(tempfile.mkdtemp(dir=top))
                    write_like_an_install(scratch, files, manifest)
                    new_parts.append(time.perf_counter() - started)
                    shutil.rmtree(scratch)
                    # Back to one signing certificate for the next round.
                    db_query(
                        farm.dsn,
                        "UPDATE certificate SET role = 'archived' WHERE thumbprint = %s"
                        " RETURNING 1",
                        (thumb,),
                    )
                    seal_state(farm)
                    run_sync()
    finally:
        shutil.rmtree(top, ignore_errors=True)
    ms = [statistics.median(x) * 1000 for x in (idle_sync, idle_query, new_sync, new_parts)]
    print(f"warm in-process sync, median of {args.rounds}:")
    print(f"  nothing changed: sync {ms[0]:.2f} ms; its one statement alone {ms[1]:.2f} ms")
    print(f"  a new secondary: sync {ms[2]:.2f} ms; read + AEAD open + writes {ms[3]:.2f} ms")
    record(
        args.results,
        Row(
            "warm sync, nothing changed / its one statement",
            ms[0] / ms[1],
            "x",
            GOAL,
            f"{ms[0]:.2f} ms vs {ms[1]:.2f} ms",
        ),
    )
    record(
        args.results,
        Row(
            "warm sync, a new secondary / read + AEAD open + writes",
            ms[2] / ms[3],
            "x",
            GOAL_CHANGED,
            f"{ms[2]:.2f} ms vs {ms[3]:.2f} ms",
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
