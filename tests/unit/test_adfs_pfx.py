"""AD FS's EncryptedPfx: parsing, key derivation, decryption, and every way a blob can be bad.

The encoder below is written from docs/blob-format.md ("AD FS EncryptedPfx"),
not from farmkeys.formats.adfs_pfx, and derives its keys with cryptography's KBKDFHMAC
rather than the module's own loop. farmkeys never writes this format: the
encoder lives here only.
"""

from __future__ import annotations

import base64
import os
import textwrap
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from adfs_encoder import (
    AES128_CBC_OID,
    AES256_CBC_OID,
    CIPHER_OID_AT,
    DER_LENGTH_AT,
    DKM_KEY,
    HMAC_SHA256_OID,
    IV,
    IV_AT,
    KDF_OID_AT,
    KEY_ID,
    KEY_ID_AT,
    MAC_OID_AT,
    NONCE,
    NONCE_AT,
    OTHER_DKM_KEY,
    SHA1_OID,
    SHA256_OID,
    SHA384_OID,
    der_length,
    encode,
    reference_keys,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import given, settings
from hypothesis import strategies as st

from farmkeys.errors import AdfsBlobError, AdfsKeyMismatchError, InvalidBlobError
from farmkeys.formats import adfs_pfx, certificates
from farmkeys.formats.adfs_pfx import decrypt, derive_keys, open_pfx, parse


def flipped(blob: bytes, at: int, mask: int = 0x01) -> bytes:
    return blob[:at] + bytes([blob[at] ^ mask]) + blob[at + 1 :]


# --- fixtures ------------------------------------------------------------------------


def make_pkcs12(key_type: str) -> bytes:
    now = datetime.now(UTC)
    made = certificates.generate(
        farm_name="contoso",
        purpose="signing",
        key_type=key_type,
        not_before=now,
        not_after=now + timedelta(days=365),
    )
    return certificates.to_pkcs12(made.certificate, made.key, friendly_name="")


@pytest.fixture(scope="module")
def rsa_pkcs12() -> bytes:
    return make_pkcs12("rsa-2048")  # what AD FS generates


@pytest.fixture(scope="module")
def ec_pkcs12() -> bytes:
    return make_pkcs12("ec-p256")  # smaller: the exhaustive loops stay quick


@pytest.fixture(scope="module")
def ec_blob(ec_pkcs12: bytes) -> bytes:
    return encode(ec_pkcs12)


# --- round trip and layout -----------------------------------------------------------


def test_decrypt_gives_the_exact_pkcs12_which_loads_without_a_password(rsa_pkcs12: bytes) -> None:
    blob = encode(rsa_pkcs12)
    assert blob[DER_LENGTH_AT] == 0x82  # the length form every real blob has
    opened = decrypt(parse(blob), DKM_KEY)
    assert opened == rsa_pkcs12
    key, cert, others = pkcs12.load_key_and_certificates(opened, None)
    assert key is not None and cert is not None and others == []
    assert certificates.from_pkcs12(opened).certificate == cert


def test_open_pfx_is_parse_then_decrypt(ec_pkcs12: bytes, ec_blob: bytes) -> None:
    assert open_pfx(ec_blob, DKM_KEY) == ec_pkcs12


@pytest.mark.parametrize(
    ("size", "form"),
    [(1, 0x30), (95, 0x80 | 1), (300, 0x80 | 2), (70_000, 0x80 | 3)],
    ids=["short", "81", "82", "83"],
)
def test_every_der_length_form_round_trips(size: int, form: int) -> None:
    plaintext = os.urandom(size)
    blob = encode(plaintext)
    assert blob[DER_LENGTH_AT] == form
    assert open_pfx(blob, DKM_KEY) == plaintext


def test_parse_reads_the_documented_fields(ec_blob: bytes) -> None:
    assert ec_blob[DER_LENGTH_AT] == 0x82
    parsed = parse(ec_blob)
    assert parsed.version == 1
    assert parsed.method == 0
    assert parsed.key_id == KEY_ID
    assert parsed.nonce == NONCE
    assert parsed.iv == IV
    assert parsed.mac == ec_blob[-32:]
    assert parsed.ciphertext == ec_blob[DER_LENGTH_AT + 3 : -32]
    assert len(parsed.ciphertext) % 16 == 0


def test_key_id_is_in_dotnet_guid_byte_order(ec_pkcs12: bytes) -> None:
    # .NET's Guid.ToByteArray: the first three fields little-endian, the rest as written.
    blob = encode(ec_pkcs12)
    raw_id = bytes(range(16))
    blob = blob[:KEY_ID_AT] + raw_id + blob[KEY_ID_AT + 16 :]
    assert parse(blob).key_id == uuid.UUID("03020100-0504-0706-0809-0a0b0c0d0e0f")


def test_module_constants_agree_with_the_description() -> None:
    assert adfs_pfx.KDF_LABEL == AES128_CBC_OID + SHA256_OID
    assert adfs_pfx.OID_SHA256 == "2.16.840.1.101.3.4.2.1"
    assert adfs_pfx.OID_AES128_CBC == "2.16.840.1.101.3.4.1.2"
    assert (adfs_pfx.AES_KEY_BYTES, adfs_pfx.HMAC_KEY_BYTES, adfs_pfx.DERIVED_KEY_BYTES) == (
        16,
        32,
        48,
    )


# --- input forms -----------------------------------------------------------------------


def test_base64_text_with_line_breaks_and_spaces_is_accepted(
    ec_pkcs12: bytes, ec_blob: bytes
) -> None:
    text = base64.b64encode(ec_blob).decode("ascii")
    wrapped = "\r\n  " + "\r\n".join(textwrap.wrap(text, 64)) + " \n\t"
    assert parse(wrapped) == parse(ec_blob)
    assert open_pfx(wrapped, DKM_KEY) == ec_pkcs12


def test_base64_read_as_bytes_is_accepted(ec_blob: bytes) -> None:
    text = base64.encodebytes(ec_blob)  # bytes, with a newline every 76 characters
    assert parse(text) == parse(ec_blob)
    assert parse(bytearray(ec_blob)) == parse(memoryview(ec_blob)) == parse(ec_blob)


@pytest.mark.parametrize(
    "text",
    ["", "   \n", "AAAAAQ!!", "AAAAAQAAAAA=", "AAAAAQé=", "AAAAAQAAAAAEE", "-_-_"],
    ids=["empty", "blank", "bad-char", "eight-bytes", "non-ascii", "bad-length", "urlsafe"],
)
def test_bad_base64_is_refused(text: str) -> None:
    with pytest.raises(AdfsBlobError) as caught:
        parse(text)
    assert caught.value.__cause__ is None


def test_bad_base64_read_as_bytes_is_refused() -> None:
    with pytest.raises(AdfsBlobError):
        parse(b"AAAAAQ\xff\xfe")
    with pytest.raises(AdfsBlobError):
        parse(b"")


def test_oversize_input_is_refused_before_decoding() -> None:
    with pytest.raises(AdfsBlobError, match="more than"):
        parse(b"\x00\x00\x00\x01" + bytes(adfs_pfx.MAX_BLOB_BYTES))
    with pytest.raises(AdfsBlobError, match="more than"):
        parse("A" * (4 * (adfs_pfx.MAX_BLOB_BYTES // 3 + 2)))


# --- wrong key, tampering, truncation -----------------------------------------------------


def test_wrong_key_is_a_key_mismatch_naming_the_key_id(ec_blob: bytes) -> None:
    with pytest.raises(AdfsKeyMismatchError) as caught:
        open_pfx(ec_blob, OTHER_DKM_KEY)
    error = caught.value
    assert isinstance(error, AdfsBlobError)
    assert isinstance(error, InvalidBlobError)
    assert str(KEY_ID) in error.what
    assert "\n" not in error.diagnostics()
    for secret in (OTHER_DKM_KEY, DKM_KEY, NONCE):
        assert secret.hex() not in str(error)
        assert secret.hex().upper() not in str(error)


def test_caller_can_try_each_key_until_one_fits(ec_pkcs12: bytes, ec_blob: bytes) -> None:
    parsed = parse(ec_blob)
    opened = None
    for key in (OTHER_DKM_KEY, bytes(32), DKM_KEY):
        try:
            opened = decrypt(parsed, key)
        except AdfsKeyMismatchError:
            continue
        break
    assert opened == ec_pkcs12


def test_every_single_byte_flip_is_caught_except_in_the_key_id(
    ec_pkcs12: bytes, ec_blob: bytes
) -> None:
    for at in range(len(ec_blob)):
        blob = flipped(ec_blob, at)
        if KEY_ID_AT <= at < KEY_ID_AT + 16:
            # The key id is not authenticated (AD FS's MAC covers IV and ciphertext
            # only): the edit shows as another key id, and the same key still opens it.
            assert parse(blob).key_id != KEY_ID
            assert open_pfx(blob, DKM_KEY) == ec_pkcs12
            continue
        with pytest.raises(AdfsBlobError):
            open_pfx(blob, DKM_KEY)


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_edit_outside_the_key_id_is_caught(ec_blob: bytes, data: st.DataObject) -> None:
    at = data.draw(
        st.integers(0, len(ec_blob) - 1).filter(lambda i: not KEY_ID_AT <= i < KEY_ID_AT + 16)
    )
    mask = data.draw(st.integers(1, 255))
    with pytest.raises(AdfsBlobError):
        open_pfx(flipped(ec_blob, at, mask), DKM_KEY)


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (NONCE_AT, AdfsKeyMismatchError),
        (IV_AT + 15, AdfsKeyMismatchError),
        (DER_LENGTH_AT + 3, AdfsKeyMismatchError),  # first ciphertext byte
        (-1, AdfsKeyMismatchError),  # last MAC byte
        (0, AdfsBlobError),
        (KDF_OID_AT + 10, AdfsBlobError),
    ],
    ids=["nonce", "iv", "ciphertext", "mac", "version", "kdf-oid"],
)
def test_edits_are_caught_by_the_right_check(ec_blob: bytes, at: int, expected: type) -> None:
    with pytest.raises(expected):
        open_pfx(flipped(ec_blob, at % len(ec_blob)), DKM_KEY)


def test_every_truncation_is_a_blob_error(ec_blob: bytes) -> None:
    for length in range(len(ec_blob)):
        with pytest.raises(AdfsBlobError):
            parse(ec_blob[:length])


def test_every_truncation_of_the_base64_text_is_a_blob_error() -> None:
    text = base64.b64encode(encode(b"short plaintext")).decode("ascii")
    for length in range(len(text)):
        with pytest.raises(AdfsBlobError):
            parse(text[:length])


def test_trailing_garbage_is_refused(ec_blob: bytes) -> None:
    for tail in (b"\x00", b"\x00" * 16, b"garbage"):
        with pytest.raises(AdfsBlobError, match="follow the MAC"):
            parse(ec_blob + tail)
    text = base64.b64encode(ec_blob + b"\x00\x00\x00").decode("ascii")
    with pytest.raises(AdfsBlobError, match="follow the MAC"):
        parse(text)


# --- unknown kinds ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 0x01000000, 0xFFFFFFFF])
def test_unknown_version_is_refused(version: int) -> None:
    with pytest.raises(AdfsBlobError, match=f"version {version}"):
        parse(encode(b"x", version=version))


@pytest.mark.parametrize("method", [1, 2, 0xFFFFFFFF])
def test_unknown_method_is_refused(method: int) -> None:
    with pytest.raises(AdfsBlobError, match=f"method {method}"):
        parse(encode(b"x", method=method))


@pytest.mark.parametrize(
    ("field", "oid", "dotted"),
    [
        ("kdf_oid", SHA1_OID, "1.3.14.3.2.26"),
        ("kdf_oid", SHA384_OID, "2.16.840.1.101.3.4.2.2"),
        ("kdf_oid", AES128_CBC_OID, "2.16.840.1.101.3.4.1.2"),
        ("mac_oid", HMAC_SHA256_OID, "1.2.840.113549.2.9"),
        ("mac_oid", SHA384_OID, "2.16.840.1.101.3.4.2.2"),
        ("mac_oid", AES128_CBC_OID, "2.16.840.1.101.3.4.1.2"),
        ("cipher_oid", AES256_CBC_OID, "2.16.840.1.101.3.4.1.42"),
        ("cipher_oid", SHA256_OID, "2.16.840.1.101.3.4.2.1"),
    ],
)
def test_each_algorithm_oid_other_than_adfs_own_is_refused(
    field: str, oid: bytes, dotted: str
) -> None:
    blob = encode(b"x", **{field: oid})
    with pytest.raises(AdfsBlobError, match=dotted.replace(".", r"\.")):
        parse(blob)


def test_mac_length_other_than_32_is_refused() -> None:
    for mac_length in (0, 16, 20, 33, 48, 64, 0x80):
        with pytest.raises(AdfsBlobError):
            parse(encode(b"x", mac_length=mac_length))


@pytest.mark.parametrize(
    ("at", "value"),
    [
        (8, 0x05),  # key id tag
        (9, 0x11),  # key id length
        (9, 0x0F),
        (KDF_OID_AT, 0x04),  # OID tag
        (MAC_OID_AT + 1, 0x0A),  # OID length
        (CIPHER_OID_AT + 1, 0x89),  # OID length in long form
        (NONCE_AT - 2, 0x06),  # nonce tag
        (NONCE_AT - 1, 0x21),  # nonce length
        (IV_AT - 2, 0x30),  # IV tag
        (IV_AT - 1, 0x20),  # IV length
    ],
)
def test_wrong_tag_or_length_byte_is_refused(ec_blob: bytes, at: int, value: int) -> None:
    with pytest.raises(AdfsBlobError):
        parse(ec_blob[:at] + bytes([value]) + ec_blob[at + 1 :])


@pytest.mark.parametrize(
    "length",
    [
        b"\x84\xff\xff\xff\xff",  # four billion bytes announced
        b"\x85\x00\x00\x00\x00\x01",  # more length bytes than any blob needs
        b"\x88" + b"\xff" * 8,
        b"\x80",  # BER's indefinite length
        b"\xff",
        b"\x82\x00\x30",  # not the shortest form
        b"\x81\x30",
        b"\x00",
        b"\x20",  # too short for one block and the MAC
        b"\x31",  # one byte more than follows
    ],
)
def test_unusable_ciphertext_lengths_are_refused(length: bytes) -> None:
    blob = encode(b"x")  # 16 bytes of ciphertext, 32 of MAC: length 0x30
    assert blob[DER_LENGTH_AT] == 0x30
    body = blob[DER_LENGTH_AT + 1 :]
    with pytest.raises(AdfsBlobError):
        parse(blob[:DER_LENGTH_AT] + length + body)


def test_ciphertext_not_a_whole_number_of_blocks_is_refused() -> None:
    blob = encode(b"x" * 40)  # 48 bytes of ciphertext
    head, body = blob[:DER_LENGTH_AT], blob[DER_LENGTH_AT + 1 :]
    shorter = body[:15] + body[16:]  # a byte less of ciphertext, the MAC kept
    with pytest.raises(AdfsBlobError, match="multiple of 16"):
        parse(head + der_length(len(shorter)) + shorter)


def test_bad_padding_behind_a_good_mac_is_a_blob_error_not_a_key_mismatch() -> None:
    blob = encode(bytes(31) + b"\x11", pad=False)  # a "padding" byte of 17: invalid
    with pytest.raises(AdfsBlobError) as caught:
        open_pfx(blob, DKM_KEY)
    assert not isinstance(caught.value, AdfsKeyMismatchError)
    assert "padding" in caught.value.what
    assert caught.value.__cause__ is None


# --- the KDF ---------------------------------------------------------------------------


@given(
    dkm_key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=32, max_size=32),
)
@settings(max_examples=50, deadline=None)
def test_kdf_agrees_with_cryptography_kbkdfhmac(dkm_key: bytes, nonce: bytes) -> None:
    assert derive_keys(dkm_key, nonce) == reference_keys(dkm_key, nonce)


def test_kbkdfhmac_label_form_encodes_bits_not_bytes() -> None:
    # Why reference_keys passes "fixed": with label and context, KBKDFHMAC writes
    # L = 384 (bits, as SP 800-108 says), which is not what AD FS does.
    standard = KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=48,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=AES128_CBC_OID + SHA256_OID,
        context=NONCE,
        fixed=None,
    ).derive(DKM_KEY)
    aes_key, hmac_key = derive_keys(DKM_KEY, NONCE)
    assert standard != aes_key + hmac_key


