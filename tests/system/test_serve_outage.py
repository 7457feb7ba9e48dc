"""`farmkeys serve` started while a server is away: it serves the installed store and catches up.

A node rebooted during an outage of the config DB or the directory must come up on the set
it has (a load balancer drops a node with no ``/healthz``; systemd restart-loops a serve
that exits), tell systemd it is ready, and install the farm's set once the server is back.
Real processes, a real notify socket, the session's PostgreSQL and slapd stopped and
started again.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from farmtools import TestFarm, add_certificate, db_query, expect_ok, wait_until
from serving import ServeNodes, ServeProcess, live_identity, manifest_identity
from test_serve_http import PUBLISH, QUICK, get, receive

from farmkeys import publish
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.servers import free_port
from farmkeys_lab.slapd import LocalSlapd

START = 30.0  # a process starts and makes its first (failing) sync on a loaded machine
# QUICK's retry budget is 1 s: a serve that gave up on the outage would have exited by then.
OUTLIVES = 8.0


@pytest.fixture
def synced_farm(farm: TestFarm) -> TestFarm:
    """The farm under QUICK, initialised, node-a's store installed by `farmkeys sync`."""
    farm.overrides.update(json.loads(json.dumps(QUICK)))
    expect_ok(farm.run("init"))
    expect_ok(farm.run("sync", node="node-a"))
    return farm


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        yield sock, address


def health(url: str) -> tuple[int, dict[str, object]]:
    status, _, body = get(url + publish.HEALTH_PATH)
    return status, json.loads(body) if body else {}


def start_serving(
    farm: TestFarm, nodes: ServeNodes, notify_address: str
) -> tuple[ServeProcess, str]:
    port = free_port()
    proc = nodes.start(
        "node-a",
        env={"NOTIFY_SOCKET": notify_address},
        publish={**PUBLISH, "listen": f"127.0.0.1:{port}"},
    )
    return proc, f"http://127.0.0.1:{port}"


def check_serves_the_installed_set(
    farm: TestFarm, proc: ServeProcess, url: str, sock: socket.socket, problem: str
) -> None:
    """READY=1, /healthz 200 "degraded" naming ``problem``, the store's metadata; still up."""
    ready = receive(sock, "READY=1", START)[-1].splitlines()
    assert ready[1].startswith("STATUS=farm contoso: generation 1 installed;"), ready
    status, body = health(url)
    assert status == 200 and body["status"] == "degraded", (body, proc.tail())
    assert any(problem in str(p) for p in body["problems"]), body
    code, _, document = get(url + publish.METADATA_PATH)
    assert code == 200
    assert document == farm.run("metadata", node="node-a", publish=PUBLISH).out.encode()
    time.sleep(OUTLIVES)
    assert proc.alive(), proc.tail()


def test_serve_starts_on_the_installed_store_while_postgres_is_down_and_catches_up(
    synced_farm: TestFarm, postgres: LocalPostgres, notify: tuple[socket.socket, str]
) -> None:
    farm = synced_farm
    sock, address = notify
    with ServeNodes(farm) as nodes:
        postgres.stop()
        try:
            proc, url = start_serving(farm, nodes, address)
            check_serves_the_installed_set(farm, proc, url, sock, "cannot reach the config DB")
        finally:
            postgres.start()
        wait_until(
            lambda: health(url)[1].get("status") == "ok",
            START,
            "node-a is healthy again once PostgreSQL is back",
            interval=0.2,
            detail=lambda: f"{health(url)}\n{nodes.logs()}",
        )
        # It caught up: its sync is recorded in the config DB again, and it takes the lease.
        wait_until(
            lambda: db_query(farm.dsn, "SELECT holder_node FROM leader_lease"),
            START,
            "node-a leads once the config DB is back",
            detail=nodes.logs,
        )
        assert proc.alive(), proc.tail()


def test_serve_starts_on_the_installed_store_while_the_directory_is_down_and_catches_up(
    synced_farm: TestFarm, slapd: LocalSlapd, notify: tuple[socket.socket, str]
) -> None:
    farm = synced_farm
    # A secondary made while node-a was off: installing it needs the master key.
    add_certificate(farm, purpose="signing", role="secondary")
    live = live_identity(farm.dsn)
    sock, address = notify
    with ServeNodes(farm) as nodes:
        slapd.stop()
        try:
            proc, url = start_serving(farm, nodes, address)
            check_serves_the_installed_set(farm, proc, url, sock, "cannot reach the directory")
            assert manifest_identity(farm.store("node-a")) != live
        finally:
            slapd.start()
        wait_until(
            lambda: manifest_identity(farm.store("node-a")) == live,
            START,
            "node-a installs the farm's new secondary once the directory is back",
            detail=nodes.logs,
        )
        wait_until(
            lambda: health(url)[1].get("status") == "ok",
            START,
            "node-a is healthy again",
            interval=0.2,
            detail=nodes.logs,
        )
        assert proc.alive(), proc.tail()


def test_serve_with_nothing_installed_waits_for_the_config_db_without_exiting(
    farm: TestFarm, postgres: LocalPostgres, notify: tuple[socket.socket, str]
) -> None:
    farm.overrides.update(json.loads(json.dumps(QUICK)))
    expect_ok(farm.run("init"))
    sock, address = notify
    with ServeNodes(farm) as nodes:
        postgres.stop()
        try:
            proc, url = start_serving(farm, nodes, address)
            # Nothing to serve: /healthz fails (the load balancer keeps it out), no READY.
            wait_until(
                lambda: health(url)[0] == 503, START, "node-a answers 503", detail=nodes.logs
            )
            with pytest.raises(AssertionError, match="no 'READY=1' within"):
                receive(sock, "READY=1", OUTLIVES)
            assert proc.alive(), proc.tail()
        finally:
            postgres.start()
        receive(sock, "READY=1", START)  # ready once it has installed the farm's set
        assert manifest_identity(farm.store("node-a")) == live_identity(farm.dsn)
