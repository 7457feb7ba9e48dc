"""Benchmark: `farmkeys serve`'s HTTP endpoints under a crowd and beside slow-loris clients.

Not part of the test run. From the repository root:

    make bench
    .venv/bin/python tests/bench/bench_crowd.py --rounds 5 --seconds 10

It starts its own PostgreSQL and slapd (farmkeys_lab), initialises a farm with a signing
secondary, and runs one `farmkeys serve` with ``[publish] listen`` (the defaults of
``[publish]`` otherwise). Clients are asyncio connections in this process, each a fresh
connection, one GET of the metadata and the whole answer read:

(a) ``--clients`` (200) connect at the same moment, ``--rounds`` times: the latency of each
    (connect to last byte), p50 and p99, the errors (anything but a 200 within 30 s), and
    the serve process's CPU time (user + system, /proc) per response, less what it spends
    idle over as long as the pauses between rounds;
(b) ``--normal`` (20) clients fetching one after the other for ``--seconds``, first alone,
    then beside ``--slow`` (50) slow-loris clients that each send a request line and then
    one byte of a header every half second, reconnecting whenever the server closes them:
    the normal clients' p99 both ways, their ratio, and how often the server closed a slow
    client (its whole-request deadline, ``publish.request_timeout_seconds``).

Goals (docs/operations.md, "Measured"): (a) 0 errors and p99 under 250 ms; (b) the normal
p99 beside the slow clients at most twice its value without them. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench: _results

from _lab import lab_farm
from _results import Row, machine, record
from farmtools import add_certificate, wait_until
from serving import ServeNodes

from farmkeys import publish
from farmkeys_lab.servers import free_port

HOST = "127.0.0.1"
REQUEST = (
    f"GET {publish.METADATA_PATH} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
).encode()
TIMEOUT = 30.0


async def fetch(port: int) -> float:
    """One metadata GET on a new connection: seconds from connect to the last byte; raises
    on anything but a whole 200."""
    started = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), TIMEOUT)
    try:
        writer.write(REQUEST)
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # to the server's close
    finally:
        writer.close()
    status_line = answer.partition(b"\r\n")[0]
    if (
        not status_line.startswith(b"HTTP/1.")
        or b" 200 " not in status_line
        or not answer.rstrip().endswith(b"</md:EntityDescriptor>")
    ):
        raise RuntimeError(answer[:80].decode(errors="replace"))
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def crowd(port: int, clients: int) -> tuple[list[float], int]:
    """``clients`` metadata GETs started at once: their latencies and the errors."""
    found = await asyncio.gather(*(fetch(port) for _ in range(clients)), return_exceptions=True)
    times = [f for f in found if isinstance(f, float)]
    return times, len(found) - len(times)


async def normal_clients(port: int, clients: int, seconds: float) -> tuple[list[float], int]:
    """``clients`` clients, each fetching one GET after another for ``seconds``."""
    deadline = time.perf_counter() + seconds
    times: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            try:
                times.append(await fetch(port))
            except (OSError, RuntimeError, TimeoutError):
                errors += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return times, errors


async def slow_loris(port: int, stop: asyncio.Event, closed: list[int]) -> None:
    """One slow client: a request line, then a byte of a header every half second, on a new
    connection each time the server closes the last (counted in ``closed``)."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(f"GET {publish.METADATA_PATH} HTTP/1.1\r\nX-Slow: ".encode())
            while not stop.is_set():
                writer.write(b"a")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1024), 0.5) == b"":
                        closed[0] += 1  # the server closed it
                        break
                except TimeoutError:
                    continue
        except OSError:
            closed[0] += 1
        finally:
            writer.close()


