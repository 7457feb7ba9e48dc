"""`farmkeys serve`'s HTTP endpoints and its systemd notifications, on real serving processes.

Two nodes serve the farm with ``[publish] listen`` on free loopback ports: they answer
the metadata and the JWKS with the same bytes, ETags and caching headers, record a
relying party's fetch, expose Prometheus metrics that agree with ``status --json``, and
say whether they are healthy. A third process runs under a real notify socket, as
systemd would start it with ``Type=notify`` and ``WatchdogSec=``. The health answer
itself and the notifier are tested without servers (tests/unit/test_node_health.py,
tests/unit/test_sdnotify.py).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from farmtools import REPO, TestFarm, add_certificate, clean_env, db_query, expect_ok, wait_until
from federation import signxml_verifies, xmlsec1_verifies
from prometheus_client.parser import text_string_to_metric_families
from serving import ServeNodes

from farmkeys import publish
from farmkeys.db import CHANGED_CHANNEL
from farmkeys_lab.servers import free_port

START = 30.0  # two processes start and sync on a loaded machine
PUBLISH = {
    "entity_id": "https://fs.contoso.example/adfs/services/trust",
    "sso_url": "https://fs.contoso.example/adfs/ls/",
    "relying_parties": ["rp1=https://rp1.example/metadata", "rp2"],
    "max_age_seconds": 120,
}
QUICK = {
    "policy": {"rollover_interval_seconds": 3600},
    "lease": {"ttl_seconds": 3.0, "renew_seconds": 0.5},
    "node": {"poll_seconds": 5},
    "retry": {"total_seconds": 1.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.2},
}


@pytest.fixture
def quick_farm(farm: TestFarm) -> TestFarm:
    """The farm under QUICK, initialised."""
    farm.overrides.update(json.loads(json.dumps(QUICK)))
    expect_ok(farm.run("init"))
    return farm


@pytest.fixture
def serving(quick_farm: TestFarm) -> Iterator[dict[str, str]]:
    """node-a and node-b serving with HTTP; their base URLs."""
    urls = {}
    with ServeNodes(quick_farm) as nodes:
        for node in ("node-a", "node-b"):
            port = free_port()
            nodes.start(node, publish={**PUBLISH, "listen": f"127.0.0.1:{port}"})
            urls[node] = f"http://127.0.0.1:{port}"
        for node, url in urls.items():
            wait_until(
                lambda url=url: get(url + publish.HEALTH_PATH)[0] == 200,
                START,
                f"{node} answers /healthz with 200",
                interval=0.1,
                detail=nodes.logs,
            )
        wait_until(lambda: leader_rows(quick_farm), START, "a node leads", detail=nodes.logs)
        yield urls


def leader_rows(farm: TestFarm) -> list[dict[str, Any]]:
    return db_query(farm.dsn, "SELECT holder_node FROM leader_lease WHERE expires_at > now()")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """(status, headers, body); the headers are looked up ignoring case, as HTTP's are
    (waitress sends ``Etag``)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()
    except OSError:
        return 0, Message(), b""


def test_every_node_answers_the_same_documents_with_caching_headers(
    quick_farm: TestFarm, serving: dict[str, str]
) -> None:
    for path, kind in (
        (publish.METADATA_PATH, "application/samlmetadata+xml"),
        (publish.JWKS_PATH, "application/json"),
    ):
        answers = [get(url + path) for url in serving.values()]
        assert [a[0] for a in answers] == [200, 200]
        (_, headers, body), (_, other_headers, other_body) = answers
        assert body == other_body  # any node answers for the farm
        assert headers["ETag"] == other_headers["ETag"] == publish.etag(body)
        assert headers["Cache-Control"] == "public, max-age=120"
        assert headers["Content-Type"] == kind
        # The CLI prints the same document from the store.
        command = "metadata" if path == publish.METADATA_PATH else "jwks"
        assert quick_farm.run(command, publish=PUBLISH).out.encode() == body
        # A client holding the current version gets 304 and no body.
        status, _, empty = get(serving["node-a"] + path, {"If-None-Match": headers["ETag"]})
        assert (status, empty) == (304, b"")
        status, _, again = get(serving["node-a"] + path, {"If-None-Match": '"stale"'})
        assert (status, again) == (200, body)


