"""Key and certificate generation, PKCS#12 in and out.

Pure: no I/O and no clock. Times are passed in as timezone-aware datetimes;
the only side input is the randomness of key generation and serial numbers.

The certificates are what AD FS generates for itself: self-signed X.509 v3,
subject = issuer = ``CN=<farm name> Token Signing`` or
``CN=<farm name> Token Decryption``, a random serial, SHA-256 signature,
``BasicConstraints`` CA=false and a critical ``KeyUsage``:

- signing: digitalSignature;
- decryption with an RSA key: keyEncipherment (tokens are encrypted to it
  by wrapping a content key with RSA);
- decryption with an EC key: keyAgreement, because an EC key cannot
  encipher anything: a content key is agreed with it (ECDH-ES) instead.

A certificate is named by its thumbprint, the upper-case hex SHA-1 of its
DER encoding, as AD FS names it (``FindValue``); SHA-1 is only a name here,
never a security check, and :func:`sha256_fingerprint` is there for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from farmkeys.errors import CertificateError
from farmkeys.vocab import KEY_TYPES, PURPOSES

__all__ = [
    "PKCS12_KDF_ROUNDS",
    "RSA_PUBLIC_EXPONENT",
    "Generated",
    "PrivateKey",
    "build_certificate",
    "certificate_der",
    "certificate_pem",
    "check_importable",
    "from_pkcs12",
    "generate",
    "generate_private_key",
    "key_matches",
    "key_type_of",
    "load_certificate_der",
    "pkcs12_opens",
    "private_key_pem",
    "protect_pkcs12",
    "sha256_fingerprint",
    "subject_common_name",
    "thumbprint",
    "to_pkcs12",
]

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


RSA_PUBLIC_EXPONENT: Final = 65537

_RSA_BITS: Final = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}
_CN_SUFFIX: Final = {"signing": "Token Signing", "decryption": "Token Decryption"}


def generate_private_key(key_type: str) -> PrivateKey:
    """A new private key of ``key_type``: one of :data:`KEY_TYPES`; ValueError otherwise."""
    if key_type in _RSA_BITS:
        return rsa.generate_private_key(
            public_exponent=RSA_PUBLIC_EXPONENT, key_size=_RSA_BITS[key_type]
        )
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"key type must be one of {KEY_TYPES}, not {key_type!r}")


def subject_common_name(farm_name: str, purpose: str) -> str:
    """The common name of the farm's certificate for ``purpose``, as AD FS spells it."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    return f"{farm_name} {_CN_SUFFIX[purpose]}"


