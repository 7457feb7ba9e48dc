"""AD FS's own ``EncryptedPfx`` format: a read-only decoder, for importing an AD FS farm.

AD FS keeps each token-signing and token-decryption certificate it generated
in its configuration (the ``EncryptedPfx`` element of the service settings,
base64) as a PKCS#12 encrypted under a key of its DKM container. This module
parses that blob and, given the DKM key, verifies and decrypts it. It never
writes the format: farmkeys seals its own blobs with :mod:`farmkeys.formats.blob`.
Pure: no I/O, no clock, no randomness.

Layout (all integers big-endian; offsets for the usual 3-byte length field)::

    offset  size  field
    ------  ----  -----------------------------------------------------------
         0     4  version = 1                                   (VERSION)
         4     4  method = 0: encrypt-then-MAC                  (METHOD_ENCRYPT_THEN_MAC)
         8     2  04 10: an OCTET STRING of 16 bytes
        10    16  DKM key id, .NET Guid.ToByteArray order       (uuid.UUID(bytes_le=...))
        26    11  06 09 + OID 2.16.840.1.101.3.4.2.1: the KDF's hash, SHA-256
        37    11  06 09 + OID 2.16.840.1.101.3.4.2.1: the MAC's hash, SHA-256
        48    11  06 09 + OID 2.16.840.1.101.3.4.1.2: the cipher, AES-128-CBC
        59     2  04 20: an OCTET STRING of 32 bytes
        61    32  nonce, the KDF's context                      (NONCE_BYTES)
        93     2  04 10: an OCTET STRING of 16 bytes
        95    16  IV                                            (IV_BYTES)
       111     1  MAC length = 32                               (MAC_BYTES)
       112     3  n = len(ciphertext) + 32 as a DER length: 82 xx xx in every AD FS
                  blob seen; in general 1 byte below 128, else 81..84 and 1 to 4
                  bytes, in DER's shortest form (offsets below shift with it)
       115  n-32  ciphertext: AES-128-CBC of the PKCS#7-padded PKCS#12
      83+n    32  MAC: HMAC-SHA256 over IV || ciphertext

Nothing may follow the MAC.

Keys: NIST SP 800-108 in counter mode with HMAC-SHA256 keyed by the 32-byte
DKM key. Block ``i`` (1, then 2) is ``HMAC(dkm key, [i]_32 || KDF_LABEL ||
00 || nonce || [48]_32)``, where ``KDF_LABEL`` is the DER of the cipher's OID
followed by the DER of the MAC's OID, and 48 is the output length in *bytes*
(SP 800-108 says bits: AD FS differs here). Of the 48 bytes, the first 16 are
the AES key, the next 32 the HMAC key.

Only the IV and the ciphertext are authenticated: the version, method, key
id, OIDs and lengths are not. The nonce is bound through the keys (another
nonce gives other keys, so the MAC fails); an edited key id goes unnoticed
unless the caller compares it with the id of the key it used. :func:`parse`
refuses every version, method, algorithm and length but the ones above, so
a blob cannot steer the decoder elsewhere.

Every malformed or unknown blob raises :class:`~farmkeys.errors.AdfsBlobError`;
a MAC that does not verify raises its subclass
:class:`~farmkeys.errors.AdfsKeyMismatchError`, so a caller holding several
DKM keys can try the next. A DKM key or nonce of the wrong length passed by
the calling code is a :class:`ValueError`. No message or repr contains key
bytes, the nonce or the plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import uuid
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from farmkeys.errors import AdfsBlobError, AdfsKeyMismatchError

__all__ = [
    "AES_KEY_BYTES",
    "DERIVED_KEY_BYTES",
    "DKM_KEY_BYTES",
    "HMAC_KEY_BYTES",
    "IV_BYTES",
    "KDF_LABEL",
    "KEY_ID_BYTES",
    "MAC_BYTES",
    "MAX_BLOB_BYTES",
    "METHOD_ENCRYPT_THEN_MAC",
    "NONCE_BYTES",
    "OID_AES128_CBC",
    "OID_SHA256",
    "VERSION",
    "EncryptedPfx",
    "decrypt",
    "derive_keys",
    "open_pfx",
    "parse",
]

VERSION: Final = 1
METHOD_ENCRYPT_THEN_MAC: Final = 0

KEY_ID_BYTES: Final = 16
NONCE_BYTES: Final = 32
IV_BYTES: Final = 16
MAC_BYTES: Final = 32
DKM_KEY_BYTES: Final = 32
"""Length of an AD FS DKM key (the ``thumbnailPhoto`` of a contact in the DKM container)."""

AES_KEY_BYTES: Final = 16
HMAC_KEY_BYTES: Final = 32
DERIVED_KEY_BYTES: Final = AES_KEY_BYTES + HMAC_KEY_BYTES  # 48, also the KDF's "L" field

_BLOCK_BYTES: Final = 16

OID_SHA256: Final = "2.16.840.1.101.3.4.2.1"
OID_AES128_CBC: Final = "2.16.840.1.101.3.4.1.2"

# The DER contents (after 06 09) of the two OIDs.
_SHA256_OID_BODY: Final = bytes.fromhex("608648016503040201")
_AES128_CBC_OID_BODY: Final = bytes.fromhex("608648016503040102")

KDF_LABEL: Final = b"\x06\x09" + _AES128_CBC_OID_BODY + b"\x06\x09" + _SHA256_OID_BODY
"""The KDF's label: DER of the cipher's OID, then DER of the MAC's OID (22 bytes)."""

