"""The config DB's rows as typed values: what the queries of :mod:`farmkeys.db` return.

A row read from the config DB is not trusted for being here: the config DB is
attacker-writable (docs/security.md), so the leader and the nodes act only on what a
row's MAC under a master key vouches for (the farm state record, a request, a fetch
record). These types say what a row holds, never that it is true.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class Farm:
    name: str
    dkm_group: uuid.UUID
    dkm_container: str
    schema_version: int


@dataclass(frozen=True)
class NewCertificate:
    """A certificate row about to be inserted."""

    id: uuid.UUID
    purpose: str
    role: str
    thumbprint: str
    sha256: str
    subject: str
    key_type: str
    not_before: datetime
    not_after: datetime
    der: bytes
    master_key: uuid.UUID
    blob: bytes


@dataclass(frozen=True)
class CertificateRow(NewCertificate):
    """A certificate row as stored, with the times the database keeps."""

    created_at: datetime
    role_since: datetime

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.purpose, self.role, self.thumbprint)


@dataclass(frozen=True)
class NodeRow:
    id: str
    last_sync: datetime | None
    last_seen: datetime
    generation: int | None
    installed: tuple[tuple[str, str, str], ...]
    last_error: str | None
    heartbeat_at: datetime | None = None
    directory_error: str | None = None
    hook_error: str | None = None
    master_keys: tuple[uuid.UUID, ...] = ()
    directory_server: str | None = None
    state_version: int | None = None


@dataclass(frozen=True)
class MasterKeyRow:
    """What the config DB records about one master key: never its bytes."""

    id: uuid.UUID
    stage: str  # a MasterKeyStage: pending, current, previous, deleted (the column `state`)
    created_at: datetime
    current_since: datetime | None
    replaced_at: datetime | None
    unused_since: datetime | None
    delete_now: bool
    deleted_at: datetime | None
    urgent: bool
    request: int | None
    reason: str


@dataclass(frozen=True)
class StoredState:
    """The farm state record as the config DB holds it: not trusted until verified
    (:func:`farmkeys.formats.farm_state.verify`)."""

    body: bytes
    mac: bytes
    version: int


@dataclass(frozen=True)
class FetchRow:
    """A relying party was served ``thumbprint`` among its signing keys (publish.py)."""

    relying_party: str
    thumbprint: str
    first_fetched_at: datetime
    last_fetched_at: datetime
    node: str
    document: str
    mac: bytes | None = None  # by the node that served it (farmkeys.fetch_record)
    mac_key: uuid.UUID | None = None


@dataclass(frozen=True)
class LiveSet:
    """What a sync reads in one round trip: the farm, its live rows, the farm state record,
    and what this node last proved it can open.

    A row whose ``blob`` is empty had it withheld: the node holds that certificate intact
    and has opened a blob under its master key before. ``recorded``: the node's claim
    matched the live set and its own row, and the read recorded the sync
    (:meth:`farmkeys.db.ConfigDB.live_set`)."""

    farm: Farm
    rows: list[CertificateRow]
    confirmed_keys: frozenset[uuid.UUID]
    state: StoredState | None = None
    recorded: bool = False
    # The generation this node's row says it last installed (unauthenticated: a warning at
    # most, never an input to what is installed).
    node_generation: int | None = None
    node_revoked: frozenset[str] = frozenset()  # the revocations its row says it remembers


@dataclass(frozen=True)
class Claim:
    """What a node's store holds, sent with the read of the live set: when the live set
    is still exactly this, the same statement records the sync."""

    generation: int
    installed: frozenset[tuple[str, str, str]]
    state_version: int | None


@dataclass(frozen=True)
class RequestRow:
    """A pending ``rollover_request`` row as the leader reads it: what its columns claim
    and the signed body and MAC that alone are acted on (:mod:`farmkeys.formats.request`)."""

    id: int
    requested_by: str
    purpose: str | None
    urgent: bool
    master_key: bool
    repair_state: bool
    import_certificate: uuid.UUID | None
    import_blob: bytes | None
    import_role: str | None
    import_source: str | None
    body: bytes | None
    mac: bytes | None
    account: str | None = None  # who the row claims asked: copies of the body's, or forged
    host: str | None = None
    reason: str | None = None
    revert: bool = False  # `rollover --revert` (migration 11)


@dataclass(frozen=True)
class RequestAnswer:
    """A request's answer as its row holds it; ``done_at`` None while it waits."""

    done_at: datetime | None
    done_by: str | None
    term: int | None
    ok: bool | None
    result: str | None


