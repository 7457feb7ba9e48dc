"""serve's HTTP server holding a crowd (issue 21): the listen backlog, the bounded handler
pool and its 503s, the whole-request deadline, the documents built once per installed set
and /metrics made once per cache period. The :class:`~farmkeys.publish.Publisher` runs in
this process on a real farm's store (PostgreSQL and slapd: the farm was initialised and
synced by the CLI), so its handlers can be held deterministically, on an Event, and what it
builds counted. No assertion here is on a timing: where time matters (the deadline) the
margins are generous and only the order of events is checked."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email.message import Message

import pytest
from farmtools import TestFarm, add_certificate, db_query, expect_ok, wait_until

from farmkeys import publish
from farmkeys.config import PublishConfig
from farmkeys.publish import Health, Publisher
from farmkeys.store import Store
from farmkeys_lab.servers import free_port

PUBLISH = {
    "entity_id": "https://fs.contoso.example/adfs/services/trust",
    "sso_url": "https://fs.contoso.example/adfs/ls/",
    "relying_parties": ["rp1"],
}
SLOW = 60.0  # the longest any step here may take on a loaded machine before it is a failure


@pytest.fixture
def synced(farm: TestFarm) -> TestFarm:
    farm.overrides["publish"] = dict(PUBLISH)
    farm.overrides["policy"] = {"rollover_interval_seconds": 3600}
    for args in (("init",), ("sync",)):
        expect_ok(farm.run(*args))
    return farm


@dataclasses.dataclass
class Node:
    """A Publisher on the farm's store and what it was asked for."""

    publisher: Publisher
    url: str
    records: list[tuple[str, str, tuple[str, ...]]]


@pytest.fixture
def make_node(synced: TestFarm) -> Iterator[Callable[..., Node]]:
    """``make_node(**publish_settings, health=..., metrics=..., clock=...)``: a started
    Publisher on node-a's store; stopped after the test."""
    started: list[Publisher] = []

    def make(
        *,
        health: Callable[[], Health] | None = None,
        metrics: Callable[[], bytes] | None = None,
        clock: Callable[[], datetime] | None = None,
        metrics_period: float = publish.METRICS_CACHE_SECONDS,
        start: bool = True,
        record: Callable[[str, str, Sequence[str]], None] | None = None,
        **settings: object,
    ) -> Node:
        port = free_port()
        config = PublishConfig(
            **{**PUBLISH, "listen": f"127.0.0.1:{port}", **settings}  # type: ignore[arg-type]
        )
        records: list[tuple[str, str, tuple[str, ...]]] = []
        publisher = Publisher(
            config,
            Store(synced.store(), node_id="node-a"),
            record=record or (lambda rp, doc, tps: records.append((rp, doc, tuple(tps)))),
            metrics=metrics or (lambda: b"farmkeys_status_up 1\n"),
            health=health or (lambda: Health(True, {"status": "ok"})),
            clock=clock or (lambda: datetime.now(UTC)),
            metrics_period=metrics_period,
        )
        started.append(publisher)
        if start:
            publisher.start()
        return Node(publisher, f"http://127.0.0.1:{port}", records)

    yield make
    for publisher in started:
        publisher.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=SLOW) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


# -- the listen backlog -------------------------------------------------------------------


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port``, as Linux reports it (ss's Send-Q of
    a listening socket is its backlog)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2])