def test_kdf_known_answer_from_a_real_adfs_farm() -> None:
    # A DKM key and a token-signing EncryptedPfx of an AD FS 2019 farm, both printed
    # by ADFSDump in public write-ups of the Hack The Box lab "Ghost" (ghost.htb).
    # The expected keys were computed once and confirmed against that whole blob:
    # its MAC verifies under them, and it decrypts to a passwordless PKCS#12 of
    # "CN=ADFS Signing - federation.ghost.htb". Only the values needed here are kept.
    dkm_key = bytes.fromhex("8daca490702b3fd608d5bc35a9848756d2fa3b7b7413a3c62c58a6f458fb9da1")
    nonce = bytes.fromhex("ddfc2e98854e960ba31d95dd22f7927641835eaeb5b7aaab021eb2d6de506e1e")
    iv = bytes.fromhex("49bc7dd5ce3fd296f7b6328e009a3cad")
    first_block = bytes.fromhex("c112bf2441e912d6228789ce064e9e00")
    aes_key, hmac_key = derive_keys(dkm_key, nonce)
    assert aes_key == bytes.fromhex("5d72b218bb03299ad89ac92c805813b7")
    assert hmac_key == bytes.fromhex(
        "d8461ce3fc0f9c03988d97449c09840c997a937aeb328150e37b3a7b32b96ee4"
    )
    assert reference_keys(dkm_key, nonce) == (aes_key, hmac_key)
    # The first block decrypts to the start of a PKCS#12: SEQUENCE of 0x1079 bytes,
    # version 3, then the authSafe ContentInfo (SEQUENCE, OID 1.2.840.113549.1.7...).
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    assert decryptor.update(first_block) == bytes.fromhex("308210790201033082103506092a8648")


