"""What differs between the directory layouts (object classes and attribute names), and
the tree they share.

Both layouts have the same tree, AD FS's DKM container::

    <directory.container>           the DKM parent, made and delegated by the directory admin
    └── cn=<group guid>             one farm's DKM container
        ├── cn=<key guid>           one master key: l = its id, <key attribute> = its 32 bytes
        └── cn=CryptoPolicy         displayName = the id of the current key

A key is found by its ``l`` value, never by its name, so a container that AD
FS made (whose contacts may be named otherwise) reads the same way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Layout:
    """One directory layout."""

    name: str
    container_classes: tuple[str, ...]
    key_classes: tuple[str, ...]
    key_attribute: str
    created_attribute: str
    key_extra: dict[str, Any] = field(default_factory=dict)
    policy_extra: dict[str, Any] = field(default_factory=dict)
    requires_tls: bool = False
    protects_container: bool = False
    """Whether ``init`` sets the farm container's security descriptor itself (AD)."""

    @property
    def key_class(self) -> str:
        """The structural class a key and CryptoPolicy entry are searched by."""
        return self.key_classes[-1]


KEY_ID_ATTRIBUTE = "l"
POLICY_CN = "CryptoPolicy"
POLICY_ATTRIBUTE = "displayName"
KEY_SURNAME = "farmkeys master key"


def container_dn(parent: str, group: uuid.UUID) -> str:
    """The DN of the DKM container of ``group`` under the DKM parent ``parent``."""
    return f"cn={group},{parent}"


def key_dn(parent: str, group: uuid.UUID, key_id: uuid.UUID) -> str:
    """The DN farmkeys gives the entry of master key ``key_id`` (found by its ``l``)."""
    return f"cn={key_id},{container_dn(parent, group)}"


def policy_dn(parent: str, group: uuid.UUID) -> str:
    """The DN of ``group``'s CryptoPolicy entry."""
    return f"cn={POLICY_CN},{container_dn(parent, group)}"
