"""Passphrase-sealed files in the age v1 format: the escrow files of master keys.

An escrow file is an ordinary age file (age-encryption.org/v1, specified at
https://c2sp.org/age) sealed with the scrypt passphrase recipient and no
other, so an operator can open it with the standard ``age -d`` tool without
farmkeys, and a file made with ``age -p`` opens here. Only that subset of age
is read or written: no X25519 or plugin recipients, no ASCII armor. Pure: no
I/O, no clock; the only side input is ``os.urandom`` for the file key, the
salt and the payload nonce, which the caller never chooses.

Layout. The header is text, lines ending in LF; base64 is the standard
alphabet without ``=`` padding, always canonical (the unused low bits of the
last character are zero), and a stanza body is wrapped at 64 columns and
ends with a line shorter than 64 (empty if the body is a multiple of 48
bytes)::

    age-encryption.org/v1                                    (VERSION_LINE)
    -> scrypt <salt: 16 random bytes, base64> <work factor w, decimal>
    <body: the wrapped file key, 32 bytes, base64 (one line of 43 characters)>
    --- <MAC: 32 bytes, base64>
    <payload, binary:>
      16 bytes   payload nonce, random for every file         (PAYLOAD_NONCE_BYTES)
      n chunks   ChaCha20-Poly1305 of 64 KiB of plaintext each (CHUNK_BYTES),
                 the last one 1 to 64 KiB, each with its 16-byte tag

Keys, all from a 16-byte file key drawn fresh for every file
(``FILE_KEY_BYTES``):

- wrap key = ``scrypt(passphrase, salt = SCRYPT_LABEL || salt, N = 2**w,
  r = 8, p = 1, 32 bytes)``; the body is ChaCha20-Poly1305 of the file key
  under it with a nonce of 12 zero bytes;
- MAC key = ``HKDF-SHA256(ikm = file key, salt = empty, info = "header")``;
  the MAC is HMAC-SHA256 over the header from its first byte up to and
  including the ``---`` of the last line (not the space after it);
- payload key = ``HKDF-SHA256(ikm = file key, salt = payload nonce,
  info = "payload")``; chunk ``i`` (from 0) is sealed with the nonce
  ``i`` as 11 bytes big-endian, then ``0x01`` for the last chunk and ``0x00``
  for every other (STREAM). The last chunk is empty only when the whole
  plaintext is, so a plaintext of exactly 64 KiB is one full last chunk.

The scrypt stanza must be the only stanza of the header. age forbids mixing
it with others to keep what a passphrase file implies: that whoever made it
knew the passphrase. Another recipient would learn the file key, and could
then forge a file that opens under the passphrase.

Work factor: 2**w rounds of scrypt need ``128 * 8 * 2**w`` bytes of memory
(256 MiB at the default ``DEFAULT_WORK_FACTOR`` of 18, what ``age -p``
uses). ``decrypt`` refuses files asking for more than ``max_work_factor``
(default ``MAX_WORK_FACTOR``, 20: 1 GiB) before running scrypt, so a
damaged or hostile file cannot make the host that opens it allocate 4 GiB
as age's own limit of 22 would allow; a caller may raise it to
``WORK_FACTOR_LIMIT`` (22) for a foreign file.

Every way a file can fail to open raises one
:class:`~farmkeys.errors.EscrowError` with a one-line ``what`` that names
the class of failure (not an age file; not sealed with a passphrase; wrong
passphrase, or the file is damaged; damaged or truncated; work factor too
high; too large) and never the passphrase or any key. A wrong passphrase and
a damaged stanza are indistinguishable by design: both fail to unwrap the
file key. Misuse by the calling code (an empty passphrase, a work factor out
of range, an oversize plaintext) is a :class:`ValueError`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from farmkeys.errors import EscrowError

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_WORK_FACTOR",
    "FILE_KEY_BYTES",
    "MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_PLAINTEXT_BYTES",
    "MAX_WORK_FACTOR",
    "PAYLOAD_NONCE_BYTES",
    "SALT_BYTES",
    "SCRYPT_LABEL",
    "TAG_BYTES",
    "VERSION_LINE",
    "WORK_FACTOR_LIMIT",
    "decrypt",
    "encrypt",
]

VERSION_LINE: Final = b"age-encryption.org/v1\n"
SCRYPT_LABEL: Final = b"age-encryption.org/v1/scrypt"
"""Prefixed to the stanza's salt to make scrypt's salt."""

FILE_KEY_BYTES: Final = 16
SALT_BYTES: Final = 16
PAYLOAD_NONCE_BYTES: Final = 16
TAG_BYTES: Final = 16
CHUNK_BYTES: Final = 64 * 1024
"""Plaintext per STREAM chunk; each chunk on disk is ``TAG_BYTES`` longer."""

DEFAULT_WORK_FACTOR: Final = 18
"""log2 of scrypt's N for files farmkeys writes: what ``age -p`` uses (256 MiB, about 1 s)."""
MAX_WORK_FACTOR: Final = 20
"""The largest work factor ``decrypt`` accepts by default: 1 GiB of memory, two steps above
what farmkeys and ``age -p`` write; age's own limit of 22 would let a file demand 4 GiB."""
WORK_FACTOR_LIMIT: Final = 22
"""The largest ``max_work_factor`` a caller may pass: age's own default limit."""

