"""The native blob format: sealing, opening, and every way a blob can be bad."""

from __future__ import annotations

import os
import struct
import uuid

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from farmkeys.errors import InvalidBlobError
from farmkeys.formats import blob as blob_format
from farmkeys.formats.blob import BlobContext, master_key_id, open_blob, reseal, seal

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KEY_ID = uuid.UUID("6f1c2a3e-9d4b-4c8e-a1f2-0123456789ab")
NEW_KEY_ID = uuid.UUID("0e8f7a6b-5c4d-4e3f-8a9b-fedcba987654")
CONTEXT = BlobContext(farm="contoso", certificate_id="cert-42", purpose="signing")
PLAINTEXT = b"pkcs#12!"  # small, so the exhaustive loops stay quick


def sealed(plaintext: bytes = PLAINTEXT, context: BlobContext = CONTEXT) -> bytes:
    return seal(plaintext, master_key=KEY, master_key_id=KEY_ID, context=context)


def assert_does_not_open(blob: bytes, *, key: bytes = KEY, context: BlobContext = CONTEXT) -> None:
    with pytest.raises(InvalidBlobError):
        open_blob(blob, master_key=key, context=context)


# --- round trip and layout -------------------------------------------------


def test_sealed_blob_opens_to_the_same_plaintext() -> None:
    assert open_blob(sealed(), master_key=KEY, context=CONTEXT) == PLAINTEXT


def test_empty_plaintext_round_trips() -> None:
    blob = sealed(b"")
    assert len(blob) == blob_format.MIN_BLOB_BYTES
    assert open_blob(blob, master_key=KEY, context=CONTEXT) == b""


def test_largest_plaintext_round_trips() -> None:
    plaintext = os.urandom(blob_format.MAX_PLAINTEXT_BYTES)
    blob = sealed(plaintext)
    assert len(blob) == blob_format.MAX_BLOB_BYTES
    assert open_blob(blob, master_key=KEY, context=CONTEXT) == plaintext


def test_blob_header_is_laid_out_as_documented() -> None:
    blob = sealed()
    assert blob[0:4] == b"FKEY"
    assert blob[4] == 1
    assert blob[5] == 1
    assert blob[6:22] == KEY_ID.bytes
    assert len(blob) == 34 + len(PLAINTEXT) + 16
    assert blob_format.HEADER_BYTES == 34
    assert blob_format.MIN_BLOB_BYTES == 50


def test_blob_built_by_hand_from_the_documentation_opens() -> None:
    # An independent encoder written from docs/blob-format.md: if the module
    # drifts from the document, this fails.
    nonce = bytes(12)
    header = b"FKEY" + b"\x01" + b"\x01" + KEY_ID.bytes + nonce
    fields = [b"contoso", b"cert-42", b"signing"]
    aad = header + b"farmkeys blob v1 row"
    for field in fields:
        aad += struct.pack(">H", len(field)) + field
    aead_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"farmkeys blob v1 aes-256-gcm"
    ).derive(KEY)
    blob = header + AESGCM(aead_key).encrypt(nonce, PLAINTEXT, aad)
    assert open_blob(blob, master_key=KEY, context=CONTEXT) == PLAINTEXT


def test_master_key_is_not_used_directly_as_the_aead_key() -> None:
    blob = sealed()
    nonce = blob[22:34]
    aad = blob[:34] + CONTEXT.encode()
    with pytest.raises(Exception):  # noqa: B017, PT011 - any failure proves the point
        AESGCM(KEY).decrypt(nonce, blob[34:], aad)


def test_every_seal_uses_a_fresh_nonce() -> None:
    blobs = [sealed() for _ in range(20)]
    nonces = {blob[22:34] for blob in blobs}
    assert len(nonces) == 20
    assert len(set(blobs)) == 20


# --- master_key_id -----------------------------------------------------------


def test_master_key_id_reads_the_id_from_the_header() -> None:
    assert master_key_id(sealed(), context=CONTEXT) == KEY_ID


def test_master_key_id_needs_no_key_and_ignores_the_ciphertext() -> None:
    blob = sealed()
    garbled = blob[:34] + bytes(len(blob) - 34)
    assert master_key_id(garbled, context=CONTEXT) == KEY_ID


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"FKEY",
        b"FKEY\x01\x01" + bytes(16 + 12 + 15),  # one byte short of the minimum
        b"XKEY\x01\x01" + bytes(16 + 12 + 16),
        b"FKEY\x02\x01" + bytes(16 + 12 + 16),
        b"FKEY\x01\x02" + bytes(16 + 12 + 16),
    ],
    ids=["empty", "magic-only", "short", "bad-magic", "unknown-version", "unknown-algorithm"],
)
def test_master_key_id_rejects_a_malformed_header(blob: bytes) -> None:
    with pytest.raises(InvalidBlobError):
        master_key_id(blob, context=CONTEXT)


