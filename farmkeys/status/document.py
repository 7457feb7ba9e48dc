"""The status document as typed values, and the one JSON form `status --json` prints.

Every part is a frozen dataclass with a ``to_json()`` that gives the keys in the
order the document has always had them; times are ISO 8601 there, ids text. The
nodes are the exception on the way in: the config DB builds their documents in one
statement (a farm of a thousand nodes), so a :class:`NodeStatus` keeps the times as
the server wrote them. Everything here may quote the config DB, which is
attacker-writable: whoever prints it as text escapes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

Health = Literal["ok", "warning", "critical"]
HEALTH_ORDER: tuple[Health, ...] = ("ok", "warning", "critical")


def iso(when: datetime | None) -> str | None:
    """A time as the document writes it: ISO 8601, or None."""
    return None if when is None else when.isoformat()


@dataclass(frozen=True)
class FarmInfo:
    name: str
    dkm_group: uuid.UUID
    dkm_container: str
    schema_version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dkm_group": str(self.dkm_group),
            "dkm_container": self.dkm_container,
            "schema_version": self.schema_version,
        }


@dataclass(frozen=True)
class LeaderInfo:
    """Who holds a valid leader lease."""

    node: str | None
    term: int
    expires_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "term": self.term, "expires_at": iso(self.expires_at)}


@dataclass(frozen=True)
class NextAction:
    """The next thing that happens to a certificate: a rollover step, ``reseal`` or ``shred``."""

    action: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "at": iso(self.at)}


@dataclass(frozen=True)
class CertificateStatus:
    """A certificate row as status shows it: never its private key's blob."""

    id: uuid.UUID
    purpose: str
    role: str
    thumbprint: str
    sha256: str
    subject: str
    key_type: str
    not_before: datetime
    not_after: datetime
    master_key: uuid.UUID
    created_at: datetime
    next_action: NextAction | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "purpose": self.purpose,
            "role": self.role,
            "thumbprint": self.thumbprint,
            "sha256": self.sha256,
            "subject": self.subject,
            "key_type": self.key_type,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "master_key": str(self.master_key),
            "created_at": iso(self.created_at),
            "next_action": None if self.next_action is None else self.next_action.to_json(),
        }


@dataclass(frozen=True)
class MasterKeyStatus:
    """A master key the farm recorded or the directory holds (``state`` ``unrecorded``:
    only the directory); ``in_directory`` None when the directory could not be listed."""

    id: uuid.UUID
    created_at: datetime | None
    current: bool
    state: str
    in_directory: bool | None
    sealed_live: int
    sealed_archived: int
    roll_at: datetime | None
    delete_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "created_at": iso(self.created_at),
            "current": self.current,
            "state": self.state,
            "in_directory": self.in_directory,
            "sealed_live": self.sealed_live,
            "sealed_archived": self.sealed_archived,
            "roll_at": iso(self.roll_at),
            "delete_at": iso(self.delete_at),
        }


@dataclass(frozen=True)
class FarmStateStatus:
    """The farm state record: its version, the key its MAC is under, and whether it is
    authentic and matches the live rows (None: it could not be checked)."""

    version: int | None = None
    master_key: uuid.UUID | None = None
    authentic: bool | None = None
    holds: tuple[PromotionHold, ...] = ()  # what a record that is not refuted says

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "master_key": None if self.master_key is None else str(self.master_key),
            "authentic": self.authentic,
            "promotion_held": [h.to_json() for h in self.holds],
        }


@dataclass(frozen=True)
class PromotionHold:
    """A revert's hold on one purpose's promotion, as the farm state record keeps it:
    the held secondary, since when, and when the critical threshold ends it."""

    purpose: str
    secondary: uuid.UUID
    since: datetime
    until: datetime | None  # the primary's critical threshold; None without a primary

    def to_json(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose,
            "secondary": str(self.secondary),
            "since": iso(self.since),
            "until": iso(self.until),
        }