def test_the_metadata_serve_answers_verifies_with_xmlsec1_and_signxml_on_every_node(
    quick_farm: TestFarm, serving: dict[str, str]
) -> None:
    """Real serve processes: each node's document is signed by the signing primary, with
    its certificate in KeyInfo, and a relying party's verifiers accept it."""
    for node, url in serving.items():
        status, _, body = get(url + publish.METADATA_PATH)
        assert status == 200
        certificate = (quick_farm.store(node) / "signing" / "primary.pem").read_bytes()
        assert xmlsec1_verifies(body, certificate), node
        assert signxml_verifies(body, certificate), node
        other = (quick_farm.store(node) / "decryption" / "primary.pem").read_bytes()
        assert not xmlsec1_verifies(body, other)


def test_a_fetch_naming_a_relying_party_is_recorded_with_the_keys_it_was_served(
    quick_farm: TestFarm, serving: dict[str, str]
) -> None:
    status, _, body = get(serving["node-b"] + publish.JWKS_PATH + "?rp=rp1")
    assert status == 200
    served = sorted(
        db_query(
            quick_farm.dsn,
            "SELECT thumbprint FROM certificate WHERE role = 'primary' AND purpose = 'signing'",
        )[0].values()
    )
    rows = db_query(
        quick_farm.dsn, "SELECT relying_party, thumbprint, node, document FROM relying_party_fetch"
    )
    assert rows == [
        {"relying_party": "rp1", "thumbprint": served[0], "node": "node-b", "document": "jwks"}
    ]
    assert served[0] in json.dumps(json.loads(body)) or rows  # the JWKS names it by x5t
    # A name not in publish.relying_parties is served but not recorded.
    assert get(serving["node-a"] + publish.METADATA_PATH + "?rp=mallory")[0] == 200
    assert len(db_query(quick_farm.dsn, "SELECT * FROM relying_party_fetch")) == 1
    doc = quick_farm.run("status", "--json", publish=PUBLISH).json
    rp1 = next(rp for rp in doc["relying_parties"] if rp["name"] == "rp1")
    assert rp1["last_node"] == "node-b" and rp1["fetched"] == served


def test_unknown_paths_are_404(serving: dict[str, str]) -> None:
    status, _, body = get(serving["node-a"] + "/adfs/ls/")
    assert status == 404
    assert b"/FederationMetadata/2007-06/FederationMetadata.xml" in body


def metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, headers, body = get(url + publish.METRICS_PATH)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_metrics_agree_with_status(quick_farm: TestFarm, serving: dict[str, str]) -> None:
    get(serving["node-a"] + publish.METADATA_PATH + "?rp=rp2")
    scraped = metrics(serving["node-b"])
    doc = quick_farm.run("status", "--json", publish=PUBLISH).json

    live = [c for c in doc["certificates"] if c["role"] != "archived"]
    expiry = {
        (m["purpose"], m["role"], m["thumbprint"]): v
        for m, v in scraped["farmkeys_certificate_expiration_timestamp_seconds"]
    }
    assert expiry == {(c["purpose"], c["role"], c["thumbprint"]): ts(c["not_after"]) for c in live}
    not_before = {
        m["thumbprint"]: v for m, v in scraped["farmkeys_certificate_not_before_timestamp_seconds"]
    }
    assert not_before == {c["thumbprint"]: ts(c["not_before"]) for c in live}
    next_action = {
        (m["thumbprint"], m["action"]): v
        for m, v in scraped["farmkeys_certificate_next_action_timestamp_seconds"]
    }
    assert next_action == {
        (c["thumbprint"], c["next_action"]["action"]): ts(c["next_action"]["at"])
        for c in live
        if c["next_action"]
    }
    assert len(next_action) == 2

    in_sync = {m["node"]: v for m, v in scraped["farmkeys_node_in_sync"]}
    assert in_sync == {n["id"]: 1.0 for n in doc["nodes"]} == {"node-a": 1.0, "node-b": 1.0}
    last_sync = {m["node"]: v for m, v in scraped["farmkeys_node_last_sync_timestamp_seconds"]}
    assert last_sync.keys() == {"node-a", "node-b"}
    # A node re-syncing between the scrape and the status may move its time forward only.
    for n in doc["nodes"]:
        assert last_sync[n["id"]] <= ts(n["last_sync"])

    keys = {
        (m["id"], m["state"]): v
        for m, v in scraped["farmkeys_master_key_created_timestamp_seconds"]
    }
    assert keys == {(k["id"], k["state"]): ts(k["created_at"]) for k in doc["master_keys"]}
    fetches = {
        m["rp"]: v for m, v in scraped["farmkeys_relying_party_last_fetch_timestamp_seconds"]
    }
    rp2 = next(rp for rp in doc["relying_parties"] if rp["name"] == "rp2")
    assert fetches == {"rp2": ts(rp2["last_fetch_at"])}
    assert "farmkeys_relying_party_has_secondary" not in scraped  # no secondary yet
    assert scraped["farmkeys_status_up"] == [({}, 1.0)]
    health = {"ok": 0.0, "warning": 1.0, "critical": 2.0}[doc["health"]]
    assert scraped["farmkeys_health"] == [({}, health)]
    assert scraped["farmkeys_sync_total"][0][1] >= 1
    assert scraped["farmkeys_sync_errors_total"] == [({}, 0.0)]

    # Exactly one node says it leads, with the lease's term.
    lease = db_query(quick_farm.dsn, "SELECT holder_node, term FROM leader_lease")[0]
    leaders = {}
    for node, url in serving.items():
        ((labels, value),) = metrics(url)["farmkeys_leader"]
        assert labels["node"] == node
        leaders[node] = (value, labels["term"])
    assert leaders[lease["holder_node"]] == (1.0, str(lease["term"]))
    other = next(n for n in serving if n != lease["holder_node"])
    assert leaders[other] == (0.0, "")


