"""Benchmark: what `farmkeys serve`'s HTTP endpoints cost, as relying parties, a load
balancer and Prometheus call them.

Not part of the test run. From the repository root:

    make bench
    .venv/bin/python tests/bench/bench_publish.py --requests 300 --clients 8

It starts its own PostgreSQL and slapd (farmkeys_lab), initialises a farm with a signing
secondary, and runs one `farmkeys serve` with ``[publish] listen`` on a free loopback
port. Then, for each endpoint, it times ``--requests`` sequential GETs (one connection
each, as a relying party's fetch), and the throughput of ``--clients`` concurrent
clients on the metadata. Printed, never asserted: median, 99th percentile and maximum
in ms, and requests per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab

from _lab import lab_farm
from farmtools import add_certificate, wait_until
from serving import ServeNodes

from farmkeys import publish
from farmkeys_lab.servers import free_port


def fetch(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with lab_farm("publish") as farm:
        port = free_port()
        farm.overrides["publish"] = {
            "listen": f"127.0.0.1:{port}",
            "entity_id": "https://fs.contoso.example/adfs/services/trust",
            "sso_url": "https://fs.contoso.example/adfs/ls/",
            "relying_parties": ["rp1"],
        }
        assert farm.run("init").code == 0
        add_certificate(farm, purpose="signing", role="secondary")
        base = f"http://127.0.0.1:{port}"
        with ServeNodes(farm) as nodes:
            nodes.start("node-a")
            wait_until(lambda: _ok(base + publish.HEALTH_PATH), 30.0, "serve answers", interval=0.1)
            print(f"{args.requests} sequential GETs each, ms: median / p99 / max")
            for label, path in (
                ("metadata", publish.METADATA_PATH),
                ("metadata ?rp=rp1 (recorded)", publish.METADATA_PATH + "?rp=rp1"),
                ("jwks", publish.JWKS_PATH),
                ("metrics (reads the config DB)", publish.METRICS_PATH),
                ("healthz", publish.HEALTH_PATH),
            ):
                times = sorted(fetch(base + path) for _ in range(args.requests))
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
                print(
                    f"  {label:<32}{statistics.median(times) * 1000:>8.2f}"
                    f" / {p99 * 1000:>6.2f} / {times[-1] * 1000:>6.2f}"
                )
            done = 0
            lock = threading.Lock()
            deadline = time.perf_counter() + 5.0

            def client() -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    fetch(base + publish.METADATA_PATH)
                    with lock:
                        done += 1

            started = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rate = done / (time.perf_counter() - started)
            print(f"metadata, {args.clients} concurrent clients for 5 s: {rate:.0f} requests/s")


def _ok(url: str) -> bool:
    try:
        fetch(url)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main()
