"""The farm's words, each defined once: a certificate's purpose and role, a master key's
stage, the audit log's actions, the key types a certificate may have and the directory
layouts.

Each is a :class:`~enum.StrEnum`, so a member *is* its string: ``Purpose.SIGNING ==
"signing"``, ``f"{Role.PRIMARY}"`` is ``"primary"``, and the config DB's text columns,
the JSON documents and the store's folder names hold exactly the values they always
held. The tuples beside them (``PURPOSES``, ``LIVE_ROLES``, …) hold the plain strings
in their canonical order, for membership tests and for messages that list them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Purpose(StrEnum):
    """What a certificate is for (AD FS's token-signing and token-decryption)."""

    SIGNING = "signing"
    DECRYPTION = "decryption"


PURPOSES: Final[tuple[str, ...]] = tuple(p.value for p in Purpose)

ALL_PURPOSES: Final = "all"
"""A request's purpose that means both: ``rollover --purpose all``."""

REQUEST_PURPOSES: Final[tuple[str, ...]] = (*PURPOSES, ALL_PURPOSES)


class Role(StrEnum):
    """Where a certificate stands in its rollover: the primary signs (or decrypts), the
    secondary is published ahead of its promotion, the retired one is kept published
    (and installed) for a while after it, an archived one is kept only in the config DB."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    RETIRED = "retired"
    ARCHIVED = "archived"


ROLES: Final[tuple[str, ...]] = tuple(r.value for r in Role)
LIVE_ROLES: Final[tuple[str, ...]] = ROLES[:3]
"""The roles a node installs: the live set."""
ALIASED_ROLES: Final[tuple[str, ...]] = ROLES[:2]
"""The roles the store names by role (``signing/primary.pem``) as well as by thumbprint."""


class MasterKeyStage(StrEnum):
    """A master key's place in its lifecycle, as the ``master_key`` table records it."""

    PENDING = "pending"
    CURRENT = "current"
    PREVIOUS = "previous"
    DELETED = "deleted"


MASTER_KEY_STAGES: Final[tuple[str, ...]] = tuple(s.value for s in MasterKeyStage)


class AuditAction(StrEnum):
    """The ``action`` of an ``audit_event`` row: what was done, by whom the row says."""

    INIT = "init"
    LEAD = "lead"
    GENERATE = "generate"
    GENERATE_AND_PROMOTE = "generate_and_promote"
    PROMOTE = "promote"
    RETIRE = "retire"
    ARCHIVE = "archive"
    REVERT = "revert"  # `rollover --revert`: the last promotion undone (one event per row)
    RELEASE = "release"  # a plain `rollover` lifted the hold a revert put on promotion
    IMPORT = "import"
    STATE_ADOPT = "state_adopt"
    STATE_REPAIR = "state_repair"
    REQUEST_REFUSED = "request_refused"
    ESCROW_EXPORT = "escrow_export"
    ESCROW_IMPORT = "escrow_import"
    MASTER_KEY_ADOPT = "master_key_adopt"
    MASTER_KEY_ADD = "master_key_add"
    MASTER_KEY_ROLL = "master_key_roll"
    MASTER_KEY_POLICY = "master_key_policy"
    MASTER_KEY_RESEAL = "master_key_reseal"
    MASTER_KEY_DELETE = "master_key_delete"
    NODE_REMOVE = "node_remove"


class KeyType(StrEnum):
    """The key of a generated certificate (``[policy] key``, ``decryption_key``)."""

    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    EC_P256 = "ec-p256"


KEY_TYPES: Final[tuple[str, ...]] = tuple(k.value for k in KeyType)
RSA_KEY_TYPES: Final[tuple[str, ...]] = KEY_TYPES[:3]
"""The key types a token-decryption certificate may have: relying parties encrypt to RSA."""


class LayoutName(StrEnum):
    """Where the farm's DKM container lives in the directory (``[directory] layout``)."""

    OPENLDAP = "openldap"
    AD = "ad"


LAYOUT_NAMES: Final[tuple[str, ...]] = tuple(n.value for n in LayoutName)