def health(url: str) -> tuple[int, dict[str, Any]]:
    status, _, body = get(url + publish.HEALTH_PATH)
    return status, json.loads(body) if body else {}


def test_healthz_stays_200_but_degraded_while_the_config_db_is_away(
    quick_farm: TestFarm, serving: dict[str, str], postgres: Any
) -> None:
    """A shared config DB outage must not take every node out of a load balancer: the
    installed keys still sign. /healthz says degraded; the metrics say the farm is unread."""
    url = serving["node-a"]
    status, body = health(url)
    assert (status, body["status"], body["problems"]) == (200, "ok", [])
    postgres.stop()
    try:
        wait_until(
            lambda: health(url)[1].get("status") == "degraded",
            20.0,
            "/healthz says degraded once the listener lost the config DB",
            interval=0.2,
        )
        status, body = health(url)
        assert status == 200 and "not connected to the config DB" in body["problems"]
        # /metrics is cached for a second (publish.METRICS_CACHE_SECONDS).
        wait_until(
            lambda: metrics(url)["farmkeys_status_up"] == [({}, 0.0)],
            20.0,
            "/metrics says the farm's state is unread",
            interval=0.2,
        )
        # The documents come from the store: relying parties still get the keys.
        assert get(url + publish.JWKS_PATH)[0] == 200
    finally:
        postgres.start()
    wait_until(
        lambda: health(url)[1].get("status") == "ok",
        30.0,
        "/healthz is ok again once the config DB is back",
        interval=0.2,
    )


def signing_primary(store: Path) -> str:
    """The thumbprint of the signing primary a store's manifest.json says is installed."""
    doc = json.loads((store / "manifest.json").read_text())
    (found,) = [
        c["thumbprint"]
        for c in doc["certificates"]
        if (c["purpose"], c["role"]) == ("signing", "primary")
    ]
    return str(found)


def refused_record(problems: list[str]) -> bool:
    """Whether ``problems`` name a sync that refused the farm state record's MAC."""
    return any("farm state" in p and "fails authentication" in p for p in problems)


