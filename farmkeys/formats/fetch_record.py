"""Relying-party fetch records, authenticated by the node that served the fetch.

With ``policy.require_fetch`` the leader holds a signing secondary's
promotion until every listed relying party has fetched it. The fetch rows live
in the config DB, which is attacker-writable: a forged row would release the
hold early and break a relying party that never saw the new key. So the node
that served the fetch (it holds the farm's master keys in memory) marks each
row with an HMAC-SHA256 over the farm, the relying party and the thumbprint,
under a key derived from a master key with HKDF-SHA256 and a label of its own
(:data:`MAC_INFO`); the leader counts only rows whose MAC verifies. A row
without one (the node could not read a master key) only delays a promotion.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

from farmkeys.formats import _mac

MAC_INFO = b"farmkeys relying-party fetch MAC v1\x00"
MAC_SIZE = 32


def mac_key(master_key: bytes, farm: uuid.UUID) -> bytes:
    """The fetch MAC key: HKDF-SHA256 of a master key under the fetch records' own label,
    bound to the farm's DKM group."""
    return _mac.derive_key(master_key, label=MAC_INFO, farm=farm, length=MAC_SIZE)


def _message(farm: uuid.UUID, relying_party: str, thumbprint: str) -> bytes:
    # Relying-party names are [A-Za-z0-9._-] and thumbprints hex (the table checks both),
    # so a newline cannot occur in either and the message is unambiguous.
    return f"{farm}\n{relying_party}\n{thumbprint}".encode("ascii", "backslashreplace")


def sign(key: bytes, *, farm: uuid.UUID, relying_party: str, thumbprint: str) -> bytes:
    """The MAC of one fetch record, ``key`` being :func:`mac_key`'s."""
    return hmac.new(key, _message(farm, relying_party, thumbprint), hashlib.sha256).digest()


def verify(
    key: bytes, mac: bytes | None, *, farm: uuid.UUID, relying_party: str, thumbprint: str
) -> bool:
    """Whether ``mac`` authenticates the record."""
    if mac is None:
        return False
    expected = sign(key, farm=farm, relying_party=relying_party, thumbprint=thumbprint)
    return hmac.compare_digest(expected, bytes(mac))
