"""Publishing the farm's keys to relying parties: SAML metadata, JWKS, and the HTTP endpoints.

Relying parties learn the token-signing certificates from the IdP's SAML metadata
(AD FS: ``/FederationMetadata/2007-06/FederationMetadata.xml``) or, for OpenID
Connect, from a JSON Web Key Set (AD FS: ``/adfs/discovery/keys``). Both are built
from the node's installed store, never from the config DB, so any node answers
and every node answers the same bytes for the same installed set:

- signing: the primary, the secondary (so relying parties learn it before it
  signs), and every retired certificate until its NotAfter, in that order
  (retired ones newest first);
- encryption (metadata only): the primary decryption certificate, the one
  relying parties encrypt tokens to.

A fetch that carries ``?rp=<name>`` of a relying party in ``[publish]
relying_parties`` is recorded in the config DB with the signing thumbprints it
was served; ``policy.require_fetch`` holds a promotion back until every relying
party has fetched the secondary (:mod:`farmkeys.policy`). The attribution is
what the caller claims; docs/security.md says why that is enough.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final
from xml.sax.saxutils import quoteattr

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from farmkeys.config import PublishConfig
from farmkeys.errors import ConfigError, Error, PublishError
from farmkeys.store import Manifest, Store

log = logging.getLogger(__name__)

METADATA_PATH: Final = "/FederationMetadata/2007-06/FederationMetadata.xml"
JWKS_PATH: Final = "/adfs/discovery/keys"
METRICS_PATH: Final = "/metrics"
HEALTH_PATH: Final = "/healthz"

_MD: Final = "urn:oasis:names:tc:SAML:2.0:metadata"
_DS: Final = "http://www.w3.org/2000/09/xmldsig#"
_PROTOCOL: Final = "urn:oasis:names:tc:SAML:2.0:protocol"
_BINDINGS: Final = (
    "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect",
    "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST",
)
_SIGNING_ORDER: Final = {"primary": 0, "secondary": 1, "retired": 2}
# A relying party's fetch of the same keys is written to the config DB at most this often.
RECORD_EVERY_SECONDS: Final = 60.0


@dataclass(frozen=True)
class PublishedKey:
    """One certificate as relying parties see it."""

    purpose: str
    role: str
    thumbprint: str  # SHA-1, upper-case hex: AD FS's thumbprint
    certificate: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(Encoding.DER)

    @property
    def x5t(self) -> str:
        """The base64url SHA-1 thumbprint (RFC 7517's ``x5t``; AD FS's ``kid``)."""
        return _b64url(bytes.fromhex(self.thumbprint))


@dataclass(frozen=True)
class Published:
    """What a node publishes: the signing keys in order, and the encryption key."""

    signing: tuple[PublishedKey, ...]
    encryption: PublishedKey | None

    @property
    def signing_thumbprints(self) -> tuple[str, ...]:
        return tuple(k.thumbprint for k in self.signing)


def published(manifest: Manifest, pems: dict[str, bytes], *, now: datetime) -> Published:
    """The keys an installed set publishes at ``now`` (see the module docstring)."""
    signing = []
    encryption = None
    for entry in manifest.certificates:
        key = PublishedKey(
            entry.purpose,
            entry.role,
            entry.thumbprint,
            x509.load_pem_x509_certificate(pems[entry.thumbprint]),
        )
        if entry.purpose == "decryption":
            if entry.role == "primary":
                encryption = key
        elif entry.role != "retired" or now < entry.not_after:
            signing.append((entry, key))
    signing.sort(
        key=lambda pair: (
            _SIGNING_ORDER[pair[0].role],
            -pair[0].not_after.timestamp(),
            pair[0].thumbprint,
        )
    )
    return Published(tuple(key for _, key in signing), encryption)


def from_store(store: Store, *, now: datetime) -> Published:
    """What the node's installed store publishes; :class:`PublishError` when nothing is
    installed yet."""
    found = store.public_certificates()
    if found is None:
        raise PublishError(
            f"nothing is installed in the store {store.path} yet",
            "run `farmkeys sync` on this node first",
        )
    manifest, pems = found
    return published(manifest, pems, now=now)


# -- documents -------------------------------------------------------------------------


def metadata(keys: Published, *, entity_id: str, sso_url: str) -> bytes:
    """SAML 2.0 IdP metadata: an ``EntityDescriptor`` with one ``IDPSSODescriptor``.

    Deterministic: the same keys and settings give the same bytes on every node.
    """
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<md:EntityDescriptor xmlns:md="{_MD}" xmlns:ds="{_DS}" entityID={quoteattr(entity_id)}>',
        f'  <md:IDPSSODescriptor protocolSupportEnumeration="{_PROTOCOL}">',
    ]
    uses = [("signing", key) for key in keys.signing]
    if keys.encryption is not None:
        uses.append(("encryption", keys.encryption))
    for use, key in uses:
        certificate = base64.b64encode(key.der).decode("ascii")
        lines += [
            f'    <md:KeyDescriptor use="{use}">',
            "      <ds:KeyInfo>",
            f"        <ds:KeyName>{key.thumbprint}</ds:KeyName>",
            f"        <ds:X509Data><ds:X509Certificate>{certificate}</ds:X509Certificate>"
            "</ds:X509Data>",
            "      </ds:KeyInfo>",
            "    </md:KeyDescriptor>",
        ]
    lines += [
        f'    <md:SingleSignOnService Binding="{binding}" Location={quoteattr(sso_url)}/>'
        for binding in _BINDINGS
    ]
    lines += ["  </md:IDPSSODescriptor>", "</md:EntityDescriptor>", ""]
    return "\n".join(lines).encode("utf-8")


def metadata_settings(
    config: PublishConfig, *, entity_id: str | None = None, sso_url: str | None = None
) -> tuple[str, str]:
    """The entity ID and SSO URL (arguments first, then ``[publish]``); a
    :class:`ConfigError` naming what is missing."""
    entity_id = entity_id or config.entity_id
    sso_url = sso_url or config.sso_url
    if not entity_id or not sso_url:
        missing = " and ".join(
            name for name, v in (("entity_id", entity_id), ("sso_url", sso_url)) if not v
        )
        raise ConfigError(
            f"publish.{missing.replace(' and ', ' and publish.')} is not set",
            "set it in [publish] (or pass --entity-id / --sso-url to `farmkeys metadata`)",
        )
    return entity_id, sso_url


def jwks(keys: Published) -> bytes:
    """The JSON Web Key Set of the signing keys (RFC 7517), as ``/adfs/discovery/keys``
    serves it: ``kid`` and ``x5t`` are the base64url SHA-1 thumbprint."""
    documents = []
    for key in keys.signing:
        public = key.certificate.public_key()
        jwk: dict[str, object]
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            jwk = {"kty": "RSA", "alg": "RS256", "n": _b64uint(numbers.n), "e": _b64uint(numbers.e)}
        elif isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
            point = public.public_numbers()
            jwk = {
                "kty": "EC",
                "alg": "ES256",
                "crv": "P-256",
                "x": _b64url(point.x.to_bytes(32, "big")),
                "y": _b64url(point.y.to_bytes(32, "big")),
            }
        else:
            raise PublishError(
                f"signing certificate {key.thumbprint} has a key JWKS cannot describe",
                "use policy.key rsa-* or ec-p256",
            )
        jwk |= {
            "use": "sig",
            "kid": key.x5t,
            "x5t": key.x5t,
            "x5c": [base64.b64encode(key.der).decode("ascii")],
        }
        documents.append(jwk)
    return (json.dumps({"keys": documents}, indent=2) + "\n").encode("utf-8")


def etag(body: bytes) -> str:
    """A strong entity tag of a document: its SHA-256, shortened."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


