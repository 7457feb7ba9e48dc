"""The MAC keys of the records farmkeys authenticates under a master key.

The farm state record (:mod:`farmkeys.formats.farm_state`), an operator request
(:mod:`farmkeys.formats.request`) and a relying-party fetch record
(:mod:`farmkeys.formats.fetch_record`) each carry an HMAC-SHA256 under a key derived from
a master key: HKDF-SHA256, no salt, and as info the record kind's own label followed by
the 16 bytes of the farm's DKM group. So no two kinds of record share a key, none is a
blob's key (:data:`farmkeys.formats.blob.HKDF_INFO`), and none carries to another farm.

Private to :mod:`farmkeys.formats`.
"""

from __future__ import annotations

import uuid


def derive_key(master_key: bytes, *, label: bytes, farm: uuid.UUID, length: int) -> bytes:
    """The ``length``-byte MAC key of the record kind ``label`` in ``farm``."""
    # Imported here: a sync that finds nothing new checks no MAC and loads no cryptography.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=label + farm.bytes
    ).derive(master_key)