def _utc_whole_seconds(name: str, when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    # X.509 times have a resolution of one second: drop the rest here, so the
    # certificate says exactly what this function returns to compare against.
    return when.astimezone(UTC).replace(microsecond=0)


def build_certificate(
    *,
    farm_name: str,
    purpose: str,
    key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """The farm's self-signed certificate for ``purpose``, valid ``not_before`` to ``not_after``.

    Both times must be timezone-aware; they are converted to UTC and
    truncated to whole seconds (X.509's resolution), so read the dates back
    from the certificate rather than keeping the ones passed in. Raises
    ValueError for an unknown purpose, naive times, ``not_after`` not after
    ``not_before``, or a farm name that makes the common name longer than 64.
    """
    if not farm_name.strip():
        raise ValueError("farm_name must not be empty")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"key must be an RSA or EC private key, not {type(key).__name__}")
    start = _utc_whole_seconds("not_before", not_before)
    end = _utc_whole_seconds("not_after", not_after)
    if end <= start:
        raise ValueError(f"not_after ({end.isoformat()}) must be after not_before")
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, subject_common_name(farm_name, purpose))]
    )
    public_key = key.public_key()
    if purpose == "signing":
        usage = _key_usage(digital_signature=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        usage = _key_usage(key_agreement=True)
    else:
        usage = _key_usage(key_encipherment=True)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    """Whether ``key`` is the private key of ``cert`` (their SubjectPublicKeyInfo are equal)."""
    return _spki(cert.public_key()) == _spki(key.public_key())


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Generated:
    """A certificate together with its private key. The two must match."""

    certificate: x509.Certificate
    key: PrivateKey

    def __post_init__(self) -> None:
        if not key_matches(self.certificate, self.key):
            raise ValueError("the private key is not the key of the certificate")


def generate(
    *,
    farm_name: str,
    purpose: str,
    key_type: str,
    not_before: datetime,
    not_after: datetime,
) -> Generated:
    """A new key of ``key_type`` and the farm's self-signed certificate for it."""
    if purpose not in PURPOSES:  # before the (slow) key generation
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    key = generate_private_key(key_type)
    certificate = build_certificate(
        farm_name=farm_name,
        purpose=purpose,
        key=key,
        not_before=not_before,
        not_after=not_after,
    )
    return Generated(certificate=certificate, key=key)


def thumbprint(cert: x509.Certificate) -> str:
    """The SHA-1 of the DER certificate in upper-case hex (40 characters): AD FS's thumbprint."""
    # A name, not a security check: AD FS and Windows find certificates by it.
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 of the DER certificate in upper-case hex (64 characters)."""
    return cert.fingerprint(hashes.SHA256()).hex().upper()


# PBKDF2-HMAC-SHA256 rounds of a .p12 written with a password (node.pkcs12_password_file):
# what Java 17 writes itself (keystore.pkcs12.keyPbeIterationCount and certPbeIterationCount).
# More would buy little: the file's MAC (HMAC-SHA256, keyed by the PKCS#12 KDF) is derived
# with cryptography's fixed 2048 iterations, so a guess costs that much whatever this says,
# and the password must be a random one (docs/operations.md). 10,000 keeps an install and a
# Java keystore load cheap.
PKCS12_KDF_ROUNDS: Final = 10_000


def to_pkcs12(
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    friendly_name: str,
    password: bytes | None = None,
) -> bytes:
    """A PKCS#12 of ``cert`` and ``key``, without a password unless ``password`` is given.

    Without one on purpose: it is stored inside a blob (:mod:`farmkeys.formats.blob`) and
    in the node's store with mode 0600. With ``password`` (a node's
    ``pkcs12_password_file``), both bags are encrypted with AES-256-CBC under a PBKDF2
    (HMAC-SHA256, :data:`PKCS12_KDF_ROUNDS`) key and the whole is MACed with HMAC-SHA256:
    what OpenSSL 3 and Java 17 keystores read. An empty ``friendly_name`` leaves the name
    out.
    """
    if not key_matches(cert, key):
        raise ValueError("the private key is not the key of the certificate")
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if password is not None:
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(PKCS12_KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password)
        )
    return pkcs12.serialize_key_and_certificates(
        name=friendly_name.encode("utf-8") or None,
        key=key,
        cert=cert,
        cas=None,
        encryption_algorithm=encryption,
    )


def protect_pkcs12(data: bytes, password: bytes) -> bytes:
    """The unencrypted PKCS#12 ``data`` (a bundle's) again, encrypted with ``password`` as
    :func:`to_pkcs12` does, under the same friendly name. :class:`CertificateError` for
    data that is not an unencrypted PKCS#12 of a certificate and its key."""
    try:
        loaded = pkcs12.load_pkcs12(bytes(data), None)
    except (ValueError, TypeError):
        raise CertificateError("the PKCS#12 data cannot be parsed", _PKCS12_TODO) from None
    key, cert = loaded.key, loaded.cert
    if (
        cert is None
        or not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        or not key_matches(cert.certificate, key)
    ):
        raise CertificateError(
            "the PKCS#12 data does not hold a certificate with its RSA or EC key", _PKCS12_TODO
        )
    return to_pkcs12(
        cert.certificate,
        key,
        friendly_name=(cert.friendly_name or b"").decode("utf-8", "replace"),
        password=password,
    )


def pkcs12_opens(data: bytes, password: bytes) -> bool:
    """Whether the PKCS#12 ``data`` opens with ``password`` (its MAC verifies and its bags
    decrypt)."""
    try:
        pkcs12.load_key_and_certificates(bytes(data), password)
    except (ValueError, TypeError):
        return False
    return True


