"""What a certificate's blob seals: the exact bytes a node writes into its store.

The leader builds the three files of a certificate once (the certificate PEM,
the PKCS#8 private key PEM and the PKCS#12) and seals them together in the
certificate's blob (:mod:`farmkeys.formats.blob`). A node that installs the
certificate writes those bytes as they are, so it never parses a PKCS#12 or
re-encodes a key; what it checks instead is cheap (:func:`files`).

Layout, version 1 (all integers big-endian)::

    offset  size  field
    ------  ----  -----------------------------------------------------------
         0     4  magic, the ASCII bytes "FKB1"                   (MAGIC)
         4     4  a, the length of the certificate PEM
         8     a  the certificate, PEM (``-----BEGIN CERTIFICATE-----``)
       8+a     4  b, the length of the private key PEM
      12+a     b  the private key, unencrypted PKCS#8 PEM
    12+a+b     4  c, the length of the PKCS#12
    16+a+b     c  the PKCS#12 of both, without a password

Nothing follows. A node with ``node.pkcs12_password_file`` encrypts its own copy of the
PKCS#12 at install (:func:`farmkeys.formats.certificates.protect_pkcs12`); the bundle is
the same on every node. Blobs sealed before bundles existed hold a bare PKCS#12
(DER, so its first byte is 0x30, never "F"): :func:`unpack` returns None for
those, and the node falls back to parsing the PKCS#12 (the slow path).

Pure: no I/O. Loading a private key here skips OpenSSL's RSA key validation
(``unsafe_skip_rsa_key_validation``): the blob that carried it is
authenticated under the master key and the leader validated the key when it
made or imported it (docs/security.md, "What a node re-checks").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from farmkeys.errors import CertificateError
from farmkeys.formats import certificates

MAGIC: Final = b"FKB1"
_LENGTH: Final = struct.Struct(">I")
_TODO: Final = "restore the row from a backup or replace the certificate"


@dataclass(frozen=True)
class Bundle:
    """The three files of one certificate, as the node writes them."""

    certificate_pem: bytes
    private_key_pem: bytes = field(repr=False)
    pkcs12: bytes = field(repr=False)


def files(generated: certificates.Generated, *, friendly_name: str) -> Bundle:
    """The three files of ``generated``."""
    return Bundle(
        certificate_pem=certificates.certificate_pem(generated.certificate),
        private_key_pem=certificates.private_key_pem(generated.key),
        pkcs12=certificates.to_pkcs12(
            generated.certificate, generated.key, friendly_name=friendly_name
        ),
    )


def encode(bundle: Bundle) -> bytes:
    """The bundle's bytes, in the layout of the module docstring."""
    parts = (bundle.certificate_pem, bundle.private_key_pem, bundle.pkcs12)
    return MAGIC + b"".join(_LENGTH.pack(len(p)) + p for p in parts)


def pack(generated: certificates.Generated, *, friendly_name: str) -> bytes:
    """The bundle of ``generated``: what the leader seals in its blob."""
    return encode(files(generated, friendly_name=friendly_name))


def is_bundle(plaintext: bytes) -> bool:
    return plaintext[: len(MAGIC)] == MAGIC


def unpack(plaintext: bytes, *, what: str) -> Bundle | None:
    """The bundle in a blob's plaintext; None for a bare PKCS#12 (a blob from before
    bundles). ``what`` names the certificate in the error of a malformed bundle."""
    if not is_bundle(plaintext):
        return None
    view = memoryview(plaintext)
    at = len(MAGIC)
    parts: list[bytes] = []
    for _ in range(3):
        if at + _LENGTH.size > len(view):
            raise _malformed(what)
        (size,) = _LENGTH.unpack_from(view, at)
        at += _LENGTH.size
        if size == 0 or at + size > len(view):
            raise _malformed(what)
        parts.append(bytes(view[at : at + size]))
        at += size
    if at != len(view):
        raise _malformed(what)
    return Bundle(certificate_pem=parts[0], private_key_pem=parts[1], pkcs12=parts[2])


def _malformed(what: str) -> CertificateError:
    return CertificateError(f"the blob of {what} opened but holds a malformed bundle", _TODO)


def check(
    bundle: Bundle,
    *,
    what: str,
    thumbprint: str,
    der: bytes,
    not_before: datetime,
    not_after: datetime,
) -> None:
    """Check a bundle against its row, cheaply: the certificate is the row's (the same DER,
    thumbprint and dates) and the private key is that certificate's key (the same public
    key). The PKCS#12 is not parsed: the authenticated blob vouches for it."""
    try:
        cert = x509.load_pem_x509_certificate(bundle.certificate_pem)
    except ValueError:
        raise CertificateError(f"the blob of {what} holds no PEM certificate", _TODO) from None
    if (
        certificates.certificate_der(cert) != der
        or certificates.thumbprint(cert) != thumbprint
        or cert.not_valid_before_utc != not_before
        or cert.not_valid_after_utc != not_after
    ):
        raise CertificateError(
            f"the blob of {what} holds a certificate other than its row describes ({thumbprint})",
            _TODO,
        )
    try:
        key = serialization.load_pem_private_key(
            bundle.private_key_pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError):
        raise CertificateError(f"the blob of {what} holds no usable private key", _TODO) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) or not (
        certificates.key_matches(cert, key)
    ):
        raise CertificateError(
            f"the private key in the blob of {what} does not match the certificate", _TODO
        )