MAX_BLOB_BYTES: Final = 1024 * 1024
"""The longest EncryptedPfx :func:`parse` looks at; AD FS's are a few KiB."""
_MAX_BASE64_CHARS: Final = 4 * -(-MAX_BLOB_BYTES // 3)

_TAG_OCTET_STRING: Final = 0x04
_TAG_OID: Final = 0x06
_BASE64_HEAD: Final = b"AAAAAQ"  # base64 of the version field 00 00 00 01

_MALFORMED_TODO: Final = (
    "copy the EncryptedPfx again, whole, from the AD FS configuration "
    "(the EncryptedPfx element of the service settings, base64)"
)
_UNSUPPORTED_TODO: Final = (
    "farmkeys reads only version 1, encrypt-then-MAC, SHA-256 and AES-128-CBC; "
    "let farmkeys generate this certificate instead (`farmkeys rollover`)"
)
_MISMATCH_TODO: Final = (
    "try the farm's other DKM keys, or copy the EncryptedPfx again from the AD FS configuration"
)


@dataclass(frozen=True, repr=False)
class EncryptedPfx:
    """The fields of one AD FS ``EncryptedPfx``, as :func:`parse` read them. Nothing secret.

    Only the structure has been checked: the MAC is verified by :func:`decrypt`.
    """

    version: int
    method: int
    key_id: uuid.UUID
    """The id of the DKM key the blob names. Not authenticated: see the module docstring."""
    nonce: bytes
    iv: bytes
    ciphertext: bytes
    mac: bytes

    def __post_init__(self) -> None:
        if self.version != VERSION or self.method != METHOD_ENCRYPT_THEN_MAC:
            raise ValueError(
                f"EncryptedPfx must be version {VERSION}, method {METHOD_ENCRYPT_THEN_MAC}"
            )
        for name, value, size in (
            ("nonce", self.nonce, NONCE_BYTES),
            ("iv", self.iv, IV_BYTES),
            ("mac", self.mac, MAC_BYTES),
        ):
            if len(value) != size:
                raise ValueError(f"EncryptedPfx.{name} must be {size} bytes, not {len(value)}")
        if not self.ciphertext or len(self.ciphertext) % _BLOCK_BYTES:
            raise ValueError(
                f"EncryptedPfx.ciphertext must be a positive multiple of {_BLOCK_BYTES} bytes, "
                f"not {len(self.ciphertext)}"
            )

    def __repr__(self) -> str:
        # Lengths only: short, and free of anything a log should not keep.
        return (
            f"EncryptedPfx(version={self.version}, method={self.method}, "
            f"key_id={self.key_id}, ciphertext=<{len(self.ciphertext)} bytes>)"
        )


def _malformed(detail: str) -> AdfsBlobError:
    return AdfsBlobError(f"the AD FS EncryptedPfx is malformed: {detail}", _MALFORMED_TODO)


def _unsupported(detail: str) -> AdfsBlobError:
    return AdfsBlobError(f"the AD FS EncryptedPfx {detail}", _UNSUPPORTED_TODO)


def _oid_text(body: bytes) -> str:
    """The dotted form of an OID's DER contents, for messages; hex if it is not a valid OID."""
    arcs: list[int] = []
    value = 0
    for i, octet in enumerate(body):
        if value == 0 and octet == 0x80:  # a leading 0x80 is not DER
            return f"(not an OID: {body.hex()})"
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
        elif i == len(body) - 1:
            return f"(not an OID: {body.hex()})"
    if not arcs:
        return "(an empty OID)"
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(arc) for arc in head + arcs[1:])