def test_a_zeroed_farm_state_mac_leaves_every_node_serving_degraded_not_drained(
    quick_farm: TestFarm, serving: dict[str, str]
) -> None:
    """Issue 19, attack 4: one UPDATE by someone who can write the config DB makes every
    node's sync refuse the farm's rows. Each node's installed set is intact, unexpired and
    still served, so /healthz stays 200 (degraded, naming the refused record): a load
    balancer keeps the farm. `status` is critical, so monitoring alerts. Only what a node
    itself cannot serve is 503: here a key file removed (the refused sync cannot repair
    it) and a new node with nothing installed."""
    before = {url: get(url + publish.METADATA_PATH) for url in serving.values()}
    assert all(answer[0] == 200 for answer in before.values())
    db_query(
        quick_farm.dsn, "UPDATE farm_state SET mac = decode(repeat('00',32),'hex') RETURNING mac"
    )
    db_query(quick_farm.dsn, "SELECT pg_notify(%s, 'test')", (CHANGED_CHANNEL,))
    for node, url in serving.items():
        wait_until(
            lambda url=url: refused_record(health(url)[1].get("problems", [])),
            20.0,
            f"{node}'s /healthz names the refused farm state record",
            interval=0.2,
        )
        status, body = health(url)
        assert (status, body["status"], body["node"]) == (200, "degraded", node), body
        assert body["generation"] == 1
        # It still serves the set it installed, byte for byte.
        assert get(url + publish.METADATA_PATH)[::2] == before[url][::2]
        assert get(url + publish.JWKS_PATH)[0] == 200
        assert metrics(url)["farmkeys_sync_errors_total"][0][1] >= 1
    result = quick_farm.run("status")
    assert result.code == 2, result.out + result.err  # critical: monitoring alerts
    assert "fails authentication" in result.out + result.err

    # A node whose installed set is damaged cannot serve: 503, even while the others stay.
    thumbprint = signing_primary(quick_farm.store("node-a"))
    (quick_farm.store("node-a") / "signing" / f"{thumbprint}.key").unlink()
    status, body = health(serving["node-a"])
    assert (status, body["status"]) == (503, "failing"), body
    assert any(f"signing primary {thumbprint} no longer matches" in p for p in body["problems"])
    assert refused_record(body["problems"])
    assert health(serving["node-b"])[:1] == (200,)

    # A node that joins now has nothing it could serve: 503.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ServeNodes(quick_farm) as nodes:
        nodes.start("node-c", publish={**PUBLISH, "listen": f"127.0.0.1:{port}"})
        wait_until(
            lambda: refused_record(health(url)[1].get("problems", [])),
            START,
            "node-c's first sync refuses the record",
            interval=0.2,
            detail=nodes.logs,
        )
        status, body = health(url)
        assert (status, body["status"], body["generation"]) == (503, "failing", None), body
        assert "nothing is installed; run `farmkeys sync`" in body["problems"]
    assert not (quick_farm.store("node-c") / "manifest.json").exists()


def test_healthz_is_503_while_an_installed_file_is_damaged_until_a_sync_repairs_it(
    quick_farm: TestFarm,
) -> None:
    """/healthz checks the installed files against the manifest on each request (cheaply:
    a file whose stat is unchanged is not read again), so a key overwritten in place,
    which changes no name, is seen at once; a sync installs the set again."""
    quick_farm.overrides["node"]["poll_seconds"] = 3600  # only the notification below re-syncs
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ServeNodes(quick_farm) as nodes:
        nodes.start("node-a", publish={**PUBLISH, "listen": f"127.0.0.1:{port}"})
        wait_until(lambda: health(url)[0] == 200, START, "node-a answers", detail=nodes.logs)
        wait_until(lambda: leader_rows(quick_farm), START, "node-a leads", detail=nodes.logs)
        status, body = health(url)
        assert (status, body["status"], body["generation"]) == (200, "ok", 1), body
        thumbprint = signing_primary(quick_farm.store())
        key = quick_farm.store() / "signing" / f"{thumbprint}.key"
        good = key.read_bytes()
        with key.open("r+b") as file:  # the same inode and size, other bytes
            file.write(b"X")
        status, body = health(url)
        assert (status, body["status"], body["generation"]) == (503, "failing", 1), body
        assert body["problems"] == [
            f"the installed signing primary {thumbprint} no longer matches the store's manifest"
            " (a file removed or changed)"
        ]
        assert get(url + publish.JWKS_PATH)[0] == 200  # certificates only: still published
        # The signed metadata needs the key, read only as its manifest records it: refused,
        # saying which file, never what it holds.
        status, _, refused = get(url + publish.METADATA_PATH)
        assert status == 503
        assert f"{thumbprint}.key is not the file its manifest records" in refused.decode()
        assert good.splitlines()[1][:24] not in refused
        db_query(quick_farm.dsn, "SELECT pg_notify(%s, 'test')", (CHANGED_CHANNEL,))
        wait_until(
            lambda: health(url)[:1] == (200,), 20.0, "the sync repaired it", detail=nodes.logs
        )
        status, body = health(url)
        assert (status, body["status"], body["generation"]) == (200, "ok", 2), body
        assert key.read_bytes() == good
        assert get(url + publish.METADATA_PATH)[0] == 200