def test_master_key_id_rejects_an_overlong_blob() -> None:
    blob = sealed() + bytes(blob_format.MAX_BLOB_BYTES)
    with pytest.raises(InvalidBlobError):
        master_key_id(blob, context=CONTEXT)


# --- every way a blob can be bad ---------------------------------------------


def test_blob_with_any_single_byte_flipped_does_not_open() -> None:
    blob = sealed()
    for position in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            edited = bytearray(blob)
            edited[position] ^= flip
            assert_does_not_open(bytes(edited))


def test_blob_truncated_at_any_length_does_not_open() -> None:
    blob = sealed()
    for length in range(len(blob)):
        assert_does_not_open(blob[:length])


def test_blob_with_bytes_appended_does_not_open() -> None:
    assert_does_not_open(sealed() + b"\x00")


def test_blob_does_not_open_under_another_master_key() -> None:
    assert_does_not_open(sealed(), key=OTHER_KEY)


def test_blob_copied_into_another_certificate_row_does_not_open() -> None:
    other = BlobContext(farm="contoso", certificate_id="cert-43", purpose="signing")
    assert_does_not_open(sealed(), context=other)


def test_blob_copied_to_the_other_purpose_does_not_open() -> None:
    other = BlobContext(farm="contoso", certificate_id="cert-42", purpose="decryption")
    assert_does_not_open(sealed(), context=other)


def test_blob_copied_into_another_farm_does_not_open() -> None:
    other = BlobContext(farm="fabrikam", certificate_id="cert-42", purpose="signing")
    assert_does_not_open(sealed(), context=other)


def test_context_fields_cannot_be_shifted_into_one_another() -> None:
    # Without length prefixes "ab"+"c" and "a"+"bc" would authenticate alike.
    one = BlobContext(farm="ab", certificate_id="c", purpose="signing")
    two = BlobContext(farm="a", certificate_id="bc", purpose="signing")
    assert one.encode() != two.encode()
    assert_does_not_open(sealed(context=one), context=two)


def test_header_naming_another_master_key_does_not_open() -> None:
    blob = bytearray(sealed())
    blob[6:22] = NEW_KEY_ID.bytes
    assert master_key_id(bytes(blob), context=CONTEXT) == NEW_KEY_ID
    assert_does_not_open(bytes(blob))


@pytest.mark.parametrize(
    ("offset", "value"),
    [(0, b"fkey"), (4, b"\x02"), (4, b"\x00"), (5, b"\x02"), (5, b"\x00"), (22, bytes(12))],
    ids=["magic", "version-2", "version-0", "algorithm-2", "algorithm-0", "nonce"],
)
def test_blob_with_an_edited_header_field_does_not_open(offset: int, value: bytes) -> None:
    blob = bytearray(sealed())
    blob[offset : offset + len(value)] = value
    assert_does_not_open(bytes(blob))


def test_not_authentic_error_names_the_certificate_and_purpose_but_never_the_key() -> None:
    with pytest.raises(InvalidBlobError) as caught:
        open_blob(sealed(), master_key=OTHER_KEY, context=CONTEXT)
    error = caught.value
    text = f"{error} {error.what} {error.todo} {error.args!r}"
    assert "cert-42" in error.what
    assert "signing" in error.what
    assert "not authentic" in error.what
    assert "replace the certificate" in error.todo
    for key in (KEY, OTHER_KEY):
        assert key.hex() not in text.lower()
        assert repr(key) not in text
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_every_failure_gives_the_same_message() -> None:
    blob = sealed()
    failures = []
    for bad in (blob[:10], b"XKEY" + blob[4:], blob[:-1] + bytes([blob[-1] ^ 1])):
        with pytest.raises(InvalidBlobError) as caught:
            open_blob(bad, master_key=KEY, context=CONTEXT)
        failures.append(str(caught.value))
    with pytest.raises(InvalidBlobError) as caught:
        open_blob(blob, master_key=OTHER_KEY, context=CONTEXT)
    failures.append(str(caught.value))
    assert len(set(failures)) == 1


# --- misuse by the caller is a ValueError -----------------------------------


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_seal_refuses_a_master_key_of_the_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        seal(PLAINTEXT, master_key=bytes(length), master_key_id=KEY_ID, context=CONTEXT)


def test_open_refuses_a_master_key_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        open_blob(sealed(), master_key=bytes(16), context=CONTEXT)


def test_seal_refuses_an_oversize_plaintext() -> None:
    with pytest.raises(ValueError, match="more than"):
        sealed(bytes(blob_format.MAX_PLAINTEXT_BYTES + 1))


def test_wrong_key_length_message_does_not_show_the_key() -> None:
    key = b"\xab" * 31
    with pytest.raises(ValueError, match="32 bytes") as caught:
        seal(PLAINTEXT, master_key=key, master_key_id=KEY_ID, context=CONTEXT)
    assert "ab" not in str(caught.value)