class _Reader:
    """A cursor over the blob whose every read checks that the bytes are there."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.at

    def take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise _malformed(
                f"it ends after {len(self.data)} bytes, inside the {field} "
                f"({size} bytes from offset {self.at})"
            )
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def byte(self, field: str) -> int:
        return self.take(1, field)[0]

    def uint32(self, field: str) -> int:
        value: int = struct.unpack(">I", self.take(4, field))[0]
        return value

    def tag(self, expected: int, field: str) -> None:
        at = self.at
        found = self.byte(field)
        if found != expected:
            raise _malformed(
                f"the {field} at offset {at} has tag {found:#04x}, not {expected:#04x}"
            )

    def octets(self, size: int, field: str) -> bytes:
        """An OCTET STRING of exactly ``size`` bytes: 04, the length, the bytes."""
        self.tag(_TAG_OCTET_STRING, field)
        at = self.at
        length = self.byte(field)
        if length != size:
            raise _malformed(
                f"the {field} at offset {at - 1} is {length:#04x} bytes long, not {size:#04x}"
            )
        return self.take(size, field)

    def oid(self, expected: bytes, name: str, field: str) -> None:
        """An OID that must be ``expected`` (its DER contents), named ``name`` in messages."""
        self.tag(_TAG_OID, field)
        at = self.at
        length = self.byte(field)
        if length & 0x80:
            raise _malformed(f"the {field} at offset {at - 1} has a length form {length:#04x}")
        body = self.take(length, field)
        if body != expected:
            raise _unsupported(
                f"names {_oid_text(body)} as its {field}; farmkeys reads only "
                f"{_oid_text(expected)} ({name})"
            )

    def der_length(self, field: str) -> int:
        """A DER length: one byte below 0x80, or 0x81 to 0x84 and that many bytes, shortest form."""
        at = self.at
        first = self.byte(field)
        if first < 0x80:
            return first
        count = first & 0x7F
        if not 1 <= count <= 4:
            raise _malformed(f"the {field} at offset {at} has an unusable length form {first:#04x}")
        value = int.from_bytes(self.take(count, field), "big")
        if value < 0x80 or value >> (8 * (count - 1)) == 0:
            raise _malformed(f"the {field} at offset {at} is not in DER's shortest form")
        return value


def _from_base64(text: str) -> bytes:
    compact = "".join(text.split())
    if not compact:
        raise _malformed("it is empty")
    if len(compact) > _MAX_BASE64_CHARS:
        raise _malformed(
            f"its base64 text is {len(compact)} characters, more than the "
            f"{_MAX_BASE64_CHARS} of a {MAX_BLOB_BYTES}-byte blob"
        )
    try:
        return base64.b64decode(compact.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise _malformed("it is neither raw bytes nor valid base64 text") from None


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(data, str):
        return _from_base64(data)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"an EncryptedPfx is bytes or base64 text, not {type(data).__name__}")
    raw = bytes(data)
    # A raw blob starts with 00 (the version); base64 text of one starts with "AAAAAQ".
    # The two cannot be confused, so base64 read from a file as bytes is accepted too.
    if raw.lstrip().startswith(_BASE64_HEAD):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _malformed("it is neither raw bytes nor valid base64 text") from None
        return _from_base64(text)
    return raw


def parse(data: bytes | bytearray | memoryview | str) -> EncryptedPfx:
    """The fields of an AD FS ``EncryptedPfx``, its structure checked; no key needed.

    ``data`` is the raw blob, or its base64 text (as AD FS's configuration
    holds it; whitespace and line breaks are ignored) as ``str`` or as ASCII
    bytes. Raises :class:`~farmkeys.errors.AdfsBlobError` for anything but the
    one layout this module describes: truncated anywhere, a wrong tag or
    length byte, an unknown version, method or algorithm, bytes after the MAC,
    bad base64, or a blob longer than :data:`MAX_BLOB_BYTES`.
    """
    raw = _as_bytes(data)
    if not raw:
        raise _malformed("it is empty")
    if len(raw) > MAX_BLOB_BYTES:
        raise _malformed(f"it is {len(raw)} bytes, more than the {MAX_BLOB_BYTES} farmkeys reads")
    reader = _Reader(raw)
    version = reader.uint32("version")
    if version != VERSION:
        raise _unsupported(f"has version {version}; farmkeys reads only version {VERSION}")
    method = reader.uint32("method")
    if method != METHOD_ENCRYPT_THEN_MAC:
        raise _unsupported(
            f"has method {method}; farmkeys reads only method {METHOD_ENCRYPT_THEN_MAC} "
            "(encrypt-then-MAC)"
        )
    key_id = uuid.UUID(bytes_le=reader.octets(KEY_ID_BYTES, "DKM key id"))
    reader.oid(_SHA256_OID_BODY, "SHA-256", "KDF hash")
    reader.oid(_SHA256_OID_BODY, "SHA-256", "MAC hash")
    reader.oid(_AES128_CBC_OID_BODY, "AES-128-CBC", "cipher")
    nonce = reader.octets(NONCE_BYTES, "nonce")
    iv = reader.octets(IV_BYTES, "IV")
    mac_length = reader.byte("MAC length")
    if mac_length != MAC_BYTES:
        raise _unsupported(
            f"has a MAC of {mac_length} bytes; farmkeys reads only {MAC_BYTES} (HMAC-SHA256)"
        )
    ciphertext, mac = _ciphertext_and_mac(reader)
    return EncryptedPfx(
        version=version,
        method=method,
        key_id=key_id,
        nonce=nonce,
        iv=iv,
        ciphertext=ciphertext,
        mac=mac,
    )


def _ciphertext_and_mac(reader: _Reader) -> tuple[bytes, bytes]:
    """The rest of the blob after the MAC length: a DER length, then exactly that many
    bytes of ciphertext (whole AES blocks) and MAC."""
    at = reader.at
    body = reader.der_length("ciphertext length")
    if body > reader.remaining:
        raise _malformed(
            f"the length at offset {at} announces {body} bytes of ciphertext and MAC, "
            f"but only {reader.remaining} follow (truncated)"
        )
    if body < reader.remaining:
        raise _malformed(f"{reader.remaining - body} bytes follow the MAC")
    cipher_size = body - MAC_BYTES
    if cipher_size <= 0 or cipher_size % _BLOCK_BYTES:
        raise _malformed(
            f"its ciphertext is {max(cipher_size, 0)} bytes, not a positive multiple of "
            f"{_BLOCK_BYTES} (the AES block)"
        )
    return reader.take(cipher_size, "ciphertext"), reader.take(MAC_BYTES, "MAC")


def _check_length(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        # Only the length: never the bytes.
        raise ValueError(f"{name} must be {size} bytes, not {len(value)}")


def derive_keys(dkm_key: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """The AES key (16 bytes) and HMAC key (32 bytes) of a blob with ``nonce``, under ``dkm_key``.

    NIST SP 800-108 counter mode, HMAC-SHA256, a 32-bit counter before the
    fixed input ``KDF_LABEL || 00 || nonce || [48]_32``; see the module
    docstring. Raises :class:`ValueError` if ``dkm_key`` is not
    :data:`DKM_KEY_BYTES` or ``nonce`` not :data:`NONCE_BYTES` long.
    """
    _check_length("dkm_key", dkm_key, DKM_KEY_BYTES)
    _check_length("nonce", nonce, NONCE_BYTES)
    fixed = KDF_LABEL + b"\x00" + bytes(nonce) + struct.pack(">I", DERIVED_KEY_BYTES)
    output = b""
    counter = 1
    while len(output) < DERIVED_KEY_BYTES:
        output += hmac.new(
            bytes(dkm_key), struct.pack(">I", counter) + fixed, hashlib.sha256
        ).digest()
        counter += 1
    return output[:AES_KEY_BYTES], output[AES_KEY_BYTES:DERIVED_KEY_BYTES]


def decrypt(blob: EncryptedPfx, dkm_key: bytes) -> bytes:
    """The PKCS#12 (without a password) inside ``blob``, after its MAC verified under ``dkm_key``.

    The MAC over IV and ciphertext is compared in constant time before
    anything is decrypted. Raises
    :class:`~farmkeys.errors.AdfsKeyMismatchError` if it does not verify
    (wrong key, or an altered blob), :class:`~farmkeys.errors.AdfsBlobError`
    if the plaintext's PKCS#7 padding is invalid after a good MAC, and
    :class:`ValueError` if ``dkm_key`` is not :data:`DKM_KEY_BYTES` long (a
    mistake of the calling code, like :mod:`farmkeys.formats.blob`'s master keys).
    Whether the result is a usable PKCS#12 is for
    :func:`farmkeys.formats.certificates.from_pkcs12` to say.
    """
    _check_length("dkm_key", dkm_key, DKM_KEY_BYTES)
    aes_key, mac_key = derive_keys(dkm_key, blob.nonce)
    expected = hmac.new(mac_key, blob.iv + blob.ciphertext, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, blob.mac):
        raise AdfsKeyMismatchError(
            f"the AD FS EncryptedPfx's MAC does not verify under DKM key {blob.key_id}: "
            "wrong key, or the blob was altered",
            _MISMATCH_TODO,
        )
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(blob.iv)).decryptor()
    padded = decryptor.update(blob.ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(8 * _BLOCK_BYTES).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise AdfsBlobError(
            f"the AD FS EncryptedPfx under DKM key {blob.key_id} verifies but its padding "
            "is invalid: it was not written by AD FS",
            _MALFORMED_TODO,
        ) from None


def open_pfx(data: bytes | bytearray | memoryview | str, dkm_key: bytes) -> bytes:
    """``decrypt(parse(data), dkm_key)``: the PKCS#12 of a raw or base64 ``EncryptedPfx``."""
    return decrypt(parse(data), dkm_key)
