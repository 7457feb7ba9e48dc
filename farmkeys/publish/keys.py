"""The keys a node publishes, read from its installed store: the view every document shares.

The signing keys come in the order relying parties are told them: the primary,
the secondary (so relying parties learn it before it signs), and every retired
certificate until its NotAfter (newest first); the encryption key is the primary
decryption certificate, the one relying parties encrypt tokens to.

The metadata is signed with the signing primary's private key (:class:`PrimaryKey`), read
from the same generation as the certificates and checked against its manifest's digest
(:meth:`~farmkeys.store.Store.certificates_and_signing_key`): the only private key
publishing opens, and never named by its bytes in an error, a log line or a repr.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from farmkeys.errors import PublishError
from farmkeys.formats.certificates import key_matches
from farmkeys.store import Manifest, Store
from farmkeys.vocab import Role

_SIGNING_ORDER: Final = {"primary": 0, "secondary": 1, "retired": 2}


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515's ``BASE64URL``)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


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
        return b64url(bytes.fromhex(self.thumbprint))


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
        raise _nothing_installed(store)
    manifest, pems = found
    return published(manifest, pems, now=now)


@dataclass(frozen=True, repr=False)
class PrimaryKey:
    """The signing primary and its private key: what signs the metadata. Its repr names the
    certificate, never the key."""

    published: PublishedKey
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"PrimaryKey({self.published.thumbprint})"


def primary_key(keys: Published, key_pem: bytes, *, store: Path) -> PrimaryKey:
    """The signing primary of ``keys`` with its private key ``key_pem`` (the verified file of
    the store at ``store``); :class:`PublishError` when the key cannot be read or is not the
    certificate's. The key's bytes are in no message."""
    primary = keys.signing[0] if keys.signing else None
    if primary is None or primary.role != Role.PRIMARY:
        raise PublishError(
            f"the certificate set installed in the store {store} has no signing primary",
            "run `farmkeys sync` on this node",
        )
    where = f"the private key of the signing primary {primary.thumbprint} in the store {store}"
    try:
        # As a sync does (docs/security.md, "What a node re-checks"): the file is the one
        # its manifest records and the key must be the certificate's, checked below;
        # OpenSSL's RSA key check would cost a build some 75 ms (RSA 2048) to 270 ms (4096).
        private = load_pem_private_key(key_pem, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError):
        raise PublishError(
            f"{where} is not an unencrypted PKCS#8 key", "run `farmkeys sync` to install it again"
        ) from None
    if not isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PublishError(f"{where} is neither RSA nor EC", "run `farmkeys sync`")
    if not key_matches(primary.certificate, private):
        raise PublishError(
            f"{where} is not the key of its certificate", "run `farmkeys sync` to install it again"
        )
    return PrimaryKey(primary, private)


def signing_from_store(store: Store, *, now: datetime) -> tuple[Manifest, Published, PrimaryKey]:
    """What the node's installed store publishes, and its signing primary with the private
    key, all from one generation; :class:`PublishError` when nothing is installed yet."""
    found = store.certificates_and_signing_key()
    if found is None:
        raise _nothing_installed(store)
    manifest, pems, key_pem = found
    keys = published(manifest, pems, now=now)
    return manifest, keys, primary_key(keys, key_pem, store=store.path)


def _nothing_installed(store: Store) -> PublishError:
    return PublishError(
        f"nothing is installed in the store {store.path} yet",
        "run `farmkeys sync` on this node first",
    )