def test_real_adfs_header_parses() -> None:
    # The first 115 bytes of the same public blob; the 4 256 bytes of ciphertext
    # and MAC it announces are replaced by zeros (so its MAC cannot verify).
    header = bytes.fromhex(
        "000000010000000004100172 1e535787 6543b246 bc28c4f1 5dba"
        "0609608648016503040201 0609608648016503040201 0609608648016503040102"
        "0420ddfc2e98854e960ba31d95dd22f7927641835eaeb5b7aaab021eb2d6de506e1e"
        "041049bc7dd5ce3fd296f7b6328e009a3cad 20 8210a0"
    )
    assert len(header) == 115
    parsed = parse(header + bytes(0x10A0))
    assert parsed.key_id == uuid.UUID("531e7201-8757-4365-b246-bc28c4f15dba")
    assert len(parsed.ciphertext) == 0x10A0 - 32
    dkm_key = bytes.fromhex("8daca490702b3fd608d5bc35a9848756d2fa3b7b7413a3c62c58a6f458fb9da1")
    with pytest.raises(AdfsKeyMismatchError):
        decrypt(parsed, dkm_key)


# --- misuse and secrecy --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_dkm_key_of_the_wrong_length_is_a_value_error(ec_blob: bytes, size: int) -> None:
    with pytest.raises(ValueError, match="dkm_key must be 32 bytes") as caught:
        decrypt(parse(ec_blob), bytes(size))
    assert not isinstance(caught.value, AdfsBlobError)
    with pytest.raises(ValueError, match="dkm_key"):
        derive_keys(bytes(size), NONCE)