def test_the_listen_backlog_holds_a_crowd_while_nothing_is_accepted(
    make_node: Callable[..., Node],
) -> None:
    """A crowd connecting while every connection waits to be accepted: each of 200 is taken
    into the backlog at once (with Linux's backlog of 5 the 7th would wait for a SYN
    retransmission, and then another)."""
    node = make_node(start=False)  # listening, not accepting: the loop has not started
    port = node.publisher.port
    assert listen_backlog(port) == 1024  # publish.backlog's default
    crowd = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=SLOW)
            crowd.append(sock)
        node.publisher.start()
        # Accepted in turn, each is answered.
        sock = crowd[-1]
        sock.sendall(f"GET {publish.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in crowd:
            sock.close()


def test_publish_backlog_sets_the_listening_sockets_backlog(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(backlog=128, start=False)
    assert listen_backlog(node.publisher.port) == 128


# -- the bounded handler pool ---------------------------------------------------------------


def test_a_request_beyond_the_busy_pool_and_its_queue_is_answered_503_with_retry_after(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    """One handler, held on an Event by a /healthz; one request queued behind it; the next
    is answered at once with 503 and Retry-After (no handler runs it), and the two held
    are answered once the handler is free."""
    entered, release = threading.Event(), threading.Event()

    def held_health() -> Health:
        entered.set()
        assert release.wait(SLOW)
        return Health(True, {"status": "ok"})

    node = make_node(threads=1, max_queued=1, health=held_health)
    answers: dict[str, int] = {}

    def fetch(name: str) -> None:
        answers[name] = get(node.url + publish.HEALTH_PATH)[0]

    first = threading.Thread(target=fetch, args=("first",))
    second = threading.Thread(target=fetch, args=("second",))
    try:
        first.start()
        assert entered.wait(SLOW)  # the one handler is busy
        second.start()
        wait_until(lambda: node.publisher.server.waiting == 1, SLOW, "the second waits")
        status, headers, body = get(node.url + publish.METADATA_PATH)
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert body.startswith(b"busy: every handler is answering")
        assert node.publisher.server.shed == 1
        assert "every HTTP handler is busy and 1 requests wait: answering 503" in caplog.text
        assert get(node.url + publish.JWKS_PATH)[0] == 503  # still full
    finally:
        release.set()
        first.join(SLOW)
        second.join(SLOW)
    assert answers == {"first": 200, "second": 200}
    assert get(node.url + publish.METADATA_PATH)[0] == 200  # free again


def test_past_the_connection_limit_a_client_waits_in_the_backlog_until_one_closes(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(connection_limit=2)
    port = node.publisher.port
    held = [socket.create_connection(("127.0.0.1", port), timeout=SLOW) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # incomplete: each stays open
        wait_until(lambda: node.publisher.server.connections == 2, SLOW, "both are accepted")
        with socket.create_connection(("127.0.0.1", port), timeout=SLOW) as third:
            third.sendall(f"GET {publish.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            third.settimeout(0.5)
            with pytest.raises(TimeoutError):
                third.recv(64)  # not accepted while two are open
            assert node.publisher.server.connections == 2
            held.pop().close()
            third.settimeout(SLOW)
            assert third.recv(64).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


def answer_to(port: int, request: bytes) -> bytes:
    """The status line the server answers ``request`` (raw bytes) with."""
    with socket.create_connection(("127.0.0.1", port), timeout=SLOW) as sock:
        sock.sendall(request)
        return sock.recv(4096).partition(b"\r\n")[0]


def test_only_get_and_head_of_a_small_request_are_answered(make_node: Callable[..., Node]) -> None:
    """HEAD is GET without the body; other methods are 405; a body or headers beyond what
    a GET needs are refused before any handler sees them."""
    node = make_node()
    port = node.publisher.port
    request = urllib.request.Request(node.url + publish.METADATA_PATH, method="HEAD")
    with urllib.request.urlopen(request, timeout=SLOW) as response:
        assert response.status == 200 and response.read() == b""
        assert int(response.headers["Content-Length"]) > 1000
        assert response.headers["ETag"] == get(node.url + publish.METADATA_PATH)[1]["ETag"]
    status, headers, _ = get_with(node.url + publish.METADATA_PATH, method="POST", data=b"x")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    body = b"x" * 2048
    assert answer_to(
        port, b"GET /healthz HTTP/1.1\r\nContent-Length: 2048\r\n\r\n" + body
    ).startswith(b"HTTP/1.1 413 ")
    big = b"X-Big: " + b"a" * 40_000 + b"\r\n"
    assert b" 431 " in answer_to(port, b"GET /healthz HTTP/1.1\r\n" + big + b"\r\n")


def get_with(url: str, *, method: str, data: bytes | None) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=SLOW) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


# -- the whole-request deadline --------------------------------------------------------------


def trickle_until_closed(port: int, *, every: float, give_up: float) -> tuple[float, int]:
    """A slow-loris: a request line, then one byte of a header every ``every`` seconds until
    the server closes the connection; (seconds it stayed open, bytes trickled)."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=SLOW) as sock:
        sock.sendall(f"GET {publish.METADATA_PATH} HTTP/1.1\r\nX-Slow: ".encode())
        sock.settimeout(every)
        while time.monotonic() - started < give_up:
            try:
                sock.sendall(b"a")
                sent += 1
                if sock.recv(1024) == b"":
                    break  # closed by the server
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        else:
            raise AssertionError(f"still open after {give_up} s of trickling")
    return time.monotonic() - started, sent


def test_the_whole_request_deadline_closes_a_slow_loris_that_keeps_sending(
    make_node: Callable[..., Node],
) -> None:
    """A client sending a byte every 0.2 s is never idle, so waitress's inactivity timeout
    alone would keep it open for ever: the deadline closes it once 2 s have passed since it
    connected without a whole request. Others are answered meanwhile."""
    node = make_node(request_timeout_seconds=2)
    done: list[tuple[float, int]] = []
    loris = threading.Thread(
        target=lambda: done.append(
            trickle_until_closed(node.publisher.port, every=0.2, give_up=SLOW)
        )
    )
    loris.start()
    assert get(node.url + publish.METADATA_PATH)[0] == 200
    loris.join(SLOW * 2)
    ((open_for, sent),) = done
    assert open_for >= 2.0  # never before its deadline
    assert sent >= 2  # it kept sending: not an idle connection


def test_the_deadline_runs_again_from_each_answer_on_a_kept_alive_connection(
    make_node: Callable[..., Node],
) -> None:
    """A kept-alive connection gets a new deadline after each answer: a client that answers
    quickly and then trickles its next request is closed too."""
    node = make_node(request_timeout_seconds=2)
    with socket.create_connection(("127.0.0.1", node.publisher.port), timeout=SLOW) as sock:
        sock.sendall(f"GET {publish.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
        sock.settimeout(0.2)
        started = time.monotonic()
        while time.monotonic() - started < SLOW:
            try:
                sock.sendall(b"a")
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        else:
            raise AssertionError("the trickled second request was never cut off")


# -- documents built once per installed set ----------------------------------------------


def test_the_documents_are_built_once_per_installed_set(
    synced: TestFarm, make_node: Callable[..., Node]
) -> None:
    node = make_node()
    answers = set()
    for _ in range(20):
        for path in (publish.METADATA_PATH, publish.JWKS_PATH, publish.METADATA_PATH + "?rp=rp1"):
            status, headers, body = get(node.url + path)
            assert status == 200 and headers["ETag"] == publish.etag(body)
            answers.add((path.partition("?")[0], body))
    assert len(answers) == 2  # the same bytes each time
    assert node.publisher.documents.builds == 2  # the metadata once, the JWKS once
    tag = get(node.url + publish.METADATA_PATH)[1]["ETag"]
    assert get(node.url + publish.METADATA_PATH, {"If-None-Match": tag})[0] == 304
    assert node.publisher.recorder.idle(SLOW)  # written off the request path
    assert node.records[0][0:2] == ("rp1", "metadata")

    # Another installed set: built again, once, and another ETag.
    secondary = add_certificate(synced, purpose="signing", role="secondary")
    expect_ok(synced.run("sync"))
    for _ in range(10):
        status, headers, body = get(node.url + publish.METADATA_PATH)
        assert f"<ds:KeyName>{secondary}</ds:KeyName>".encode() in body
        assert headers["ETag"] != tag
    assert get(node.url + publish.METADATA_PATH, {"If-None-Match": tag})[0] == 200
    assert node.publisher.documents.builds == 3


def test_a_retired_certificate_past_its_not_after_makes_the_documents_again(
    synced: TestFarm, make_node: Callable[..., Node]
) -> None:
    retired = add_certificate(synced, purpose="signing", role="retired")
    expect_ok(synced.run("sync"))
    (row,) = db_query(
        synced.dsn, "SELECT not_after FROM certificate WHERE thumbprint = %s", (retired,)
    )
    now = [row["not_after"] - timedelta(seconds=1)]
    node = make_node(clock=lambda: now[0])
    assert retired.encode() in get(node.url + publish.METADATA_PATH)[2]
    assert retired.encode() in get(node.url + publish.METADATA_PATH)[2]
    assert node.publisher.documents.builds == 1
    now[0] = row["not_after"] + timedelta(seconds=1)
    assert retired.encode() not in get(node.url + publish.METADATA_PATH)[2]
    assert node.publisher.documents.builds == 2


# -- /metrics made once per cache period --------------------------------------------------


def test_concurrent_scrapes_read_the_farms_status_once_per_cache_period(
    make_node: Callable[..., Node],
) -> None:
    """Twelve scrapers at once while the first status read is held: one read, twelve
    answers of the same document; more scrapes within the period read nothing."""
    entered, release = threading.Event(), threading.Event()
    reads = []

    def metrics() -> bytes:
        reads.append(1)
        entered.set()
        assert release.wait(SLOW)
        return f"farmkeys_status_up 1\nread {len(reads)}\n".encode()

    node = make_node(threads=12, metrics=metrics, metrics_period=SLOW * 10)
    bodies: list[bytes] = []
    lock = threading.Lock()

    def scrape() -> None:
        status, _, body = get(node.url + publish.METRICS_PATH)
        assert status == 200
        with lock:
            bodies.append(body)

    scrapers = [threading.Thread(target=scrape) for _ in range(12)]
    for t in scrapers:
        t.start()
    try:
        assert entered.wait(SLOW)
        wait_until(
            lambda: node.publisher.server.busy == 12,
            SLOW,
            "the twelve scrapes are each in a handler, at once",
        )
        assert len(reads) == 1
    finally:
        release.set()
        for t in scrapers:
            t.join(SLOW)
    assert bodies == [b"farmkeys_status_up 1\nread 1\n"] * 12
    for _ in range(30):
        assert get(node.url + publish.METRICS_PATH)[2] == bodies[0]
    assert len(reads) == 1 and node.publisher.metrics.makes == 1


def test_metrics_are_read_again_after_the_period(make_node: Callable[..., Node]) -> None:
    reads = []

    def metrics() -> bytes:
        reads.append(1)
        return f"read {len(reads)}\n".encode()

    node = make_node(metrics=metrics, metrics_period=0.2)
    assert get(node.url + publish.METRICS_PATH)[2] == b"read 1\n"
    wait_until(
        lambda: get(node.url + publish.METRICS_PATH)[2] == b"read 2\n",
        SLOW,
        "a scrape after the period reads the status again",
    )


# -- stopping -------------------------------------------------------------------------------


def test_stopping_closes_open_connections_and_the_listening_socket(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    port = node.publisher.port
    with socket.create_connection(("127.0.0.1", port), timeout=SLOW) as idle:
        idle.sendall(b"GET / HTTP/1.1\r\n")  # an incomplete request, held open
        assert get(node.url + publish.HEALTH_PATH)[0] == 200
        node.publisher.stop()
        assert idle.recv(1024) == b""  # closed by the server
    with pytest.raises(ConnectionRefusedError), contextlib.closing(socket.socket()) as sock:
        sock.connect(("127.0.0.1", port))


def test_fetches_during_a_config_db_outage_hold_no_handler(
    make_node: Callable[..., Node],
) -> None:
    """The record of a fetch waits for the config DB (here: for ever, until released); the
    fetches are answered, and /healthz with them, though two handlers serve them all."""
    released = threading.Event()
    written: list[str] = []

    def record(rp: str, document: str, thumbprints: Sequence[str]) -> None:
        released.wait(SLOW * 4)
        written.append(rp)

    node = make_node(threads=2, record=record, relying_parties=["rp1", "rp2", "rp3", "rp4"])
    try:
        for rp in ("rp1", "rp2", "rp3", "rp4", "rp1"):
            assert get(f"{node.url}{publish.METADATA_PATH}?rp={rp}")[0] == 200
        assert get(node.url + publish.HEALTH_PATH)[0] == 200
    finally:
        released.set()
    assert node.publisher.recorder.idle(SLOW)
    assert sorted(written) == ["rp1", "rp2", "rp3", "rp4"]  # one record each, all written