MAX_PLAINTEXT_BYTES: Final = 16 * 1024 * 1024
"""The largest plaintext sealed; an escrow file of master keys is a few KiB."""
MAX_HEADER_BYTES: Final = 64 * 1024
"""The longest header read. A passphrase header is under 200 bytes; the room is there so
that a file for other recipients is still recognised as one (and refused as such)."""
_MAX_CHUNKS: Final = -(-MAX_PLAINTEXT_BYTES // CHUNK_BYTES)
MAX_FILE_BYTES: Final = (
    MAX_HEADER_BYTES + PAYLOAD_NONCE_BYTES + MAX_PLAINTEXT_BYTES + _MAX_CHUNKS * TAG_BYTES
)
"""The largest file ``decrypt`` reads."""

_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_WRAP_KEY_BYTES: Final = 32
_WRAPPED_KEY_BYTES: Final = FILE_KEY_BYTES + TAG_BYTES
_MAC_BYTES: Final = 32
_ZERO_NONCE: Final = bytes(12)
_ENCRYPTED_CHUNK_BYTES: Final = CHUNK_BYTES + TAG_BYTES
_COLUMNS: Final = 64
_BYTES_PER_LINE: Final = _COLUMNS // 4 * 3  # 48
_STANZA_PREFIX: Final = b"->"
_MAC_PREFIX: Final = b"---"
_ARMOR_BEGIN: Final = b"-----BEGIN AGE ENCRYPTED FILE-----"
_AGE_PREFIX: Final = b"age-encryption.org/"

_BASE64: Final = re.compile(rb"[A-Za-z0-9+/]*")
_ARGUMENT: Final = re.compile(rb"[\x21-\x7e]+")  # VCHAR, at least one
_DECIMAL: Final = re.compile(r"[1-9][0-9]*")

_OTHER_COPY_TODO: Final = "use another copy of the escrow file; this one cannot be opened"


# --- errors -----------------------------------------------------------------------------


def _not_age(detail: str) -> EscrowError:
    return EscrowError(
        f"the escrow file is not an age file ({detail})",
        "give the escrow file farmkeys wrote, whose first line is age-encryption.org/v1, "
        "not another file or a copy converted to text",
    )


def _damaged(detail: str) -> EscrowError:
    return EscrowError(f"the escrow file is damaged or truncated: {detail}", _OTHER_COPY_TODO)


def _wrong_passphrase() -> EscrowError:
    return EscrowError(
        "wrong passphrase for the escrow file, or the file is damaged",
        "check the passphrase (exactly as typed when the file was sealed: case, spaces, "
        "keyboard layout) and try again; if it is right, use another copy of the escrow file",
    )


# --- base64 and the header --------------------------------------------------------------


def _b64encode(raw: bytes) -> bytes:
    return base64.b64encode(raw).rstrip(b"=")


def _b64decode(text: bytes) -> bytes | None:
    """The bytes ``text`` encodes, or None unless it is canonical unpadded standard base64."""
    if not _BASE64.fullmatch(text) or len(text) % 4 == 1:
        return None
    raw = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    # Re-encoding rejects set padding bits: "rF0/NwblUHHTpgQgRpe5CR" is not canonical.
    return raw if _b64encode(raw) == text else None


def _wrapped(body: bytes) -> bytes:
    """A stanza body as header lines: 64 columns each, the last one shorter (maybe empty)."""
    text = _b64encode(body)
    lines = [text[i : i + _COLUMNS] for i in range(0, len(text), _COLUMNS)]
    if not lines or len(lines[-1]) == _COLUMNS:
        lines.append(b"")
    return b"".join(line + b"\n" for line in lines)


@dataclass(frozen=True)
class _Stanza:
    type: str
    args: tuple[str, ...]
    body: bytes


@dataclass(frozen=True)
class _Header:
    stanzas: tuple[_Stanza, ...]
    mac: bytes
    mac_input: bytes
    """The header up to and including the "---" of its last line: what the MAC covers."""
    payload_at: int


def _line(data: bytes, at: int) -> tuple[bytes, int]:
    """The header line starting at ``at`` without its LF, and where the next one starts."""
    end = data.find(b"\n", at, MAX_HEADER_BYTES)
    if end < 0:
        if len(data) >= MAX_HEADER_BYTES:
            raise _damaged(f"its header is longer than {MAX_HEADER_BYTES} bytes")
        raise _damaged("its header ends before its MAC line")
    return data[at:end], end + 1


def _parse_header(data: bytes) -> _Header:
    """The parsed header of an age v1 file, strictly as the spec's grammar has it."""
    if not data.startswith(VERSION_LINE):
        if not data:
            raise _not_age("it is empty")
        if data.startswith(_ARMOR_BEGIN):
            raise EscrowError(
                "the escrow file is ASCII-armored age, not the binary age file farmkeys reads",
                "decrypt it with `age -d` and seal it again without -a/--armor",
            )
        if data.startswith(_AGE_PREFIX):
            raise _not_age("it is of an age format version other than v1")
        raise _not_age("it does not start with age-encryption.org/v1")
    stanzas: list[_Stanza] = []
    at = len(VERSION_LINE)
    while True:
        line, after = _line(data, at)
        if line.startswith(_MAC_PREFIX):
            parts = line.split(b" ")
            mac = _b64decode(parts[1]) if len(parts) == 2 and parts[0] == _MAC_PREFIX else None
            if mac is None or len(mac) != _MAC_BYTES:
                raise _damaged("its MAC line is malformed")
            if not stanzas:
                raise _damaged("its header has no recipient stanza")
            mac_input = data[: at + len(_MAC_PREFIX)]
            return _Header(tuple(stanzas), mac, mac_input, after)
        if not line.startswith(_STANZA_PREFIX):
            raise _damaged("its header has a line that is neither a stanza nor the MAC line")
        parts = line.split(b" ")
        if parts[0] != _STANZA_PREFIX or len(parts) < 2:
            raise _damaged("its header has a malformed stanza line")
        if not all(_ARGUMENT.fullmatch(arg) for arg in parts[1:]):
            raise _damaged("its header has a malformed stanza line")
        args = [arg.decode("ascii") for arg in parts[1:]]
        body = bytearray()
        while True:
            line, after = _line(data, after)
            chunk = _b64decode(line)
            if chunk is None:
                raise _damaged("a stanza body in its header is not canonical base64")
            if len(chunk) > _BYTES_PER_LINE:
                raise _damaged("a stanza body line in its header is longer than 64 columns")
            body += chunk
            if len(chunk) < _BYTES_PER_LINE:
                break
        stanzas.append(_Stanza(args[0], tuple(args[1:]), bytes(body)))
        at = after


def _shown(value: str, limit: int = 24) -> str:
    """A value read from the file, cut short for a message (it is printable ASCII already)."""
    return value if len(value) <= limit else value[:limit] + "…"


def _scrypt_stanza(header: _Header, max_work_factor: int) -> tuple[bytes, int, bytes]:
    """The salt, work factor and wrapped file key of the header's only stanza, a scrypt one."""
    stanzas = header.stanzas
    if not any(stanza.type == "scrypt" for stanza in stanzas):
        types = ", ".join(sorted({_shown(stanza.type) for stanza in stanzas})[:5])
        raise EscrowError(
            f"the escrow file is an age file but not sealed with a passphrase "
            f"(its recipient stanzas are of type {types})",
            "open it with `age -d -i <identity file>` instead, or give the escrow file "
            "farmkeys wrote",
        )
    if len(stanzas) != 1:
        raise _damaged("its scrypt (passphrase) stanza is not alone in its header, as age requires")
    (stanza,) = stanzas
    if len(stanza.args) != 2:
        count = len(stanza.args)
        raise _damaged(f"its scrypt stanza has {count} argument{'' if count == 1 else 's'}, not 2")
    salt = _b64decode(stanza.args[0].encode("ascii"))
    if salt is None:
        raise _damaged("the salt of its scrypt stanza is not canonical base64")
    if len(salt) != SALT_BYTES:
        raise _damaged(f"the salt of its scrypt stanza is {len(salt)} bytes, not {SALT_BYTES}")
    work_factor_text = stanza.args[1]
    if not _DECIMAL.fullmatch(work_factor_text):
        raise _damaged("the work factor of its scrypt stanza is not a plain decimal number")
    # Compared as text first: int() of thousands of digits is slow, and refused by Python.
    if len(work_factor_text) > 2 or int(work_factor_text) > max_work_factor:
        raise EscrowError(
            f"the escrow file asks for an scrypt work factor of 2^{_shown(work_factor_text)}, "
            f"more than the 2^{max_work_factor} farmkeys accepts",
            "if the file is genuine, decrypt it with `age -d` and seal it again with farmkeys; "
            "otherwise use another copy of the escrow file",
        )
    if len(stanza.body) != _WRAPPED_KEY_BYTES:
        # Checked before any decryption, as the spec requires (partitioning oracles).
        raise _damaged(
            f"the wrapped file key of its scrypt stanza is {len(stanza.body)} bytes, "
            f"not {_WRAPPED_KEY_BYTES}"
        )
    return salt, int(work_factor_text), stanza.body


# --- keys and the payload ---------------------------------------------------------------


def _wrap_key(passphrase: bytes, salt: bytes, work_factor: int) -> bytes:
    return Scrypt(
        salt=SCRYPT_LABEL + salt,
        length=_WRAP_KEY_BYTES,
        n=2**work_factor,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
    ).derive(passphrase)


def _hkdf(file_key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(file_key)


def _header_mac(file_key: bytes, mac_input: bytes) -> bytes:
    return hmac.new(_hkdf(file_key, b"", b"header"), mac_input, hashlib.sha256).digest()


def _payload_aead(file_key: bytes, nonce: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))


def _chunk_nonce(index: int, *, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _seal_payload(file_key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    aead = _payload_aead(file_key, nonce)
    chunks = [plaintext[i : i + CHUNK_BYTES] for i in range(0, len(plaintext), CHUNK_BYTES)]
    chunks = chunks or [b""]
    sealed = [
        aead.encrypt(_chunk_nonce(i, last=i == len(chunks) - 1), chunk, None)
        for i, chunk in enumerate(chunks)
    ]
    return nonce + b"".join(sealed)


def _open_payload(file_key: bytes, payload: bytes) -> bytes:
    """The plaintext of a STREAM payload (nonce, then chunks); EscrowError if not authentic."""
    if len(payload) < PAYLOAD_NONCE_BYTES + TAG_BYTES:
        raise _damaged("its payload is missing or cut short")
    aead = _payload_aead(file_key, payload[:PAYLOAD_NONCE_BYTES])
    body = payload[PAYLOAD_NONCE_BYTES:]
    pieces = [
        body[i : i + _ENCRYPTED_CHUNK_BYTES] for i in range(0, len(body), _ENCRYPTED_CHUNK_BYTES)
    ]
    plaintext = bytearray()
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        if last and index > 0 and len(piece) == TAG_BYTES:
            raise _damaged("its final payload chunk is empty")
        try:
            plaintext += aead.decrypt(_chunk_nonce(index, last=last), piece, None)
        except InvalidTag:
            raise _damaged(_why_chunk_fails(aead, index, piece, last=last)) from None
    return bytes(plaintext)


def _why_chunk_fails(aead: ChaCha20Poly1305, index: int, piece: bytes, *, last: bool) -> str:
    """What went wrong with a chunk that did not open where it stands (error path only)."""
    try:
        aead.decrypt(_chunk_nonce(index, last=not last), piece, None)
    except InvalidTag:
        return f"its payload chunk {index + 1} does not authenticate"
    if last:
        return f"its payload ends after chunk {index + 1}, without its final chunk"
    return f"its payload has data after its final chunk ({index + 1})"


# --- the recipe -------------------------------------------------------------------------


def _check_passphrase(passphrase: bytes) -> None:
    if not passphrase:
        raise ValueError("passphrase must not be empty")


def _check_work_factor(value: int, name: str, highest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= highest:
        raise ValueError(f"{name} must be an integer from 1 to {highest}, not {value!r}")


def encrypt(
    plaintext: bytes, passphrase: bytes, *, work_factor: int = DEFAULT_WORK_FACTOR
) -> bytes:
    """An age v1 file of ``plaintext`` sealed under ``passphrase``, as ``age -p`` writes it.

    The file key, salt and payload nonce are fresh randomness for every call.
    ``work_factor`` is log2 of scrypt's N; anything below the default is for
    tests. The file opens with ``age -d`` given the same passphrase, so the
    passphrase must be typeable at age's prompt: bytes as typed, no line
    break. Raises :class:`ValueError` if the passphrase is empty or holds a
    line break, if ``work_factor`` is not from 1 to ``MAX_WORK_FACTOR`` (a
    higher one would write a file :func:`decrypt` refuses), or if the
    plaintext is larger than ``MAX_PLAINTEXT_BYTES``.
    """
    _check_passphrase(passphrase)
    if b"\n" in passphrase or b"\r" in passphrase:
        raise ValueError("passphrase must not hold a line break: age could not read it back")
    _check_work_factor(work_factor, "work_factor", MAX_WORK_FACTOR)
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise ValueError(
            f"plaintext is {len(plaintext)} bytes, more than the {MAX_PLAINTEXT_BYTES} "
            "an escrow file holds"
        )
    return _encrypt_with(
        bytes(plaintext),
        passphrase,
        work_factor=work_factor,
        file_key=os.urandom(FILE_KEY_BYTES),
        salt=os.urandom(SALT_BYTES),
        nonce=os.urandom(PAYLOAD_NONCE_BYTES),
    )


def _encrypt_with(
    plaintext: bytes,
    passphrase: bytes,
    *,
    work_factor: int,
    file_key: bytes,
    salt: bytes,
    nonce: bytes,
) -> bytes:
    """:func:`encrypt` with its randomness given, for known-answer tests. Checks nothing."""
    wrapped_key = ChaCha20Poly1305(_wrap_key(passphrase, salt, work_factor)).encrypt(
        _ZERO_NONCE, file_key, None
    )
    stanza = b"-> scrypt " + _b64encode(salt) + b" %d\n" % work_factor + _wrapped(wrapped_key)
    mac_input = VERSION_LINE + stanza + _MAC_PREFIX
    mac = _header_mac(file_key, mac_input)
    return mac_input + b" " + _b64encode(mac) + b"\n" + _seal_payload(file_key, nonce, plaintext)


def decrypt(data: bytes, passphrase: bytes, *, max_work_factor: int = MAX_WORK_FACTOR) -> bytes:
    """The plaintext of the age v1 file ``data``, sealed under ``passphrase`` alone.

    Reads files written by :func:`encrypt` and by ``age -p`` alike. The header
    is parsed and checked in full, and the work factor checked against
    ``max_work_factor``, before scrypt runs; the header MAC is checked before
    any of the payload is opened, and the payload must authenticate to its
    final chunk and end there. Every failure raises one
    :class:`~farmkeys.errors.EscrowError` (see the module docstring). Raises
    :class:`ValueError` if the passphrase is empty or ``max_work_factor`` is
    not from 1 to ``WORK_FACTOR_LIMIT``.
    """
    _check_passphrase(passphrase)
    _check_work_factor(max_work_factor, "max_work_factor", WORK_FACTOR_LIMIT)
    data = bytes(data)
    if len(data) > MAX_FILE_BYTES:
        raise EscrowError(
            f"the escrow file is {len(data)} bytes, more than the {MAX_FILE_BYTES} "
            "an escrow file can be",
            "give the escrow file farmkeys wrote, not another file",
        )
    header = _parse_header(data)
    salt, work_factor, wrapped_key = _scrypt_stanza(header, max_work_factor)
    try:
        file_key = ChaCha20Poly1305(_wrap_key(passphrase, salt, work_factor)).decrypt(
            _ZERO_NONCE, wrapped_key, None
        )
    except InvalidTag:
        raise _wrong_passphrase() from None
    if not hmac.compare_digest(_header_mac(file_key, header.mac_input), header.mac):
        raise EscrowError(
            "the escrow file is damaged or has been tampered with: "
            "its header does not match its MAC",
            _OTHER_COPY_TODO,
        )
    return _open_payload(file_key, data[header.payload_at :])