async def beside_slow(
    port: int, normal: int, slow: int, seconds: float
) -> tuple[list[float], int, int]:
    stop = asyncio.Event()
    closed = [0]
    lorises = [asyncio.create_task(slow_loris(port, stop, closed)) for _ in range(slow)]
    await asyncio.sleep(1.0)  # every slow client connected and trickling
    times, errors = await normal_clients(port, normal, seconds)
    stop.set()
    await asyncio.gather(*lorises, return_exceptions=True)
    return times, errors, closed[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--normal", type=int, default=20)
    parser.add_argument("--slow", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--results", help="append the goal rows to this JSON-lines file")
    args = parser.parse_args()
    with lab_farm("crowd") as farm:
        port = free_port()
        farm.overrides["publish"] = {
            "listen": f"{HOST}:{port}",
            "entity_id": "https://fs.contoso.example/adfs/services/trust",
            "sso_url": "https://fs.contoso.example/adfs/ls/",
        }
        farm.overrides["policy"] = {"rollover_interval_seconds": 3600}
        assert farm.run("init").code == 0
        add_certificate(farm, purpose="signing", role="secondary")
        with ServeNodes(farm) as nodes:
            serve = nodes.start("node-a")
            wait_until(
                lambda: _answers(port), 30.0, "serve answers", interval=0.1, detail=nodes.logs
            )
            asyncio.run(crowd(port, 10))  # warm: the documents built, the code paths run
            print(f"on {machine()}")
            print(f"(a) {args.clients} clients connect at once, {args.rounds} rounds")
            times: list[float] = []
            errors = 0
            idle = cpu_seconds(serve.pid)
            time.sleep(0.5 * args.rounds)  # what serve spends meanwhile, idle (its jobs)
            idle = cpu_seconds(serve.pid) - idle
            cpu = cpu_seconds(serve.pid)
            for _ in range(args.rounds):
                got, failed = asyncio.run(crowd(port, args.clients))
                times += got
                errors += failed
                time.sleep(0.5)
            cpu = cpu_seconds(serve.pid) - cpu - idle
            responses = max(1, len(times))
            p50, p99 = statistics.median(times) * 1000, percentile(times, 0.99) * 1000
            print(
                f"  p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(times) * 1000:.1f} ms,"
                f" {errors} errors of {args.clients * args.rounds};"
                f" serve's CPU {cpu * 1000 / responses:.2f} ms per response"
                f" (its idle CPU over the rounds' pauses, {idle * 1000:.0f} ms, taken off)"
            )
            record(args.results, Row(f"HTTP, {args.clients} clients at once: p99", p99, "ms", 250))
            record(
                args.results,
                Row(f"HTTP, {args.clients} clients at once: errors", errors, "errors", 0),
            )
            print(
                f"(b) {args.normal} normal clients for {args.seconds:.0f} s, without and"
                f" beside {args.slow} slow-loris clients"
            )
            alone, alone_errors = asyncio.run(normal_clients(port, args.normal, args.seconds))
            beside, beside_errors, closed = asyncio.run(
                beside_slow(port, args.normal, args.slow, args.seconds)
            )
            p99_alone = percentile(alone, 0.99) * 1000
            p99_beside = percentile(beside, 0.99) * 1000
            print(
                f"  alone: {len(alone)} GETs, p50 {statistics.median(alone) * 1000:.1f} ms,"
                f" p99 {p99_alone:.1f} ms, {alone_errors} errors"
            )
            print(
                f"  beside the slow clients: {len(beside)} GETs,"
                f" p50 {statistics.median(beside) * 1000:.1f} ms, p99 {p99_beside:.1f} ms,"
                f" {beside_errors} errors; the server closed slow clients {closed} times"
            )
            record(
                args.results,
                Row(
                    f"HTTP, {args.normal} clients beside {args.slow} slow-loris: p99 ratio",
                    p99_beside / p99_alone,
                    "x",
                    2.0,
                    note=f"{p99_beside:.1f} ms vs {p99_alone:.1f} ms alone",
                ),
            )
    return 0


def _answers(port: int) -> bool:
    try:
        asyncio.run(fetch(port))
    except (OSError, RuntimeError, TimeoutError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
