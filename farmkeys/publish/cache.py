"""What the HTTP endpoints keep between requests, so a crowd costs what one client does.

- :class:`Documents`: the metadata and the JWKS, built once per installed set. Each
  request reads the store's manifest (one small file) to learn which set is installed;
  the documents, their ETags and the thumbprints they list are built again only when
  what they would list changed: another generation, another certificate, or a retired
  certificate past its NotAfter; the signed metadata also when its validity window turns
  (once a day, :data:`~farmkeys.publish.metadata.WINDOW`).
- :class:`Refreshed`: a value (the ``/metrics`` document) made at most once per period
  whatever the number of callers. While one caller makes it, the others are given the
  previous value at once, or, before there is one, wait for that caller's.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Generic, TypeVar

from farmkeys.config import PublishConfig
from farmkeys.errors import PublishError
from farmkeys.publish.jwks import jwks
from farmkeys.publish.keys import PrimaryKey, Published, primary_key, published
from farmkeys.publish.metadata import metadata_settings, render, window
from farmkeys.store import Manifest, Store

METADATA: Final = "metadata"
JWKS: Final = "jwks"

T = TypeVar("T")


def etag(body: bytes) -> str:
    """A strong entity tag of a document: its SHA-256, shortened."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclass(frozen=True)
class Document:
    """One built document: its bytes, their ETag, and the signing thumbprints it lists."""

    body: bytes
    etag: str
    thumbprints: tuple[str, ...]


# What a document is built from: the generation, each certificate it publishes now, and
# (the signed metadata) the start of its validity window.
_SetKey = tuple[int, tuple[tuple[str, str, str, str | None], ...], datetime | None]


def _set_key(manifest: Manifest, now: datetime, *, windowed: bool) -> _SetKey:
    return (
        manifest.generation,
        tuple(
            (e.purpose, e.role, e.thumbprint, (e.sha256 or {}).get("cert"))
            for e in manifest.certificates
            if e.role != "retired" or now < e.not_after
        ),
        window(now).start if windowed else None,
    )


class Documents:
    """The metadata and the JWKS of ``store``'s installed set, built once per set.

    :meth:`get` raises :class:`~farmkeys.errors.ConfigError` (the metadata without
    ``publish.entity_id`` or ``sso_url``) or another :class:`~farmkeys.errors.Error` (nothing
    installed, a store that cannot be read); neither is kept. ``builds`` counts the
    documents built, for the tests.
    """

    def __init__(self, config: PublishConfig, store: Store) -> None:
        self._config = config
        self._store = store
        self._lock = threading.Lock()
        self._built: dict[str, tuple[_SetKey, Document]] = {}
        self.builds = 0

    def _signs(self, name: str) -> bool:
        return name == METADATA and self._config.sign_metadata

    def get(self, name: str, *, now: datetime) -> Document:
        """The document ``name`` (:data:`METADATA` or :data:`JWKS`) of the set installed now
        (and, the signed metadata, of the window ``now`` is in)."""
        manifest = self._store.manifest()
        if manifest is None:
            raise _nothing_installed(self._store)
        key = _set_key(manifest, now, windowed=self._signs(name))
        found = self._built.get(name)
        if found is not None and found[0] == key:
            return found[1]
        with self._lock:  # one build per set, whatever the number of requests waiting for it
            found = self._built.get(name)
            if found is not None and found[0] == key:
                return found[1]
            key, document = self._build(name, now)
            self._built[name] = (key, document)
            return document

    def _build(self, name: str, now: datetime) -> tuple[_SetKey, Document]:
        signs = self._signs(name)
        primary: PrimaryKey | None = None
        if name == METADATA:
            metadata_settings(self._config)  # no entity ID or SSO URL: say so, open no key
        if signs:
            found_with_key = self._store.certificates_and_signing_key()
            if found_with_key is None:
                raise _nothing_installed(self._store)
            manifest, pems, key_pem = found_with_key  # one generation, each file checked
            keys = published(manifest, pems, now=now)
            primary = primary_key(keys, key_pem, store=self._store.path)
        else:
            found = self._store.public_certificates()
            if found is None:
                raise _nothing_installed(self._store)
            manifest, pems = found  # read from one generation, each checked against its digest
            keys = published(manifest, pems, now=now)
        body = self._render(name, keys, primary, now)
        self.builds += 1
        key = _set_key(manifest, now, windowed=signs)
        return key, Document(body, etag(body), keys.signing_thumbprints)

    def _render(
        self, name: str, keys: Published, primary: PrimaryKey | None, now: datetime
    ) -> bytes:
        if name == METADATA:
            return render(self._config, keys, primary, now=now)
        if name == JWKS:
            return jwks(keys)
        raise ValueError(f"no document {name!r}")


def _nothing_installed(store: Store) -> PublishError:
    return PublishError(
        f"nothing is installed in the store {store.path} yet",
        "run `farmkeys sync` on this node first",
    )


class Refreshed(Generic[T]):
    """``make()``'s value, made again once ``period`` seconds have passed since it was last
    made (``clock``: a monotonic clock), by one caller at a time; the others meanwhile get
    the previous value (no older than ``period`` and one making), or wait for the first.
    An exception from ``make`` reaches its caller and keeps nothing. ``makes`` counts."""

    def __init__(
        self,
        make: Callable[[], T],
        *,
        period: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if period <= 0:
            raise ValueError("period must be positive")
        self._make = make
        self._period = period
        self._clock = clock
        self._making = threading.Lock()
        self._value: tuple[float, T] | None = None
        self.makes = 0

    def get(self) -> T:
        current = self._value
        if current is not None and self._clock() - current[0] < self._period:
            return current[1]
        if current is not None:
            if not self._making.acquire(blocking=False):
                return current[1]  # another caller is making it: the previous value
        else:
            self._making.acquire()  # none yet: wait for the caller making the first
        try:
            current = self._value
            if current is not None and self._clock() - current[0] < self._period:
                return current[1]  # made while this caller waited
            value = self._make()
            self.makes += 1
            self._value = (self._clock(), value)  # fresh from when it was made
            return value
        finally:
            self._making.release()
