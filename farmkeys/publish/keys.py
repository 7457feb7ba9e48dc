"""The keys a node publishes, read from its installed store: the view every document shares.

The signing keys come in the order relying parties are told them: the primary,
the secondary (so relying parties learn it before it signs), and every retired
certificate until its NotAfter (newest first); the encryption key is the primary
decryption certificate, the one relying parties encrypt tokens to.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from farmkeys.errors import PublishError
from farmkeys.store import Manifest, Store

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
        raise PublishError(
            f"nothing is installed in the store {store.path} yet",
            "run `farmkeys sync` on this node first",
        )
    manifest, pems = found
    return published(manifest, pems, now=now)
