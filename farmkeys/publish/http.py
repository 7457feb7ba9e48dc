"""serve's HTTP endpoints: the documents, ``/metrics`` and ``/healthz``, and the fetch records.

:class:`Publisher` owns the server and what each path answers; the request handler
only turns an answer into bytes on the wire.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from farmkeys.config import PublishConfig
from farmkeys.errors import ConfigError, Error
from farmkeys.publish.jwks import jwks
from farmkeys.publish.keys import from_store
from farmkeys.publish.metadata import metadata, metadata_settings
from farmkeys.store import Store

# The name these lines have always carried, before publish became a package.
log = logging.getLogger("farmkeys.publish")

METADATA_PATH: Final = "/FederationMetadata/2007-06/FederationMetadata.xml"
JWKS_PATH: Final = "/adfs/discovery/keys"
METRICS_PATH: Final = "/metrics"
HEALTH_PATH: Final = "/healthz"
# A relying party's fetch of the same keys is written to the config DB at most this often.
RECORD_EVERY_SECONDS: Final = 60.0

_TEXT: Final = "text/plain; charset=utf-8"
_NOT_FOUND: Final = (
    b"not found: farmkeys answers "
    + " ".join((METADATA_PATH, JWKS_PATH, METRICS_PATH, HEALTH_PATH)).encode()
    + b"\n"
)


def etag(body: bytes) -> str:
    """A strong entity tag of a document: its SHA-256, shortened."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclass(frozen=True)
class Health:
    """What ``/healthz`` says: 200 when ``ok``, else 503; ``detail`` is its JSON body."""

    ok: bool
    detail: dict[str, object]


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, content type, body and the headers beyond those."""

    status: int
    kind: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class Publisher:
    """serve's HTTP endpoints: metadata, JWKS, ``/metrics`` and ``/healthz``.

    Each request is answered from the node's installed store (documents), a
    callback (metrics, health) and the clock passed in; a relying party's fetch
    is recorded through ``record`` (rp, document, thumbprints), at most every
    :data:`RECORD_EVERY_SECONDS` for the same keys, and never holds up the answer
    for long: a failed record is logged and the document served.
    """

    def __init__(
        self,
        config: PublishConfig,
        store: Store,
        *,
        record: Callable[[str, str, Sequence[str]], None],
        metrics: Callable[[], bytes],
        health: Callable[[], Health],
        clock: Callable[[], datetime],
    ) -> None:
        address = config.address
        if address is None:
            raise ValueError("publish.listen is not set")
        self.config = config
        self.store = store
        self._record = record
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self._parties = frozenset(p.name for p in config.parties)
        self._recorded: dict[str, tuple[tuple[str, ...], float]] = {}
        self._recorded_lock = threading.Lock()
        try:
            self._server = ThreadingHTTPServer(address, functools.partial(_Handler, publisher=self))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on publish.listen {config.listen}: {exc.strerror}",
                "choose a free port on an address of this host, or unset publish.listen",
            ) from None
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="farmkeys-publish", daemon=True
        )
        self._thread.start()
        log.info("publishing on http://%s", self.config.listen)

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    # -- answers ----------------------------------------------------------------------

    def answer(self, target: str, *, if_none_match: str | None) -> Answer:
        """The answer to a GET of ``target`` (a path and query): a document (304 when its
        tag is in ``if_none_match``), the metrics, the health, or 404."""
        url = urllib.parse.urlsplit(target)
        if url.path in (METADATA_PATH, JWKS_PATH):
            rp = urllib.parse.parse_qs(url.query).get("rp", [None])[-1]
            status, kind, body = self.document(url.path, rp)
            if status != HTTPStatus.OK:
                return Answer(status, kind, body)
            tag = etag(body)
            headers = {
                "ETag": tag,
                "Cache-Control": f"public, max-age={self.config.max_age_seconds}",
            }
            if tag in _tags(if_none_match):
                return Answer(HTTPStatus.NOT_MODIFIED, kind, b"", headers)
            return Answer(status, kind, body, headers)
        if url.path == METRICS_PATH:
            kind = "text/plain; version=0.0.4; charset=utf-8"
            return Answer(HTTPStatus.OK, kind, self._metrics(), {"Cache-Control": "no-store"})
        if url.path == HEALTH_PATH:
            health = self._health()
            status = HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE
            body = (json.dumps(health.detail, sort_keys=True) + "\n").encode()
            return Answer(status, "application/json", body, {"Cache-Control": "no-store"})
        return Answer(HTTPStatus.NOT_FOUND, _TEXT, _NOT_FOUND)

    def document(self, path: str, rp: str | None) -> tuple[int, str, bytes]:
        """(status, content type, body) of a metadata or JWKS request."""
        try:
            keys = from_store(self.store, now=self._clock())
            if path == METADATA_PATH:
                entity_id, sso_url = metadata_settings(self.config)
                body = metadata(keys, entity_id=entity_id, sso_url=sso_url)
                kind, name = "application/samlmetadata+xml", "metadata"
            else:
                body, kind, name = jwks(keys), "application/json", "jwks"
        except ConfigError as exc:
            return HTTPStatus.NOT_FOUND, _TEXT, _line(exc)
        except Error as exc:
            log.warning("cannot publish %s: %s", path, exc.diagnostics())
            return HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, _line(exc)
        if rp is not None:
            self._note_fetch(rp, name, keys.signing_thumbprints)
        return HTTPStatus.OK, kind, body

    def _note_fetch(self, rp: str, document: str, thumbprints: tuple[str, ...]) -> None:
        if rp not in self._parties:
            log.debug("a fetch named relying party %r, which publish.relying_parties lacks", rp)
            return
        now = time.monotonic()
        with self._recorded_lock:
            last = self._recorded.get(rp)
            if last is not None and last[0] == thumbprints and now - last[1] < RECORD_EVERY_SECONDS:
                return
            self._recorded[rp] = (thumbprints, now)
        try:
            self._record(rp, document, thumbprints)
        except Error as exc:
            with self._recorded_lock:
                self._recorded.pop(rp, None)
            log.warning("cannot record relying party %s's fetch: %s", rp, exc.diagnostics())


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests, each answered by :meth:`Publisher.answer`."""

    server_version = "farmkeys"
    sys_version = ""
    timeout = 10  # a client that sends nothing is dropped

    def __init__(
        self,
        request: socket.socket,
        client_address: tuple[str, int],
        server: socketserver.BaseServer,
        *,
        publisher: Publisher,
    ) -> None:
        self.publisher = publisher  # before the base class, which handles the request
        super().__init__(request, client_address, server)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        answer = self.publisher.answer(self.path, if_none_match=self.headers.get("If-None-Match"))
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.kind)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body and answer.status != HTTPStatus.NOT_MODIFIED:
            self.wfile.write(answer.body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _line(exc: Error) -> bytes:
    return (exc.diagnostics() + "\n").encode("utf-8")


def _tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",")}
