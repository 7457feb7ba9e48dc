"""The native sealed blob: a certificate's files, private key and all, encrypted at rest.

A blob is an authenticated, versioned envelope around the files of one
certificate: its bundle (:mod:`farmkeys.formats.bundle`: the certificate, its
private key and their PKCS#12, as a node writes them), or, in a blob sealed
before bundles existed, a bare PKCS#12; this module never looks inside. It is
sealed under a master key kept in the directory (the DKM container) and is
bound to the config DB row it lives in, so a blob copied into another row does
not open. Pure: no I/O, no clock; the only side input is ``os.urandom`` for
the nonce, which the caller never chooses.

Layout, version 1 (all integers big-endian)::

    offset  size  field
    ------  ----  -----------------------------------------------------------
         0     4  magic, the ASCII bytes "FKEY"                 (MAGIC)
         4     1  format version = 1                            (VERSION)
         5     1  algorithm id = 1: AES-256-GCM under an HKDF-SHA256
                  key derived from the master key               (ALG_AES256GCM_HKDF)
         6    16  master key id, uuid.UUID.bytes
        22    12  nonce, random for every seal                  (NONCE_BYTES)
        34     n  AES-256-GCM ciphertext of the plaintext, n = len(plaintext)
      34+n    16  GCM authentication tag                        (TAG_BYTES)

The 34 bytes from offset 0 to 33 are the header (``HEADER_BYTES``). A blob
is therefore ``MIN_BLOB_BYTES`` (50) to ``MAX_BLOB_BYTES`` long, and its
plaintext at most ``MAX_PLAINTEXT_BYTES`` (1 MiB).

Key: the AEAD key is never the master key itself but
``HKDF-SHA256(ikm=master key, salt=none, info=HKDF_INFO, length=32)``, so a
master key used elsewhere later (another algorithm id, another format) never
meets the same primitive twice under the same key.

Associated data: the whole 34-byte header, then ``AD_LABEL`` (the ASCII
bytes "farmkeys blob v1 row", no terminator), then the farm id (the
farm's DKM group GUID as text), the
certificate id and the purpose, each as a 2-byte big-endian length followed
by that many bytes of UTF-8. Every field has an explicit length, so no two
different contexts encode to the same bytes. Authenticating the header means
an edited magic, version, algorithm, key id or nonce fails; authenticating
the context means a blob moved to another farm, certificate or purpose fails.

Every way a blob can be bad (truncated, overlong, wrong magic, unknown
version or algorithm, wrong master key, tampered, wrong row) ends in one
:class:`~farmkeys.errors.InvalidBlobError` that names the certificate id and
purpose, never a key. Misuse by the calling code (a master key of the wrong
length, an oversize plaintext, a malformed context) is a :class:`ValueError`.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from farmkeys.errors import InvalidBlobError
from farmkeys.vocab import PURPOSES

__all__ = [
    "AD_LABEL",
    "ALG_AES256GCM_HKDF",
    "HEADER_BYTES",
    "HKDF_INFO",
    "KEY_ID_BYTES",
    "MAGIC",
    "MASTER_KEY_BYTES",
    "MAX_BLOB_BYTES",
    "MAX_CONTEXT_FIELD_BYTES",
    "MAX_PLAINTEXT_BYTES",
    "MIN_BLOB_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "VERSION",
    "BlobContext",
    "blob_context",
    "master_key_id",
    "open_blob",
    "reseal",
    "seal",
]

MAGIC: Final = b"FKEY"
VERSION: Final = 1
ALG_AES256GCM_HKDF: Final = 1

MASTER_KEY_BYTES: Final = 32
"""Length of a master key as stored in the directory."""
KEY_ID_BYTES: Final = 16
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16

_MAGIC_AT: Final = 0
_VERSION_AT: Final = 4
_ALG_AT: Final = 5
_KEY_ID_AT: Final = 6
_NONCE_AT: Final = _KEY_ID_AT + KEY_ID_BYTES  # 22
HEADER_BYTES: Final = _NONCE_AT + NONCE_BYTES  # 34

MAX_PLAINTEXT_BYTES: Final = 1024 * 1024
"""The largest plaintext sealed; the bundle of an RSA-4096 certificate is under 10 KiB."""
MIN_BLOB_BYTES: Final = HEADER_BYTES + TAG_BYTES
MAX_BLOB_BYTES: Final = HEADER_BYTES + MAX_PLAINTEXT_BYTES + TAG_BYTES

MAX_CONTEXT_FIELD_BYTES: Final = 0xFFFF
"""The longest farm id, certificate id or purpose, in UTF-8 bytes (a 2-byte length)."""

HKDF_INFO: Final = b"farmkeys blob v1 aes-256-gcm"
AD_LABEL: Final = b"farmkeys blob v1 row"

_NOT_AUTHENTIC_TODO: Final = (
    "restore the row from a backup, or replace the certificate as docs/operations.md shows"
)


@dataclass(frozen=True)
class BlobContext:
    """The row a blob belongs to. Bound into every blob as associated data."""

    farm: str
    certificate_id: str
    purpose: str

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, not {self.purpose!r}")
        for name, value in (("farm", self.farm), ("certificate_id", self.certificate_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"BlobContext.{name} must be a non-empty string")
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValueError(f"BlobContext.{name} is not encodable as UTF-8") from None
            if size > MAX_CONTEXT_FIELD_BYTES:
                raise ValueError(
                    f"BlobContext.{name} is {size} bytes of UTF-8, "
                    f"more than {MAX_CONTEXT_FIELD_BYTES}"
                )

    def encode(self) -> bytes:
        """The context part of the associated data: ``AD_LABEL`` then each field length-prefixed."""
        parts = [AD_LABEL]
        for value in (self.farm, self.certificate_id, self.purpose):
            raw = value.encode("utf-8")
            parts.append(struct.pack(">H", len(raw)))
            parts.append(raw)
        return b"".join(parts)


def blob_context(dkm_group: uuid.UUID, certificate_id: uuid.UUID, purpose: str) -> BlobContext:
    """What a certificate's blob is bound to: its farm's DKM group, its id and its purpose."""
    return BlobContext(farm=str(dkm_group), certificate_id=str(certificate_id), purpose=purpose)


def _not_authentic(context: BlobContext) -> InvalidBlobError:
    return InvalidBlobError(
        f"the blob of {context.purpose} certificate {context.certificate_id} is not authentic "
        "(tampered, truncated, or copied from another row)",
        _NOT_AUTHENTIC_TODO,
    )


def _check_master_key(master_key: bytes, name: str = "master_key") -> None:
    if len(master_key) != MASTER_KEY_BYTES:
        # Only the length: never the key.
        raise ValueError(
            f"{name} must be {MASTER_KEY_BYTES} bytes, not {len(master_key)}",
        )


def _aead(master_key: bytes) -> AESGCM:
    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=HKDF_INFO,
    ).derive(master_key)
    return AESGCM(derived)


def _header(key_id: uuid.UUID, nonce: bytes) -> bytes:
    return MAGIC + bytes((VERSION, ALG_AES256GCM_HKDF)) + key_id.bytes + nonce


def _parse_header(blob: bytes, context: BlobContext) -> tuple[uuid.UUID, bytes]:
    """The key id and nonce of a well-formed header; InvalidBlobError otherwise."""
    if not MIN_BLOB_BYTES <= len(blob) <= MAX_BLOB_BYTES:
        raise _not_authentic(context)
    if (
        blob[_MAGIC_AT:_VERSION_AT] != MAGIC
        or blob[_VERSION_AT] != VERSION
        or blob[_ALG_AT] != ALG_AES256GCM_HKDF
    ):
        raise _not_authentic(context)
    key_id = uuid.UUID(bytes=bytes(blob[_KEY_ID_AT:_NONCE_AT]))
    nonce = bytes(blob[_NONCE_AT:HEADER_BYTES])
    return key_id, nonce


def seal(
    plaintext: bytes,
    *,
    master_key: bytes,
    master_key_id: uuid.UUID,
    context: BlobContext,
) -> bytes:
    """Encrypt ``plaintext`` for the row ``context`` under the master key ``master_key_id``.

    The nonce is fresh randomness for every call. Raises :class:`ValueError`
    if the key is not ``MASTER_KEY_BYTES`` long or the plaintext is larger
    than ``MAX_PLAINTEXT_BYTES``: both are mistakes of the calling code.
    """
    _check_master_key(master_key)
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise ValueError(
            f"plaintext is {len(plaintext)} bytes, more than the {MAX_PLAINTEXT_BYTES} a blob holds"
        )
    nonce = os.urandom(NONCE_BYTES)
    header = _header(master_key_id, nonce)
    sealed = _aead(master_key).encrypt(nonce, bytes(plaintext), header + context.encode())
    return header + sealed


def master_key_id(blob: bytes, *, context: BlobContext) -> uuid.UUID:
    """The id of the master key a blob names, read from its header alone.

    Nothing is authenticated here: the id only says which key to fetch, and
    :func:`open_blob` then proves the blob genuine. Raises
    :class:`~farmkeys.errors.InvalidBlobError` if the header is malformed.
    """
    key_id, _ = _parse_header(blob, context)
    return key_id


def open_blob(blob: bytes, *, master_key: bytes, context: BlobContext) -> bytes:
    """The plaintext of an authentic blob of the row ``context``.

    Every failure raises one :class:`~farmkeys.errors.InvalidBlobError`.
    Checking that ``master_key`` is the key the header names is left to the
    caller (it looked the key up by that id); a different key simply fails
    authentication. Raises :class:`ValueError` only if ``master_key`` is not
    ``MASTER_KEY_BYTES`` long.
    """
    _check_master_key(master_key)
    _, nonce = _parse_header(blob, context)
    header = bytes(blob[:HEADER_BYTES])
    try:
        return _aead(master_key).decrypt(
            nonce, bytes(blob[HEADER_BYTES:]), header + context.encode()
        )
    except InvalidTag:
        raise _not_authentic(context) from None


def reseal(
    blob: bytes,
    *,
    old_key: bytes,
    new_key: bytes,
    new_key_id: uuid.UUID,
    context: BlobContext,
) -> bytes:
    """Open ``blob`` with ``old_key`` and seal its plaintext again under ``new_key``.

    For master-key rollover. The new blob has a fresh nonce and the same row
    binding. Raises :class:`~farmkeys.errors.InvalidBlobError` if ``blob``
    does not open, :class:`ValueError` if either key has the wrong length.
    """
    _check_master_key(new_key, "new_key")
    _check_master_key(old_key, "old_key")
    plaintext = open_blob(blob, master_key=old_key, context=context)
    return seal(plaintext, master_key=new_key, master_key_id=new_key_id, context=context)
