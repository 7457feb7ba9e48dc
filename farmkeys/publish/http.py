"""serve's HTTP endpoints: the documents, ``/metrics`` and ``/healthz``, and the fetch records.

:class:`Publisher` owns what each path answers and the server that answers it
(:mod:`farmkeys.publish.server`: waitress, with a whole-request deadline and shedding);
:meth:`Publisher.wsgi` only turns an answer into a WSGI response. The documents are
built once per installed set, ``/metrics`` at most once per :data:`METRICS_CACHE_SECONDS`
(:mod:`farmkeys.publish.cache`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from farmkeys.config import PublishConfig
from farmkeys.errors import ConfigError, Error
from farmkeys.publish.cache import JWKS, METADATA, Documents, Refreshed
from farmkeys.publish.server import HTTPServer
from farmkeys.store import Store

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

# The name these lines have always carried, before publish became a package.
log = logging.getLogger("farmkeys.publish")

METADATA_PATH: Final = "/FederationMetadata/2007-06/FederationMetadata.xml"
JWKS_PATH: Final = "/adfs/discovery/keys"
METRICS_PATH: Final = "/metrics"
HEALTH_PATH: Final = "/healthz"
# A relying party's fetch of the same keys is written to the config DB at most this often.
RECORD_EVERY_SECONDS: Final = 60.0
# /metrics is one status read of the config DB: at most one per this many seconds,
# whatever the number of scrapers.
METRICS_CACHE_SECONDS: Final = 1.0

_TEXT: Final = "text/plain; charset=utf-8"
_NOT_FOUND: Final = (
    b"not found: farmkeys answers "
    + " ".join((METADATA_PATH, JWKS_PATH, METRICS_PATH, HEALTH_PATH)).encode()
    + b"\n"
)


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

    Each request is answered from the node's installed store (documents, built once
    per installed set), a callback (metrics, made at most every
    :data:`METRICS_CACHE_SECONDS`; health, on every request) and the clock passed in; a
    relying party's fetch is recorded through ``record`` (rp, document, thumbprints), at
    most every :data:`RECORD_EVERY_SECONDS` for the same keys, and never holds up the
    answer for long: a failed record is logged and the document served.
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
        metrics_period: float = METRICS_CACHE_SECONDS,
    ) -> None:
        """``metrics_period``: how long a ``/metrics`` document is answered before ``metrics``
        is called again (:data:`METRICS_CACHE_SECONDS`; the tests lengthen it)."""
        if config.address is None:
            raise ValueError("publish.listen is not set")
        self.config = config
        self.store = store
        self._record = record
        self._health = health
        self._clock = clock
        self.documents = Documents(config, store)
        self.metrics = Refreshed(metrics, period=metrics_period)
        self._parties = frozenset(p.name for p in config.parties)
        self._recorded: dict[str, tuple[tuple[str, ...], float]] = {}
        self._recorded_lock = threading.Lock()
        self.server = HTTPServer(self.wsgi, config)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()
        log.info("publishing on http://%s", self.config.listen)

    def stop(self) -> None:
        self.server.stop()

    # -- answers ----------------------------------------------------------------------

    def wsgi(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application: GET and HEAD of :meth:`answer`, 405 for other methods."""
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            answer = Answer(
                HTTPStatus.METHOD_NOT_ALLOWED, _TEXT, b"only GET and HEAD\n", {"Allow": "GET, HEAD"}
            )
        else:
            target = environ.get("PATH_INFO", "") or "/"
            query = environ.get("QUERY_STRING", "")
            answer = self.answer(
                target + ("?" + query if query else ""),
                if_none_match=environ.get("HTTP_IF_NONE_MATCH"),
            )
        status = HTTPStatus(answer.status)
        headers = [("Content-Type", answer.kind)]
        if answer.status != HTTPStatus.NOT_MODIFIED:
            headers.append(("Content-Length", str(len(answer.body))))
        headers += answer.headers.items()
        start_response(f"{status.value} {status.phrase}", headers)
        if method == "HEAD" or answer.status == HTTPStatus.NOT_MODIFIED:
            return []
        return [answer.body]

    def answer(self, target: str, *, if_none_match: str | None) -> Answer:
        """The answer to a GET of ``target`` (a path and query): a document (304 when its
        tag is in ``if_none_match``), the metrics, the health, or 404."""
        url = urllib.parse.urlsplit(target)
        if url.path in (METADATA_PATH, JWKS_PATH):
            rp = urllib.parse.parse_qs(url.query).get("rp", [None])[-1]
            return self._document(url.path, rp, if_none_match)
        if url.path == METRICS_PATH:
            kind = "text/plain; version=0.0.4; charset=utf-8"
            return Answer(HTTPStatus.OK, kind, self.metrics.get(), {"Cache-Control": "no-store"})
        if url.path == HEALTH_PATH:
            health = self._health()
            status = HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE
            body = (json.dumps(health.detail, sort_keys=True) + "\n").encode()
            return Answer(status, "application/json", body, {"Cache-Control": "no-store"})
        return Answer(HTTPStatus.NOT_FOUND, _TEXT, _NOT_FOUND)

    def document(self, path: str, rp: str | None) -> tuple[int, str, bytes]:
        """(status, content type, body) of a metadata or JWKS request."""
        answer = self._document(path, rp, None)
        return answer.status, answer.kind, answer.body

    def _document(self, path: str, rp: str | None, if_none_match: str | None) -> Answer:
        name, kind = (
            (METADATA, "application/samlmetadata+xml")
            if path == METADATA_PATH
            else (JWKS, "application/json")
        )
        try:
            document = self.documents.get(name, now=self._clock())
        except ConfigError as exc:
            return Answer(HTTPStatus.NOT_FOUND, _TEXT, _line(exc))
        except Error as exc:
            log.warning("cannot publish %s: %s", path, exc.diagnostics())
            return Answer(HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, _line(exc))
        if rp is not None:
            self._note_fetch(rp, name, document.thumbprints)
        headers = {
            "ETag": document.etag,
            "Cache-Control": f"public, max-age={self.config.max_age_seconds}",
        }
        if document.etag in _tags(if_none_match):
            return Answer(HTTPStatus.NOT_MODIFIED, kind, b"", headers)
        return Answer(HTTPStatus.OK, kind, document.body, headers)

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


def _line(exc: Error) -> bytes:
    return (exc.diagnostics() + "\n").encode("utf-8")


def _tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",")}