def test_nonce_of_the_wrong_length_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nonce"):
        derive_keys(DKM_KEY, NONCE[:31])


def test_encrypted_pfx_refuses_impossible_fields(ec_blob: bytes) -> None:
    parsed = parse(ec_blob)
    for changes in (
        {"nonce": NONCE[:31]},
        {"iv": IV + b"\x00"},
        {"mac": b""},
        {"ciphertext": b""},
        {"ciphertext": bytes(17)},
        {"version": 2},
        {"method": 1},
    ):
        with pytest.raises(ValueError, match="EncryptedPfx"):
            replace(parsed, **changes)


def test_repr_is_short_and_shows_nothing_but_ids_and_lengths(ec_blob: bytes) -> None:
    parsed = parse(ec_blob)
    text = repr(parsed)
    assert text == (
        f"EncryptedPfx(version=1, method=0, key_id={KEY_ID}, "
        f"ciphertext=<{len(parsed.ciphertext)} bytes>)"
    )
    for value in (parsed.nonce, parsed.iv, parsed.mac, parsed.ciphertext[:8]):
        assert value.hex() not in text


def test_messages_never_contain_the_nonce_or_the_plaintext(ec_pkcs12: bytes) -> None:
    blobs = [
        encode(ec_pkcs12, dkm_key=OTHER_DKM_KEY),  # key mismatch
        encode(bytes(31) + b"\x11", pad=False),  # bad padding
        encode(ec_pkcs12, version=7),
        encode(ec_pkcs12, mac_oid=HMAC_SHA256_OID),
        encode(ec_pkcs12)[:-1],
    ]
    for blob in blobs:
        with pytest.raises(AdfsBlobError) as caught:
            open_pfx(blob, DKM_KEY)
        message = caught.value.diagnostics()
        assert "\n" not in message
        for secret in (DKM_KEY, OTHER_DKM_KEY, NONCE, ec_pkcs12[:16]):
            assert secret.hex() not in message.lower()