@pytest.mark.parametrize("purpose", ["", "Signing", "encryption", "primary"])
def test_context_refuses_an_unknown_purpose(purpose: str) -> None:
    with pytest.raises(ValueError, match="purpose"):
        BlobContext(farm="contoso", certificate_id="cert-42", purpose=purpose)


@pytest.mark.parametrize(
    ("farm", "certificate_id"),
    [("", "cert-42"), ("contoso", ""), ("x" * 0x10000, "cert-42"), ("contoso", "\udc80")],
    ids=["empty-farm", "empty-certificate-id", "overlong-farm", "lone-surrogate"],
)
def test_context_refuses_fields_it_cannot_encode(farm: str, certificate_id: str) -> None:
    with pytest.raises(ValueError, match="BlobContext"):
        BlobContext(farm=farm, certificate_id=certificate_id, purpose="signing")


def test_context_is_immutable() -> None:
    with pytest.raises(AttributeError):
        CONTEXT.purpose = "decryption"  # type: ignore[misc]


# --- reseal (master-key rollover) -------------------------------------------


def test_resealed_blob_opens_under_the_new_key_and_names_it() -> None:
    blob = reseal(sealed(), old_key=KEY, new_key=OTHER_KEY, new_key_id=NEW_KEY_ID, context=CONTEXT)
    assert master_key_id(blob, context=CONTEXT) == NEW_KEY_ID
    assert open_blob(blob, master_key=OTHER_KEY, context=CONTEXT) == PLAINTEXT
    assert_does_not_open(blob, key=KEY)


def test_reseal_keeps_the_row_binding() -> None:
    blob = reseal(sealed(), old_key=KEY, new_key=OTHER_KEY, new_key_id=NEW_KEY_ID, context=CONTEXT)
    other = BlobContext(farm="contoso", certificate_id="cert-43", purpose="signing")
    assert_does_not_open(blob, key=OTHER_KEY, context=other)


def test_reseal_with_the_wrong_old_key_fails_as_not_authentic() -> None:
    with pytest.raises(InvalidBlobError):
        reseal(sealed(), old_key=OTHER_KEY, new_key=KEY, new_key_id=NEW_KEY_ID, context=CONTEXT)


def test_reseal_refuses_a_new_key_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="new_key"):
        reseal(sealed(), old_key=KEY, new_key=bytes(31), new_key_id=NEW_KEY_ID, context=CONTEXT)


def test_reseal_uses_a_fresh_nonce() -> None:
    blob = sealed()
    resealed = reseal(blob, old_key=KEY, new_key=KEY, new_key_id=KEY_ID, context=CONTEXT)
    assert resealed[22:34] != blob[22:34]
    assert open_blob(resealed, master_key=KEY, context=CONTEXT) == PLAINTEXT


# --- properties --------------------------------------------------------------

contexts = st.builds(
    BlobContext,
    farm=st.text(min_size=1, max_size=40),
    certificate_id=st.text(min_size=1, max_size=40),
    purpose=st.sampled_from(["signing", "decryption"]),
)

# Random bytes, and random bytes behind a well-formed header, so both the
# header checks and the authentication are exercised.
candidate_blobs = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda key_id, nonce, rest: b"FKEY\x01\x01" + key_id + nonce + rest,
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=12, max_size=12),
        st.binary(max_size=200),
    ),
)


@given(blob=candidate_blobs, key=st.binary(min_size=32, max_size=32), context=contexts)
@settings(max_examples=300)
def test_random_bytes_never_open(blob: bytes, key: bytes, context: BlobContext) -> None:
    with pytest.raises(InvalidBlobError):
        open_blob(blob, master_key=key, context=context)


@given(blob=candidate_blobs, context=contexts)
@settings(max_examples=300)
def test_master_key_id_of_random_bytes_is_an_id_or_invalid_blob(
    blob: bytes, context: BlobContext
) -> None:
    try:
        key_id = master_key_id(blob, context=context)
    except InvalidBlobError:
        return
    assert key_id.bytes == blob[6:22]


@given(
    plaintext=st.binary(max_size=4096),
    key=st.binary(min_size=32, max_size=32),
    key_id=st.uuids(),
    context=contexts,
)
@settings(max_examples=200)
def test_random_plaintexts_round_trip(
    plaintext: bytes, key: bytes, key_id: uuid.UUID, context: BlobContext
) -> None:
    blob = seal(plaintext, master_key=key, master_key_id=key_id, context=context)
    assert master_key_id(blob, context=context) == key_id
    assert open_blob(blob, master_key=key, context=context) == plaintext


@given(
    plaintext=st.binary(max_size=64), position=st.integers(min_value=0), flip=st.integers(1, 255)
)
@settings(max_examples=200)
def test_random_single_byte_edits_never_open(plaintext: bytes, position: int, flip: int) -> None:
    blob = bytearray(sealed(plaintext))
    blob[position % len(blob)] ^= flip
    assert_does_not_open(bytes(blob))