@dataclass(frozen=True)
class NodeStatus:
    """A node's row as the config DB wrote its document: times are its ISO 8601 text,
    ``installed`` the thumbprints by purpose and role, ``master_keys`` ids as text."""

    id: str
    last_sync: str | None
    last_seen: str | None
    generation: int | None
    installed: tuple[str, ...]
    in_sync: bool
    last_error: str | None
    heartbeat_at: str | None
    directory_error: str | None
    directory_server: str | None
    hook_error: str | None
    master_keys: tuple[str, ...]
    state_version: int | None
    stopped_at: str | None = None  # its serve stopped cleanly then, and has not run since
    version: str | None = None  # the farmkeys it last reported running

    @property
    def serving(self) -> str:
        """``serving``, ``stopped`` (cleanly), or ``never`` (it has only ever synced)."""
        if self.heartbeat_at is not None:
            return "serving"
        return "stopped" if self.stopped_at is not None else "never"

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> NodeStatus:
        """From one of :meth:`farmkeys.db.ConfigDB.node_documents` (its ``silent`` aside)."""
        return cls(
            id=doc["id"],
            last_sync=doc["last_sync"],
            last_seen=doc["last_seen"],
            generation=doc["generation"],
            installed=tuple(doc["installed"]),
            in_sync=doc["in_sync"],
            last_error=doc["last_error"],
            heartbeat_at=doc["heartbeat_at"],
            directory_error=doc["directory_error"],
            directory_server=doc["directory_server"],
            hook_error=doc["hook_error"],
            master_keys=tuple(doc["master_keys"]),
            state_version=doc["state_version"],
            stopped_at=doc.get("stopped_at"),
            version=doc.get("version"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "last_sync": self.last_sync,
            "last_seen": self.last_seen,
            "generation": self.generation,
            "installed": list(self.installed),
            "in_sync": self.in_sync,
            "last_error": self.last_error,
            "heartbeat_at": self.heartbeat_at,
            "directory_error": self.directory_error,
            "directory_server": self.directory_server,
            "hook_error": self.hook_error,
            "master_keys": list(self.master_keys),
            "state_version": self.state_version,
            "serving": self.serving,
            "stopped_at": self.stopped_at,
            "version": self.version,
        }


@dataclass(frozen=True)
class RelyingPartyStatus:
    """A relying party of ``[publish]``: its last fetch, the live signing certificates it
    fetched, and whether one was the signing secondary (None: there is none)."""

    name: str
    url: str | None
    last_fetch_at: datetime | None
    last_node: str | None
    fetched: tuple[str, ...]
    has_secondary: bool | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "last_fetch_at": iso(self.last_fetch_at),
            "last_node": self.last_node,
            "fetched": list(self.fetched),
            "has_secondary": self.has_secondary,
        }


@dataclass(frozen=True)
class FarmStatus:
    """The farm at a glance: what `farmkeys status` prints and monitoring reads."""

    farm: FarmInfo
    health: Health
    problems: tuple[str, ...]
    leader: LeaderInfo | None
    certificates: tuple[CertificateStatus, ...]
    master_keys: tuple[MasterKeyStatus, ...]
    farm_state: FarmStateStatus
    nodes: tuple[NodeStatus, ...]
    relying_parties: tuple[RelyingPartyStatus, ...]
    checked_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The document `farmkeys status --json` prints, its keys in their documented order."""
        return {
            "farm": self.farm.to_json(),
            "health": self.health,
            "problems": list(self.problems),
            "leader": None if self.leader is None else self.leader.to_json(),
            "certificates": [c.to_json() for c in self.certificates],
            "master_keys": [k.to_json() for k in self.master_keys],
            "farm_state": self.farm_state.to_json(),
            "nodes": [n.to_json() for n in self.nodes],
            "relying_parties": [rp.to_json() for rp in self.relying_parties],
            "checked_at": iso(self.checked_at),
        }
