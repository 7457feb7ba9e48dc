"""Escrow files in the age v1 format: round trips, the real age tool both ways, the spec's
test vectors, and every way a file can fail to open."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from farmkeys.errors import EscrowError
from farmkeys.formats import escrow_file
from farmkeys.formats.escrow_file import CHUNK_BYTES, TAG_BYTES, decrypt, encrypt

PASSPHRASE = "correct horse battery staple é".encode()
FAST = 10  # work factor for tests: 2^10 scrypt rounds, milliseconds instead of a second
PLAINTEXT = b"master key 0f3c: escrow"

# Fixed "randomness" for files whose payload the tests rebuild by hand.
FILE_KEY = bytes(range(16))
SALT = bytes(range(16, 32))
NONCE = bytes(range(32, 48))

# The recognisable part of each class of failure.
NOT_AGE = "is not an age file"
NOT_PASSPHRASE = "not sealed with a passphrase"
WRONG = "wrong passphrase for the escrow file, or the file is damaged"
DAMAGED = "is damaged or truncated"
TAMPERED = "its header does not match its MAC"
NOT_ALONE = "scrypt (passphrase) stanza is not alone"
NOT_CANONICAL = "not canonical base64"
NOT_DECIMAL = "not a plain decimal number"
TOO_HIGH = "asks for an scrypt work factor of"


def sealed(plaintext: bytes = PLAINTEXT, work_factor: int = FAST) -> bytes:
    return encrypt(plaintext, PASSPHRASE, work_factor=work_factor)


def fixed(plaintext: bytes = PLAINTEXT) -> bytes:
    """A file sealed with FILE_KEY, SALT and NONCE, so its payload can be rebuilt."""
    return escrow_file._encrypt_with(
        plaintext, PASSPHRASE, work_factor=FAST, file_key=FILE_KEY, salt=SALT, nonce=NONCE
    )


def header_of(data: bytes) -> bytes:
    """The header of a file, through the LF of its MAC line."""
    return data[: data.index(b"\n", data.index(b"\n--- ") + 1) + 1]


def with_chunks(*chunks: tuple[bytes, bool]) -> bytes:
    """A genuine header and payload nonce, then (plaintext, is-final) chunks sealed as given."""
    aead = escrow_file._payload_aead(FILE_KEY, NONCE)
    sealed_chunks = [
        aead.encrypt(escrow_file._chunk_nonce(i, last=final), chunk, None)
        for i, (chunk, final) in enumerate(chunks)
    ]
    return header_of(fixed()) + NONCE + b"".join(sealed_chunks)


def refused(
    data: bytes, passphrase: bytes = PASSPHRASE, *, secret: bytes | None = None, **options: int
) -> EscrowError:
    """The EscrowError decrypt raises, checked to be one line that does not name ``secret``.

    ``secret`` is the passphrase given, unless that is a plain word the message may well
    hold ("wrong", in one of the spec's vectors).
    """
    with pytest.raises(EscrowError) as caught:
        decrypt(data, passphrase, **options)
    error = caught.value
    assert "\n" not in str(error)
    text = f"{error} {error.args!r}"
    for shown in {PASSPHRASE, passphrase if secret is None else secret}:
        assert shown.decode() not in text
        assert repr(shown) not in text
    return error


def flip(data: bytes, at: int, bit: int = 0x01) -> bytes:
    return data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]


# --- round trips and layout -------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES + 5],
)
def test_round_trip_restores_the_plaintext(size: int) -> None:
    plaintext = os.urandom(size)
    assert decrypt(sealed(plaintext), PASSPHRASE) == plaintext


def test_round_trip_at_the_default_work_factor() -> None:
    data = encrypt(PLAINTEXT, PASSPHRASE)
    assert b" 18\n" in header_of(data)
    assert decrypt(data, PASSPHRASE) == PLAINTEXT


def test_largest_plaintext_round_trips() -> None:
    plaintext = os.urandom(escrow_file.MAX_PLAINTEXT_BYTES)
    data = sealed(plaintext)
    assert len(data) <= escrow_file.MAX_FILE_BYTES
    assert decrypt(data, PASSPHRASE) == plaintext


def test_file_is_laid_out_as_the_spec_says() -> None:
    data = sealed()
    header = header_of(data)
    assert re.fullmatch(
        rb"age-encryption\.org/v1\n"
        rb"-> scrypt [A-Za-z0-9+/]{21}[AQgw] 10\n"  # 16 bytes: the last character holds 2 bits
        rb"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]\n"  # 32 bytes: the last character holds 4 bits
        rb"--- [A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]\n",
        header,
    )
    payload = data[len(header) :]
    assert len(payload) == escrow_file.PAYLOAD_NONCE_BYTES + len(PLAINTEXT) + TAG_BYTES


def test_empty_plaintext_is_one_empty_final_chunk() -> None:
    data = sealed(b"")
    assert len(data) - len(header_of(data)) == escrow_file.PAYLOAD_NONCE_BYTES + TAG_BYTES


def test_plaintext_of_exactly_one_chunk_is_one_full_final_chunk() -> None:
    data = sealed(bytes(CHUNK_BYTES))
    payload = data[len(header_of(data)) :]
    assert len(payload) == escrow_file.PAYLOAD_NONCE_BYTES + CHUNK_BYTES + TAG_BYTES


def test_every_file_has_a_fresh_file_key_salt_and_nonce() -> None:
    first, second = sealed(), sealed()
    first_lines, second_lines = header_of(first).split(b"\n"), header_of(second).split(b"\n")
    assert first_lines[1] != second_lines[1]  # salt
    assert first_lines[2] != second_lines[2]  # wrapped file key
    assert first_lines[3] != second_lines[3]  # MAC, under another file key
    nonce_at = len(header_of(first))
    assert first[nonce_at : nonce_at + 16] != second[nonce_at : nonce_at + 16]


@pytest.mark.parametrize(
    ("body_bytes", "line_lengths"),
    [(0, [0]), (32, [43]), (47, [63]), (48, [64, 0]), (49, [64, 2]), (96, [64, 64, 0])],
)
def test_stanza_body_wraps_at_64_columns_and_ends_with_a_short_line(
    body_bytes: int, line_lengths: list[int]
) -> None:
    lines = escrow_file._wrapped(bytes(body_bytes)).split(b"\n")
    assert lines[-1] == b""  # every line ends with LF
    assert [len(line) for line in lines[:-1]] == line_lengths


# --- known answers: the spec's test vectors ---------------------------------------------

# From the age test kit, C2SP/CCTV age/testdata/ (commit 1e3d2860d46e94e777e1b17c7a6f2436387e3ecc,
# https://github.com/C2SP/CCTV/tree/main/age), every non-armored scrypt vector: the header
# after its version line, the payload in hex, the passphrase, and what decrypt must do.
# The vectors' plaintext is b"age" (sha256 013f5440...d2ab), their file key "YELLOW SUBMARINE".
VECTOR_FILE_KEY = b"YELLOW SUBMARINE"
VECTOR_SALT = base64.b64decode("rF0/NwblUHHTpgQgRpe5CQ==")
VECTOR_PLAINTEXT_SHA256 = "013f54400c82da08037759ada907a8b864e97de81c088a182062c4b5622fd2ab"
COMMON_PAYLOAD = "1b35c6e687dd00da3ac379ac9f742c21fd185a1b9e3ded739d14ac6a9a50124db866d8"
OPENS = b"age"
SPEC_VECTOR_HEADER = (  # the "scrypt" vector, the one that opens
    "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
    "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
    "--- IOXiQYStkoT1mvZW2tFOqZdhRVvj58egABx/sWfZQbc\n"
)

SCRYPT_VECTORS = [
    pytest.param(  # expect: success
        SPEC_VECTOR_HEADER,
        COMMON_PAYLOAD,
        "password",
        OPENS,
        id="scrypt",
    ),
    pytest.param(  # expect: header failure
        (
            "-> X25519 ajtqAvDEkVNr2B7zUOtq2mAQXDSBlNrVAuM/dKb5sT4\n"
            "U+hKlJ4isweJ9PKG7pgscmG3cPASLgTw7SOBpbZ8x2U\n"
            "-> scrypt 3d9y0G+8q1ffPQ0xJJatIQ 10\n"
            "foZolxuhRSL7IG7oaR+456IzkHtvue7j4mUjh3DB6EI\n"
            "--- yp4Z0lV1LEdkm1+uDCuPUV+9hIXbPKrBXKQ/f5Y03As\n"
        ),
        "02545e6bf4c6061c893e8f29eccd2c0b72b1cc466c9e062763cff41192829e9bb856b5",
        "password",
        NOT_ALONE,
        id="scrypt_and_x25519",
    ),
    pytest.param(  # expect: no match
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2abk\n"
            "--- SrAokXI05aok1vecCAoCV8gWjDJDHWjJhOWzMkMWRFM\n"
        ),
        COMMON_PAYLOAD,
        "password",
        WRONG,
        id="scrypt_bad_tag",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "-> scrypt GzXG5ofdANo6w3msn3QsIQ 10\n"
            "OveITuwxakv7k2oLnioNYF4Bhgz9KZ36pb098wDoAv8\n"
            "--- a5d+4Ay1evJhoDskIzuTZV9bBgKk4573VZNfuoWJDPE\n"
        ),
        "eecf62c7ce91b433274e68d4f2f9134cb74c5bfef7beaa52c8f0bc0e992c1e8331fb66",
        "password",
        NOT_ALONE,
        id="scrypt_double",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10 10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- bD1boyD2mrBqlBY+sUKnMoPbNVUEQz0di1yWSFM/eMs\n"
        ),
        COMMON_PAYLOAD,
        "password",
        "has 3 arguments, not 2",
        id="scrypt_extra_argument",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
            "mS3EyWBaVFSlC69BLnTvh6jp4x0GNGz4fjvm7/IeZ/HjGkufKkN26ZU\n"
            "--- +U4J6fXsGl1AdkxLjoSJ0lvUGPj/3XuN726BmKTwooU\n"
        ),
        "1b35c6e687dd00da3ac379ac9f742c215b3b1d939bca94caadc10eed9dbcbb72bc49f5",
        "password",
        "is 41 bytes, not 32",
        id="scrypt_long_file_key",
    ),
    pytest.param(  # expect: no match
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- IOXiQYStkoT1mvZW2tFOqZdhRVvj58egABx/sWfZQbc\n"
        ),
        COMMON_PAYLOAD,
        "wrong",
        WRONG,
        id="scrypt_no_match",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUZ\n"
            "--- Gv9VJQCscGbbIVgo1Xm1ANUhnoySLqukpLkSGzH+crk\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_CANONICAL,
        id="scrypt_not_canonical_body",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CR 10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- ICTA8viD2DrPbktjxaSm4Pvgd3DKGiJSL/vdStr9MYs\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_CANONICAL,
        id="scrypt_not_canonical_salt",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CRs1xuY 10\n"
            "JP7roI4ahATYBIWimTJaQii7ksmW/z+Aq0eSVr9HbLo\n"
            "--- p2iAunuF0fUVkNI7hUtH1BWFFn68WdOogdUeLa84nE4\n"
        ),
        "87dd00da3ac379ac9f742c21eecf62c730b276ffca0fe68e04e6a6379641ea3a8d8c12",
        "password",
        "is 20 bytes, not 16",
        id="scrypt_salt_long",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt 10\n"
            "W0mMthyhNJOV3debCwkQcUlNx/i6Ss/A07aQCrG5Gcw\n"
            "--- 1QsPcEbBSylfP4apakJqtDBJMrpd81rPuSLTCvdZx6E\n"
        ),
        "ac5d3f3706e55071d3a604204697b9090595c2f7f5dbaee80d7a018c2872058af3ce7c",
        "password",
        "has 1 argument, not 2",
        id="scrypt_salt_missing",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQg 10\n"
            "ZGF2/KEUvcpgN3Tx0IlLDplomb6zR8IFVE5A3VzU1gg\n"
            "--- Lq300cKdC3gevT3PNOr/reWypdfOX6oEmyfmOnCaAzk\n"
        ),
        "4697b9091b35c6e687dd00da3ac379ace4634c8f8f2ee44e0f4f646c5fc72d81bd1711",
        "password",
        "is 12 bytes, not 16",
        id="scrypt_salt_short",
    ),
    pytest.param(  # expect: no match
        (
            "-> Scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- In/TcKP5wDKP14sufF74poPZcpaLVECmfDt0G+yMIs4\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_PASSPHRASE,
        id="scrypt_uppercase",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 23\n"
            "qW9eVsT0NVb/Vswtw8kPIxUnaYmm9Px1dYmq2+4+qZA\n"
            "--- 38TpQMxQRRNMfmYYpBX6DDrPx4/QY5UmJnhPyVoX/cw\n"
        ),
        "ac5d3f3706e55071d3a604204697b9090595c2f7f5dbaee80d7a018c2872058af3ce7c",
        "password",
        "work factor of 2^23,",
        id="scrypt_work_factor_23",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 0xa\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- Zhfvm6wXgjB06Uuu4GdFFKOAkvLkoS964+CClpeHSUM\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_hex",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ aaaa10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- LLS9yf+aaj4fsMsjpV3AcdBA8Ili7KtBmoZx2BlxH8M\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_leading_garbage",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ +10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- asCGzSHSu5DwU7Y5j+nSrTohKoFNji9uK/3IksXnC4k\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_leading_plus",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 010\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- 6h3P4+w4yVp0e42ozUDcD/zmLUc/T2wlKERb95zfBZo\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_leading_zero_decimal",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 012\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- oQueMkJ1qYVHADU5Fx47ZA0gVIhYB3MVqBFakeRJwHQ\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_leading_zero_octal",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ\n"
            "1hqlaoCUpkgzYI+oTS0p1Nxm9u3Fjib8REjrwp40mRE\n"
            "--- 0naLaDEWL9m7y7NtIxEc8OmxbN72KyZruckNXv1m9VM\n"
        ),
        COMMON_PAYLOAD,
        "password",
        "has 1 argument, not 2",
        id="scrypt_work_factor_missing",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ -10\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- 8i2OZ5glMFFnnNyfhPN9VvvEDsJzw/Q8X4th/e7rjC0\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_negative",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 9223372036854775818\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- UobSKIIhfCsmXF2/8AKSvvSZIkz/Y31Ipf7YARIFcB0\n"
        ),
        COMMON_PAYLOAD,
        "password",
        "work factor of 2^9223372036854775818,",
        id="scrypt_work_factor_overflow",
    ),
    pytest.param(  # not a CCTV vector: leading_garbage with the garbage after the digits
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10aaaa\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- LLS9yf+aaj4fsMsjpV3AcdBA8Ili7KtBmoZx2BlxH8M\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_trailing_garbage",
    ),
    pytest.param(  # expect: no match
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 10\n"
            "1hqlaoCUpkgzYI+oTS0p1Nxm9u3Fjib8REjrwp40mRE\n"
            "--- i9lHiMJydkXC7XcQk/j7lrJGmCfzI/L2cfJqGy6jT8I\n"
        ),
        COMMON_PAYLOAD,
        "password",
        WRONG,
        id="scrypt_work_factor_wrong",
    ),
    pytest.param(  # expect: header failure
        (
            "-> scrypt rF0/NwblUHHTpgQgRpe5CQ 0\n"
            "gUjEymFKMVXQEKdMMHL24oYexjE3TIC0O0zGSqJ2aUY\n"
            "--- a+ZwnySFgU+1ZDOps5Ba45mz9PC/mrkOlb068FfXMS8\n"
        ),
        COMMON_PAYLOAD,
        "password",
        NOT_DECIMAL,
        id="scrypt_work_factor_zero",
    ),
]


def vector(header: str, payload_hex: str) -> bytes:
    return b"age-encryption.org/v1\n" + header.encode("ascii") + bytes.fromhex(payload_hex)


@pytest.mark.parametrize(("header", "payload_hex", "passphrase", "expected"), SCRYPT_VECTORS)
def test_spec_scrypt_vectors(
    header: str, payload_hex: str, passphrase: str, expected: bytes | str
) -> None:
    data = vector(header, payload_hex)
    if isinstance(expected, bytes):
        plaintext = decrypt(data, passphrase.encode())
        assert plaintext == expected
        assert hashlib.sha256(plaintext).hexdigest() == VECTOR_PLAINTEXT_SHA256
    else:
        assert expected in refused(data, passphrase.encode(), secret=PASSPHRASE).what


def test_spec_vector_is_reproduced_byte_for_byte_from_its_randomness() -> None:
    data = vector(SPEC_VECTOR_HEADER, COMMON_PAYLOAD)
    payload_nonce = bytes.fromhex(COMMON_PAYLOAD)[:16]
    rebuilt = escrow_file._encrypt_with(
        b"age",
        b"password",
        work_factor=10,
        file_key=VECTOR_FILE_KEY,
        salt=VECTOR_SALT,
        nonce=payload_nonce,
    )
    assert rebuilt == data


# --- interop with the real age tool -----------------------------------------------------

AGE_TIMEOUT = 180.0  # seconds; generous for a loaded 2-core machine running scrypt at 2^18


def age_tool() -> str:
    """The path of the real age tool; fails the calling test (never skips it) if absent."""
    path = shutil.which("age")
    if path is None:
        pytest.fail(
            "the age tool is not installed, and the escrow interop tests need the real one — "
            "apt-get install age (make test installs it)",
            pytrace=False,
        )
    return path


def run_on_terminal(argv: list[str], answers: list[tuple[bytes, bytes]]) -> bytes:
    """Run ``argv`` with a pseudo-terminal as its stdin, typing each answer at its prompt.

    age reads a passphrase only from a terminal: /dev/tty, or stdin if that is one. The
    child gets a session of its own (so no controlling terminal, and no chance of reading
    the terminal pytest runs in) and the pty as stdin. Each answer is typed only once its
    prompt has appeared. Returns stdout; fails the test if age exits non-zero or stalls.
    """
    deadline = time.monotonic() + AGE_TIMEOUT
    primary, secondary = os.openpty()
    try:
        process = subprocess.Popen(
            argv,
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    finally:
        os.close(secondary)
    shown = b""
    try:
        for prompt, answer in answers:
            while prompt not in shown:
                wait = max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([primary], [], [], wait)
                try:
                    chunk = os.read(primary, 4096) if ready else b""
                except OSError:  # EIO: every copy of the pty's other end is closed, age exited
                    chunk = b""
                if not chunk:
                    process.kill()
                    _, stderr = process.communicate()
                    pytest.fail(
                        f"{argv[0]} did not prompt {prompt!r} (terminal showed {shown!r}, "
                        f"stderr {stderr!r})"
                    )
                shown += chunk
            shown = shown[shown.index(prompt) + len(prompt) :]
            os.write(primary, answer + b"\n")
        stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        process.kill()
        process.communicate()
        raise
    finally:
        os.close(primary)
    assert process.returncode == 0, f"{argv} exited {process.returncode}: {stderr!r}"
    return stdout


def age_decrypt(path: Path, passphrase: bytes) -> bytes:
    argv = [age_tool(), "--decrypt", str(path)]
    return run_on_terminal(argv, [(b"Enter passphrase:", passphrase)])


INTEROP_SIZES = [0, CHUNK_BYTES, 2 * CHUNK_BYTES + 1000]


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_age_decrypts_what_farmkeys_encrypts(tmp_path: Path, size: int) -> None:
    plaintext = os.urandom(size)
    path = tmp_path / "escrow.age"
    path.write_bytes(sealed(plaintext))
    assert age_decrypt(path, PASSPHRASE) == plaintext


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_farmkeys_decrypts_what_age_encrypts(tmp_path: Path, size: int) -> None:
    plaintext = os.urandom(size)
    source, target = tmp_path / "plain", tmp_path / "escrow.age"
    source.write_bytes(plaintext)
    # age asks twice (the second to confirm); an empty answer would make it pick a passphrase.
    run_on_terminal(
        [age_tool(), "--passphrase", "--output", str(target), str(source)],
        [(b"Enter passphrase", PASSPHRASE), (b"Confirm passphrase:", PASSPHRASE)],
    )
    data = target.read_bytes()
    assert b"-> scrypt " in header_of(data)
    assert decrypt(data, PASSPHRASE, max_work_factor=escrow_file.DEFAULT_WORK_FACTOR) == plaintext


def test_age_decrypts_a_file_built_from_fixed_randomness(tmp_path: Path) -> None:
    plaintext = bytes(range(256)) * 300  # two chunks, the second short
    path = tmp_path / "known.age"
    path.write_bytes(fixed(plaintext))
    assert age_decrypt(path, PASSPHRASE) == plaintext


def test_age_decrypts_the_spec_vector(tmp_path: Path) -> None:
    path = tmp_path / "vector.age"
    path.write_bytes(vector(SPEC_VECTOR_HEADER, COMMON_PAYLOAD))
    assert age_decrypt(path, b"password") == b"age"


# --- every way a file can fail to open --------------------------------------------------


def test_wrong_passphrase_is_refused() -> None:
    error = refused(sealed(), b"correct horse battery staple e")
    assert error.what == WRONG


def test_flipped_bit_in_the_mac_is_refused_as_tampered() -> None:
    data = sealed()
    header = header_of(data)
    mac = base64.b64decode(header[-44:-1] + b"=")
    forged_mac = base64.b64encode(flip(mac, 0)).rstrip(b"=")
    forged = header[:-44] + forged_mac + b"\n" + data[len(header) :]
    assert TAMPERED in refused(forged).what


def test_flipped_bit_in_the_wrapped_file_key_reads_as_a_wrong_passphrase() -> None:
    data = sealed()
    body_at = data.index(b"\n", data.index(b"-> scrypt")) + 1
    # The first character of the body carries six whole bits: any other letter is canonical.
    other = b"B" if data[body_at : body_at + 1] == b"A" else b"A"
    forged = data[:body_at] + other + data[body_at + 1 :]
    assert refused(forged).what == WRONG


def test_every_single_bit_flip_in_the_header_is_refused() -> None:
    data = sealed()
    for at in range(len(header_of(data))):
        for bit in (0x01, 0x20):
            with pytest.raises(EscrowError):
                decrypt(flip(data, at, bit), PASSPHRASE)


@pytest.mark.parametrize(
    ("where", "offset"),
    [("payload nonce", 0), ("first ciphertext byte", 16), ("last tag byte", -1)],
)
def test_flipped_bit_in_the_payload_is_refused(where: str, offset: int) -> None:
    data = sealed(os.urandom(CHUNK_BYTES + 100))
    at = len(header_of(data)) + offset if offset >= 0 else len(data) + offset
    assert DAMAGED in refused(flip(data, at)).what


def test_file_truncated_mid_chunk_is_refused() -> None:
    data = sealed(os.urandom(CHUNK_BYTES + 100))
    error = refused(data[:-1])
    assert DAMAGED in error.what
    assert "chunk 2 does not authenticate" in error.what


def test_file_truncated_at_a_chunk_boundary_is_refused() -> None:
    data = sealed(os.urandom(CHUNK_BYTES + 100))
    cut = len(header_of(data)) + escrow_file.PAYLOAD_NONCE_BYTES + CHUNK_BYTES + TAG_BYTES
    error = refused(data[:cut])
    assert DAMAGED in error.what
    assert "ends after chunk 1, without its final chunk" in error.what


@pytest.mark.parametrize("keep", [0, 1, escrow_file.PAYLOAD_NONCE_BYTES, 31])
def test_file_with_its_payload_cut_away_is_refused(keep: int) -> None:
    data = sealed()
    error = refused(data[: len(header_of(data)) + keep])
    assert "its payload is missing or cut short" in error.what


@pytest.mark.parametrize("keep", [22, 40, 80, 120])
def test_file_truncated_inside_its_header_is_refused(keep: int) -> None:
    error = refused(sealed()[:keep])
    assert DAMAGED in error.what
    assert "its header ends before its MAC line" in error.what


def test_file_cut_inside_its_version_line_is_not_an_age_file() -> None:
    assert NOT_AGE in refused(sealed()[:10]).what


def test_data_appended_after_a_full_final_chunk_is_refused() -> None:
    data = sealed(os.urandom(CHUNK_BYTES))
    error = refused(data + b"\x00")
    assert DAMAGED in error.what
    assert "data after its final chunk" in error.what


def test_data_appended_after_a_short_final_chunk_is_refused() -> None:
    data = sealed()
    assert DAMAGED in refused(data + b"\x00").what
    assert DAMAGED in refused(data + data).what


def test_empty_final_chunk_after_a_full_one_is_refused() -> None:
    data = with_chunks((bytes(CHUNK_BYTES), False), (b"", True))
    assert "its final payload chunk is empty" in refused(data).what


def test_a_second_final_chunk_is_refused() -> None:
    data = with_chunks((bytes(CHUNK_BYTES), True), (b"more", True))
    assert "data after its final chunk" in refused(data).what


def test_hand_built_chunks_open_when_well_formed() -> None:
    data = with_chunks((bytes(CHUNK_BYTES), False), (b"more", True))
    assert decrypt(data, PASSPHRASE) == bytes(CHUNK_BYTES) + b"more"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, world\n",
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
        b"age-encryption.org/v1\r\n-> scrypt AAAAAAAAAAAAAAAAAAAAAA 10\r\n",
        b"age-encryption.org/v2\n-> scrypt AAAAAAAAAAAAAAAAAAAAAA 10\n",
    ],
    ids=["empty", "text", "pem", "gzip", "crlf-mangled", "age-v2"],
)
def test_not_an_age_file_is_refused(data: bytes) -> None:
    error = refused(data)
    assert NOT_AGE in error.what


def test_armored_age_file_is_refused_with_a_way_out() -> None:
    armored = b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdlLWVuY3J5cHRpb24ub3JnL3YxCg==\n"
    error = refused(armored)
    assert "ASCII-armored" in error.what
    assert "age -d" in error.todo


X25519_STANZA = (
    b"-> X25519 ajtqAvDEkVNr2B7zUOtq2mAQXDSBlNrVAuM/dKb5sT4\n"
    b"U+hKlJ4isweJ9PKG7pgscmG3cPASLgTw7SOBpbZ8x2U\n"
)


def test_file_for_other_recipients_is_refused() -> None:
    data = b"age-encryption.org/v1\n" + X25519_STANZA + b"--- " + b"A" * 43 + b"\n" + bytes(32)
    error = refused(data)
    assert NOT_PASSPHRASE in error.what
    assert "X25519" in error.what


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("kind", ["scrypt", "X25519"])
def test_a_second_stanza_is_refused(kind: str, position: str) -> None:
    data = sealed()
    lines = data.split(b"\n", 3)  # version, stanza, body, rest
    stanza = lines[1] + b"\n" + lines[2] + b"\n"
    other = stanza if kind == "scrypt" else X25519_STANZA
    stanzas = other + stanza if position == "before" else stanza + other
    assert NOT_ALONE in refused(lines[0] + b"\n" + stanzas + lines[3]).what


def non_canonical(text: bytes) -> bytes:
    """``text`` with unused low bits set in its last character: the same bytes, other text."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = alphabet.index(text[-1:])
    assert value & 1 == 0, "canonical base64 of 16 or 32 bytes has its low bit clear"
    return text[:-1] + alphabet[value | 1 : (value | 1) + 1]


@pytest.mark.parametrize("field", ["salt", "body", "mac"])
def test_non_canonical_base64_is_refused(field: str) -> None:
    data = sealed()
    header = header_of(data)
    version, stanza, body, mac_line, _ = header.split(b"\n")
    if field == "salt":
        word = stanza.split(b" ")[2]
        stanza = stanza.replace(word, non_canonical(word))
    elif field == "body":
        body = non_canonical(body)
    else:
        mac_line = non_canonical(mac_line)
    forged = b"\n".join([version, stanza, body, mac_line, b""]) + data[len(header) :]
    error = refused(forged)
    assert DAMAGED in error.what
    if field != "mac":
        assert NOT_CANONICAL in error.what


def test_padded_base64_is_refused() -> None:
    data = sealed()
    version, stanza, rest = data.split(b"\n", 2)
    salt = stanza.split(b" ")[2]
    padded = version + b"\n" + stanza.replace(salt, salt + b"==") + b"\n" + rest
    assert NOT_CANONICAL in refused(padded).what


def test_work_factor_above_the_max_is_refused_before_scrypt_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_scrypt(*_: object) -> bytes:
        raise AssertionError("scrypt ran for a file asking too much")

    data = sealed().replace(b" 10\n", b" 21\n", 1)
    monkeypatch.setattr(escrow_file, "_wrap_key", no_scrypt)
    error = refused(data)
    assert f"{TOO_HIGH} 2^21, more than the 2^20" in error.what
    assert "age -d" in error.todo


def test_lower_max_work_factor_refuses_a_file_above_it() -> None:
    assert TOO_HIGH in refused(sealed(work_factor=FAST), max_work_factor=FAST - 1).what
    assert decrypt(sealed(work_factor=FAST), PASSPHRASE, max_work_factor=FAST) == PLAINTEXT


def test_oversize_file_is_refused_unread() -> None:
    error = refused(b"age-encryption.org/v1\n" + bytes(escrow_file.MAX_FILE_BYTES))
    assert "more than the" in error.what


def test_overlong_header_is_refused() -> None:
    data = b"age-encryption.org/v1\n-> scrypt " + b"A" * escrow_file.MAX_HEADER_BYTES
    assert "header is longer than" in refused(data).what


# --- misuse by the calling code ---------------------------------------------------------


def test_empty_passphrase_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="passphrase must not be empty"):
        encrypt(PLAINTEXT, b"", work_factor=FAST)
    with pytest.raises(ValueError, match="passphrase must not be empty"):
        decrypt(sealed(), b"")


