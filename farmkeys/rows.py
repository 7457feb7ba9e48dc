"""What the pure modules read of a certificate row, as protocols (``db.CertificateRow``
has all of it). Apart from :mod:`farmkeys.policy` so that the farm state record
(:mod:`farmkeys.farmstate`), which a sync checks, does not load the rollover policy.
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