# -- the HTTP endpoints ----------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """What ``/healthz`` says: 200 when ``ok``, else 503; ``detail`` is its JSON body."""

    ok: bool
    detail: dict[str, object]


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
            self._server = ThreadingHTTPServer(address, _handler(self))
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
            return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", _line(exc)
        except Error as exc:
            log.warning("cannot publish %s: %s", path, exc.diagnostics())
            return HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", _line(exc)
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


def _line(exc: Error) -> bytes:
    return (exc.diagnostics() + "\n").encode("utf-8")


def _handler(publisher: Publisher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "farmkeys"
        sys_version = ""
        timeout = 10  # a client that sends nothing is dropped

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _answer(self, *, send_body: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            rp = query.get("rp", [None])[-1]
            headers: dict[str, str] = {}
            if url.path in (METADATA_PATH, JWKS_PATH):
                status, kind, body = publisher.document(url.path, rp)
                if status == HTTPStatus.OK:
                    tag = etag(body)
                    headers = {
                        "ETag": tag,
                        "Cache-Control": f"public, max-age={publisher.config.max_age_seconds}",
                    }
                    if tag in _tags(self.headers.get("If-None-Match")):
                        self._send(HTTPStatus.NOT_MODIFIED, kind, b"", headers, send_body=False)
                        return
            elif url.path == METRICS_PATH:
                status, kind = HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8"
                body = publisher._metrics()
                headers = {"Cache-Control": "no-store"}
            elif url.path == HEALTH_PATH:
                health = publisher._health()
                status = HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE
                kind = "application/json"
                body = (json.dumps(health.detail, sort_keys=True) + "\n").encode()
                headers = {"Cache-Control": "no-store"}
            else:
                status, kind, body = HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b""
                body = (
                    b"not found: farmkeys answers "
                    + " ".join((METADATA_PATH, JWKS_PATH, METRICS_PATH, HEALTH_PATH)).encode()
                    + b"\n"
                )
            self._send(status, kind, body, headers, send_body=send_body)

        def _send(
            self, status: int, kind: str, body: bytes, headers: dict[str, str], *, send_body: bool
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def _tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",")}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64uint(n: int) -> str:
    return _b64url(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))