@dataclass(frozen=True)
class Lease:
    """The lease row as the config DB sees it now."""

    holder: str | None
    holder_node: str | None
    term: int
    acquired_at: datetime | None
    expires_at: datetime | None
    valid: bool  # held, and not yet expired by the database's clock
    now: datetime


@dataclass(frozen=True)
class FenceCheck:
    """The lease row as a fenced transaction reads it once it holds the row's lock."""

    holder: str | None
    term: int
    valid: bool  # not yet expired by the clock as it reads once the lock is held
    now: datetime  # the transaction's clock: every time the write stamps


@dataclass(frozen=True)
class KeyUse:
    """How many certificates a master key seals, live and archived."""

    live: int
    archived: int


@dataclass(frozen=True)
class AuditEvent:
    """One row of the audit log: what was done, when, by which node under which term
    (``term`` None for `init`, which runs before any lease). A report, never an input."""

    id: int
    at: datetime
    node: str
    term: int | None
    action: str
    purpose: str | None
    certificate: uuid.UUID | None
    thumbprint: str | None
    master_key: uuid.UUID | None
    detail: str
    request: int | None = None  # the request it carried out (None: not asked for)
    account: str | None = None  # who asked, as the request's verified body says
    host: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Attribution:
    """Who asked for what the leader is doing: an authenticated request's id and its
    verified requester (``account`` and ``host`` None: a format-1 body, not recorded)."""

    request: int
    account: str | None
    host: str | None
    reason: str | None

    def columns(self) -> tuple[int, str | None, str | None, str | None]:
        """The values of ``audit_event``'s request, account, host and reason columns."""
        return (self.request, self.account, self.host, self.reason)


def farm_row(row: dict[str, Any]) -> Farm:
    return Farm(
        name=row["name"],
        dkm_group=row["dkm_group"],
        dkm_container=row["dkm_container"],
        schema_version=row["schema_version"] or 0,
    )


def stored_state_row(row: dict[str, Any]) -> StoredState | None:
    if row.get("state_body") is None:
        return None
    return StoredState(
        body=bytes(row["state_body"]), mac=bytes(row["state_mac"]), version=row["state_version"]
    )


def _bytes(value: Any) -> bytes | None:  # noqa: ANN401 - a bytea column: bytes, memoryview or NULL
    return None if value is None else bytes(value)


def request_row(row: dict[str, Any]) -> RequestRow:
    return RequestRow(
        id=row["id"],
        requested_by=row["requested_by"],
        purpose=row["purpose"],
        urgent=bool(row["urgent"]),
        master_key=bool(row["master_key"]),
        repair_state=bool(row["repair_state"]),
        revert=bool(row.get("revert", False)),
        import_certificate=row["import_certificate"],
        import_blob=_bytes(row["import_blob"]),
        import_role=row["import_role"],
        import_source=row["import_source"],
        body=_bytes(row["body"]),
        mac=_bytes(row["mac"]),
        account=row["account"],
        host=row["host"],
        reason=row["reason"],
    )


def master_key_row(row: dict[str, Any]) -> MasterKeyRow:
    values = dict(row)
    values["stage"] = values.pop("state")
    return MasterKeyRow(**values)


def audit_event_row(row: dict[str, Any]) -> AuditEvent:
    return AuditEvent(**row)


CERTIFICATE_FIELDS = tuple(CertificateRow.__dataclass_fields__)


def certificate_row(row: dict[str, Any]) -> CertificateRow:
    values = {name: row[name] for name in CERTIFICATE_FIELDS}
    values["der"] = bytes(values["der"])
    values["blob"] = b"" if values["blob"] is None else bytes(values["blob"])
    values["thumbprint"] = values["thumbprint"].strip()
    return CertificateRow(**values)


def installed_doc(installed: Collection[tuple[str, str, str]]) -> Jsonb:
    """How the node row records an installed set: sorted objects of purpose, role, thumbprint."""
    return Jsonb([{"purpose": p, "role": r, "thumbprint": t} for p, r, t in sorted(installed)])