@pytest.mark.parametrize("passphrase", [b"two\nlines", b"carriage\rreturn"])
def test_passphrase_age_could_not_read_from_a_terminal_is_a_value_error(
    passphrase: bytes,
) -> None:
    with pytest.raises(ValueError, match="line break"):
        encrypt(PLAINTEXT, passphrase, work_factor=FAST)


@pytest.mark.parametrize("work_factor", [0, -1, escrow_file.MAX_WORK_FACTOR + 1, True])
def test_work_factor_out_of_range_is_a_value_error(work_factor: int) -> None:
    with pytest.raises(ValueError, match="work_factor must be an integer from 1 to 20"):
        encrypt(PLAINTEXT, PASSPHRASE, work_factor=work_factor)


@pytest.mark.parametrize("max_work_factor", [0, escrow_file.WORK_FACTOR_LIMIT + 1])
def test_max_work_factor_out_of_range_is_a_value_error(max_work_factor: int) -> None:
    with pytest.raises(ValueError, match="max_work_factor must be an integer from 1 to 22"):
        decrypt(sealed(), PASSPHRASE, max_work_factor=max_work_factor)


def test_oversize_plaintext_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="more than the"):
        encrypt(bytes(escrow_file.MAX_PLAINTEXT_BYTES + 1), PASSPHRASE, work_factor=FAST)
