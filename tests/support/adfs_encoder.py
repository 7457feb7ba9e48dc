"""A test-only encoder of AD FS's EncryptedPfx, written from docs/blob-format.md.

farmkeys never writes this format; the tests make their own vectors with it.
The key derivation is computed by cryptography's KBKDFHMAC, independently of
farmkeys.formats.adfs_pfx.
"""

from __future__ import annotations

import struct
import uuid

from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

DKM_KEY = bytes(range(32))
OTHER_DKM_KEY = bytes(range(1, 33))
KEY_ID = uuid.UUID("6f1c2a3e-9d4b-4c8e-a1f2-0123456789ab")
NONCE = bytes(range(100, 132))
IV = bytes(range(200, 216))

# DER of the OIDs, written out from their dotted forms.
SHA256_OID = bytes.fromhex("06 09 60 86 48 01 65 03 04 02 01")  # 2.16.840.1.101.3.4.2.1
AES128_CBC_OID = bytes.fromhex("06 09 60 86 48 01 65 03 04 01 02")  # 2.16.840.1.101.3.4.1.2
HMAC_SHA256_OID = bytes.fromhex("06 08 2a 86 48 86 f7 0d 02 09")  # 1.2.840.113549.2.9
SHA1_OID = bytes.fromhex("06 05 2b 0e 03 02 1a")  # 1.3.14.3.2.26
SHA384_OID = bytes.fromhex("06 09 60 86 48 01 65 03 04 02 02")  # 2.16.840.1.101.3.4.2.2
AES256_CBC_OID = bytes.fromhex("06 09 60 86 48 01 65 03 04 01 2a")  # 2.16.840.1.101.3.4.1.42

# Offsets of the fixed part (docs/blob-format.md).
KEY_ID_AT = 10
KDF_OID_AT, MAC_OID_AT, CIPHER_OID_AT = 26, 37, 48
NONCE_AT, IV_AT = 61, 95
MAC_LENGTH_AT = 111
DER_LENGTH_AT = 112


# --- the reference encoder (tests only) --------------------------------------------


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def reference_keys(dkm_key: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """SP 800-108 counter mode as AD FS uses it, by cryptography's KBKDFHMAC.

    KBKDFHMAC's label/context form writes L in bits (384), as SP 800-108
    says; AD FS writes 48, the length in bytes. So the whole fixed input is
    passed as ``fixed`` (see test_kbkdfhmac_label_form_encodes_bits_not_bytes).
    """
    label = AES128_CBC_OID + SHA256_OID
    fixed = label + b"\x00" + nonce + struct.pack(">I", 48)
    out = KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=48,
        rlen=4,
        llen=None,
        location=CounterLocation.BeforeFixed,
        label=None,
        context=None,
        fixed=fixed,
    ).derive(dkm_key)
    return out[:16], out[16:]


def encrypt_then_mac(
    plaintext: bytes, *, dkm_key: bytes, nonce: bytes, iv: bytes, pad: bool = True
) -> tuple[bytes, bytes]:
    aes_key, mac_key = reference_keys(dkm_key, nonce)
    if pad:
        padder = padding.PKCS7(128).padder()
        plaintext = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(iv + ciphertext)
    return ciphertext, h.finalize()


def encode(
    plaintext: bytes,
    *,
    dkm_key: bytes = DKM_KEY,
    key_id: uuid.UUID = KEY_ID,
    nonce: bytes = NONCE,
    iv: bytes = IV,
    version: int = 1,
    method: int = 0,
    kdf_oid: bytes = SHA256_OID,
    mac_oid: bytes = SHA256_OID,
    cipher_oid: bytes = AES128_CBC_OID,
    mac_length: int = 32,
    pad: bool = True,
) -> bytes:
    ciphertext, mac = encrypt_then_mac(plaintext, dkm_key=dkm_key, nonce=nonce, iv=iv, pad=pad)
    return b"".join(
        [
            struct.pack(">II", version, method),
            b"\x04\x10" + key_id.bytes_le,
            kdf_oid,
            mac_oid,
            cipher_oid,
            b"\x04\x20" + nonce,
            b"\x04\x10" + iv,
            bytes([mac_length]),
            der_length(len(ciphertext) + len(mac)),
            ciphertext,
            mac,
        ]
    )