_PKCS12_TODO: Final = (
    "supply an unencrypted PKCS#12 holding exactly the certificate and its RSA or EC private key"
)


def from_pkcs12(data: bytes) -> Generated:
    """The certificate and key of an unencrypted PKCS#12.

    Raises :class:`~farmkeys.errors.CertificateError` if the data cannot be
    parsed, lacks the key or the certificate, holds a key that is neither
    RSA nor EC, or holds a key that is not the certificate's.
    """
    # No password; Windows exports "no password" as the empty one, which is not the same.
    try:
        key, cert, others = pkcs12.load_key_and_certificates(bytes(data), None)
    except (ValueError, TypeError):
        try:
            key, cert, others = pkcs12.load_key_and_certificates(bytes(data), b"")
        except (ValueError, TypeError):
            raise CertificateError("the PKCS#12 data cannot be parsed", _PKCS12_TODO) from None
    if key is None:
        # Without a key, a certificate comes back among the "additional" ones.
        found = cert or (others[0] if others else None)
        named = f" for certificate {thumbprint(found)}" if found is not None else ""
        raise CertificateError(f"the PKCS#12 data holds no private key{named}", _PKCS12_TODO)
    if cert is None:
        raise CertificateError(
            "the PKCS#12 data holds no certificate for its private key", _PKCS12_TODO
        )
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"the private key of certificate {thumbprint(cert)} is neither RSA nor EC",
            _PKCS12_TODO,
        )
    if not key_matches(cert, key):
        raise CertificateError(
            f"the private key in the PKCS#12 data is not the key of certificate {thumbprint(cert)}",
            _PKCS12_TODO,
        )
    return Generated(certificate=cert, key=key)


def certificate_der(cert: x509.Certificate) -> bytes:
    """The DER encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_pem(cert: x509.Certificate) -> bytes:
    """The PEM encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_certificate_der(data: bytes) -> x509.Certificate:
    """The certificate DER-encoded in ``data``; CertificateError if it is not one."""
    try:
        return x509.load_der_x509_certificate(bytes(data))
    except (ValueError, TypeError):
        raise CertificateError(
            "the stored certificate is not a valid DER-encoded X.509 certificate",
            "restore the row from a backup, or replace the certificate as docs/operations.md shows",
        ) from None


def key_type_of(key: PrivateKey) -> str:
    """The key's type in the ``policy.key`` vocabulary (``rsa-2048``, ``ec-p256``, ...)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    name = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}.get(key.curve.name)
    return f"ec-{name or key.curve.name}"


def check_importable(
    cert: x509.Certificate, key: PrivateKey, *, purpose: str, now: datetime
) -> None:
    """Refuse a certificate brought from elsewhere (``farmkeys import adfs``) that cannot
    serve ``purpose``: its key is not its certificate's, it has expired, a decryption
    certificate's key cannot decrypt (not RSA), or its key usage forbids the purpose."""
    thumb = thumbprint(cert)
    if not key_matches(cert, key):
        raise CertificateError(
            f"the private key given with certificate {thumb} is not its key",
            "export the certificate together with its own private key",
        )
    if cert.not_valid_after_utc <= now:
        raise CertificateError(
            f"certificate {thumb} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
            "import a certificate that is still valid, or let farmkeys generate one",
        )
    if purpose == "decryption" and not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError(
            f"certificate {thumb} has a {key_type_of(key)} key, which cannot decrypt tokens "
            "(token decryption needs RSA)",
            "import it as --purpose signing, or import an RSA certificate",
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    allowed = usage.digital_signature if purpose == "signing" else usage.key_encipherment
    if not allowed:
        needed = "digitalSignature" if purpose == "signing" else "keyEncipherment"
        raise CertificateError(
            f"certificate {thumb}'s key usage does not allow {purpose} (it lacks {needed})",
            "import it with the --purpose its key usage allows",
        )
