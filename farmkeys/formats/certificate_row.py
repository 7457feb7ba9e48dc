"""What the pure modules read of a certificate row, as protocols (``db.CertificateRow``
has all of it): the farm state record (:mod:`farmkeys.formats.farm_state`) names rows by
them and the rollover policy (:mod:`farmkeys.policy`) decides on them. A module of its own,
at the bottom with the codecs, so that neither loads the other: a sync checks the record
without loading the policy, and the policy needs nothing of the record.
"""

from __future__ import annotations

import uuid
from typing import Protocol

__all__ = ["Published", "Row"]


class Row(Protocol):
    """A certificate row's identity and place (``db.CertificateRow`` has it)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def purpose(self) -> str: ...
    @property
    def role(self) -> str: ...


class Published(Row, Protocol):
    """A certificate row with the thumbprint relying parties are served."""

    @property
    def thumbprint(self) -> str: ...