def test_a_port_in_use_is_one_clear_error(quick_farm: TestFarm) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = quick_farm.spawn("serve", publish={"listen": f"127.0.0.1:{port}"})
    assert result.code == 1
    lines = [line for line in result.err.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"cannot listen on publish.listen 127.0.0.1:{port}" in lines[0]


# -- systemd's notify protocol -------------------------------------------------------------


def receive(sock: socket.socket, want: str, timeout: float) -> list[str]:
    """Datagrams until one holds the line ``want``; all of them."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if want in got[-1].splitlines():
            return got
    raise AssertionError(f"no {want!r} within {timeout} s; got {got}")


def test_serve_tells_systemd_it_is_ready_pings_the_watchdog_and_says_it_stops(
    quick_farm: TestFarm, tmp_path: Path
) -> None:
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        env = {**clean_env(), "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
        log = (tmp_path / "serve.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "farmkeys",
                "serve",
                "--config",
                str(quick_farm.config("node-a")),
            ],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
        try:
            before = receive(sock, "READY=1", START)
            ready = before[-1].splitlines()
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=farm contoso: generation 1 installed;")
            # By then the node has synced: READY waits for the store.
            assert (quick_farm.store() / "manifest.json").exists()
            assert receive(sock, "WATCHDOG=1", 5.0)  # every half of WATCHDOG_USEC
            proc.send_signal(signal.SIGTERM)
            assert receive(sock, "STOPPING=1", 10.0)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def test_the_last_relying_partys_fetch_wakes_the_leader_to_promote(quick_farm: TestFarm) -> None:
    """With require_fetch, the fetch that completes the set is answered within seconds, not
    at the next rollover check (an hour away here)."""
    due = {}
    for purpose in ("signing", "decryption"):
        due[purpose] = add_certificate(quick_farm, purpose=purpose, role="secondary")
        db_query(
            quick_farm.dsn,
            "UPDATE certificate SET created_at = now() - interval '6 days'"
            " WHERE thumbprint = %s RETURNING id",
            (due[purpose],),
        )
    port = free_port()
    settings = {
        "publish": {**PUBLISH, "relying_parties": ["rp1"], "listen": f"127.0.0.1:{port}"},
        "policy": {**QUICK["policy"], "require_fetch": True},
    }

    def primary(purpose: str) -> str:
        rows = db_query(
            quick_farm.dsn,
            "SELECT thumbprint FROM certificate WHERE purpose = %s AND role = 'primary'",
            (purpose,),
        )
        return str(rows[0]["thumbprint"])

    with ServeNodes(quick_farm) as nodes:
        nodes.start("node-a", **settings)
        # The leader's first check promotes the decryption secondary and holds the signing one.
        wait_until(
            lambda: primary("decryption") == due["decryption"],
            START,
            "the leader's first check promoted the decryption secondary",
            detail=nodes.logs,
        )
        assert primary("signing") != due["signing"]
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(url + publish.HEALTH_PATH)[0] == 200, START, "serve answers")
        wait_until(lambda: _has(url, due["signing"]), START, "the secondary is published")
        assert get(url + publish.METADATA_PATH + "?rp=rp1")[0] == 200
        wait_until(
            lambda: primary("signing") == due["signing"],
            10.0,
            "the fetch woke the leader, which promoted the signing secondary",
            detail=nodes.logs,
        )
    (event,) = db_query(
        quick_farm.dsn,
        "SELECT detail FROM audit_event WHERE action = 'promote' AND purpose = 'signing'",
    )
    assert "generated at" in event["detail"]  # promoted as due, not at the critical moment


def _has(url: str, thumbprint: str) -> bool:
    """Whether the metadata lists ``thumbprint`` (its KeyName)."""
    return f"<ds:KeyName>{thumbprint}</ds:KeyName>" in get(url + publish.METADATA_PATH)[2].decode()


def test_serve_listens_with_a_deep_backlog_and_stops_on_sigterm_beside_slow_clients(
    quick_farm: TestFarm,
) -> None:
    """The serving process's listening socket has publish.backlog (ss reads it back), and
    SIGTERM stops it cleanly while clients hold connections with incomplete requests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ServeNodes(quick_farm) as nodes:
        serve = nodes.start("node-a", publish={**PUBLISH, "listen": f"127.0.0.1:{port}"})
        wait_until(lambda: get(url + publish.HEALTH_PATH)[0] == 200, START, "serve answers")
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert int(out[2]) == 1024  # Send-Q of a listening socket: its backlog
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        try:
            for sock in slow:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            assert get(url + publish.METADATA_PATH)[0] == 200
            assert nodes.stop("node-a", timeout=20) == 0, nodes.logs()
            for sock in slow:
                assert sock.recv(1024) == b""  # closed by the server as it stopped
        finally:
            for sock in slow:
                sock.close()
    assert "stopped" in serve.tail(5)
