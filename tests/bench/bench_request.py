"""Benchmark: what the request MAC costs `farmkeys rollover` (issue 19).

Not part of the test run. From the repository root:

    .venv/bin/python tests/bench/bench_request.py --runs 200

It starts its own PostgreSQL and slapd (farmkeys_lab), initialises one farm, and
times, in one process with the connections a `rollover` command already holds
(one to the config DB, one bound to the directory):

- ``sign``: building and signing a request body (HKDF-SHA256 and HMAC-SHA256);
- ``file unsigned``: the bare INSERT and NOTIFY a request cost before issue 19;
- ``file signed``: `requesting.file_request`, as the command runs it: the directory's
  CryptoPolicy and the current key (each read once per command; the client caches
  the key, so later runs show the cached cost; ``first`` is the uncached one), the
  INSERT, the signature and its UPDATE in the same transaction;
- the whole `farmkeys rollover --purpose signing` command in-process, for scale.

Printed, never asserted: the median and the 95th percentile of ``--runs``, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab

from _lab import lab_farm

from farmkeys import requesting
from farmkeys.config import load
from farmkeys.db import REQUEST_CHANNEL, ConfigDB
from farmkeys.directory import Directory
from farmkeys.formats import request


def timed(runs: int, step: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return times


def line(what: str, times: list[float]) -> str:
    p95 = sorted(times)[int(len(times) * 0.95) - 1] if len(times) > 1 else times[0]
    return f"{what:<42} median {statistics.median(times):8.3f} ms   p95 {p95:8.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with lab_farm("request") as farm:
        assert farm.run("init").code == 0
        cfg = load(farm.config())
        with (
            ConfigDB(cfg.database, cfg.retry) as db,
            Directory(cfg.directory, cfg.retry) as directory,
        ):
            group = db.require_farm().dkm_group
            key_id = directory.current_key_id(group)
            key = directory.master_key(group, key_id)
            body = request.Request(
                id=1,
                nonce=uuid.uuid4(),
                farm=group,
                kind="rollover",
                purpose="signing",
                urgent=False,
                requested_by="node-a",
                created=int(time.time()),
                expires=int(time.time()) + 180,
                master_key=key_id,
                requester=request.Requester(account="farmkeys", host="bench", reason="bench"),
            )

            def unsigned() -> None:
                with db.transaction() as tx:
                    tx.execute(
                        "INSERT INTO rollover_request (requested_by, purpose, urgent)"
                        " VALUES ('bench', 'signing', false) RETURNING id"
                    )
                    tx.notify(REQUEST_CHANNEL, "bench")

            def signed() -> None:
                requesting.file_request(
                    cfg,
                    db,
                    directory,
                    kind="rollover",
                    purpose="signing",
                    urgent=False,
                    lifetime_seconds=120,
                )

            with Directory(cfg.directory, cfg.retry) as cold:
                started = time.perf_counter()
                requesting.file_request(
                    cfg,
                    db,
                    cold,
                    kind="rollover",
                    purpose="signing",
                    urgent=False,
                    lifetime_seconds=120,
                )
                first = (time.perf_counter() - started) * 1000
            print(
                f"servers: the lab's PostgreSQL and slapd; config DB {farm.dsn.rsplit('@', 1)[-1]}"
            )
            print(line("sign (HKDF + HMAC)", timed(args.runs, lambda: request.sign(body, key))))
            print(line("file unsigned (INSERT + NOTIFY)", timed(args.runs, unsigned)))
            print(line("file signed (key cached)", timed(args.runs, signed)))
            print(f"{'file signed, first (directory reads)':<42} {first:8.3f} ms")
            db.fetch("UPDATE rollover_request SET done_at = now() WHERE done_at IS NULL")
        command = timed(
            max(5, args.runs // 20),
            lambda: farm.run("rollover", "--purpose", "signing"),
        )
        print(line("farmkeys rollover --purpose signing", command))


if __name__ == "__main__":
    main()
