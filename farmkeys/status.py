"""The farm at a glance: the document `farmkeys status` prints and monitoring reads.

Reads the config DB and the directory's key list, never key material.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from farmkeys import certs
from farmkeys import policy as rollover_policy
from farmkeys.config import Config, PolicyConfig
from farmkeys.configdb import CertificateRow, ConfigDB
from farmkeys.directory import Directory, MasterKeyInfo
from farmkeys.errors import (
    DirectoryError,
)
from farmkeys.sync import LIVE_ROLES

log = logging.getLogger(__name__)


# -- status ----------------------------------------------------------------------------

HEALTH_ORDER = ("ok", "warning", "critical")


@dataclass
class _Problems:
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, level: str, text: str) -> None:
        self.items.append((level, text))

    @property
    def health(self) -> str:
        return max((lvl for lvl, _ in self.items), key=HEALTH_ORDER.index, default="ok")


def farm_status(
    config: Config, db: ConfigDB, directory: Directory | None, *, now: datetime
) -> dict[str, Any]:
    """The farm at a glance, as the JSON document `farmkeys status --json` prints.

    Reads the config DB (raising if it cannot) and the directory's key list
    (never key material; a directory failure becomes a problem, not an error).
    """
    farm = db.require_farm()
    rows = db.certificates()
    nodes = db.nodes()
    problems = _Problems()
    policy = config.policy
    live = [r for r in rows if r.role in LIVE_ROLES]
    live_set = frozenset(r.identity for r in live)

    for purpose in certs.PURPOSES:
        primary = next((r for r in live if r.purpose == purpose and r.role == "primary"), None)
        secondary = next((r for r in live if r.purpose == purpose and r.role == "secondary"), None)
        if primary is None:
            problems.add("critical", f"there is no primary {purpose} certificate")
            continue
        left = primary.not_after - now
        if left <= timedelta(0):
            problems.add(
                "critical", f"the primary {purpose} certificate {primary.thumbprint} has expired"
            )
        elif left <= policy.units(policy.critical_threshold):
            problems.add(
                "critical",
                f"the primary {purpose} certificate {primary.thumbprint} expires in"
                f" {_human(left)}, inside the critical threshold",
            )
        elif left <= policy.units(policy.generation_threshold) and secondary is None:
            problems.add(
                "warning",
                f"the primary {purpose} certificate {primary.thumbprint} expires in"
                f" {_human(left)} and has no secondary yet",
            )

    master_keys: list[dict[str, Any]]
    if directory is None:
        master_keys = _keys_named_by(live)
    else:
        try:
            infos = directory.list_keys(farm.dkm_group)
        except DirectoryError as exc:
            problems.add("warning", f"cannot list master keys: {exc.what}")
            master_keys = _keys_named_by(live)
        else:
            master_keys = [_key_json(k) for k in infos]
            present = {k.id for k in infos}
            for key_id in sorted({r.master_key for r in live} - present, key=str):
                problems.add(
                    "critical",
                    f"master key {key_id}, which live certificates need, is missing from"
                    " the directory",
                )

    lease = _lease(db)
    if lease is None or not lease["valid"]:
        problems.add("warning", "no node holds the leader lease; is `farmkeys serve` running?")

    if not nodes:
        problems.add("warning", "no node has synced yet; run `farmkeys sync` on each node")
    silent_after = timedelta(seconds=3 * config.lease.ttl_seconds)
    node_docs = []
    for n in nodes:
        in_sync = frozenset(n.installed) == live_set
        if not in_sync:
            problems.add("warning", f"node {n.id} has not installed the live certificate set")
        if n.last_error:
            problems.add("warning", f"node {n.id}'s last sync failed: {n.last_error}")
        db_now = lease["now"] if lease is not None else now
        if n.heartbeat_at is not None and db_now - n.heartbeat_at > silent_after:
            problems.add(
                "warning",
                f"node {n.id} has not been heard from since {n.heartbeat_at.isoformat()}",
            )
        if n.directory_error and n.heartbeat_at is not None:
            problems.add("warning", f"node {n.id} cannot reach the directory: {n.directory_error}")
        if n.hook_error:
            problems.add("warning", f"node {n.id}'s on_change hook failed: {n.hook_error}")
        node_docs.append(
            {
                "id": n.id,
                "last_sync": _iso(n.last_sync),
                "last_seen": _iso(n.last_seen),
                "generation": n.generation,
                "installed": [t for _, _, t in sorted(n.installed)],
                "in_sync": in_sync,
                "last_error": n.last_error,
                "heartbeat_at": _iso(n.heartbeat_at),
                "directory_error": n.directory_error,
                "hook_error": n.hook_error,
            }
        )

    return {
        "farm": {
            "name": farm.name,
            "dkm_group": str(farm.dkm_group),
            "dkm_container": farm.dkm_container,
            "schema_version": farm.schema_version,
        },
        "health": problems.health,
        "problems": [text for _, text in problems.items],
        "leader": _leader_json(lease),
        "certificates": [_certificate_json(r, _next(policy, now, live, r)) for r in rows],
        "master_keys": master_keys,
        "nodes": node_docs,
        "checked_at": _iso(now),
    }


def _lease(db: ConfigDB) -> dict[str, Any] | None:
    rows = db.fetch(
        "SELECT holder_node, term, expires_at, now() AS now,"
        " holder IS NOT NULL AND expires_at > now() AS valid FROM leader_lease"
    )
    return rows[0] if rows else None


def _leader_json(lease: dict[str, Any] | None) -> dict[str, Any] | None:
    if lease is None or not lease["valid"]:
        return None
    return {
        "node": lease["holder_node"],
        "term": lease["term"],
        "expires_at": _iso(lease["expires_at"]),
    }


def _next(
    policy: PolicyConfig, now: datetime, live: Sequence[CertificateRow], row: CertificateRow
) -> dict[str, Any] | None:
    if row.role not in LIVE_ROLES:
        return None
    scheduled = rollover_policy.next_action(policy, now, live, row.id)
    return None if scheduled is None else {"action": scheduled.action, "at": _iso(scheduled.at)}


def _certificate_json(row: CertificateRow, next_action: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "purpose": row.purpose,
        "role": row.role,
        "thumbprint": row.thumbprint,
        "sha256": row.sha256,
        "subject": row.subject,
        "key_type": row.key_type,
        "not_before": _iso(row.not_before),
        "not_after": _iso(row.not_after),
        "master_key": str(row.master_key),
        "created_at": _iso(row.created_at),
        "next_action": next_action,
    }


def _key_json(info: MasterKeyInfo) -> dict[str, Any]:
    return {"id": str(info.id), "created_at": _iso(info.created_at), "current": info.current}


def _keys_named_by(rows: Sequence[CertificateRow]) -> list[dict[str, Any]]:
    ids = sorted({r.master_key for r in rows}, key=str)
    return [{"id": str(k), "created_at": None, "current": None} for k in ids]


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    if seconds >= 120:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"
